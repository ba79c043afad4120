"""Several seeds (``--seeds``): one model per seed, the seeds summary (mean ± std, the test-selected
column of the fusion), the best dev seed under the usual names, and the plots beside each metrics JSON."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import copy_checkpoints, dataset_spec, flags, script, stage_paths
from magtkd import artifacts, cli, dataset, fusion_data, results, utils
from magtkd.synthetic.features import write_synthetic_features
from MELD.config import MELD
from test_kd_extract import tiny_iemocap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {"seed", "selected_epoch", "dev_weighted_f1", "test_accuracy", "test_weighted_f1", "test_per_class_f1"}
FUSION = ["--epochs", "3", "--batch_size", "4", "--lr", "3e-3", "--dropout", "0.1", "--n_head", "2",
          "--per_batch_schedule", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_png(path: Path, size: tuple[int, int]) -> None:
    """A real PNG of the expected pixel size with more than a blank canvas in it."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, (path, len(data))
    with Image.open(path) as image:
        assert image.size == size, path
        assert len(image.convert("L").getcolors()) > 20, path  # grey levels: drawn, not blank


def assert_summary_agrees_with_rows(doc: dict, label_names) -> None:
    """``mean`` / ``std`` (sample, n - 1) of every numeric key, recomputed from the per-seed rows."""
    assert {"seeds", "mean", "std", "best_seed"} <= set(doc) <= {"seeds", "mean", "std", "best_seed", "variant"}
    rows = doc["seeds"]
    assert doc["best_seed"] == max(rows, key=lambda r: r["dev_weighted_f1"])["seed"]
    numeric = [k for k in rows[0] if k not in ("seed", "test_per_class_f1")]
    assert set(doc["mean"]) == set(doc["std"]) == {*numeric, "test_per_class_f1"}
    for key in numeric:
        values = np.array([row[key] for row in rows], dtype=float)
        assert doc["mean"][key] == pytest.approx(values.mean()), key
        assert doc["std"][key] == pytest.approx(values.std(ddof=1)), key
    for label in label_names:
        values = np.array([row["test_per_class_f1"][label] for row in rows])
        assert doc["mean"]["test_per_class_f1"][label] == pytest.approx(values.mean()), label
        assert doc["std"]["test_per_class_f1"][label] == pytest.approx(values.std(ddof=1)), label


def digest(path: Path) -> bytes:
    return path.read_bytes()


# --------------------------------------------------------------------------- fusion


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
        "multimodal_fusion.state.pt", "multimodal_fusion_best.bin", "multimodal_fusion_best.json", "multimodal_fusion_confusion.png",
        "multimodal_fusion_curves.png", "multimodal_fusion_metrics.json"]
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


# --------------------------------------------------------------------------- first stage (KD: the longest loop)


@pytest.mark.slow
def test_kd_seeds_fresh_models_summary_and_best_copy(demo, generated, tmp_path, monkeypatch):
    """``KD.py --seeds 7 8``: per-seed student checkpoints (each as its single-seed run), the summary,
    the best dev seed as text_KD_audio.bin, plots beside every metrics JSON."""
    demo_paths = stage_paths(demo["workdir"], "IEMOCAP")
    data_dir = tiny_iemocap(generated, tmp_path, {"train": 8, "dev": 4, "test": 4})
    base = {**demo_paths, "data_dir": data_dir, "pretrained_dir": generated / "pretrained_model"}
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


# --------------------------------------------------------------------------- units


def test_seeds_summary_mean_and_sample_std():
    rows = [{"seed": 1, "selected_epoch": 2, "dev_weighted_f1": 0.5, "test_accuracy": 0.6, "test_weighted_f1": 0.4,
             "test_per_class_f1": {"a": 0.2, "b": 0.8}},
            {"seed": 2, "selected_epoch": 4, "dev_weighted_f1": 0.7, "test_accuracy": 0.8, "test_weighted_f1": 0.6,
             "test_per_class_f1": {"a": 0.4, "b": 0.6}}]
    doc = results.seeds_summary(rows)
    assert doc["seeds"] == rows
    mean, std = doc["mean"], doc["std"]
    assert mean.pop("test_per_class_f1") == pytest.approx({"a": 0.3, "b": 0.7})
    assert mean == pytest.approx({"selected_epoch": 3.0, "dev_weighted_f1": 0.6, "test_accuracy": 0.7,
                                  "test_weighted_f1": 0.5})  # no "seed": an identifier, not a measurement
    sd = 2 ** 0.5 / 10  # two values 0.2 apart: sample std = 0.1 * sqrt(2)
    assert std.pop("test_per_class_f1") == pytest.approx({"a": sd, "b": sd})
    assert std == pytest.approx({"selected_epoch": 2 ** 0.5, "dev_weighted_f1": sd, "test_accuracy": sd,
                                 "test_weighted_f1": sd})
    assert results.seeds_summary(rows[:1])["std"]["test_weighted_f1"] == 0.0


def test_seed_list_defaults_and_errors():
    assert cli.seed_list(2024, None, True) == [2024]
    assert cli.seed_list(2024, [3, 1], True) == [3, 1]
    with pytest.raises(utils.UserError, match=r"--seeds lists \[3\] more than once"):
        cli.seed_list(0, [3, 1, 3], True)
    with pytest.raises(utils.UserError, match="--train False"):
        cli.seed_list(0, [1, 2], False)
    assert cli.seed_tag(5, [5]) == "" and cli.seed_tag(5, [5, 6]) == "_seed5"


def test_pipeline_passes_seeds_to_training_stages_only(tmp_path):
    from magtkd.pipeline import STAGES, Context, Options, stage_argv

    options = Options(None, 0, None, None, None, False, (1, 2), "--lr 1e-3", False, False, 1)
    ctx = Context(dataset_spec("IEMOCAP"), tmp_path, tmp_path, tmp_path, tmp_path)
    for stage in STAGES:
        argv = stage_argv(stage, ctx, options)
        if stage.kind in ("train", "fusion"):
            assert argv[argv.index("--seeds"):][:3] == ["--seeds", "1", "2"], stage.name
        else:
            assert "--seeds" not in argv, stage.name


def test_first_stage_help_lists_seeds(capsys):
    with pytest.raises(SystemExit):
        script("MELD", "text").main(["--help"])
    assert "--seeds SEEDS [SEEDS ...]" in capsys.readouterr().out


def test_copy_file_is_atomic_and_streams(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * (3 << 20))
    artifacts.copy_file(src, tmp_path / "out" / "b.bin")
    assert (tmp_path / "out" / "b.bin").read_bytes() == src.read_bytes()
    assert not list((tmp_path / "out").glob(".*"))
    shutil.rmtree(tmp_path / "out")
