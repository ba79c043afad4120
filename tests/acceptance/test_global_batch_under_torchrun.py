"""The global batch under torchrun (CPU, gloo; docs/METHOD.md §2 "The schedule at any global batch", §3 "The
relational batch"): N processes of per-process batch b compute what one process of batch N*b computes.

One worker script runs under ``torchrun --standalone --nproc_per_node N`` for N = 1, 2 and 4 and writes, from
rank 0: the loss (averaged over the ranks) and the gradients (DistributedDataParallel's average) of both
datasets' KD ``objective`` on one global batch of 4 samples, each rank holding its 4/N of them and the teacher's
outputs read by sample index (`magtkd.teacher_cache.TeacherOutputs`); and the ``lr`` of every epoch row of an
`engine.fit` on 40 toy samples at per-process batch 4 (the one-process run also with ``--grad_accum 2``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, SUBPROCESS_ENV

pytestmark = pytest.mark.slow

WORKER = r'''
import functools, importlib, json, sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, sys.argv[2])
from magtkd import engine, loaders, runtime, schedule
from magtkd.artifacts import StageFiles
from magtkd.teacher_cache import TeacherOutputs

out = Path(sys.argv[1])
device = runtime.resolve_device("cpu")  # joins the gloo process group under torchrun
rank, world = runtime.rank(), runtime.world_size()


class Student(torch.nn.Module):
    """A student with the encoders' encode(batch) -> (representation, logits), no dropout."""

    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3)

    def encode(self, batch):
        rep = torch.tanh(self.body(batch["x"]))
        return rep, self.head(rep)


# 1. Both datasets' KD objective on one global batch of 4: this rank's 4 / world rows
g = torch.Generator().manual_seed(0)
x, labels = torch.randn(4, 5, generator=g), torch.tensor([0, 2, 1, 2])
teacher = TeacherOutputs(torch.randn(4, 8, generator=g), torch.randn(4, 3, generator=g))
rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
kd = {}
for dataset in ("IEMOCAP", "MELD"):
    module = importlib.import_module(f"{dataset}.KD")
    torch.manual_seed(0)
    student = Student()
    data = loaders.SampleBatches({}, device)
    data.prepare(student, functools.partial(module.objective, teacher=teacher, tau=2.0, **module.KD_WEIGHTS), 0)
    loss = data.runner({"index": torch.arange(4)[rows], "x": x[rows], "labels": labels[rows]})
    loss.backward()
    mean = loss.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(mean)
    kd[dataset] = {"loss": float(mean) / world, "grads": {k: p.grad.tolist() for k, p in student.named_parameters()}}


# 2. The learning rate at the end of every epoch of a fit on 40 samples, per-process batch 4
class Items(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return i

    def collate(self, items):
        index = torch.tensor(items)
        return {"index": index, "x": self.x[index], "labels": self.y[index]}


def fit_rates(grad_accum):
    torch.manual_seed(0)
    student = Student()
    splits = {split: loaders.make_loader(Items(n, seed), 4, split == "train", 0, seed=1)
              for split, n, seed in (("train", 40, 1), ("dev", 8, 2), ("test", 8, 3))}
    files = StageFiles.first_stage(out / f"save{grad_accum}", "toy")
    config = engine.FitConfig.from_flags({"epochs": 6, "grad_accum": grad_accum}, seed=0, stage="toy", script="toy",
                                         dataset="toy", labels=["a", "b", "c"], files=files, authors_batch=4)
    data = loaders.SampleBatches(splits, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.5)
    doc = engine.fit(student, lambda model, batch: F.cross_entropy(model.encode(batch)[1], batch["labels"]), data,
                     optimizer, schedule.reference_schedule(optimizer, data, config), config)
    return [row["lr"] for row in doc["epochs"]]


rates = {str(a): fit_rates(a) for a in ((1, 2) if world == 1 else (1,))}
if rank == 0:
    (out / "result.json").write_text(json.dumps({"world": world, "kd": kd, "rates": rates}))
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    root = tmp_path_factory.mktemp("global_batch")
    worker = root / "worker.py"
    worker.write_text(WORKER, encoding="utf-8")
    results = {}
    for nproc in (1, 2, 4):
        out = root / f"nproc{nproc}"
        out.mkdir()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(nproc), str(worker), str(out), str(REPO)], env=SUBPROCESS_ENV,
                              capture_output=True, text=True, cwd=REPO, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[nproc] = json.loads((out / "result.json").read_text())
    return results


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_kd_on_n_processes_of_batch_b_is_one_process_of_batch_n_times_b(runs: dict, dataset: str) -> None:
    """The relational terms (intra-class Pearson; MELD's feature loss too) relate every rank's samples:
    2 x 2 and 4 x 1 (where each rank alone would have a constant intra term and a zero feature loss) give
    one process's loss and gradients at batch 4."""
    one = runs[1]["kd"][dataset]
    for nproc in (2, 4):
        other = runs[nproc]["kd"][dataset]
        assert runs[nproc]["world"] == nproc
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-6), nproc
        for name, grad in one["grads"].items():
            torch.testing.assert_close(torch.tensor(other["grads"][name]), torch.tensor(grad), rtol=1e-5, atol=1e-7)


def test_learning_rate_at_each_epoch_end_is_the_same_for_1_2_4_processes_and_grad_accum(runs: dict) -> None:
    """The authors' curve over epochs whatever the global batch: 40 samples at 4 per process are 10, 5 and 3
    updates per epoch (and 5 with --grad_accum 2 on one process), and every epoch ends at the same rate."""
    one = runs[1]["rates"]["1"]
    assert len(one) == 6 and one[3] == pytest.approx(0.5)  # warmup ends after 4 epochs (40 samples / batch 4)
    assert one[-1] == pytest.approx(0.5 * (24 - 6) / (24 - 4))  # their decay: total 4 x 6 epochs
    for rates in (runs[1]["rates"]["2"], runs[2]["rates"]["1"], runs[4]["rates"]["1"]):
        assert rates == pytest.approx(one, rel=1e-12)
