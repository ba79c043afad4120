"""Checks of a user's conversation before prediction (`magtkd.predict.check_media`; docs/METHOD.md §0,
§6)."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from helpers import meld_conversation
from magtkd.dataset import load_conversation
from magtkd.predict import check_media
from magtkd.utils import UserError
from MELD.config import MELD


def test_every_clip_missing_is_refused_but_some_missing_pass(generated, tmp_path):
    conv = meld_conversation(generated, tmp_path / "talk", copy_clips=True)
    utts = load_conversation(MELD, conv, tmp_path / "nowhere", csv_relative=True)
    utts[0].video_path.unlink()
    check_media(conv, utts)  # one missing: substituted later, listed in the report
    for utt in utts[1:]:
        utt.video_path.unlink()
    with pytest.raises(UserError, match=r"none of its 3 audio"):
        check_media(conv, utts)


def test_empty_utterances_are_named(generated, tmp_path, caplog):
    conv = meld_conversation(generated, tmp_path / "talk", copy_clips=True)
    frame = pd.read_csv(conv, dtype=str, keep_default_na=False)
    frame.loc[1, "Utterance"] = "   "
    frame.to_csv(conv, index=False)
    utts = load_conversation(MELD, conv, tmp_path / "nowhere", csv_relative=True)
    caplog.set_level(logging.WARNING, logger="magtkd")
    check_media(conv, utts)
    assert "rows 2 have an empty Utterance" in caplog.text
