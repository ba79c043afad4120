"""Every prediction as a row (`magtkd.predictions`; docs/METHOD.md §0, "Predictions"): the CSV's columns
and cells, the ids a feature pickle's utterances get from the dataset's CSV, and the files' names."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from helpers import dataset_spec
from magtkd.artifacts import StageFiles
from magtkd.model import PATHS
from magtkd.predictions import (ID_COLUMNS, SplitOutputs, fusion_columns, pickle_ids, prediction_csv,
                                read_predictions, write_split_outputs)

NAMES = ["ang", "exc", "fru", "hap", "neu", "sad"]


def outputs(with_fusion: bool = False) -> SplitOutputs:
    probs = np.array([[0.7, 0.1, 0.1, 0.05, 0.05, 0.0], [0.0, 0.0, 0.2, 0.0, 0.3, 0.5]])
    ids = {"dialogue_id": [4, 4], "utterance_id": [0, 1], "speaker": ["Ses05F_x_F000", "Ses05F_x_M001"],
           "utterance": ['He said "no", twice.', "Fine"]}
    columns = {}
    if with_fusion:
        columns = {"text_anchor": np.array([0, 5]), "audio_anchor": np.array([1, 5]), "video_anchor": np.array([-1, -1]),
                   **{f"gate_{p}": np.array([0.75, np.nan]) for p in PATHS},
                   **{f"share_{p}": np.array([0.5, 1 / 3]) for p in PATHS}}
    return SplitOutputs(np.array([0, 4]), probs.argmax(1), probs, ids, columns,
                        {"attention_t_t": np.ones((2, 2), np.float32)} if with_fusion else {})


def test_a_row_per_utterance_with_label_names_and_probabilities(tmp_path):
    path = tmp_path / "text_predictions_test.csv"
    path.write_text(prediction_csv(outputs(), NAMES), encoding="utf-8")
    frame = read_predictions(path)
    assert list(frame.columns) == [*ID_COLUMNS, "gold", "predicted", *(f"p_{n}" for n in NAMES)]
    assert frame["utterance"].tolist() == ['He said "no", twice.', "Fine"]  # quoted as CSV needs
    assert frame["gold"].tolist() == ["ang", "neu"] and frame["predicted"].tolist() == ["ang", "sad"]
    assert frame["dialogue_id"].tolist() == [4, 4] and frame.loc[1, "p_sad"] == 0.5


def test_the_fusion_adds_its_anchors_gates_and_shares_empty_where_it_has_none(tmp_path):
    path = tmp_path / "multimodal_fusion_predictions_test.csv"
    path.write_text(prediction_csv(outputs(with_fusion=True), NAMES), encoding="utf-8")
    frame = read_predictions(path)
    assert list(frame.columns)[-len(fusion_columns(PATHS)):] == fusion_columns(PATHS)
    assert frame["text_anchor"].tolist() == ["ang", "sad"] and frame["video_anchor"].tolist() == ["", ""]
    assert frame.loc[0, "gate_t_t"] == 0.75 and np.isnan(frame.loc[1, "gate_t_t"])
    assert frame.loc[1, "share_a_v"] == pytest.approx(1 / 3, abs=1e-6)


def test_a_training_run_writes_under_in_progress_names_and_an_evaluation_the_usual_ones(tmp_path):
    files = StageFiles.fusion(tmp_path, "_seed7")
    assert files.predictions_csv("dev").name == "multimodal_fusion_seed7_predictions_dev.csv"
    assert StageFiles.first_stage(tmp_path, "text_KD_audio").predictions_csv("test").name == \
        "text_KD_audio_predictions_test.csv"
    written = write_split_outputs(files, {"dev": outputs(True), "test": outputs(True)}, NAMES, in_progress=True)
    assert sorted(p.name for p in written) == sorted(p.name for p in tmp_path.iterdir()) == [
        "multimodal_fusion_seed7_attention_dev.npz.partial", "multimodal_fusion_seed7_attention_test.npz.partial",
        "multimodal_fusion_seed7_predictions_dev.csv.partial", "multimodal_fusion_seed7_predictions_test.csv.partial"]
    assert set(files.tables()) == {files.predictions_csv(s) for s in ("dev", "test")} | {
        files.attention_npz(s) for s in ("dev", "test")}
    assert set(files.tables()) <= set(files.published()) and files.published()[-1] == files.checkpoint
    first = StageFiles.first_stage(tmp_path / "eval", "text")
    write_split_outputs(first, {"test": outputs()}, NAMES)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["text_predictions_test.csv"]
    with np.load(files.in_progress(files.attention_npz("test"))) as arrays:
        assert arrays["attention_t_t"].shape == (2, 2)


IEMOCAP_CSV = ("Utterance,Speaker,Dialogue_ID,Start_Time,End_Time,Wav_Path,Video_Path,Emotion,Utterance_ID\n"
               "Hello.,Ses05F_a_F000,0,1.0,2.0,a.wav,a.avi,neu,0\n"
               "\"Hi, you.\",Ses05F_a_M001,0,2.0,3.0,b.wav,a.avi,hap,1\n")


def test_pickle_utterances_take_speakers_and_texts_from_the_matching_csv(tmp_path, caplog):
    spec = dataset_spec("IEMOCAP")
    (tmp_path / "IEMOCAP_test.csv").write_text(IEMOCAP_CSV, encoding="utf-8")
    ids = pickle_ids(spec, tmp_path, "test", [0], [[0, 1]], [[0, 1]], [[4, 3]])
    assert ids == {"dialogue_id": [0, 0], "utterance_id": [0, 1], "speaker": ["Ses05F_a_F000", "Ses05F_a_M001"],
                   "utterance": ["Hello.", "Hi, you."]}
    # Another CSV (a label differs) or none: the pickle's speaker ids, no texts, and the log says why
    caplog.set_level(logging.INFO, logger="magtkd")
    other = pickle_ids(spec, tmp_path, "test", [0], [[0, 1]], [[0, 1]], [[4, 4]])
    assert other == {"dialogue_id": [0, 0], "utterance_id": [0, 1], "speaker": ["0", "1"], "utterance": ["", ""]}
    assert "dialogue 0 utterance 1 of the features is not in" in caplog.text
    assert pickle_ids(spec, tmp_path / "nowhere", "test", [0], [[0, 1]], [[0, 1]], [[4, 3]])["utterance"] == ["", ""]
    assert "no speaker names or texts" in caplog.text
