"""Writing outputs (`magtkd.artifacts`; docs/METHOD.md §6): atomic copies, failed writes (disk full,
read-only folder) as one line, and the output lock."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import remount_read_only, tmpfs
from magtkd import artifacts
from magtkd.artifacts import output_lock, WriteError


def test_copy_file_is_atomic_and_streams(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * (3 << 20))
    artifacts.copy_file(src, tmp_path / "out" / "b.bin")
    assert (tmp_path / "out" / "b.bin").read_bytes() == src.read_bytes()
    assert not list((tmp_path / "out").glob(".*"))
    shutil.rmtree(tmp_path / "out")


def test_disk_full_during_torch_save_is_one_line_and_leaves_no_temp(tmp_path):
    with tmpfs(tmp_path / "small") as folder:
        (folder / "text.bin").write_bytes(b"previous")
        with pytest.raises(WriteError, match=r"cannot write .*text.bin: No space left on device"):
            artifacts.save_state_dict(folder / "text.bin", torch.nn.Linear(200, 200))
        assert sorted(os.listdir(folder)) == ["text.bin"]
        assert (folder / "text.bin").read_bytes() == b"previous"


def test_disk_full_during_a_text_write_is_one_line(tmp_path):
    with tmpfs(tmp_path / "small") as folder:
        with pytest.raises(WriteError, match=r"cannot write .*big.json: No space left on device"):
            artifacts.write_json(folder / "big.json", {"x": "y" * 200_000})
        assert os.listdir(folder) == []


def test_read_only_folder_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro") as folder:
        remount_read_only(folder)
        with pytest.raises(WriteError, match=r"cannot write .*a.json: Read-only file system \(the folder .* is not "
                                             r"writable"):
            artifacts.write_json(folder / "a.json", {})


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".multimodal_fusion.lock"
    lock.write_text(f"{dead.pid}\n")
    caplog.set_level(logging.WARNING, logger="magtkd")
    with output_lock(tmp_path, "multimodal_fusion") as held:
        assert held.read_text().strip() == str(os.getpid())
    assert f"taking over the stale lock {lock} of PID {dead.pid}" in caplog.text
    assert not lock.exists()
