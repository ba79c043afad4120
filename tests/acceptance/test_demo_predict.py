"""``<DS>/predict.py``: the trained models on a user's own conversation CSV.

Both predict scripts run on the demo's prepared test CSV with the demo's
checkpoints (``demo`` fixture) and must reproduce, utterance for utterance, the
fusion stage's test predictions, through the same frames, features and speaker
ids. Each run writes its frames and features into its own temporary feature
folder, so the demo's artifacts stay untouched.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import copy_checkpoints, flags, script, stage_paths
from IEMOCAP.config import IEMOCAP
from magtkd import dataset as magtkd_dataset
from magtkd.artifacts import StageFiles, SubstitutionReport, feature_path
from magtkd.checkpoints import FusionCheckpointError
from magtkd.model import PATHS
from magtkd.pickles import FEATURE_KEYS, load_features
from magtkd.predictions import ID_COLUMNS, fusion_columns
from magtkd.utils import DataError
from MELD.config import MELD


FUSION_CHECKPOINT = StageFiles.fusion("").checkpoint.name  # multimodal_fusion_best.bin
FUSION_PREDICTIONS = StageFiles.fusion("").predictions.name  # multimodal_fusion_best.json
DATASETS = {"IEMOCAP": IEMOCAP, "MELD": MELD}

CHECKPOINTS = ("text.bin", "audio.bin", "video.bin", "text_KD_audio.bin", "text_KD_video.bin", FUSION_CHECKPOINT)


def predict(paths: dict[str, Path], dataset: str, conversation: Path, out: Path, **extra: str) -> dict:
    return script(dataset, "predict").main(flags(paths, conversation=conversation, out=out, device="cpu", **extra))


@pytest.fixture(scope="module", params=["IEMOCAP", "MELD"])
def predicted(request, demo, tmp_path_factory):
    """One predict run per dataset on the demo's test CSV (a copy), into a fresh feature folder."""
    dataset = request.param
    spec = DATASETS[dataset]
    demo_paths = stage_paths(demo["workdir"], dataset)
    tmp = tmp_path_factory.mktemp(f"predict_{dataset}")
    paths = {**demo_paths, "feature_dir": tmp / "feature"}
    conversation = tmp / "conversation.csv"
    shutil.copy2(demo_paths["data_dir"] / spec.csv_names["test"], conversation)
    out = tmp / "out" / "predictions.csv"
    result = predict(paths, dataset, conversation, out)
    return {"dataset": dataset, "spec": spec, "demo_paths": demo_paths, "paths": paths, "tmp": tmp,
            "conversation": conversation, "out": out, "result": result,
            "table": pd.read_csv(out, dtype={"Speaker": str, "Utterance": str}, keep_default_na=False)}


@pytest.mark.slow
def test_emotions_match_the_fusion_stage_test_predictions(predicted):
    spec, table = predicted["spec"], predicted["table"]
    demo_paths = predicted["demo_paths"]
    saved = json.loads((demo_paths["save_dir"] / FUSION_PREDICTIONS).read_text(encoding="utf-8"))
    test = load_features(feature_path(demo_paths["feature_dir"], "test"), keys=("text",))
    keys = [(dia, utt) for dia in test["vids"] for utt in test["dia2utt"][dia]]  # the predictions' order
    expected = {key: spec.labels[p] for key, p in zip(keys, saved["preds"], strict=True)}
    got = {(d, u): e for d, u, e in zip(table["Dialogue_ID"], table["Utterance_ID"], table["emotion"])}
    assert len(table) == len(keys) == len(got)
    assert got == expected
    assert predicted["result"]["emotions"] == table["emotion"].tolist()


@pytest.mark.slow
def test_output_columns_order_and_probabilities(predicted):
    spec, table = predicted["spec"], predicted["table"]
    source = pd.read_csv(predicted["conversation"], dtype=str, keep_default_na=False)
    assert list(table.columns) == ["Dialogue_ID", "Utterance_ID", "Speaker", "Utterance", "emotion",
                                   *(f"p_{label}" for label in spec.labels), *ID_COLUMNS, "predicted",
                                   *fusion_columns(PATHS)]
    # The stages' predictions columns repeat predict.py's own; the anchors are the fusion's (the prediction
    # is the text anchor's), its gates in [1/2, 1)
    assert table["predicted"].tolist() == table["emotion"].tolist() == table["text_anchor"].tolist()
    assert table["utterance"].tolist() == table["Utterance"].tolist()
    assert set(table["audio_anchor"]) <= set(spec.labels)
    gates = table[[f"gate_{p}" for p in PATHS]].to_numpy()
    assert ((gates >= 0.5) & (gates < 1)).all()
    # The file's order and its ids, speakers and texts (byte-exact)
    assert table["Dialogue_ID"].astype(str).tolist() == source["Dialogue_ID"].tolist()
    assert table["Utterance_ID"].astype(str).tolist() == source["Utterance_ID"].tolist()
    assert table["Speaker"].tolist() == source["Speaker"].tolist()
    assert table["Utterance"].tolist() == source["Utterance"].tolist()
    probs = table[[f"p_{label}" for label in spec.labels]].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The emotion is the most probable label
    assert [spec.labels[i] for i in probs.argmax(axis=1)] == table["emotion"].tolist()


@pytest.mark.slow
def test_features_and_speakers_are_the_pipeline_s(predicted):
    """The conversation's pickle holds exactly the extraction stage's test vectors and speaker ids."""
    ours = load_features(predicted["result"]["paths"]["features"])
    theirs = load_features(feature_path(predicted["demo_paths"]["feature_dir"], "test"))
    assert ours["vids"] == theirs["vids"] and ours["dia2utt"] == theirs["dia2utt"]
    assert ours["speakers"] == theirs["speakers"]
    for key in FEATURE_KEYS:
        for dia in ours["vids"]:
            np.testing.assert_array_equal(np.stack(ours[key][dia]), np.stack(theirs[key][dia]), err_msg=key)
    # Frames live in the conversation's own folder, apart from the dataset's splits
    frames = list((predicted["paths"]["feature_dir"] / "predict" / "video").glob("conversation-*/*.npy"))
    assert len(frames) == len(predicted["table"])
    assert not (predicted["paths"]["feature_dir"] / "video").exists()


@pytest.mark.slow
def test_substitutions_are_the_pipeline_s(predicted):
    """Every unreadable medium of the test split is substituted and reported as the pipeline did."""
    out = predicted["out"]
    report = out.with_name("predictions_substitutions.tsv")
    assert Path(predicted["result"]["paths"]["substitutions"]) == report
    ours = {(s.key.split("/")[-1], s.path, s.reason, s.replacement) for s in SubstitutionReport.read(report)}
    feature_dir = predicted["demo_paths"]["feature_dir"]
    pipeline = SubstitutionReport.read(feature_dir / "video" / "substitutions.tsv") + \
        SubstitutionReport.read(feature_dir / "first_stage_substitutions.tsv")
    theirs = {(s.key.split("/")[-1], s.path, s.reason, s.replacement) for s in pipeline if s.key.startswith("test/")}
    assert ours == theirs
    if predicted["dataset"] == "MELD":
        assert ours  # the generated MELD test split has missing and corrupt clips


@pytest.mark.slow
def test_interleaved_dialogues_keep_file_order(predicted):
    """File order with interleaved dialogues, no Emotion column, absolute media paths: same predictions."""
    dataset, spec, table = predicted["dataset"], predicted["spec"], predicted["table"]
    source = pd.read_csv(predicted["conversation"], dtype=str, keep_default_na=False)
    first_two = source[source["Dialogue_ID"].isin(source["Dialogue_ID"].unique()[:2])]
    by_dialogue = [rows for _, rows in first_two.groupby("Dialogue_ID", sort=False)]
    interleaved = pd.concat([by_dialogue[0].iloc[:1], by_dialogue[1], by_dialogue[0].iloc[1:]])
    interleaved = interleaved.drop(columns=["Emotion"])
    data_dir = predicted["demo_paths"]["data_dir"]
    for column in {spec.audio_column, spec.video_column}:
        interleaved[column] = [str(magtkd_dataset.MediaResolver(spec, data_dir)(v)) for v in interleaved[column]]
    conversation = predicted["tmp"] / "interleaved.csv"
    interleaved.to_csv(conversation, index=False)
    out = predicted["tmp"] / "interleaved_predictions.csv"
    paths = {**predicted["paths"], "data_dir": predicted["tmp"] / "no_such_folder"}
    if dataset == "MELD":  # MELD reads its speaker map from --data_dir
        paths["data_dir"] = data_dir
    predict(paths, dataset, conversation, out)
    got = pd.read_csv(out, dtype={"Speaker": str, "Utterance": str}, keep_default_na=False)
    assert got["Utterance_ID"].astype(str).tolist() == interleaved["Utterance_ID"].tolist()
    assert got["Dialogue_ID"].astype(str).tolist() == interleaved["Dialogue_ID"].tolist()
    before = table.set_index(["Dialogue_ID", "Utterance_ID"])
    after = got.set_index(["Dialogue_ID", "Utterance_ID"])
    p_columns = [f"p_{label}" for label in spec.labels]
    p_before, p_after = before.loc[after.index, p_columns].to_numpy(), after[p_columns].to_numpy()
    # Other batches (fewer utterances and dialogues) change the float sums only
    assert np.allclose(p_after, p_before, atol=1e-4)
    top_two = np.sort(p_before, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 1e-3
    assert (after["emotion"].to_numpy()[clear] == before.loc[after.index, "emotion"].to_numpy()[clear]).all()
    folders = sorted((predicted["paths"]["feature_dir"] / "predict" / "video").glob("conversation-*"))
    assert len(folders) == 2  # the other conversation's frames are never reused


@pytest.mark.slow
def test_missing_utterance_column_is_named(predicted):
    conversation = predicted["tmp"] / "no_utterance.csv"
    pd.read_csv(predicted["conversation"], dtype=str, keep_default_na=False).drop(columns=["Utterance"]).to_csv(
        conversation, index=False)
    out = predicted["tmp"] / "never.csv"
    with pytest.raises(DataError, match=r"no_utterance\.csv: missing column 'Utterance'"):
        predict(predicted["paths"], predicted["dataset"], conversation, out)
    assert not out.exists()


@pytest.mark.slow
def test_empty_file_is_named(predicted, tmp_path):
    for name, text in (("empty.csv", ""), ("header_only.csv", "Dialogue_ID,Utterance_ID\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        predict(predicted["paths"], predicted["dataset"], tmp_path / "empty.csv", tmp_path / "out.csv")
    with pytest.raises(DataError, match=r"header_only\.csv: missing column"):
        predict(predicted["paths"], predicted["dataset"], tmp_path / "header_only.csv", tmp_path / "out.csv")
    columns = [c for c in predicted["spec"].required_columns if c != "Emotion"]
    (tmp_path / "no_rows.csv").write_text(",".join(columns) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no_rows\.csv: no data rows"):
        predict(predicted["paths"], predicted["dataset"], tmp_path / "no_rows.csv", tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.slow
def test_other_dataset_checkpoint_is_refused_before_any_work(predicted, demo, tmp_path):
    dataset = predicted["dataset"]
    other = "MELD" if dataset == "IEMOCAP" else "IEMOCAP"
    paths = copy_checkpoints({**predicted["paths"], "feature_dir": tmp_path / "feature"}, tmp_path, *CHECKPOINTS)
    shutil.copy2(stage_paths(demo["workdir"], other)["save_dir"] / FUSION_CHECKPOINT, paths["save_dir"])
    classes = f"{DATASETS[other].num_classes} classes, {dataset} has {DATASETS[dataset].num_classes}"
    with pytest.raises(FusionCheckpointError, match=rf"{FUSION_CHECKPOINT} was not trained for {dataset}: .*{classes}"):
        predict(paths, dataset, predicted["conversation"], tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "feature").exists()


@pytest.mark.slow
def test_meld_unknown_speaker_gets_the_padding_row_or_an_error(demo, tmp_path, caplog):
    paths = {**stage_paths(demo["workdir"], "MELD"), "feature_dir": tmp_path / "feature"}
    source = pd.read_csv(paths["data_dir"] / MELD.csv_names["test"], dtype=str, keep_default_na=False)
    dialogue = source[source["Dialogue_ID"] == source["Dialogue_ID"].iloc[0]].copy()
    dialogue.iloc[0, dialogue.columns.get_loc("Speaker")] = "Somebody New"
    conversation = tmp_path / "new_speaker.csv"
    dialogue.to_csv(conversation, index=False)
    with pytest.raises(DataError, match=r"new_speaker\.csv: row 1: speaker 'Somebody New' is not in speaker2id"):
        predict(paths, "MELD", conversation, tmp_path / "refused.csv", unknown_speakers="error")
    assert not (tmp_path / "refused.csv").exists()
    with caplog.at_level(logging.WARNING, logger="magtkd"):
        result = predict(paths, "MELD", conversation, tmp_path / "out.csv")
    assert "'Somebody New' is not in speaker2id.json; it gets the fusion model's padding speaker row" in caplog.text
    features = load_features(result["paths"]["features"], keys=("text",))
    first = features["vids"][0]
    rows = torch.load(paths["save_dir"] / FUSION_CHECKPOINT, weights_only=True)["speaker_embeddings.weight"].shape[0]
    assert features["speakers"][first][0] == rows - 1  # the padding row is the last one
    assert len(pd.read_csv(tmp_path / "out.csv")) == len(dialogue)
