"""Reliability (issue 24): non-finite numbers stop a stage before anything is published, flags that
make the loss undefined are refused at parsing, a re-run keeps the previous complete set until it
completes, and a reader refuses the other dataset's features (docs/METHOD.md §6).

The fusion stage runs on small hand-made feature pickles (seconds, no first-stage models).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import script
from IEMOCAP.config import IEMOCAP
from magtkd import engine
from magtkd.artifacts import StageFiles, feature_path, features_record, finish_outputs
from magtkd.training_state import TrainingState
from magtkd.spec import SPLITS
from magtkd.utils import FeatureFileError
from magtkd.engine import NonFiniteError
from magtkd.pickles import FEATURE_KEYS, assemble_features, save_features
from magtkd.utils import UserError

WIDTH = 16


def make_features(feature_dir: Path, spec=IEMOCAP, seed: int = 0) -> Path:
    """Three small, learnable pickles of ``spec``'s labels and their complete record."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((spec.num_classes, WIDTH)).astype(np.float32)
    for split in SPLITS:
        ids = [(d, u) for d in range(6) for u in range(5)]
        labels = [int(rng.integers(spec.num_classes)) for _ in ids]
        vectors = {k: centres[labels] + 0.3 * rng.standard_normal((len(ids), WIDTH)).astype(np.float32)
                   for k in FEATURE_KEYS}
        save_features(feature_path(feature_dir, split),
                      assemble_features([d for d, _ in ids], [u for _, u in ids], labels,
                                        [u % 2 for _, u in ids], vectors))
    finish_outputs(features_record(feature_dir), f"{spec.name}/extract_first_stage_features.py", {},
                   dataset=spec.name, labels=list(spec.labels), pickles=[f"first_stage_{s}_features.pkl" for s in SPLITS],
                   width=WIDTH)
    return feature_dir


def put_nan(path: Path, key: str = "text", dialogue_index: int = 1, utterance: int = 2) -> int:
    """Write one NaN into one utterance's vector of a pickle (written directly: save_features refuses it)."""
    data = pickle.loads(path.read_bytes())
    dia = data["vids"][dialogue_index]
    data[key][dia][utterance][3] = np.nan
    path.write_bytes(pickle.dumps(data))
    return dia


def fusion(feature_dir: Path, save_dir: Path, *extra: str, dataset: str = "IEMOCAP"):
    return script(dataset, "multimodal_fusion").main(
        ["--feature_dir", str(feature_dir), "--save_dir", str(save_dir), "--device", "cpu", "--batch_size", "2",
         "--lr", "1e-3", *extra])


def digest(folder: Path, names) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


@pytest.fixture
def trained(tmp_path: Path) -> dict:
    """A complete fusion set (2 epochs) and the digests of its published files."""
    features, save = make_features(tmp_path / "feature"), tmp_path / "save"
    fusion(features, save, "--epochs", "2")
    files = StageFiles.fusion(save)
    names = [p.name for p in files.published()]
    return {"features": features, "save": save, "files": files, "names": names, "before": digest(save, names)}


def assert_previous_set_kept(trained: dict) -> None:
    save, files = trained["save"], trained["files"]
    assert digest(save, trained["names"]) == trained["before"]
    assert json.loads(files.metrics.read_text())["complete"] is True
    assert not list(save.glob(".*.tmp"))


# --------------------------------------------------------------------------- non-finite numbers

def test_nan_in_a_training_pickle_names_file_dialogue_utterance_and_key(tmp_path):
    features = make_features(tmp_path / "feature")
    dia = put_nan(feature_path(features, "train"), key="audio_kd")
    with pytest.raises(FeatureFileError, match=rf"first_stage_train_features.pkl: feature 'audio_kd' of dialogue "
                                               rf"{dia}, utterance 2 holds non-finite values \(1 NaN"):
        fusion(features, tmp_path / "save", "--epochs", "1")
    assert not (tmp_path / "save" / "multimodal_fusion_metrics.json").exists()


def test_nan_in_the_test_pickle_stops_the_evaluation(trained):
    dia = put_nan(feature_path(trained["features"], "test"), key="text", dialogue_index=0, utterance=0)
    with pytest.raises(FeatureFileError, match=rf"test_features.pkl: feature 'text' of dialogue {dia}, utterance 0"):
        fusion(trained["features"], trained["save"], "--train", "False")


def test_non_finite_logits_at_evaluation_are_an_error(trained):
    files = trained["files"]
    state = torch.load(files.checkpoint, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    state[key] = torch.full_like(state[key], float("nan"))
    torch.save(state, files.checkpoint)
    with pytest.raises(NonFiniteError, match=r"logits are not finite for dialogue\(s\) \[0, 1, 2"):
        fusion(trained["features"], trained["save"], "--train", "False")


@pytest.mark.slow
def test_non_finite_loss_stops_before_publishing_and_keeps_the_previous_set(trained, monkeypatch):
    module = script("IEMOCAP", "multimodal_fusion")
    real, calls = module.objective, []

    def nan_at_update_4(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(module, "objective", nan_at_update_4)
    with pytest.raises(NonFiniteError, match=r"IEMOCAP multimodal_fusion: the training loss is not finite .* at "
                                             r"epoch 2, update 1 of 3; stopped before publishing"):
        fusion(trained["features"], trained["save"], "--epochs", "3")
    assert_previous_set_kept(trained)
    # The run's own record says it did not finish.
    partial = json.loads(trained["files"].in_progress(trained["files"].metrics).read_text())
    assert partial["complete"] is False


def test_loss_check_reads_the_device_every_ten_updates(monkeypatch):
    """The NaN of update 3 of 25 is found at the read of update 10 and named as update 3."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    values = [1.0] * 25
    values[2] = float("inf")
    seen = []

    def loss_of(batch):
        seen.append(batch)
        return model(torch.ones(1, 2)).sum() * 0 + values[batch[0]]

    class Updates:  # the engine's view of 25 one-item batches [i], one update each
        runner, n_train = model, 25

        def micro_batches(self, epoch):
            return ([i] for i in range(25))

        def updates_per_epoch(self, grad_accum):
            return 25

        def loss(self, batch, config):
            return loss_of(batch)

    config = engine.FitConfig(stage="unit", script="unit.py", dataset="X", labels=["a"],
                              files=StageFiles.first_stage("/nonexistent", "unit"), epochs=1, seed=0, args={})
    step = engine.Step(optimizer, scheduler, list(model.parameters()), config.grad_clip)
    with pytest.raises(NonFiniteError, match=r"unit: .* at epoch 7, update 3 of 25"):
        engine.train_one_epoch(Updates(), step, config, 7)
    assert len(seen) == 10  # stopped at the first read, not at the end of the epoch


@pytest.mark.parametrize("name, argv, message", [
    ("KD", ["--tau", "0"], "--tau: expected a number > 0"),
    ("KD", ["--tau", "-1"], "--tau: expected a number > 0"),
    ("multimodal_fusion", ["--dropout", "1.5"], r"--dropout: expected a number in \[0, 1\)"),
    ("multimodal_fusion", ["--dropout", "1"], r"--dropout: expected a number in \[0, 1\)"),
    ("text", ["--seeds", "-5"], "--seeds: expected an integer in 0..4294967295"),
    ("text", ["--seed", "4294967296"], "--seed: expected an integer in 0..4294967295"),
    ("multimodal_fusion", ["--seed", "-1"], "--seed: expected an integer in 0..4294967295"),
])
def test_flags_that_make_the_loss_undefined_are_refused_at_parsing(name, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        script("MELD", name).main(argv)
    assert exit_.value.code == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_largest_numpy_seed_is_accepted():
    from magtkd.runtime import set_seed
    from magtkd.utils import SEED_MAX, seed_int

    set_seed(seed_int(str(SEED_MAX)))


# --------------------------------------------------------------------------- nothing lost

@pytest.mark.slow
def test_interrupted_rerun_keeps_the_previous_set_and_resume_publishes(trained, monkeypatch):
    files = trained["files"]
    real = TrainingState.save

    def killed_after_epoch_one(self, epoch, progress):
        real(self, epoch, progress)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingState, "save", killed_after_epoch_one)
    with pytest.raises(KeyboardInterrupt):
        fusion(trained["features"], trained["save"], "--epochs", "3", "--seed", "7")
    assert_previous_set_kept(trained)
    assert files.in_progress(files.checkpoint).is_file()  # the new run's best so far, not published
    monkeypatch.undo()
    doc = fusion(trained["features"], trained["save"], "--epochs", "3", "--seed", "7", "--resume", "True")
    record = json.loads(files.metrics.read_text())
    assert record["complete"] is True and record["args"]["epochs"] == 3 and len(record["epochs"]) == 3
    assert record["selected_epoch"] == doc["selected_epoch"]
    assert not any(p.exists() for p in files.pending())
    assert digest(trained["save"], [files.checkpoint.name]) != {files.checkpoint.name: trained["before"][files.checkpoint.name]}


# --------------------------------------------------------------------------- the right data

def test_meld_fusion_refuses_iemocap_features_naming_both(tmp_path):
    features = make_features(tmp_path / "feature")
    with pytest.raises(FeatureFileError, match=r"are IEMOCAP's .*dataset IEMOCAP.* but MELD/multimodal_fusion.py "
                                               r"reads MELD's"):
        fusion(features, tmp_path / "save", "--epochs", "1", dataset="MELD")


@pytest.mark.slow
def test_iemocap_fusion_refuses_meld_features_also_with_train_false(trained, tmp_path):
    from MELD.config import MELD

    features = make_features(tmp_path / "meld_feature", MELD)
    for argv in (["--epochs", "1"], ["--train", "False"]):
        with pytest.raises(FeatureFileError, match=r"are MELD's .* but IEMOCAP/multimodal_fusion.py reads IEMOCAP's"):
            fusion(features, trained["save"], *argv)


def test_a_pickle_whose_width_differs_from_its_record_is_refused(tmp_path):
    features = make_features(tmp_path / "feature")
    record = features_record(features)
    record.write_text(json.dumps({**json.loads(record.read_text()), "width": 32}))
    with pytest.raises(FeatureFileError, match=r"has width 16 but .*first_stage_features.json says 32"):
        fusion(features, tmp_path / "save", "--epochs", "1")


def test_errors_are_user_errors():
    assert issubclass(NonFiniteError, UserError) and issubclass(FeatureFileError, UserError)
