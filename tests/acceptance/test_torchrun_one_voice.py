"""Under torchrun, one voice (docs/METHOD.md §6): a refusal every process meets is printed once, by rank 0,
and no traceback of ours follows it (torchrun's own report of the failed run stays: a script cannot prevent
it). The fusion run by rank 0 alone is in test_every_stage_under_torchrun.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, SUBPROCESS_ENV

pytestmark = pytest.mark.slow


def test_a_refusal_under_torchrun_is_printed_once(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "IEMOCAP" / "text.py"), "--device", "cpu", "--data_dir", str(tmp_path / "absent"),
               "--save_dir", str(tmp_path / "save")]
    done = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error: " in line and "absent" in line]
    assert errors == [f"error: IEMOCAP data folder {tmp_path / 'absent'} does not exist; it must contain the "
                      "unpacked IEMOCAP release (Session1 ... Session5, each with dialog/avi/DivX, "
                      "dialog/transcriptions, dialog/EmoEvaluation and sentences/wav) and, after `python "
                      "IEMOCAP/preprocessing.py`, IEMOCAP_{train,dev,test}.csv"]
    assert f'File "{REPO}' not in done.stderr and not (tmp_path / "save").exists()
