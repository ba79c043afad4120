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
