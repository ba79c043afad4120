"""The demo's IEMOCAP pipeline as a model folder (`python -m magtkd.hub export`, docs/METHOD.md §9): predict.py and
``multimodal_fusion.py --train False`` given ``--model_dir`` reproduce what the demo's save folder gives, and the
card's test figures are the metrics document's."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from helpers import flags, script, stage_paths
from IEMOCAP.config import IEMOCAP
from magtkd import hub
from magtkd.artifacts import StageFiles
from magtkd.pickles import FEATURE_KEYS, load_features

yaml = pytest.importorskip("yaml")  # comes with transformers; reads the card's front matter here


@pytest.fixture(scope="module")
def folder(demo, tmp_path_factory) -> dict:
    paths = stage_paths(demo["workdir"], "IEMOCAP")
    tmp = tmp_path_factory.mktemp("model_folder")
    before = {p.name: p.stat().st_mtime_ns for p in paths["save_dir"].iterdir()}
    hub.main(["export", "IEMOCAP", "--save_dir", str(paths["save_dir"]), "--out", str(tmp / "magtkd-iemocap")])
    assert {p.name: p.stat().st_mtime_ns for p in paths["save_dir"].iterdir()} == before  # the source untouched
    return {"paths": paths, "tmp": tmp, "out": tmp / "magtkd-iemocap"}


@pytest.mark.slow
def test_predict_from_the_model_folder_gives_the_save_folders_predictions(folder):
    """The same conversation (the first two test dialogues) through both folders: the same CSV, byte for byte,
    and the same first-stage vectors (the five encoders from their safetensors)."""
    paths, tmp, out = folder["paths"], folder["tmp"], folder["out"]
    conversation = tmp / "conversation.csv"
    frame = pd.read_csv(paths["data_dir"] / IEMOCAP.csv_names["test"], dtype=str, keep_default_na=False)
    frame[frame["Dialogue_ID"].isin(frame["Dialogue_ID"].unique()[:2])].to_csv(conversation, index=False)
    runs = {}
    for name, source in (("model_dir", {"model_dir": out, "save_dir": tmp / "no_save_dir"}),
                         ("save_dir", {"save_dir": paths["save_dir"]})):
        run = {**paths, **source, "feature_dir": tmp / name}
        runs[name] = script("IEMOCAP", "predict").main(flags(run, conversation=conversation,
                                                             out=tmp / f"{name}.csv", device="cpu"))
    table = pd.read_csv(tmp / "model_dir.csv", keep_default_na=False)
    assert len(table) == len(pd.read_csv(conversation)) and set(table["emotion"]) <= set(IEMOCAP.labels)
    assert (tmp / "model_dir.csv").read_bytes() == (tmp / "save_dir.csv").read_bytes()
    ours, theirs = (load_features(runs[name]["paths"]["features"]) for name in ("model_dir", "save_dir"))
    assert ours["vids"] == theirs["vids"] and len(ours["vids"]) == 2
    for key in FEATURE_KEYS:
        for dia in ours["vids"]:
            np.testing.assert_array_equal(np.stack(ours[key][dia]), np.stack(theirs[key][dia]), err_msg=key)


@pytest.mark.slow
def test_evaluation_from_the_model_folder_writes_the_save_folders_predictions_elsewhere(folder):
    paths, out = folder["paths"], folder["out"]
    before = sorted(p.name for p in out.iterdir())
    save_dir = folder["tmp"] / "evaluation"
    result = script("IEMOCAP", "multimodal_fusion").main(
        flags({"feature_dir": paths["feature_dir"], "save_dir": save_dir}, model_dir=out, train="False", device="cpu"))
    saved = StageFiles.fusion(paths["save_dir"]).predictions
    assert (save_dir / saved.name).read_bytes() == saved.read_bytes()
    doc = json.loads(StageFiles.fusion(paths["save_dir"]).metrics.read_text(encoding="utf-8"))
    assert (result["accuracy"], result["weighted_f1"]) == (doc["test"]["accuracy"], doc["test"]["weighted_f1"])
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow
def test_the_cards_test_figures_are_the_metrics_documents(folder):
    doc = json.loads(StageFiles.fusion(folder["paths"]["save_dir"]).metrics.read_text(encoding="utf-8"))
    card = (folder["out"] / hub.CARD).read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    figures = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert figures == {"f1": doc["test"]["weighted_f1"], "accuracy": doc["test"]["accuracy"]}
    assert f"| {doc['test']['accuracy']:.4f} | {doc['test']['weighted_f1']:.4f} |" in card
    config = json.loads((folder["out"] / hub.CONFIG).read_text(encoding="utf-8"))
    assert config["selection"]["seed"] == doc["args"]["seed"] and config["sizes"] == doc["sizes"]
