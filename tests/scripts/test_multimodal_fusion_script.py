"""``<DS>/multimodal_fusion.py`` (stage 8, docs/METHOD.md §5, §6) on small hand-made feature
pickles: its objective term by term (both datasets), training and artifacts, packed rows, evaluation-only,
reference checkpoints, several seeds, ablation variants, non-finite numbers, interrupted runs and resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import (C, H, N_SPK, ROW_KEYS, assert_png, assert_summary_agrees_with_rows, digest, random_dialogues,
                     reference_state, remount_read_only, script, tmpfs)
from IEMOCAP.config import IEMOCAP
from magtkd import fusion_data, losses, model, results, utils
from magtkd.artifacts import feature_path, features_record, finish_outputs, output_lock, StageFiles
from magtkd.checkpoints import settings_from_checkpoint
from magtkd.engine import NonFiniteError
from magtkd.fusion_data import dialogue_logits, load_dialogues
from magtkd.model import AnchorGatedTransformer
from magtkd.pickles import assemble_features, FEATURE_KEYS, load_features, save_features
from magtkd.predictions import ID_COLUMNS, fusion_columns, read_predictions
from magtkd.spec import SPLITS
from magtkd.synthetic.features import write_synthetic_features
from magtkd.training_state import TrainingState
from magtkd.utils import FeatureFileError, UserError
from MELD.config import MELD


pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 16

SIZES = {"train": 24, "dev": 10, "test": 10}


# Small model, quick schedule: the reference's lr 1e-4 / dropout 0.5 are tuned for width 768.
FAST = ["--epochs", "8", "--batch_size", "4", "--lr", "3e-3", "--dropout", "0.1", "--n_head", "2",
        "--per_batch_schedule", "--device", "cpu"]


# Each dataset's fusion defaults, as multimodal_fusion.py's flags state them (docs/METHOD.md §5).
FUSION_DEFAULTS = {
    "IEMOCAP": {"audio_feature": "audio_kd", "video_feature": "video", "alpha": 0.7, "beta": 0.8,
                "feature_loss": True, "n_speaker": 2},
    "MELD": {"audio_feature": "audio_kd", "video_feature": "video_kd", "alpha": 0.01, "beta": 0.08,
             "feature_loss": False, "n_speaker": 304},
}


def fusion_main(spec, argv):
    """``<DS>/multimodal_fusion.py`` with ``argv`` (always with explicit folders: its defaults are repo paths)."""
    return script(spec.name, "multimodal_fusion").main(argv)


def predict_dialogues(model, data, batch_size, packed=None):
    """The fusion's test predictions: the argmax of `engine.dialogue_logits`."""
    return dialogue_logits(model, data, batch_size, packed=packed).argmax(-1).tolist()


def saved_predictions(save_dir):
    """``multimodal_fusion_best.json``: the test labels and predictions at the selected epoch."""
    return json.loads(StageFiles.fusion(save_dir).predictions.read_text())


def run(spec, tmp_path, *extra):
    return fusion_main(spec, ["--feature_dir", str(tmp_path / "feature"),
                              "--save_dir", str(tmp_path / "save"), *FAST, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """One training run per recipe on synthetic pickles (shared by several tests)."""
    out = {}
    for spec in (IEMOCAP, MELD):
        root = tmp_path_factory.mktemp(spec.name)
        write_synthetic_features(root / "feature", spec, SIZES, width=WIDTH, seed=3)
        out[spec.name] = (root, run(spec, root))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("spec", [IEMOCAP, MELD], ids=lambda s: s.name)
def test_training_learns_and_writes_artifacts(trained, spec):
    root, result = trained[spec.name]
    curve = result["epochs"]
    assert len(curve) == 8
    assert curve[-1]["train_loss"] < 0.7 * curve[0]["train_loss"]
    assert result["dev"]["weighted_f1"] > 0.5  # chance is 1/6 or 1/7
    best_dev = max(c["dev"]["weighted_f1"] for c in curve)
    assert result["dev"]["weighted_f1"] == best_dev  # selection on DEV

    save = root / "save"
    assert sorted(p.name for p in save.iterdir()) == [
        "multimodal_fusion_attention_dev.npz", "multimodal_fusion_attention_test.npz",
        "multimodal_fusion_best.bin", "multimodal_fusion_best.json",  # no training state: not asked for
        "multimodal_fusion_confusion.png", "multimodal_fusion_curves.png", "multimodal_fusion_metrics.json",
        "multimodal_fusion_predictions_dev.csv", "multimodal_fusion_predictions_test.csv"]
    preds = json.loads((save / "multimodal_fusion_best.json").read_text())
    assert set(preds) == {"labels", "preds"}
    n_test = sum(len(x) for x in load_dialogues(
        feature_path(root / "feature", "test"), "audio_kd", "video", torch.device("cpu")).labels)
    assert len(preds["labels"]) == len(preds["preds"]) == n_test
    assert preds["labels"] == [int(x) for d in load_dialogues(
        feature_path(root / "feature", "test"), "audio_kd", "video", torch.device("cpu")).labels for x in d]
    assert sum(p == y for p, y in zip(preds["preds"], preds["labels"])) / n_test == pytest.approx(
        result["test"]["accuracy"])  # the predictions are the selected epoch's

    report = json.loads((save / "multimodal_fusion_metrics.json").read_text())
    assert report == json.loads(json.dumps(result))
    assert report["selected_epoch"] == result["selected_epoch"]
    assert report["selection"] == "best dev weighted F1" and report["complete"] is True
    assert report["labels"] == list(spec.labels) and list(report["test"]["per_class"])[:len(spec.labels)] == list(spec.labels)
    assert len(report["test"]["confusion"]) == len(spec.labels)
    assert {"dev", "test", "train_loss"} <= set(report["epochs"][0])
    defaults = FUSION_DEFAULTS[spec.name]
    for flag in ("audio_feature", "video_feature", "alpha", "beta", "feature_loss"):
        assert report["args"][flag] == defaults[flag], flag
    assert report["sizes"]["n_speaker"] == defaults["n_speaker"] == spec.n_speaker
    state = torch.load(save / "multimodal_fusion_best.bin", weights_only=True)
    assert state["speaker_embeddings.weight"].shape == (defaults["n_speaker"] + 1, WIDTH)
    assert not any(k.startswith(("a_t.", "v_t.", "fc.")) for k in state)


@pytest.mark.slow
def test_packed_rows_train_the_same_run(trained, tmp_path):
    """``--packed True`` retraces the run on the padded grid (the authors' computation, the default): the
    same curve up to float summation order, the same selected epoch and test predictions."""
    root, padded = trained["IEMOCAP"]
    assert padded["args"]["packed"] is False
    packed = fusion_main(IEMOCAP, ["--feature_dir", str(root / "feature"), "--save_dir", str(tmp_path / "save"),
                                   *FAST, "--packed", "True"])
    assert [c["train_loss"] for c in padded["epochs"]] == pytest.approx(
        [c["train_loss"] for c in packed["epochs"]], rel=1e-4)
    assert [c["dev"] for c in padded["epochs"]] == [c["dev"] for c in packed["epochs"]]
    assert padded["selected_epoch"] == packed["selected_epoch"]
    assert saved_predictions(root / "save")["preds"] == saved_predictions(tmp_path / "save")["preds"]
    assert all(c["train_seconds"] > 0 for c in packed["epochs"])


@pytest.mark.slow
def test_eval_round_trip_reads_only_test_pickle(trained, tmp_path):
    root, result = trained["IEMOCAP"]
    # Copy only what --train False may read.
    (tmp_path / "feature").mkdir()
    (tmp_path / "save").mkdir()
    for src, dst in ((feature_path(root / "feature", "test"), feature_path(tmp_path / "feature", "test")),
                     (root / "save" / "multimodal_fusion_best.bin", tmp_path / "save" / "multimodal_fusion_best.bin")):
        dst.write_bytes(src.read_bytes())
    evaluated = fusion_main(IEMOCAP, ["--feature_dir", str(tmp_path / "feature"), "--save_dir",
                                      str(tmp_path / "save"), "--train", "False", "--n_head", "2",
                                      "--batch_size", "4", "--device", "cpu"])
    trained_preds = saved_predictions(root / "save")
    assert evaluated["preds"] == trained_preds["preds"]
    for key in ("accuracy", "weighted_f1"):
        assert evaluated[key] == pytest.approx(result["test"][key])
    assert evaluated["confusion"] == result["test"]["confusion"]
    written = json.loads((tmp_path / "save" / "multimodal_fusion_best.json").read_text())
    assert written == trained_preds


@pytest.mark.slow
@pytest.mark.parametrize("spec", [IEMOCAP, MELD], ids=lambda s: s.name)
def test_every_dev_and_test_prediction_is_a_row_that_agrees_with_the_metrics(trained, spec, tmp_path):
    """``multimodal_fusion_predictions_{dev,test}.csv``: the columns scripts rely on, one row per utterance in
    the pickle's order, and the selected epoch's accuracy and weighted F1 recomputed from the rows; the
    attention npz beside it; ``--train False`` writes the same test rows."""
    root, result = trained[spec.name]
    files = StageFiles.fusion(root / "save")
    for split in ("dev", "test"):
        frame = read_predictions(files.predictions_csv(split))
        assert list(frame.columns) == [*ID_COLUMNS, "gold", "predicted", *(f"p_{n}" for n in spec.labels),
                                       *fusion_columns(model.PATHS)]
        features = load_features(feature_path(root / "feature", split), keys=())
        assert list(zip(frame["dialogue_id"], frame["utterance_id"])) == [
            (v, u) for v in features["vids"] for u in features["dia2utt"][v]]
        assert frame["gold"].tolist() == [spec.labels[y] for v in features["vids"] for y in features["labels"][v]]
        index = {name: i for i, name in enumerate(spec.labels)}
        recomputed = results.summary(frame["gold"].map(index), frame["predicted"].map(index))
        assert recomputed == {k: result[split][k] for k in ("accuracy", "weighted_f1")}
        probs = frame[[f"p_{n}" for n in spec.labels]].to_numpy()
        assert np.allclose(probs.sum(1), 1, atol=1e-5)
        assert frame["text_anchor"].tolist() == frame["predicted"].tolist()  # the text anchor predicts
        assert set(frame["audio_anchor"]) | set(frame["video_anchor"]) <= set(spec.labels)
        with np.load(files.attention_npz(split)) as arrays:
            longest = max(len(features["labels"][v]) for v in features["vids"])
            assert arrays["attention_t_t"].shape == (len(frame), longest)
            assert np.allclose(np.nansum(arrays["attention_a_v"], axis=1), 1, atol=1e-5)
            assert arrays["dialogue_id"].tolist() == frame["dialogue_id"].tolist()
    evaluation = tmp_path / "save"
    evaluation.mkdir()
    for name in (files.checkpoint.name, files.metrics.name):
        shutil.copy2(root / "save" / name, evaluation / name)
    fusion_main(spec, ["--feature_dir", str(root / "feature"), "--save_dir", str(evaluation), "--train", "False",
                       "--batch_size", "4", "--device", "cpu"])
    assert sorted(p.name for p in evaluation.iterdir() if "_predictions_" in p.name or "_attention_" in p.name) == [
        "multimodal_fusion_attention_test.npz", "multimodal_fusion_predictions_test.csv"]
    assert StageFiles.fusion(evaluation).predictions_csv("test").read_bytes() == \
        files.predictions_csv("test").read_bytes()


def test_separate_text_blocks_train_and_eval(tmp_path):
    write_synthetic_features(tmp_path / "feature", IEMOCAP, {"train": 6, "dev": 3, "test": 3}, width=WIDTH, seed=5)
    run(IEMOCAP, tmp_path, "--separate_text_blocks", "--epochs", "2")
    state = torch.load(tmp_path / "save" / "multimodal_fusion_best.bin", weights_only=True)
    assert "a_t_gate.fc.weight" in state and settings_from_checkpoint(state).separate_text_blocks
    # Evaluation infers the separate blocks from the checkpoint.
    evaluated = fusion_main(IEMOCAP, ["--feature_dir", str(tmp_path / "feature"), "--save_dir",
                                      str(tmp_path / "save"), "--train", "False", "--n_head", "2",
                                      "--batch_size", "4"])
    assert evaluated["preds"] == saved_predictions(tmp_path / "save")["preds"]


def test_hidden_dim_mismatch_names_both_numbers(tmp_path):
    write_synthetic_features(tmp_path / "feature", IEMOCAP, {"train": 3, "dev": 2, "test": 2}, width=WIDTH, seed=1)
    with pytest.raises(UserError, match=r"--hidden_dim 32 does not match the width 16"):
        run(IEMOCAP, tmp_path, "--hidden_dim", "32")


def test_reference_checkpoint_same_predictions_through_the_stage(tmp_path):
    """A reference checkpoint evaluates through --train False like the model it was loaded into."""
    write_synthetic_features(tmp_path / "feature", MELD, {"train": 2, "dev": 2, "test": 4}, width=H, seed=2)
    state = reference_state()
    (tmp_path / "save").mkdir()
    torch.save(state, tmp_path / "save" / "multimodal_fusion_best.bin")
    result = fusion_main(MELD, ["--feature_dir", str(tmp_path / "feature"), "--save_dir",
                                str(tmp_path / "save"), "--train", "False", "--n_head", "2"])
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    test = load_dialogues(feature_path(tmp_path / "feature", "test"), "audio_kd", "video_kd", torch.device("cpu"))
    assert result["preds"] == predict_dialogues(model, test, batch_size=1)
    # ... and like the authors' computation: every layer on the padded grid (docs/METHOD.md §5, Speed)
    assert result["preds"] == predict_dialogues(model, test, batch_size=16, packed=False)
    assert torch.allclose(dialogue_logits(model, test, 16), dialogue_logits(model, test, 16, packed=False), atol=1e-5)


def test_fusion_objective_weights_the_anchor_terms():
    n, classes, width = 7, 6, 8
    g = torch.Generator().manual_seed(1)
    out = model.FusionOutput(*(torch.randn(n, classes if i < 3 else width, generator=g) for i in range(6)))
    target = torch.randint(0, classes, (n,), generator=g)
    fusion = script("IEMOCAP", "multimodal_fusion")
    full = fusion.objective(out, target, alpha=0.7, beta=0.8, feature_loss=True)

    def kd(logits, feat):
        return (F.cross_entropy(logits, target) + losses.logit_kd_loss(logits, out.t_logits)
                + losses.feature_kd_loss(feat, out.t_feat))

    expected = F.cross_entropy(out.t_logits, target) + 0.7 * kd(out.a_logits, out.a_feat) + 0.8 * kd(out.v_logits,
                                                                                                      out.v_feat)
    assert torch.allclose(full, expected)
    without = fusion.objective(out, target, alpha=0.0, beta=0.0, feature_loss=True)
    assert torch.allclose(without, F.cross_entropy(out.t_logits, target))


def test_meld_fusion_objective_weights_the_anchor_terms_without_the_feature_loss():
    """MELD's objective (docs/METHOD.md §5): CE(W_t T') + 0.01 KD(A') + 0.08 KD(V'), each anchor's KD term
    CE + L_logit towards the text anchor, without L_feat; checked term by term, at the script's defaults."""
    n, classes, width = 9, 7, 8
    g = torch.Generator().manual_seed(2)
    out = model.FusionOutput(*(torch.randn(n, classes if i < 3 else width, generator=g) for i in range(6)))
    target = torch.randint(0, classes, (n,), generator=g)
    fusion = script("MELD", "multimodal_fusion")
    weights = {key: fusion.DEFAULTS[key] for key in ("alpha", "beta", "feature_loss")}
    assert weights == {"alpha": 0.01, "beta": 0.08, "feature_loss": False}
    loss = fusion.objective(out, target, **weights)

    def kd(logits):
        return F.cross_entropy(logits, target) + losses.logit_kd_loss(logits, out.t_logits)

    expected = F.cross_entropy(out.t_logits, target) + 0.01 * kd(out.a_logits) + 0.08 * kd(out.v_logits)
    assert torch.allclose(loss, expected)
    # No feature term: the anchors' features, however far from the text anchor's, change nothing ...
    far = out._replace(a_feat=5 + 100 * out.a_feat, v_feat=-out.v_feat)
    assert torch.allclose(fusion.objective(far, target, **weights), expected)
    # ... while with --feature_loss True they would (the flag is what leaves L_feat out)
    with_feature = fusion.objective(out, target, alpha=0.01, beta=0.08, feature_loss=True)
    assert torch.allclose(with_feature, expected + 0.01 * losses.feature_kd_loss(out.a_feat, out.t_feat)
                          + 0.08 * losses.feature_kd_loss(out.v_feat, out.t_feat))
    assert not torch.allclose(with_feature, expected)
    # Without the anchors' weights only the text anchor's cross-entropy is left
    assert torch.allclose(fusion.objective(out, target, alpha=0.0, beta=0.0, feature_loss=False),
                          F.cross_entropy(out.t_logits, target))


def fusion_objective(out, target, alpha=0.7, beta=0.8, feature_loss=True):
    """The stage's ``CE(W_t T') + alpha KD(A') + beta KD(V')`` (IEMOCAP's weights) over the given rows."""
    return script("IEMOCAP", "multimodal_fusion").objective(out, target, alpha=alpha, beta=beta,
                                                            feature_loss=feature_loss)


def _loss(model, batch, keep=None):
    """The objective over the batch's real utterances (``keep``: a (B, L) mask of those to count)."""
    out = model(*batch.inputs)
    rows = batch.rows if keep is None else (lambda x: x[keep])
    return fusion_objective(type(out)(*map(rows, out)), rows(batch.labels))


def test_loss_ignores_padding():
    torch.manual_seed(0)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2).eval()
    data = random_dialogues([3, 5, 30], N_SPK)
    with torch.no_grad():
        l1 = _loss(model, data.collate([0, 1], model.padding_speaker))
        # Same two dialogues padded to 30 by a third one that is then masked out of the loss.
        b2 = data.collate([0, 1, 2], model.padding_speaker, packed=False)
        keep = b2.mask.clone()
        keep[2] = False
        l2 = _loss(model, b2, keep)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5)


FUSION = ["--epochs", "3", "--batch_size", "4", "--lr", "3e-3", "--dropout", "0.1", "--n_head", "2",
          "--per_batch_schedule", "--device", "cpu"]


@pytest.fixture(scope="module")
def fusion_seeds(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fusion_seeds")
    write_synthetic_features(root / "feature", MELD, {"train": 12, "dev": 6, "test": 6}, width=16, seed=4)
    main = script("MELD", "multimodal_fusion").main
    reads: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        load = fusion_data.load_dialogues
        patch.setattr(fusion_data, "load_dialogues", lambda path, *a, **k: reads.append(Path(path).name)
                      or load(path, *a, **k))
        result = main(["--feature_dir", str(root / "feature"), "--save_dir", str(root / "save"), *FUSION,
                       "--seeds", "1", "2", "3"])
    single = main(["--feature_dir", str(root / "feature"), "--save_dir", str(root / "single"), *FUSION,
                   "--seed", "2"])
    return {"root": root, "save": root / "save", "result": result, "single": single, "reads": reads}


@pytest.mark.slow
def test_fusion_seeds_write_one_model_per_seed_and_the_summary(fusion_seeds):
    save = fusion_seeds["save"]
    doc = json.loads((save / "multimodal_fusion_seeds.json").read_text(encoding="utf-8"))
    assert [row["seed"] for row in doc["seeds"]] == [1, 2, 3]
    assert all(set(row) == ROW_KEYS | {"test_selected_weighted_f1"} for row in doc["seeds"])
    assert_summary_agrees_with_rows(doc, MELD.labels)
    assert fusion_seeds["result"]["seeds"]["seeds"] == doc["seeds"]
    assert sorted(fusion_seeds["reads"]) == sorted(f"first_stage_{s}_features.pkl" for s in ("train", "dev", "test"))
    for row in doc["seeds"]:
        seed = row["seed"]
        assert (save / f"multimodal_fusion_best_seed{seed}.bin").is_file()
        metrics = json.loads((save / f"multimodal_fusion_metrics_seed{seed}.json").read_text(encoding="utf-8"))
        assert metrics["args"]["seed"] == seed and metrics["complete"] is True
        # Each row is its seed's metrics at the dev-selected epoch ...
        assert row["selected_epoch"] == metrics["selected_epoch"]
        assert row["dev_weighted_f1"] == metrics["dev"]["weighted_f1"] == metrics["dev_weighted_f1"]
        assert row["test_accuracy"] == metrics["test"]["accuracy"]
        assert row["test_weighted_f1"] == metrics["test"]["weighted_f1"]
        assert row["test_per_class_f1"] == {n: metrics["test"]["per_class"][n]["f1-score"] for n in MELD.labels}
        # ... plus the authors' protocol: the best test score over all epochs.
        test_curve = [c["test"]["weighted_f1"] for c in metrics["epochs"]]
        assert row["test_selected_weighted_f1"] == max(test_curve) >= row["test_weighted_f1"]
        assert metrics["test_selected_weighted_f1"] == max(test_curve)
        predictions = json.loads((save / f"multimodal_fusion_best_seed{seed}.json").read_text(encoding="utf-8"))
        assert results.summary(predictions["labels"], predictions["preds"])["weighted_f1"] == \
            pytest.approx(row["test_weighted_f1"])
    # Seeds give different models.
    states = [torch.load(save / f"multimodal_fusion_best_seed{s}.bin", weights_only=True) for s in (1, 2, 3)]
    assert not torch.equal(states[0]["w_t.weight"], states[1]["w_t.weight"])


@pytest.mark.slow
def test_fusion_best_dev_seed_is_kept_under_the_usual_names(fusion_seeds):
    save, rows = fusion_seeds["save"], fusion_seeds["result"]["seeds"]["seeds"]
    best = max(rows, key=lambda r: r["dev_weighted_f1"])["seed"]
    assert fusion_seeds["result"]["seeds"]["best_seed"] == best
    for usual, own in (("multimodal_fusion_best.bin", f"multimodal_fusion_best_seed{best}.bin"),
                       ("multimodal_fusion_best.json", f"multimodal_fusion_best_seed{best}.json"),
                       ("multimodal_fusion_metrics.json", f"multimodal_fusion_metrics_seed{best}.json"),
                       ("multimodal_fusion_curves.png", f"multimodal_fusion_seed{best}_curves.png"),
                       ("multimodal_fusion_confusion.png", f"multimodal_fusion_seed{best}_confusion.png")):
        assert digest(save / usual) == digest(save / own), usual
    assert not list(save.glob(".*.tmp"))
    # The kept checkpoint evaluates like its seed (later stages and --train False run unchanged).
    evaluated = script("MELD", "multimodal_fusion").main(
        ["--feature_dir", str(fusion_seeds["root"] / "feature"), "--save_dir", str(save), "--train", "False",
         "--n_head", "2", "--device", "cpu"])
    assert evaluated["preds"] == json.loads((save / f"multimodal_fusion_best_seed{best}.json").read_text())["preds"]


@pytest.mark.slow
def test_fusion_seed_among_several_equals_its_single_seed_run(fusion_seeds):
    """Seed 2 of ``--seeds 1 2 3`` is exactly ``--seed 2`` alone: fresh model, own shuffle, same numbers."""
    save, single = fusion_seeds["save"], fusion_seeds["root"] / "single"
    ours = torch.load(save / "multimodal_fusion_best_seed2.bin", weights_only=True)
    alone = torch.load(single / "multimodal_fusion_best.bin", weights_only=True)
    assert ours.keys() == alone.keys() and all(torch.equal(ours[k], alone[k]) for k in ours)
    curve = json.loads((save / "multimodal_fusion_metrics_seed2.json").read_text())["epochs"]
    assert [c["train_loss"] for c in curve] == [c["train_loss"] for c in fusion_seeds["single"]["epochs"]]
    # A single seed writes exactly the usual files (plus its plots), no seed files and no summary.
    assert sorted(p.name for p in single.iterdir()) == [
        "multimodal_fusion_attention_dev.npz", "multimodal_fusion_attention_test.npz",
        "multimodal_fusion_best.bin", "multimodal_fusion_best.json",
        "multimodal_fusion_confusion.png", "multimodal_fusion_curves.png", "multimodal_fusion_metrics.json",
        "multimodal_fusion_predictions_dev.csv", "multimodal_fusion_predictions_test.csv"]
    assert "seeds" not in fusion_seeds["single"]


@pytest.mark.slow
def test_fusion_seeds_markdown_shows_both_protocols_and_mean_std(fusion_seeds):
    text = (fusion_seeds["save"] / "multimodal_fusion_seeds.md").read_text(encoding="utf-8")
    doc = fusion_seeds["result"]["seeds"]
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| seed |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    column = cells.index("test-selected wF1 (authors' protocol, comparison only)")
    assert cells[cells.index("test wF1")] and column == cells.index("test wF1") + 1
    assert [f"test F1 {n}" for n in MELD.labels] == cells[-len(MELD.labels):]
    for row in doc["seeds"]:
        line = next(line for line in lines if line.startswith(f"| {row['seed']} |"))
        values = [c.strip() for c in line.strip("|").split("|")]
        assert values[column] == f"{row['test_selected_weighted_f1']:.4f}"
    mean_line = next(line for line in lines if line.startswith("| **mean ± std** |"))
    values = [c.strip() for c in mean_line.strip("|").split("|")]
    m, s = doc["mean"]["test_weighted_f1"], doc["std"]["test_weighted_f1"]
    assert values[cells.index("test wF1")] == f"{m:.4f} ± {s:.4f}"
    assert "authors' protocol" in text and "best dev weighted F1" in text


@pytest.mark.slow
def test_fusion_seed_plots_are_valid_pngs(fusion_seeds):
    save = fusion_seeds["save"]
    for stem in ("multimodal_fusion", "multimodal_fusion_seed1", "multimodal_fusion_seed2",
                 "multimodal_fusion_seed3"):
        assert_png(save / f"{stem}_curves.png", (1000, 400))
        assert_png(save / f"{stem}_confusion.png", (600, 540))


def test_a_plot_that_cannot_be_drawn_never_fails_the_run(tmp_path, monkeypatch, caplog):
    from matplotlib.figure import Figure

    def broken(self, *args, **kwargs):
        raise RuntimeError("no room on the device")

    monkeypatch.setattr(Figure, "savefig", broken)
    write_synthetic_features(tmp_path / "feature", MELD, {"train": 4, "dev": 2, "test": 2}, width=16, seed=1)
    with caplog.at_level(logging.WARNING, logger="magtkd"):
        result = script("MELD", "multimodal_fusion").main(
            ["--feature_dir", str(tmp_path / "feature"), "--save_dir", str(tmp_path / "save"), *FUSION,
             "--epochs", "1", "--seeds", "5", "6"])
    save = tmp_path / "save"
    assert result["seeds"]["seeds"][0]["seed"] == 5
    assert (save / "multimodal_fusion_best.bin").is_file() and (save / "multimodal_fusion_seeds.json").is_file()
    assert not list(save.glob("*.png")) and not list(save.glob(".*.tmp"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not draw" in w and "multimodal_fusion_seed5_curves.png" in w and "no room" in w
               for w in warnings), warnings
    assert any("multimodal_fusion_curves.png is not updated" in w for w in warnings), warnings


# The ablation variants' runs (IEMOCAP, hand-made pickles): 2 epochs of a 2-head model
VARIANT_FLAGS = ["--epochs", "2", "--n_head", "2", "--device", "cpu", "--lr", "1e-3", "--batch_size", "2"]


def fusion_argv(*argv: str) -> dict:
    return script("IEMOCAP", "multimodal_fusion").main(list(argv))


def test_text_only_fusion_never_reads_audio_or_video(iemocap_pickles: Path, tmp_path: Path):
    save = tmp_path / "T"
    trained = fusion_argv(*VARIANT_FLAGS, "--feature_dir", str(iemocap_pickles), "--save_dir", str(save), "--modalities", "T")
    assert trained["sizes"]["variant"] == {"modalities": ["T"], "gates": True, "speaker_embedding": True,
                                           "fusion": "anchor"}
    noisy = tmp_path / "noisy"
    shutil.copytree(iemocap_pickles, noisy)
    rng = np.random.default_rng(5)
    for split in ("train", "dev", "test"):
        path = feature_path(noisy, split)
        data = pickle.loads(path.read_bytes())
        for key in ("audio", "audio_kd", "video", "video_kd"):
            data[key] = {v: [rng.normal(size=x.shape).astype(np.float32) for x in rows] for v, rows in data[key].items()}
        path.write_bytes(pickle.dumps(data))
    clean = fusion_argv("--feature_dir", str(iemocap_pickles), "--save_dir", str(save), "--train", "False", "--n_head", "2")
    other = fusion_argv("--feature_dir", str(noisy), "--save_dir", str(save), "--train", "False", "--n_head", "2")
    assert clean["preds"] == other["preds"]
    assert clean["weighted_f1"] == pytest.approx(trained["test"]["weighted_f1"])
    # ... and the absent keys are not even required
    path = feature_path(noisy, "test")
    data = pickle.loads(path.read_bytes())
    for key in ("audio", "audio_kd", "video", "video_kd"):
        del data[key]
    path.write_bytes(pickle.dumps(data))
    assert fusion_argv("--feature_dir", str(noisy), "--save_dir", str(save), "--train", "False", "--n_head", "2",
                  "--modalities", "T")["preds"] == clean["preds"]
    with pytest.raises(utils.UserError, match=r"--modalities T A V but checkpoint .* --modalities T\b"):
        fusion_argv("--feature_dir", str(iemocap_pickles), "--save_dir", str(save), "--train", "False", "--n_head", "2",
               "--modalities", "T", "A", "V")


@pytest.mark.parametrize("extra", [["--modalities", "A", "V"], ["--gates", "False", "--speaker_embedding", "False"],
                                   ["--fusion", "concat", "--modalities", "T", "V"]])
@pytest.mark.slow
def test_variants_train_and_evaluate_from_the_checkpoint(iemocap_pickles: Path, tmp_path: Path, extra: list[str]):
    trained = fusion_argv(*VARIANT_FLAGS, *extra, "--feature_dir", str(iemocap_pickles), "--save_dir", str(tmp_path))
    again = fusion_argv("--feature_dir", str(iemocap_pickles), "--save_dir", str(tmp_path), "--train", "False", "--n_head", "2")
    assert again["variant"] == trained["sizes"]["variant"]
    assert again["weighted_f1"] == pytest.approx(trained["test"]["weighted_f1"])
    doc = json.loads(StageFiles.fusion(tmp_path).metrics.read_text())
    assert doc["sizes"]["variant"] == trained["sizes"]["variant"]


def test_duplicate_modality_is_an_error(iemocap_pickles: Path, tmp_path: Path):
    with pytest.raises(utils.UserError, match="listed twice"):
        fusion_argv(*VARIANT_FLAGS, "--modalities", "T", "t", "--feature_dir", str(iemocap_pickles), "--save_dir", str(tmp_path))


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


def digests(folder: Path, names) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


@pytest.fixture
def published(tmp_path: Path) -> dict:
    """A complete fusion set (2 epochs) and the digests of its published files."""
    features, save = make_features(tmp_path / "feature"), tmp_path / "save"
    fusion(features, save, "--epochs", "2")
    files = StageFiles.fusion(save)
    names = [p.name for p in files.published()]
    return {"features": features, "save": save, "files": files, "names": names, "before": digests(save, names)}


def assert_previous_set_kept(published: dict) -> None:
    save, files = published["save"], published["files"]
    assert digests(save, published["names"]) == published["before"]
    assert json.loads(files.metrics.read_text())["complete"] is True
    assert not list(save.glob(".*.tmp"))


def test_nan_in_a_training_pickle_names_file_dialogue_utterance_and_key(tmp_path):
    features = make_features(tmp_path / "feature")
    dia = put_nan(feature_path(features, "train"), key="audio_kd")
    with pytest.raises(FeatureFileError, match=rf"first_stage_train_features.pkl: feature 'audio_kd' of dialogue "
                                               rf"{dia}, utterance 2 holds non-finite values \(1 NaN"):
        fusion(features, tmp_path / "save", "--epochs", "1")
    assert not (tmp_path / "save" / "multimodal_fusion_metrics.json").exists()


def test_nan_in_the_test_pickle_stops_the_evaluation(published):
    dia = put_nan(feature_path(published["features"], "test"), key="text", dialogue_index=0, utterance=0)
    with pytest.raises(FeatureFileError, match=rf"test_features.pkl: feature 'text' of dialogue {dia}, utterance 0"):
        fusion(published["features"], published["save"], "--train", "False")


def test_non_finite_logits_at_evaluation_are_an_error(published):
    files = published["files"]
    state = torch.load(files.checkpoint, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    state[key] = torch.full_like(state[key], float("nan"))
    torch.save(state, files.checkpoint)
    with pytest.raises(NonFiniteError, match=r"logits are not finite for dialogue\(s\) \[0, 1, 2"):
        fusion(published["features"], published["save"], "--train", "False")


@pytest.mark.slow
def test_non_finite_loss_stops_before_publishing_and_keeps_the_previous_set(published, monkeypatch):
    module = script("IEMOCAP", "multimodal_fusion")
    real, calls = module.objective, []

    def nan_at_update_4(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(module, "objective", nan_at_update_4)
    with pytest.raises(NonFiniteError, match=r"IEMOCAP multimodal_fusion: the training loss is not finite .* at "
                                             r"epoch 2, update 1 of 3; stopped before publishing"):
        fusion(published["features"], published["save"], "--epochs", "3")
    assert_previous_set_kept(published)
    # The run's own record says it did not finish.
    partial = json.loads(published["files"].in_progress(published["files"].metrics).read_text())
    assert partial["complete"] is False


def test_out_of_memory_mid_training_is_one_line_and_keeps_the_previous_set(published, monkeypatch, capsys):
    module = script("IEMOCAP", "multimodal_fusion")
    real, calls = module.objective, []

    def allocator_fails_at_update_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # torch's CPU allocator's own words, colour codes included
            raise RuntimeError("\x1b[1m[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 4294967296 bytes. Error code 12\x1b[0m")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "objective", allocator_fails_at_update_4)
    with pytest.raises(SystemExit) as exit_:
        utils.run(module.main, ["--feature_dir", str(published["features"]), "--save_dir", str(published["save"]),
                                "--device", "cpu", "--batch_size", "2", "--lr", "1e-3", "--epochs", "3"])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: IEMOCAP/multimodal_fusion.py ran out of CPU memory at --batch_size 2 (per process) "
                      "([enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                      "tried to allocate 4294967296 bytes. Error code 12); try a smaller --batch_size (e.g. 1 with "
                      "--grad_accum 2, the same update). The previous complete outputs are kept"]
    assert_previous_set_kept(published)


@pytest.mark.slow
def test_interrupted_rerun_keeps_the_previous_set_and_resume_publishes(published, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="magtkd")
    files = published["files"]
    real = TrainingState.save

    def killed_after_epoch_one(self, epoch, progress):
        real(self, epoch, progress)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingState, "save", killed_after_epoch_one)
    with pytest.raises(KeyboardInterrupt):
        fusion(published["features"], published["save"], "--epochs", "3", "--seed", "7", "--save_state", "True")
    assert_previous_set_kept(published)
    assert files.in_progress(files.checkpoint).is_file()  # the new run's best so far, not published
    monkeypatch.undo()
    doc = fusion(published["features"], published["save"], "--epochs", "3", "--seed", "7", "--resume", "True")
    assert "resuming from epoch 1 of 3" in caplog.text
    record = json.loads(files.metrics.read_text())
    assert record["complete"] is True and record["args"]["epochs"] == 3 and len(record["epochs"]) == 3
    assert record["selected_epoch"] == doc["selected_epoch"]
    assert not any(p.exists() for p in files.pending())
    assert digests(published["save"], [files.checkpoint.name]) != {files.checkpoint.name: published["before"][files.checkpoint.name]}


def test_meld_fusion_refuses_iemocap_features_naming_both(tmp_path):
    features = make_features(tmp_path / "feature")
    with pytest.raises(FeatureFileError, match=r"are IEMOCAP's .*dataset IEMOCAP.* but MELD/multimodal_fusion.py "
                                               r"reads MELD's"):
        fusion(features, tmp_path / "save", "--epochs", "1", dataset="MELD")


@pytest.mark.slow
def test_iemocap_fusion_refuses_meld_features_also_with_train_false(published, tmp_path):
    from MELD.config import MELD

    features = make_features(tmp_path / "meld_feature", MELD)
    for argv in (["--epochs", "1"], ["--train", "False"]):
        with pytest.raises(FeatureFileError, match=r"are MELD's .* but IEMOCAP/multimodal_fusion.py reads IEMOCAP's"):
            fusion(features, published["save"], *argv)


def test_a_pickle_whose_width_differs_from_its_record_is_refused(tmp_path):
    features = make_features(tmp_path / "feature")
    record = features_record(features)
    record.write_text(json.dumps({**json.loads(record.read_text()), "width": 32}))
    with pytest.raises(FeatureFileError, match=r"has width 16 but .*first_stage_features.json says 32"):
        fusion(features, tmp_path / "save", "--epochs", "1")


@pytest.mark.slow
def test_fusion_evaluation_into_a_read_only_save_dir_is_one_line_with_status_2_before_any_work(tmp_path, capsys):
    features, save = make_features(tmp_path / "feature"), tmp_path / "save"
    fusion(features, save, "--epochs", "1")
    with tmpfs(tmp_path / "ro", size="16m") as folder:
        for path in save.iterdir():
            shutil.copy2(path, folder / path.name)
        remount_read_only(folder)
        argv = ["--feature_dir", str(features), "--save_dir", str(folder), "--device", "cpu", "--train", "False"]
        with pytest.raises(SystemExit) as exit_:
            utils.run(script("IEMOCAP", "multimodal_fusion").main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Refused at parsing, before any work: the evaluation writes multimodal_fusion_best.json there
    assert err[-1] == (f"error: --save_dir {folder}: the folder {folder} is not writable (read-only or another "
                       "user's): choose a folder you can write")
    assert "Traceback" not in "\n".join(err)


def test_fusion_removes_stale_temps_and_publishes_a_complete_record(tmp_path):
    feature_dir = make_features(tmp_path / "feature")
    save_dir = tmp_path / "save"
    save_dir.mkdir()
    strays = [save_dir / f".{name}.x1y2.tmp" for name in
              ("multimodal_fusion_best.bin", "multimodal_fusion.state.pt", "multimodal_fusion_confusion.png")]
    for stray in strays:
        stray.write_bytes(b"")
    script("IEMOCAP", "multimodal_fusion").main(["--feature_dir", str(feature_dir), "--save_dir", str(save_dir),
                                                 "--epochs", "1", "--batch_size", "4"])
    assert not any(stray.exists() for stray in strays)
    record = json.loads(StageFiles.fusion(save_dir).metrics.read_text())
    assert record["complete"] is True and record["dataset"] == "IEMOCAP"
    assert record["labels"] == list(IEMOCAP.labels) and record["width"] > 0


def test_second_fusion_run_into_the_same_folder_stops(tmp_path):
    feature_dir = make_features(tmp_path / "feature")
    save_dir = tmp_path / "save"
    argv = ["--feature_dir", str(feature_dir), "--save_dir", str(save_dir), "--epochs", "1"]
    with output_lock(save_dir, StageFiles.fusion(save_dir).lock_name):  # the first run, still going
        with pytest.raises(UserError, match=rf"{save_dir} is in use: another run \(PID {os.getpid()}\)"):
            script("IEMOCAP", "multimodal_fusion").main(argv)
    assert not StageFiles.fusion(save_dir).checkpoint.exists()


def test_fusion_flags_are_checked_before_any_work(capsys):
    for flag in (["--batch_size", "0"], ["--lr", "0"], ["--epochs", "-3"]):
        with pytest.raises(SystemExit) as exit_:
            script("MELD", "multimodal_fusion").main([*flag, "--train", "False"])
        assert exit_.value.code == 2 and f"argument {flag[0]}" in capsys.readouterr().err


def test_grad_accum_zero_is_refused_at_parsing(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        script("MELD", "multimodal_fusion").main(["--grad_accum", "0"])
    assert exit_.value.code == 2 and "argument --grad_accum: expected an integer >= 1" in capsys.readouterr().err


def test_model_dir_is_for_evaluation_only(tmp_path):
    with pytest.raises(UserError, match="--model_dir gives a trained model: evaluate it with --train False"):
        script("IEMOCAP", "multimodal_fusion").main(["--model_dir", str(tmp_path), "--feature_dir", str(tmp_path),
                                                     "--save_dir", str(tmp_path), "--device", "cpu"])
# --------------------------------------------------------------------------- the authors' runs, draw for draw

# Measured by running the authors' own multimodel_fusion.py on CPU (`.cuda()` made a no-op, DataLoader workers 0,
# torch 2.11.0, one thread): their commit 96af1e3 (May 2025, the paper's attention) and fd5adc6 (Nov 2025, the
# fixed one), on the `trained` fixture's feature pickles, with --hidden_dim 16 --n_head 2 --epochs 6 --batch_size 4
# --lr 3e-3 --dropout 0.1 --seed 2024 (docs/METHOD.md §5, "The authors' run, draw for draw"). Per epoch: the mean
# training loss and the test weighted F1 in %, as their log rounds them; the epoch their code keeps (MELD May: 100.0
# twice, the first stays) and that epoch's test predictions.
AUTHORS_RUNS = {
    ("May", "IEMOCAP"): ([18.473, 15.438, 11.5072, 8.4632, 5.8135, 4.8259], [17.35, 25.48, 35.25, 41.69, 43.89, 62.67],
                         6, "4040321444121010441234441420141114011014044100414401411"),
    ("May", "MELD"): ([4.0008, 3.3617, 2.4555, 1.5169, 0.8316, 0.438], [0.0, 4.69, 46.49, 89.97, 100.0, 100.0],
                      5, "04352365555621653565524526213411124114140234455623244065030354"),
    ("Nov", "IEMOCAP"): ([18.2726, 15.7682, 12.1359, 9.5654, 6.4738, 4.9365], [20.54, 25.85, 34.04, 46.63, 53.12, 77.02],
                         6, "1040121454121010451214451520151115011015044100114501411"),
    ("Nov", "MELD"): ([3.9287, 3.2473, 2.4211, 1.547, 0.8787, 0.4771], [2.15, 9.03, 47.41, 93.5, 98.38, 100.0],
                      6, "04352365555621653565524526213411124114140234455623244065030354"),
}
# At a batch other than their 16, the authors' code counts its warmup in steps of that batch: --schedule_epochs False
AUTHORS_FLAGS = ["--hidden_dim", "16", "--n_head", "2", "--epochs", "6", "--batch_size", "4", "--lr", "3e-3",
                 "--schedule_epochs", "False", "--dropout", "0.1", "--seed", "2024", "--padding_speaker", "authors", "--device", "cpu"]
RELEASES = {"May": "True", "Nov": "False"}


@pytest.fixture(scope="module")
def authors_runs(trained, tmp_path_factory):
    """Our stage with the authors' settings and --selection test, once per release and dataset."""
    runs = {}
    for release, dataset in AUTHORS_RUNS:
        save = tmp_path_factory.mktemp(f"{release}_{dataset}")
        runs[release, dataset] = save, fusion_main({"IEMOCAP": IEMOCAP, "MELD": MELD}[dataset], [
            "--feature_dir", str(trained[dataset][0] / "feature"), "--save_dir", str(save), *AUTHORS_FLAGS,
            "--paper_attention", RELEASES[release], "--selection", "test"])
    return runs


@pytest.mark.slow
@pytest.mark.skipif(not torch.__version__.startswith("2.11."), reason="figures measured with torch 2.11")
@pytest.mark.parametrize("release, dataset", list(AUTHORS_RUNS))
def test_the_authors_run_epoch_by_epoch_and_the_checkpoint_they_keep(authors_runs, release, dataset):
    losses, f1, kept, preds = AUTHORS_RUNS[release, dataset]
    save, doc = authors_runs[release, dataset]
    assert [round(row["train_loss"], 4) for row in doc["epochs"]] == losses
    assert [round(100 * row["test"]["weighted_f1"], 2) for row in doc["epochs"]] == f1
    assert doc["selected_epoch"] == doc["test_selected_epoch"] == kept
    assert "".join(map(str, saved_predictions(save)["preds"])) == preds
    assert doc["args"]["paper_attention"] is (release == "May") and doc["sizes"]["paper_attention"] is (release == "May")
    assert "authors' protocol: selected on test, not an estimate" in doc["selection"]


@pytest.mark.slow
def test_the_selection_keeps_another_epoch_of_the_same_training(authors_runs, trained, tmp_path):
    """Which epoch is kept never changes the training: --selection dev retraces the run epoch for epoch."""
    _, on_test = authors_runs["May", "MELD"]
    on_dev = fusion_main(MELD, ["--feature_dir", str(trained["MELD"][0] / "feature"), "--save_dir", str(tmp_path),
                                *AUTHORS_FLAGS, "--paper_attention", "True"])
    strip = [{k: row[k] for k in ("epoch", "train_loss", "dev", "test")} for row in on_dev["epochs"]]
    assert strip == [{k: row[k] for k in ("epoch", "train_loss", "dev", "test")} for row in on_test["epochs"]]
    best_dev = max(row["dev"]["weighted_f1"] for row in on_dev["epochs"])
    assert on_dev["selected_epoch"] == next(r["epoch"] for r in on_dev["epochs"] if r["dev"]["weighted_f1"] == best_dev)
    assert on_dev["selection"] == "best dev weighted F1" and on_dev["test_selected_epoch"] == on_test["selected_epoch"]


@pytest.mark.slow
def test_evaluation_reads_the_attention_from_the_record_or_the_flag(authors_runs, trained, tmp_path, caplog):
    save, _ = authors_runs["May", "IEMOCAP"]
    feature = ["--feature_dir", str(trained["IEMOCAP"][0] / "feature"), "--device", "cpu", "--batch_size", "4"]
    kept = saved_predictions(save)["preds"]
    with caplog.at_level(logging.INFO, logger="magtkd"):
        recorded = fusion_main(IEMOCAP, [*feature, "--save_dir", str(save), "--train", "False"])
    assert recorded["preds"] == kept and "the May-2025 release's" in caplog.text and "as recorded" in caplog.text
    with pytest.raises(UserError, match="--paper_attention False but checkpoint .* was trained with "
                                        "--paper_attention True"):
        fusion_main(IEMOCAP, [*feature, "--save_dir", str(save), "--train", "False", "--paper_attention", "False"])
    bare = tmp_path / "authors"  # the checkpoint alone, as the authors' code leaves it: no record
    bare.mkdir()
    shutil.copy2(StageFiles.fusion(save).checkpoint, StageFiles.fusion(bare).checkpoint)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="magtkd"):
        fixed = fusion_main(IEMOCAP, [*feature, "--save_dir", str(bare), "--train", "False", "--n_head", "2"])
    assert fixed["preds"] != kept and "no record" in caplog.text and "--paper_attention True for the other" in caplog.text
    paper = fusion_main(IEMOCAP, [*feature, "--save_dir", str(bare), "--train", "False", "--n_head", "2",
                                  "--paper_attention", "True"])
    assert paper["preds"] == kept
