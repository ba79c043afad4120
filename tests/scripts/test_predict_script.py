"""``<DS>/predict.py`` (docs/METHOD.md §0, §6): a conversation through stand-in models, and an --out
that would overwrite an input or names a folder, or media that are all missing, refused before any work."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import copy_checkpoints, dataset_spec, flags, generated_paths, meld_conversation, script
from magtkd.artifacts import FIRST_STAGE_MODELS, StageFiles
from magtkd.model import PATHS
from magtkd.predictions import ID_COLUMNS, fusion_columns
from magtkd.utils import UserError


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_a_conversation_gets_one_emotion_per_utterance_in_file_order(dataset, generated, untrained, tmp_path):
    """A dialogue of the generated test CSV through the six stand-in checkpoints (frames, features and the
    fusion, untrained: the output does not depend on training), written beside the substitution report."""
    spec = dataset_spec(dataset)
    source = pd.read_csv(generated / "datasets" / dataset / spec.csv_names["test"], dtype=str, keep_default_na=False)
    dialogue = source[source["Dialogue_ID"] == source["Dialogue_ID"].iloc[0]]
    conversation, out = tmp_path / "conversation.csv", tmp_path / "out" / "predictions.csv"
    dialogue.to_csv(conversation, index=False)
    names = [f"{name}.bin" for name, _ in FIRST_STAGE_MODELS.values()] + [StageFiles.fusion("").checkpoint.name]
    paths = copy_checkpoints({**generated_paths(generated, dataset, tmp_path), "save_dir": untrained(dataset)},
                             tmp_path, *names)
    result = script(dataset, "predict").main(flags(paths, conversation=conversation, out=out, device="cpu"))

    table = pd.read_csv(out, dtype={"Speaker": str, "Utterance": str}, keep_default_na=False)
    assert list(table.columns) == ["Dialogue_ID", "Utterance_ID", "Speaker", "Utterance", "emotion",
                                   *(f"p_{label}" for label in spec.labels), *ID_COLUMNS, "predicted",
                                   *fusion_columns(PATHS)]
    assert table["predicted"].tolist() == table["emotion"].tolist()
    assert table["Utterance_ID"].astype(str).tolist() == dialogue["Utterance_ID"].tolist()
    assert table["Utterance"].tolist() == dialogue["Utterance"].tolist()
    probs = table[[f"p_{label}" for label in spec.labels]].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all() and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [spec.labels[i] for i in probs.argmax(axis=1)] == table["emotion"].tolist() == result["emotions"]
    assert Path(result["paths"]["substitutions"]) == out.with_name("predictions_substitutions.tsv")


def predict(generated: Path, tmp_path: Path, conv: Path, out: Path, data_dir: Path | None = None) -> dict:
    return script("MELD", "predict").main([
        "--conversation", str(conv), "--out", str(out), "--data_dir", str(data_dir or generated / "datasets" / "MELD"),
        "--pretrained_dir", str(generated / "pretrained_model"), "--save_dir", str(tmp_path / "save"),
        "--feature_dir", str(tmp_path / "feature"), "--device", "cpu"])


def test_out_equal_to_the_conversation_is_refused_and_the_input_kept(generated, tmp_path):
    conv = meld_conversation(generated, tmp_path / "talk")
    before = conv.read_bytes()
    with pytest.raises(UserError, match=r"--out .*conversation.csv would overwrite the input .*conversation.csv"):
        predict(generated, tmp_path, conv, tmp_path / "talk" / ".." / "talk" / "conversation.csv")
    assert conv.read_bytes() == before
    assert not (tmp_path / "feature").exists()  # refused before any work


def test_out_whose_report_would_overwrite_the_conversation_is_refused(generated, tmp_path):
    conv = meld_conversation(generated, tmp_path)
    shutil.move(conv, tmp_path / "p_substitutions.tsv")
    with pytest.raises(UserError, match=r"would overwrite the input .*p_substitutions.tsv \(with its substitution"):
        predict(generated, tmp_path, tmp_path / "p_substitutions.tsv", tmp_path / "p.csv")


def test_out_naming_a_folder_or_a_checkpoint_is_refused(generated, tmp_path):
    conv = meld_conversation(generated, tmp_path / "talk")
    with pytest.raises(UserError, match=r"--out .* is a folder; name the predictions CSV"):
        predict(generated, tmp_path, conv, tmp_path)
    with pytest.raises(UserError, match=r"would overwrite the input .*save/text.bin"):
        predict(generated, tmp_path, conv, tmp_path / "save" / "text.bin")


def test_every_clip_missing_stops_with_a_list(generated, tmp_path):
    conv = meld_conversation(generated, tmp_path / "talk")
    with pytest.raises(UserError, match=r"none of its 3 audio file\(s\) exists \(e.g. .*dia0_utt0.mp4"):
        predict(generated, tmp_path, conv, tmp_path / "out.csv", data_dir=tmp_path / "nowhere")
    assert not (tmp_path / "out.csv").exists()


def test_a_semicolon_spreadsheet_export_of_a_conversation_gives_the_same_predictions(generated, untrained,
                                                                                     tmp_path):
    """The conversation as a spreadsheet in a comma-decimal locale saves it (';' between cells, decimal commas
    in the times, quoted cells, CRLF, a BOM): the same utterances, the same frames, the same predictions."""
    spec = dataset_spec("IEMOCAP")
    source = pd.read_csv(generated / "datasets" / "IEMOCAP" / spec.csv_names["test"], dtype=str,
                         keep_default_na=False)
    dialogue = source[source["Dialogue_ID"] == source["Dialogue_ID"].iloc[0]].copy()
    dialogue.loc[dialogue.index[0], "Utterance"] = 'Well; "fine", then'
    original, export = tmp_path / "conversation.csv", tmp_path / "excel" / "conversation.csv"
    dialogue.to_csv(original, index=False)
    export.parent.mkdir()
    comma_decimals = dialogue.assign(**{c: dialogue[c].str.replace(".", ",") for c in ("Start_Time", "End_Time")})
    comma_decimals.to_csv(export, index=False, sep=";", encoding="utf-8-sig", lineterminator="\r\n")
    names = [f"{name}.bin" for name, _ in FIRST_STAGE_MODELS.values()] + [StageFiles.fusion("").checkpoint.name]
    paths = copy_checkpoints({**generated_paths(generated, "IEMOCAP", tmp_path), "save_dir": untrained("IEMOCAP")},
                             tmp_path, *names)
    tables = []
    for conversation in (original, export):
        out = conversation.with_name("predictions.csv")
        script("IEMOCAP", "predict").main(flags(paths, conversation=conversation, out=out, device="cpu"))
        tables.append(pd.read_csv(out, dtype=str, keep_default_na=False))
    assert re.search(r";\d+,\d+;", export.read_text(encoding="utf-8-sig").splitlines()[1])  # decimal commas
    pd.testing.assert_frame_equal(tables[0], tables[1])
    assert tables[1]["Utterance"].iloc[0] == 'Well; "fine", then'
