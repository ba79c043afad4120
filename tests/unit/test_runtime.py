"""Devices, processes and seeds (`magtkd.runtime`; docs/METHOD.md §6, §7)."""

from __future__ import annotations

import pytest
import torch

from magtkd import runtime, utils
from magtkd.runtime import resolve_device
from magtkd.utils import UserError


def test_default_device_is_cuda_when_available_else_cpu():
    expected = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(None) == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_device_is_a_user_error():
    with pytest.raises(UserError, match=r"--device gpu: not a device name; use cpu, cuda or cuda:N"):
        runtime.resolve_device("gpu")


def test_more_torchrun_processes_than_gpus_is_one_user_error(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(utils.UserError, match=r"more processes per node \(4\) than this machine has GPUs \(2\): "
                                              r"use --nproc_per_node 2"):
        runtime.init_distributed(torch.device("cuda"))


def test_cuda_unavailable_names_the_wheel_and_the_driver(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "gpu_present", lambda: True)
    monkeypatch.setattr(runtime, "driver_version", lambda: None)  # a driver whose version cannot be read
    with pytest.raises(utils.UserError) as err:
        runtime.resolve_device("cuda")
    message = str(err.value)
    assert f"built for CUDA {torch.version.cuda}" in message and "nvidia-smi" in message and "\n" not in message
    monkeypatch.setattr(runtime, "gpu_present", lambda: False)
    with pytest.raises(utils.UserError, match="no NVIDIA driver found"):
        runtime.resolve_device("cuda")


def test_set_seed_as_the_authors(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        runtime.set_seed(2024)
        import os

        assert os.environ["PYTHONHASHSEED"] == "2024"
        assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
        a = torch.rand(2)
        runtime.set_seed(2024, deterministic=False)  # variable-length inputs: no cuDNN tuning per new shape
        assert torch.backends.cudnn.deterministic is False and torch.backends.cudnn.benchmark is False
        assert torch.equal(a, torch.rand(2))
        runtime.set_seed(2024, deterministic=False, fixed_shapes=True)  # the video stage's 8 frames
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def test_largest_numpy_seed_is_accepted():
    from magtkd.runtime import set_seed
    from magtkd.utils import SEED_MAX, seed_int

    set_seed(seed_int(str(SEED_MAX)))


def test_a_driver_this_torch_cannot_use_stops_the_default_device_in_one_line(monkeypatch, tmp_path, capsys) -> None:
    from helpers import script

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "gpu_present", lambda: True)
    monkeypatch.setattr(runtime, "driver_version", lambda: "535.104.05")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    # A stage with the default --device: one line, exit status 2, before any data is read
    with pytest.raises(SystemExit) as stop:
        utils.run(script("IEMOCAP", "text").main, ["--data_dir", str(tmp_path / "missing")])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "driver 535.104.05" in lines[0] and "built for CUDA 13.0" in lines[0]
    assert "--index-url https://download.pytorch.org/whl/cu126" in lines[0] and "--device cpu" in lines[0]
    assert resolve_device("cpu") == torch.device("cpu")  # the CPU chosen deliberately is fine
    # Newer drivers get the newest wheel they run; one older than every wheel: update the driver
    assert runtime.install_command("575.51.03").endswith("/cu128")
    assert runtime.install_command("580.65.06").endswith("/cu130")
    assert runtime.install_command("470.256.02") is None
    monkeypatch.setattr(runtime, "driver_version", lambda: "470.256.02")
    with pytest.raises(runtime.CudaMismatch, match="driver 470.256.02.*update the driver"):
        resolve_device(None)


def test_driver_version_is_read_from_the_kernel_module(monkeypatch, tmp_path) -> None:
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  Release Build  "
                    "(dvs-builder@U16-I3-B03-4-3)  Fri Mar 14 2025\nGCC version:  gcc version 12.3.0\n")
    real_path = runtime.Path
    monkeypatch.setattr(runtime, "Path", lambda p: proc if p == "/proc/driver/nvidia/version" else real_path(p))
    assert runtime.driver_version() == "570.133.20"


def test_torchrun_group_gets_the_timeout_and_is_destroyed_at_exit(monkeypatch) -> None:
    import datetime

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout: seen.update(
        backend=backend, timeout=timeout))
    monkeypatch.setattr(runtime.atexit, "register", lambda fn: seen.update(at_exit=fn))
    monkeypatch.setattr(runtime, "is_main", lambda: True)
    assert runtime.init_distributed(torch.device("cpu"), 45) == torch.device("cpu")
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=45),
                    "at_exit": runtime.destroy_distributed}
    from magtkd import cli
    from IEMOCAP.config import IEMOCAP

    parser = cli.training_parser(IEMOCAP, ".", None, epochs=1, batch_size=4, learning_rate=1e-5)
    assert parser.parse_args([]).dist_timeout == 30.0 and parser.parse_args([]).num_workers is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--dist_timeout", "0"])


def test_loader_workers_default_to_prefetching_on_cuda_only(monkeypatch) -> None:
    assert runtime.loader_workers(None, torch.device("cpu")) == 0
    assert runtime.loader_workers(3, torch.device("cpu")) == 3  # as asked
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.loader_workers(None, torch.device("cuda")) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 2 CPUs per process: one worker beside the main process
    assert runtime.loader_workers(None, torch.device("cuda")) == 1
