"""benchmarks/gpu_check.py with --device cpu: the GPU acceptance run is itself tested before any GPU sees it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_gpu_check_passes_on_cpu_at_tiny_sizes(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--keep", str(tmp_path / "work")], capture_output=True, text=True, cwd=REPO,
                          timeout=1500)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert not [line for line in lines if line.startswith("FAIL")]
    passed = {line.split("  ", 1)[1].split(" (")[0] for line in lines if line.startswith("PASS")}
    assert {"pipeline IEMOCAP", "pipeline MELD", "fusion packed = padded", "workers", "bf16 accum+checkpointing",
            "resume KD", "resume fusion", "evaluation-only + predict"} <= passed
    skipped = [line for line in lines if line.startswith("SKIP")]
    assert len(skipped) == 3 and all("GPU" in line for line in skipped)
    assert "| check | result | seconds | note |" in done.stdout and "0 FAIL" in done.stdout


def test_gpu_check_on_a_machine_without_cuda_fails_in_one_line_naming_the_cause(monkeypatch, capsys) -> None:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("FAIL  setup: --device cuda but CUDA is not available")
