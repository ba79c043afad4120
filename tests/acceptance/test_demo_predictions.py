"""Every prediction as a row, after the demo (docs/METHOD.md §0, "Predictions"): each stage of both datasets
wrote ``<name>_predictions_{dev,test}.csv`` with the columns scripts rely on, one row per utterance in the
split's order, and the accuracy and weighted F1 recomputed from the rows are its metrics document's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import dataset_spec, stage_paths
from magtkd.artifacts import FIRST_STAGE_MODELS, StageFiles, feature_path
from magtkd.dataset import load_split
from magtkd.model import PATHS
from magtkd.pickles import load_features
from magtkd.predictions import ID_COLUMNS, fusion_columns, read_predictions
from magtkd.results import summary

pytestmark = pytest.mark.slow

FIRST_STAGE = [name for name, _ in FIRST_STAGE_MODELS.values()]


def recomputed(frame, labels) -> dict:
    index = {label: i for i, label in enumerate(labels)}
    return summary(frame["gold"].map(index).to_numpy(), frame["predicted"].map(index).to_numpy())


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("name", FIRST_STAGE)
def test_each_first_stage_model_wrote_its_rows_and_they_agree_with_its_metrics(demo, dataset, name):
    spec, paths = dataset_spec(dataset), stage_paths(demo["workdir"], dataset)
    files = StageFiles.first_stage(paths["save_dir"], name)
    doc = json.loads(files.metrics.read_text(encoding="utf-8"))
    for split in ("dev", "test"):
        frame = read_predictions(files.predictions_csv(split))
        assert list(frame.columns) == [*ID_COLUMNS, "gold", "predicted", *(f"p_{label}" for label in spec.labels)]
        utterances = load_split(spec, paths["data_dir"], split)
        assert frame[list(ID_COLUMNS)].values.tolist() == [[u.dialogue_id, u.utterance_id, u.speaker, u.text]
                                                          for u in utterances]
        assert frame["gold"].tolist() == [u.emotion for u in utterances]
        scores = recomputed(frame, spec.labels)
        assert scores == {k: doc[split][k] for k in ("accuracy", "weighted_f1")}, split
        probs = frame[[f"p_{label}" for label in spec.labels]].to_numpy()
        assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_the_fusion_wrote_its_rows_per_seed_with_texts_and_the_kept_seed_under_the_usual_names(demo, dataset):
    spec, paths = dataset_spec(dataset), stage_paths(demo["workdir"], dataset)
    usual = StageFiles.fusion(paths["save_dir"])
    summary_doc = json.loads(usual.seeds_summary.read_text(encoding="utf-8"))
    texts = {split: {(u.dialogue_id, u.utterance_id): (u.speaker, u.text)
                     for u in load_split(spec, paths["data_dir"], split)} for split in ("dev", "test")}
    for row in summary_doc["seeds"]:
        files = StageFiles.fusion(paths["save_dir"], f"_seed{row['seed']}")
        doc = json.loads(files.metrics.read_text(encoding="utf-8"))
        for split in ("dev", "test"):
            frame = read_predictions(files.predictions_csv(split))
            assert list(frame.columns) == [*ID_COLUMNS, "gold", "predicted", *(f"p_{label}" for label in spec.labels),
                                           *fusion_columns(PATHS)]
            features = load_features(feature_path(paths["feature_dir"], split), keys=())
            assert list(zip(frame["dialogue_id"], frame["utterance_id"])) == [
                (v, u) for v in features["vids"] for u in features["dia2utt"][v]]
            # The pipeline passes --data_dir: speakers and texts are the CSV's
            assert list(zip(frame["speaker"], frame["utterance"])) == [
                texts[split][(d, u)] for d, u in zip(frame["dialogue_id"], frame["utterance_id"])]
            assert recomputed(frame, spec.labels) == {k: doc[split][k] for k in ("accuracy", "weighted_f1")}
            shares = frame[[f"share_{p}" for p in PATHS]].to_numpy()
            assert np.allclose(shares.reshape(len(frame), 3, 3).sum(axis=2), 1, atol=1e-5)  # per anchor
    best = StageFiles.fusion(paths["save_dir"], f"_seed{summary_doc['best_seed']}")
    for split in ("dev", "test"):
        assert usual.predictions_csv(split).read_bytes() == best.predictions_csv(split).read_bytes()
        assert usual.attention_npz(split).read_bytes() == best.attention_npz(split).read_bytes()
