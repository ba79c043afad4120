"""Past one machine (README, "Several machines"): a stage run as two nodes, each its own torchrun launcher of one
process meeting over 127.0.0.1 (the static rendezvous a real multi-node run uses), trains what one launcher
with two processes trains; global rank 0 (node 0) alone writes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, SUBPROCESS_ENV, text_command

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_simulated_nodes_train_what_two_local_processes_train(generated: Path, small_iemocap: Path,
                                                                  tmp_path: Path) -> None:
    pdir = generated / "pretrained_model"
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    stage = lambda save: text_command(small_iemocap, pdir, save, "--epochs", "1", "--batch_size", "2")  # noqa: E731
    one = subprocess.run([*launcher, "--standalone", "--nproc_per_node", "2", *stage(tmp_path / "one")],
                         env=SUBPROCESS_ENV, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    # Two nodes: the README's command, node_rank 0 and 1, one process each, a shared save folder
    port, shared = free_port(), tmp_path / "shared"
    nodes = [subprocess.Popen([*launcher, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                               "--rdzv_endpoint", f"127.0.0.1:{port}", *stage(shared)],
                              env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=REPO) for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "world_size=2" in logs[0] and "world_size=2" not in logs[1]  # node 1's rank logs warnings only

    def load(folder: Path) -> dict:
        return torch.load(folder / "text.bin", map_location="cpu", weights_only=True)

    ours, theirs = load(shared), load(tmp_path / "one")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
