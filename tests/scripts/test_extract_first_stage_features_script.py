"""``<DS>/extract_first_stage_features.py`` (stage 7, docs/METHOD.md §4): the three pickles from the five
first-stage checkpoints (untrained stand-ins here: the layout does not depend on training), over the frames
stage 3 stored from the generated data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import copy_checkpoints, dataset_spec, flags, generated_paths, script
from magtkd.artifacts import FIRST_STAGE_MODELS, feature_path, features_record
from magtkd.dataset import group_dialogues, load_speaker2id, load_split
from magtkd.pickles import FEATURE_KEYS, load_features
from magtkd.spec import SPLITS
from magtkd.synthetic.models import AV_HIDDEN


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_extraction_writes_the_three_pickles_of_the_five_models(dataset, generated, untrained, tmp_path):
    spec = dataset_spec(dataset)
    paths = copy_checkpoints({**generated_paths(generated, dataset, tmp_path), "save_dir": untrained(dataset)},
                             tmp_path, *(f"{name}.bin" for name, _ in FIRST_STAGE_MODELS.values()))
    script(dataset, "video_feature_extract").main(flags(paths, num_workers=0))
    script(dataset, "extract_first_stage_features").main(flags(paths, device="cpu"))

    record = json.loads(features_record(paths["feature_dir"]).read_text(encoding="utf-8"))
    assert record["complete"] is True and record["dataset"] == dataset and record["labels"] == list(spec.labels)
    assert record["width"] == AV_HIDDEN and record["pickles"] == [feature_path("", s).name for s in SPLITS]
    speaker2id = load_speaker2id(paths["data_dir"]) if dataset == "MELD" else None
    for split in SPLITS:
        features = load_features(feature_path(paths["feature_dir"], split))
        dialogues = group_dialogues(load_split(spec, paths["data_dir"], split))
        assert features["vids"] == [dia for dia, _ in dialogues]
        for dia, utts in dialogues:
            assert features["dia2utt"][dia] == [u.utterance_id for u in utts]
            assert features["labels"][dia] == [u.label for u in utts]
            if speaker2id is not None:  # MELD: the global ids of speaker2id.json; IEMOCAP: 0/1 per dialogue
                assert features["speakers"][dia] == [speaker2id[u.speaker] for u in utts]
            else:
                assert set(features["speakers"][dia]) <= {0, 1} and features["speakers"][dia][0] == 0
            for key in FEATURE_KEYS:
                assert [v.shape for v in features[key][dia]] == [(AV_HIDDEN,)] * len(utts), key
                assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in features[key][dia]), key


def test_a_model_folder_of_the_other_dataset_is_refused_before_any_work(generated, tmp_path):
    """--model_dir (magtkd.hub, docs/METHOD.md §9): the folder's config.json must name this dataset and labels."""
    from magtkd.hub import ModelFolderError

    folder = tmp_path / "magtkd-meld"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"magtkd_model_folder": 1, "dataset": "MELD",
                                                    "labels": list(dataset_spec("MELD").labels)}), encoding="utf-8")
    paths = generated_paths(generated, "IEMOCAP", tmp_path)
    with pytest.raises(ModelFolderError, match="holds MELD's models .* this script is IEMOCAP's"):
        script("IEMOCAP", "extract_first_stage_features").main(flags(paths, model_dir=folder, device="cpu"))
    assert not paths["feature_dir"].exists()
