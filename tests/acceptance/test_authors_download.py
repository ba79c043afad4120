"""The paper's computation on downloaded or demo artifacts (docs/METHOD.md §0, §5, §7): the reproduction table on
the demo's features, and the authors' download as it ships: its nested feature folder and first-stage
checkpoints in their own layout, without records, through ``multimodal_fusion.py --train False`` and
``predict.py``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import assert_png, authors_layout, flags, script, stage_paths
from magtkd.artifacts import FIRST_STAGE_MODELS, StageFiles, feature_path
from magtkd.results import AUTHORS_PROTOCOL, authors_kept_row
from magtkd.utils import FeatureFileError

FAST = ["--device", "cpu", "--epochs", "5", "--lr", "1e-3", "--batch_size", "2", "--dropout", "0.1"]


@pytest.fixture(scope="module")
def reproduction(demo, one_thread, tmp_path_factory) -> dict:
    """``IEMOCAP/ablation.py --table reproduction`` on the demo's features, two seeds (2024 among them)."""
    save_dir = tmp_path_factory.mktemp("reproduction")
    features = stage_paths(demo["workdir"], "IEMOCAP")["feature_dir"]
    doc = script("IEMOCAP", "ablation").main(["--table", "reproduction", "--seeds", "2024", "7", "--feature_dir",
                                              str(features), "--save_dir", str(save_dir), *FAST])
    return {"doc": doc, "folder": save_dir / "ablation"}


@pytest.mark.slow
def test_the_reproduction_table_reads_each_run_under_both_selections(reproduction):
    doc, folder = reproduction["doc"], reproduction["folder"]
    assert json.loads((folder / "reproduction.json").read_text(encoding="utf-8")) == json.loads(json.dumps(doc))
    assert [row["key"] for row in doc["attentions"]] == ["paper", "fixed"]
    for row in doc["attentions"]:
        on_test, on_dev = row["cells"]
        for seed in (2024, 7):
            metrics = json.loads(StageFiles.fusion(folder / "reproduction" / row["key"], f"_seed{seed}")
                                 .metrics.read_text(encoding="utf-8"))
            assert metrics["args"]["paper_attention"] is (row["key"] == "paper")
            assert metrics["args"]["padding_speaker"] == "authors"
            kept = authors_kept_row(metrics["epochs"])
            by_seed = {s["seed"]: s for s in on_test["seeds"]}
            assert by_seed[seed]["epoch"] == kept["epoch"]
            assert by_seed[seed]["weighted_f1"] == pytest.approx(100 * kept["test"]["weighted_f1"])
            dev = {s["seed"]: s for s in on_dev["seeds"]}[seed]
            assert (dev["epoch"], dev["weighted_f1"]) == (metrics["selected_epoch"],
                                                          pytest.approx(100 * metrics["test"]["weighted_f1"]))
        assert on_test["protocol"] == AUTHORS_PROTOCOL and on_test["seed_2024"]["seed"] == 2024
        assert on_test["weighted_f1_mean"] >= on_dev["weighted_f1_mean"] - 1e-9  # kept on test: never below
    assert 0 < doc["paired_test"]["p_value"] <= 1 and doc["paper"]["weighted_f1"] == 69.59
    table = (folder / "reproduction.md").read_text(encoding="utf-8")
    assert "69.59" in table and "Paired bootstrap of the two attentions" in table
    assert_png(folder / "reproduction.png", (590, 420))


def download_like(demo_paths: dict[str, Path], root: Path, dataset: str) -> dict[str, Path]:
    """The demo's artifacts as the authors' archive lays them out: ``MAGTKD/<DS>[/<DS>]/feature`` with the three
    pickles (MELD nested once more, as their archive) and the five first-stage checkpoints in their code's
    layout (``text_model.``/``model.``, heads ``W`` and ``classifier``) without records; beside them the
    fusion checkpoint a user trained on those features, with its record."""
    base = root / "MAGTKD" / dataset / (dataset if dataset == "MELD" else "")
    (base / "feature").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        shutil.copy2(feature_path(demo_paths["feature_dir"], split), feature_path(base / "feature", split))
    save = base / dataset / "save_model"
    save.mkdir(parents=True)
    for key, (name, _) in FIRST_STAGE_MODELS.items():
        ours = torch.load(demo_paths["save_dir"] / f"{name}.bin", map_location="cpu", weights_only=True)
        modality = key.removesuffix("_kd")
        hidden = next((v.shape[1] for k, v in ours.items() if k.endswith("word_embeddings.weight")), 0)
        theirs = authors_layout(ours, modality, hidden, classifier="classifier" if modality == "text" else "W",
                                projection="W")
        torch.save(theirs, save / f"{name}.bin")
    trained = StageFiles.fusion(demo_paths["save_dir"])
    for path in (trained.checkpoint, trained.metrics):
        shutil.copy2(path, save / path.name)
    return {"root": root / "MAGTKD" / dataset, "feature_dir": base / "feature", "save_dir": save}


@pytest.mark.slow
def test_the_download_as_it_ships_through_evaluation_and_predict(demo, tmp_path):
    demo_paths = stage_paths(demo["workdir"], "MELD")
    download = download_like(demo_paths, tmp_path, "MELD")
    assert not list(download["save_dir"].glob("text*.json"))  # the authors' checkpoints carry no record
    fusion = script("MELD", "multimodal_fusion").main
    with pytest.raises(FeatureFileError, match=f"pass --feature_dir {download['feature_dir']}"):
        fusion(["--feature_dir", str(download["root"]), "--save_dir", str(download["save_dir"]), "--train", "False",
                "--device", "cpu"])
    evaluated = fusion(["--feature_dir", str(download["feature_dir"]), "--save_dir", str(download["save_dir"]),
                        "--train", "False", "--device", "cpu"])
    saved = json.loads(StageFiles.fusion(demo_paths["save_dir"]).predictions.read_text(encoding="utf-8"))
    assert evaluated["preds"] == saved["preds"]

    # predict.py with their first-stage checkpoints: the same emotions as with ours
    conversation = tmp_path / "conversation.csv"
    shutil.copy2(demo_paths["data_dir"] / "test_meld_emo.csv", conversation)
    tables = {}
    for name, save_dir in (("ours", demo_paths["save_dir"]), ("theirs", download["save_dir"])):
        paths = {**demo_paths, "save_dir": save_dir, "feature_dir": tmp_path / name / "feature"}
        out = tmp_path / name / "predictions.csv"
        script("MELD", "predict").main(flags(paths, conversation=conversation, out=out, device="cpu"))
        tables[name] = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert tables["theirs"].equals(tables["ours"])
