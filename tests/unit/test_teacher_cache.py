"""The KD teacher computed once (`magtkd.teacher_cache`; docs/METHOD.md §3): one pass, the cache file and its
key, reading it back, and what is refused."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import utterance_sample
from magtkd import engine, loaders, teacher_cache
from magtkd.artifacts import StageFiles, teacher_outputs_path


class Prompts:
    """A text field stand-in: sample ``i`` of a dialogue prefix is the ids ``1..(dialogue + 2)``, left-padded."""

    name = "text"
    prompt = "full"
    tokenizer = SimpleNamespace(name_or_path="/models/roberta")

    def load(self, sample):
        return list(range(1, sample.utterance.dialogue_id + 3))

    def collate(self, items):
        width = max(len(ids) for ids in items)
        ids = torch.tensor([[0] * (width - len(x)) + x for x in items])
        return {"text_ids": ids, "text_mask": (ids > 0).long()}


class Teacher(torch.nn.Module):
    """A teacher stand-in: the last token's embedding and a linear head, counting its forward passes."""

    def __init__(self, poison: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head, self.calls, self.poison = torch.nn.Embedding(40, 6), torch.nn.Linear(6, 3), 0, poison

    def encode(self, batch):
        self.calls += 1
        rep = self.embed(batch["text_ids"][:, -1])
        if self.poison is not None:
            rep = torch.where(batch["index"][:, None] == self.poison, float("inf"), rep)
        return rep, self.head(rep)


SAMPLES = [utterance_sample("train", dialogue, 0, Path("clip.mp4")) for dialogue in range(10)]


def run(tmp_path: Path, teacher: Teacher, batch_size: int = 4, amp: bool = True):
    """`teacher_cache.teacher_outputs` as KD.py calls it, for the text.bin in ``tmp_path``."""
    checkpoint = tmp_path / "text.bin"
    if not checkpoint.exists():
        checkpoint.write_bytes(b"weights")
    train = loaders.make_loader(loaders.SampleDataset(SAMPLES, []), batch_size, True, 0, seed=1)
    data = loaders.SampleBatches({"train": train}, torch.device("cpu"))
    config = engine.FitConfig(stage="KD", script="KD.py", dataset="X", labels=["a", "b", "c"],
                              files=StageFiles.first_stage(tmp_path, "text_KD_audio"), epochs=1, seed=0, args={},
                              amp=amp, amp_dtype=torch.float16)
    return teacher_cache.teacher_outputs(teacher, Prompts(), SAMPLES, checkpoint, data, config)


def test_one_pass_then_the_steps_read_the_outputs_by_sample_index(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="magtkd")
    teacher = Teacher()
    outputs = run(tmp_path, teacher)
    assert teacher.calls == 3  # 10 utterances at batch 4, once
    batch = {"index": torch.tensor([7, 2]), "text_ids": torch.tensor([list(range(1, 10)), [0] * 5 + [1, 2, 3, 4]])}
    with torch.no_grad():
        expected = teacher.encode(batch)
    got = outputs.encode(batch)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    saved = torch.load(teacher_outputs_path(tmp_path / "text.bin"), weights_only=True)
    assert saved["rep"].shape == (10, 6) and saved["logits"].shape == (10, 3) and saved["key"]["prompt"] == "full"
    assert "computed once and cached in" in caplog.text

    again = Teacher()
    read = run(tmp_path, again, batch_size=2)  # the batch size of the pass does not matter
    assert again.calls == 0 and "read from" in caplog.text
    assert torch.equal(read.rep, outputs.rep) and torch.equal(read.logits, outputs.logits)


def test_the_key_names_the_checkpoint_prompt_precision_and_data(tmp_path):
    checkpoint = tmp_path / "text.bin"
    checkpoint.write_bytes(b"weights")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    key = teacher_cache.cache_key(checkpoint, Prompts(), SAMPLES, cpu, True, torch.float16)
    assert key == teacher_cache.cache_key(checkpoint, Prompts(), SAMPLES, cpu, True, torch.float16)
    assert key["precision"] == "cpu fp32"  # autocast runs on CUDA only (magtkd.runtime.autocast)
    assert teacher_cache.cache_key(checkpoint, Prompts(), SAMPLES, cuda, True, torch.float16)["precision"] == \
        "cuda torch.float16 autocast"
    other_prompt = Prompts()
    other_prompt.prompt = "no_context"
    others = [teacher_cache.cache_key(checkpoint, other_prompt, SAMPLES, cpu, True, torch.float16),
              teacher_cache.cache_key(checkpoint, Prompts(), SAMPLES[:-1], cpu, True, torch.float16),
              teacher_cache.cache_key(checkpoint, Prompts(), SAMPLES[::-1], cpu, True, torch.float16)]
    os.utime(checkpoint, ns=(0, checkpoint.stat().st_mtime_ns + 10**9))  # text.bin trained again
    others.append(teacher_cache.cache_key(checkpoint, Prompts(), SAMPLES, cpu, True, torch.float16))
    assert all(other != key for other in others)


def test_another_key_or_an_unreadable_file_is_computed_again(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="magtkd")
    run(tmp_path, Teacher())
    path = teacher_outputs_path(tmp_path / "text.bin")
    os.utime(tmp_path / "text.bin", ns=(0, (tmp_path / "text.bin").stat().st_mtime_ns + 10**9))
    teacher = Teacher()
    run(tmp_path, teacher)
    assert teacher.calls == 3 and "was computed for another teacher checkpoint" in caplog.text
    path.write_bytes(path.read_bytes()[:100])  # truncated
    teacher = Teacher()
    run(tmp_path, teacher)
    assert teacher.calls == 3 and "cannot be read" in caplog.text


def test_non_finite_teacher_outputs_are_an_error_naming_the_utterance(tmp_path):
    with pytest.raises(engine.NonFiniteError, match=r"KD: the teacher's outputs are not finite for 1 training "
                                                    r"utterance\(s\), the first train 6_0 \(CSV row 1\)"):
        run(tmp_path, Teacher(poison=6))
    assert not teacher_outputs_path(tmp_path / "text.bin").exists()
