"""Reliability of predict.py (issue 24): an --out that is an input or a folder is refused before any work,
relative media paths resolve against the conversation's folder first, a modality without any clip stops
the run, empty utterances are named (docs/METHOD.md §0, §6)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from helpers import script
from magtkd.dataset import load_conversation
from magtkd.predict import check_media
from magtkd.utils import UserError
from MELD.config import MELD


def conversation(generated: Path, folder: Path, rows: int = 3, copy_clips: bool = False) -> Path:
    """The first ``rows`` rows of the generated MELD test CSV as a user's conversation in ``folder``."""
    data_dir = generated / "datasets" / "MELD"
    frame = pd.read_csv(data_dir / "test_meld_emo.csv", dtype=str, keep_default_na=False).head(rows)
    folder.mkdir(parents=True, exist_ok=True)
    if copy_clips:
        for clip in frame["Video_Path"]:
            (folder / clip).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(data_dir / clip, folder / clip)
    path = folder / "conversation.csv"
    frame.to_csv(path, index=False)
    return path


def predict(generated: Path, tmp_path: Path, conv: Path, out: Path, data_dir: Path | None = None) -> dict:
    return script("MELD", "predict").main([
        "--conversation", str(conv), "--out", str(out), "--data_dir", str(data_dir or generated / "datasets" / "MELD"),
        "--pretrained_dir", str(generated / "pretrained_model"), "--save_dir", str(tmp_path / "save"),
        "--feature_dir", str(tmp_path / "feature"), "--device", "cpu"])


def test_out_equal_to_the_conversation_is_refused_and_the_input_kept(generated, tmp_path):
    conv = conversation(generated, tmp_path / "talk")
    before = conv.read_bytes()
    with pytest.raises(UserError, match=r"--out .*conversation.csv would overwrite the input .*conversation.csv"):
        predict(generated, tmp_path, conv, tmp_path / "talk" / ".." / "talk" / "conversation.csv")
    assert conv.read_bytes() == before
    assert not (tmp_path / "feature").exists()  # refused before any work


def test_out_whose_report_would_overwrite_the_conversation_is_refused(generated, tmp_path):
    conv = conversation(generated, tmp_path)
    shutil.move(conv, tmp_path / "p_substitutions.tsv")
    with pytest.raises(UserError, match=r"would overwrite the input .*p_substitutions.tsv \(with its substitution"):
        predict(generated, tmp_path, tmp_path / "p_substitutions.tsv", tmp_path / "p.csv")


def test_out_naming_a_folder_or_a_checkpoint_is_refused(generated, tmp_path):
    conv = conversation(generated, tmp_path / "talk")
    with pytest.raises(UserError, match=r"--out .* is a folder; name the predictions CSV"):
        predict(generated, tmp_path, conv, tmp_path)
    with pytest.raises(UserError, match=r"would overwrite the input .*save/text.bin"):
        predict(generated, tmp_path, conv, tmp_path / "save" / "text.bin")


def test_relative_media_resolve_against_the_conversation_folder_first(generated, tmp_path, caplog):
    conv = conversation(generated, tmp_path / "talk", copy_clips=True)
    caplog.set_level(logging.INFO, logger="magtkd")
    utts = load_conversation(MELD, conv, generated / "datasets" / "MELD", csv_relative=True)
    assert all(u.video_path.parent.parent == tmp_path / "talk" for u in utts)
    assert "resolved against the conversation's folder" in caplog.text
    # Without a copy beside the CSV, --data_dir is next.
    conv = conversation(generated, tmp_path / "elsewhere")
    utts = load_conversation(MELD, conv, generated / "datasets" / "MELD", csv_relative=True)
    assert all(u.video_path.is_relative_to(generated / "datasets" / "MELD") for u in utts)
    assert f"--data_dir {generated / 'datasets' / 'MELD'} (3)" in caplog.text


def test_every_clip_missing_stops_with_a_list(generated, tmp_path):
    conv = conversation(generated, tmp_path / "talk")
    with pytest.raises(UserError, match=r"none of its 3 audio file\(s\) exists \(e.g. .*dia0_utt0.mp4"):
        predict(generated, tmp_path, conv, tmp_path / "out.csv", data_dir=tmp_path / "nowhere")
    assert not (tmp_path / "out.csv").exists()


def test_every_clip_missing_is_refused_but_some_missing_pass(generated, tmp_path):
    conv = conversation(generated, tmp_path / "talk", copy_clips=True)
    utts = load_conversation(MELD, conv, tmp_path / "nowhere", csv_relative=True)
    utts[0].video_path.unlink()
    check_media(conv, utts)  # one missing: substituted later, listed in the report
    for utt in utts[1:]:
        utt.video_path.unlink()
    with pytest.raises(UserError, match=r"none of its 3 audio"):
        check_media(conv, utts)


def test_empty_utterances_are_named(generated, tmp_path, caplog):
    conv = conversation(generated, tmp_path / "talk", copy_clips=True)
    frame = pd.read_csv(conv, dtype=str, keep_default_na=False)
    frame.loc[1, "Utterance"] = "   "
    frame.to_csv(conv, index=False)
    utts = load_conversation(MELD, conv, tmp_path / "nowhere", csv_relative=True)
    caplog.set_level(logging.WARNING, logger="magtkd")
    check_media(conv, utts)
    assert "rows 2 have an empty Utterance" in caplog.text
