"""``<DS>/KD.py`` (stages 5-6, docs/METHOD.md §3): one epoch from a teacher checkpoint, what a run loads
and freezes, its objective term by term, several seeds, the teacher computed once, fp16's skipped updates."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import (FixedEncoder, ROW_KEYS, assert_png, assert_summary_agrees_with_rows, copy_checkpoints, digest,
                     flags, generated_paths, one_epoch_then_evaluate, random_batch, script, tiny_iemocap)
from magtkd import checkpoints, dataset, engine, loaders, losses, pretrained
from magtkd.checkpoints import CheckpointError
from magtkd.spec import SPLITS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost (conftest.py)


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("logit_weight, feature_weight, tau", [(1.0, 0.0, 2.0), (0.1, 1.0, 2.0), (0.5, 0.3, 4.0)])
def test_kd_objective_is_ce_plus_the_weighted_terms(dataset, logit_weight, feature_weight, tau):
    s_rep, s_logits, t_rep, t_logits, batch = random_batch()
    objective = script(dataset, "KD").objective
    teacher = FixedEncoder(t_rep, t_logits)
    loss = objective(FixedEncoder(s_rep, s_logits), batch, teacher=teacher, logit_weight=logit_weight,
                     feature_weight=feature_weight, tau=tau)
    expected = (F.cross_entropy(s_logits, batch["labels"])
                + logit_weight * losses.logit_kd_loss(s_logits, t_logits, tau=tau)
                + feature_weight * losses.feature_kd_loss(s_rep, t_rep))
    assert torch.allclose(loss, expected)
    assert teacher.grad_enabled == [False]  # the teacher runs without autograd (frozen)


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_kd_trains_one_epoch_from_its_teacher_and_its_checkpoint_evaluates_alike(dataset, generated, untrained,
                                                                                 tmp_path):
    paths = copy_checkpoints({**generated_paths(generated, dataset, tmp_path), "save_dir": untrained(dataset)},
                             tmp_path, "text.bin", "audio.bin")
    doc = one_epoch_then_evaluate(dataset, "KD", "text_KD_audio", paths, "--student", "audio")
    # Each dataset's objective by default: IEMOCAP CE + L_logit, MELD CE + 0.1 L_logit + L_feat (docs/METHOD.md §3)
    expected = {"IEMOCAP": (1.0, 0.0), "MELD": (0.1, 1.0)}[dataset]
    assert (doc["args"]["logit_weight"], doc["args"]["feature_weight"], doc["args"]["tau"]) == (*expected, 2.0)
    assert (doc["args"]["student"], doc["args"]["teacher"]) == ("audio", "text")

def few_rows_and_checkpoints(generated: Path, untrained, tmp: Path, frames: bool = False) -> dict[str, Path]:
    """A few IEMOCAP rows (8 train, 4 dev, 4 test; their stored frames with ``frames``) and a save folder
    holding untrained stand-ins of text.bin (the teacher) and audio.bin (where the audio student starts)."""
    data_dir = tiny_iemocap(generated, tmp, {"train": 8, "dev": 4, "test": 4})
    paths = {**generated_paths(generated, "IEMOCAP", tmp), "data_dir": data_dir, "save_dir": untrained("IEMOCAP")}
    paths = copy_checkpoints(paths, tmp, "text.bin", "audio.bin")
    if frames:
        script("IEMOCAP", "video_feature_extract").main(flags(paths, num_workers=0))
    return paths


class Watch:
    """Records what a KD run builds, which fields its loaders get, what it loads, the teacher's state,
    and, for every training step, whether the loss is ``CE + logit_weight L_logit + feature_weight L_feat``
    of the very terms the run computed (the KD objective of docs/METHOD.md §3)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, logit_weight: float, feature_weight: float) -> None:
        self.built: list[str] = []
        self.fields: dict[str, list[str]] = {}
        self.checkpoints: list[str] = []
        self.teacher_calls: list[tuple[bool, bool, bool]] = []
        self.losses: dict[str, int] = {"logit": 0, "feature": 0}
        self.taus: set[float] = set()
        self.objectives: list[tuple[float, float, float]] = []  # (loss of the step, CE + weighted terms, CE)
        self._terms: dict[str, torch.Tensor] = {}
        build, make_loaders = pretrained.load_encoder, loaders.split_loaders
        load, fit = checkpoints.load_checkpoint, engine.fit
        logit, feature, cross_entropy = losses.logit_kd_loss, losses.feature_kd_loss, F.cross_entropy

        def watched_build(modality, pretrained_dir, num_classes, feature_dir=None, audio_cache=None, **options):
            model, field = build(modality, pretrained_dir, num_classes, feature_dir, audio_cache, **options)
            if modality == "text":  # the teacher
                model.register_forward_pre_hook(self._teacher_call)
            self.built.append(modality)
            return model, field

        def watched_loaders(samples, fields, batch_size, num_workers, seed, splits=SPLITS, **options):
            for split in splits:
                self.fields[split] = [f.name for f in fields]
            return make_loaders(samples, fields, batch_size, num_workers, seed, splits, **options)

        def watched_load(model, path, produced_by, dataset=None, labels=None):
            self.checkpoints.append(Path(path).name)
            return load(model, path, produced_by, dataset, labels)

        def watched_logit(s, t, tau=2.0, **kw):
            self.losses["logit"] += 1
            self.taus.add(tau)
            self._terms["logit"] = logit(s, t, tau=tau, **kw)
            return self._terms["logit"]

        def watched_feature(s, t):
            self.losses["feature"] += 1
            self._terms["feature"] = feature(s, t)
            return self._terms["feature"]

        def watched_cross_entropy(*args, **kwargs):
            self._terms["ce"] = cross_entropy(*args, **kwargs)
            return self._terms["ce"]

        def watched_fit(model, objective, *args, **kwargs):
            # The stage's own objective (KD.objective with its weights); every training step's loss is
            # compared with CE + logit_weight L_logit + feature_weight L_feat of the terms it computed.
            def checked(student, batch):
                self._terms.clear()
                loss = objective(student, batch)
                zero = torch.zeros(())
                expected = (self._terms["ce"] + logit_weight * self._terms.get("logit", zero)
                            + feature_weight * self._terms.get("feature", zero))
                self.objectives.append((loss.item(), expected.item(), self._terms["ce"].item()))
                return loss

            return fit(model, checked, *args, **kwargs)

        monkeypatch.setattr(pretrained, "load_encoder", watched_build)
        monkeypatch.setattr(loaders, "split_loaders", watched_loaders)
        monkeypatch.setattr(checkpoints, "load_checkpoint", watched_load)
        monkeypatch.setattr(engine, "fit", watched_fit)
        monkeypatch.setattr(losses, "logit_kd_loss", watched_logit)
        monkeypatch.setattr(losses, "feature_kd_loss", watched_feature)
        monkeypatch.setattr(F, "cross_entropy", watched_cross_entropy)

    def _teacher_call(self, module, _inputs) -> None:
        trainable = any(p.requires_grad for p in module.parameters())
        self.teacher_calls.append((module.training, trainable, torch.is_grad_enabled()))


def refuse(field: str):
    def load(self, sample):
        raise AssertionError(f"the KD run loaded {field} for {sample.utterance.key}")

    return load


@pytest.mark.parametrize("student", ["audio", "video"])
def test_kd_run_loads_only_its_modalities_and_freezes_the_teacher(generated, untrained, tmp_path, monkeypatch, student):
    paths = few_rows_and_checkpoints(generated, untrained, tmp_path, frames=student == "video")
    other = "video" if student == "audio" else "audio"
    monkeypatch.setattr(getattr(loaders, f"{other.capitalize()}Field"), "load", refuse(other))
    watch = Watch(monkeypatch, logit_weight=1.0, feature_weight=0.0)
    teacher_before = digest(paths["save_dir"] / "text.bin")
    audio_before = digest(paths["save_dir"] / "audio.bin")

    script("IEMOCAP", "KD").main(flags(paths, student=student, epochs=1, device="cpu"))

    assert sorted(watch.built) == sorted(["text", student])  # the other modality's model is never built
    # The teacher's outputs are computed once (the training batches carry the student's input only)
    assert watch.fields == {"train": [student], "dev": [student], "test": [student]}
    # Teacher from text.bin; audio student from audio.bin, video student from the pretrained TimeSformer.
    assert watch.checkpoints == (["text.bin", "audio.bin"] if student == "audio" else ["text.bin"])
    assert watch.teacher_calls and len(watch.teacher_calls) == 2  # one pass: 8 train rows / batch 4; not in steps
    assert all(call == (False, False, False) for call in watch.teacher_calls), watch.teacher_calls
    cached = torch.load(paths["save_dir"] / "text_teacher_outputs.pt", weights_only=True)
    assert cached["rep"].shape[0] == cached["logits"].shape[0] == 8 and cached["key"]["prompt"] == "full"
    # IEMOCAP objective: CE + L_logit (tau 2); no feature loss (docs/METHOD.md §3).
    assert watch.losses == {"logit": 2, "feature": 0} and watch.taus == {2.0}
    assert len(watch.objectives) == 2  # CE + 1.0 * L_logit at every training step
    for loss, expected, _ in watch.objectives:
        assert loss == pytest.approx(expected, rel=1e-6)
    assert digest(paths["save_dir"] / "text.bin") == teacher_before
    assert digest(paths["save_dir"] / "audio.bin") == audio_before
    state = torch.load(paths["save_dir"] / f"text_KD_{student}.bin", weights_only=True)
    reference = torch.load(untrained("IEMOCAP") / f"{student}.bin", weights_only=True)  # the unimodal model
    assert set(state) == set(reference)
    args = json.loads((paths["save_dir"] / f"text_KD_{student}.json").read_text(encoding="utf-8"))["args"]
    assert args["student"] == student and args["teacher"] == "text" and args["epochs"] == 1
    assert (args["logit_weight"], args["feature_weight"], args["learning_rate"]) == (1.0, 0.0, 1e-5)


def test_kd_objective_weights_its_terms(generated, untrained, tmp_path, monkeypatch):
    """``--logit_weight``/``--feature_weight``/``--tau`` set the objective CE + w_l L_logit + w_f L_feat
    (MELD's weights 0.1 / 1, on a few IEMOCAP rows)."""
    paths = few_rows_and_checkpoints(generated, untrained, tmp_path)
    watch = Watch(monkeypatch, logit_weight=0.1, feature_weight=1.0)

    script("IEMOCAP", "KD").main(flags(paths, student="audio", epochs=1, device="cpu", logit_weight=0.1,
                                       feature_weight=1.0, tau=3.0))

    assert watch.losses == {"logit": 2, "feature": 2} and watch.taus == {3.0}
    assert len(watch.objectives) == 2
    for loss, expected, ce in watch.objectives:
        assert loss == pytest.approx(expected, rel=1e-6)
        assert loss != pytest.approx(ce, rel=1e-6)  # the distillation terms really contribute
    args = json.loads((paths["save_dir"] / "text_KD_audio.json").read_text(encoding="utf-8"))["args"]
    assert (args["logit_weight"], args["feature_weight"], args["tau"]) == (0.1, 1.0, 3.0)


def test_kd_seeds_fresh_models_summary_and_best_copy(generated, untrained, tmp_path, monkeypatch):
    """``KD.py --seeds 7 8``: per-seed student checkpoints (each as its single-seed run), the summary,
    the best dev seed as text_KD_audio.bin, plots beside every metrics JSON."""
    base = few_rows_and_checkpoints(generated, untrained, tmp_path)
    paths = copy_checkpoints(base, tmp_path / "several", "text.bin", "audio.bin")
    alone = copy_checkpoints(base, tmp_path / "alone", "text.bin", "audio.bin")
    kd = script("IEMOCAP", "KD").main
    reads = []
    load = dataset.load_samples
    monkeypatch.setattr(dataset, "load_samples", lambda *a, **k: reads.append(a) or load(*a, **k))
    result = kd(flags(paths, student="audio", epochs=2, device="cpu", learning_rate=1e-3) + ["--seeds", "7", "8"])
    assert len(reads) == 1  # the CSVs are read once for both seeds
    kd(flags(alone, student="audio", epochs=2, device="cpu", learning_rate=1e-3, seed=8))

    save = paths["save_dir"]
    doc = json.loads((save / "text_KD_audio_seeds.json").read_text(encoding="utf-8"))
    assert [row["seed"] for row in doc["seeds"]] == [7, 8]
    assert all(set(row) == ROW_KEYS for row in doc["seeds"])
    assert_summary_agrees_with_rows(doc, ("ang", "exc", "fru", "hap", "neu", "sad"))
    for row in doc["seeds"]:
        metrics = json.loads((save / f"text_KD_audio_seed{row['seed']}.json").read_text(encoding="utf-8"))
        assert metrics["args"]["seed"] == row["seed"] and metrics["checkpoint"] == f"text_KD_audio_seed{row['seed']}.bin"
        assert (row["selected_epoch"], row["dev_weighted_f1"]) == (metrics["selected_epoch"], metrics["dev_weighted_f1"])
        assert (row["test_accuracy"], row["test_weighted_f1"]) == (metrics["test"]["accuracy"],
                                                                    metrics["test"]["weighted_f1"])
        assert row["test_per_class_f1"] == {n: c["f1-score"] for n, c in metrics["test"]["per_class"].items()
                                            if n in row["test_per_class_f1"]}
        assert_png(save / f"text_KD_audio_seed{row['seed']}_curves.png", (1000, 400))
        assert_png(save / f"text_KD_audio_seed{row['seed']}_confusion.png", (600, 540))
    best = max(doc["seeds"], key=lambda r: r["dev_weighted_f1"])["seed"]
    assert result["seeds"]["best_seed"] == best and result["checkpoint"] == f"text_KD_audio_seed{best}.bin"
    for suffix in (".bin", ".json", "_curves.png", "_confusion.png"):
        assert digest(save / f"text_KD_audio{suffix}") == digest(save / f"text_KD_audio_seed{best}{suffix}")
    md = (save / "text_KD_audio_seeds.md").read_text(encoding="utf-8")
    assert "| **mean ± std** |" in md and "test-selected" not in md  # the column is the fusion's only
    # Seed 8 among several is exactly seed 8 alone (the teacher is rebuilt per seed for that).
    ours = torch.load(save / "text_KD_audio_seed8.bin", weights_only=True)
    single = torch.load(alone["save_dir"] / "text_KD_audio.bin", weights_only=True)
    assert all(torch.equal(ours[k], single[k]) for k in single)
    assert not (alone["save_dir"] / "text_KD_audio_seeds.json").exists()
    assert_png(alone["save_dir"] / "text_KD_audio_curves.png", (1000, 400))


def test_kd_without_text_checkpoint_says_text_py_writes_it(generated, tmp_path):
    paths = generated_paths(generated, "IEMOCAP", tmp_path)
    with pytest.raises(CheckpointError) as info:
        script("IEMOCAP", "KD").main(flags(paths, student="audio", epochs=1, device="cpu"))
    message = str(info.value)
    assert str(tmp_path / "save_model" / "text.bin") in message and "text.py" in message
    assert not (tmp_path / "save_model" / "text_KD_audio.bin").exists()


def kd_run(paths: dict[str, Path], *extra: str, logit_weight: float = 0.1, feature_weight: float = 1.0) -> Watch:
    """One IEMOCAP KD audio run of 2 epochs on ``paths`` with MELD's objective (the feature loss included),
    watched (`Watch`); returns the watch, with the student it wrote as ``student``."""
    with pytest.MonkeyPatch.context() as patch:
        watch = Watch(patch, logit_weight=logit_weight, feature_weight=feature_weight)
        script("IEMOCAP", "KD").main(flags(paths, student="audio", epochs=2, device="cpu", learning_rate="1e-3",
                                           logit_weight=logit_weight, feature_weight=feature_weight) + list(extra))
    watch.student = torch.load(paths["save_dir"] / "text_KD_audio.bin", weights_only=True)
    return watch


def test_teacher_computed_once_gives_the_losses_of_the_teacher_in_every_step(generated, untrained, tmp_path):
    """``--teacher_cache`` (default) vs ``False``: the same loss at every step and the same student, to float
    tolerance (the teacher's pass pads its prompts to other lengths than the training batches); a second run
    reads the cached outputs (the teacher never runs) and trains exactly the same student."""
    paths = few_rows_and_checkpoints(generated, untrained, tmp_path)
    in_steps = kd_run(paths, "--teacher_cache", "False")
    computed = kd_run(paths)
    read = kd_run(paths)

    assert in_steps.fields["train"] == ["text", "audio"] and len(in_steps.teacher_calls) == 4  # 2 epochs x 2 steps
    assert computed.fields["train"] == ["audio"] and len(computed.teacher_calls) == 2  # one pass over 8 rows
    assert read.teacher_calls == [] and sorted(read.built) == ["audio", "text"]  # built all the same: same draws
    assert len(in_steps.objectives) == len(computed.objectives) == 4
    for (a, _, _), (b, _, _) in zip(in_steps.objectives, computed.objectives):
        assert b == pytest.approx(a, rel=1e-5)
    assert [row[0] for row in read.objectives] == [row[0] for row in computed.objectives]
    for key, value in in_steps.student.items():
        torch.testing.assert_close(computed.student[key], value, rtol=1e-4, atol=1e-6)
        assert torch.equal(read.student[key], computed.student[key])


def test_fp16_kd_skips_an_overflowing_update_and_stops_on_non_finite_input(generated, untrained, tmp_path,
                                                                           monkeypatch, caplog):
    """With the gradient scaler (``--amp True``, which runs on CPU too) an update whose gradients overflow is
    skipped and logged, and the run publishes; a NaN in the inputs still stops it with one line."""
    paths = few_rows_and_checkpoints(generated, untrained, tmp_path)
    module, calls = script("IEMOCAP", "KD"), []
    real = module.objective

    def overflow_at_update_2(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * 1e38 * 1e38 if len(calls) == 2 else loss  # inf: the scaled gradients overflow

    monkeypatch.setattr(module, "objective", overflow_at_update_2)
    caplog.set_level(logging.INFO, logger="magtkd")
    doc = module.main(flags(paths, student="audio", epochs=2, device="cpu", amp="True"))
    assert doc["complete"] is True and len(calls) == 4
    assert "IEMOCAP KD text->audio epoch 1: update(s) 2 of 2 skipped by the fp16 gradient scaler" in caplog.text
    assert "epoch 2: update(s)" not in caplog.text
    assert all(row["train_loss"] == row["train_loss"] and abs(row["train_loss"]) < 1e30 for row in doc["epochs"])

    bad = next(sample.utterance.key for sample in dataset.load_samples(script("IEMOCAP", "config").IEMOCAP,
                                                                       paths["data_dir"])["train"][3:4])
    load = loaders.AudioField.load

    def nan_audio(self, sample):
        values, problem = load(self, sample)
        return (values * float("nan") if sample.utterance.key == bad and sample.utterance.split == "train"
                else values), problem

    monkeypatch.setattr(loaders.AudioField, "load", nan_audio)
    with pytest.raises(engine.NonFiniteError, match=r"IEMOCAP KD text->audio: audio_values of training sample\(s\) "
                                                    r"\[3\] \(0-based, CSV order\) holds NaN/inf at epoch 1, update \d"):
        module.main(flags(paths, student="audio", epochs=2, device="cpu", amp="True", seed=7))
