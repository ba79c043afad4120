"""The facts of the public releases that the generator reproduces: IEMOCAP's and MELD's labels,
IEMOCAP's split (dev dialogues, test session) and speaker naming, MELD's file names and columns.

The recipe folders (``IEMOCAP/config.py``, ``MELD/config.py``) hold the same facts
for the stages; library code does not import the recipe folders, so the generator
keeps its own copy here. tests/unit/test_synthetic.py checks that the two
are equal.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- IEMOCAP

IEMOCAP_LABELS = ("ang", "exc", "fru", "hap", "neu", "sad")

# The standard split of this line of work: Sessions 1-4 train+dev, Session 5 test.
IEMOCAP_DEV_DIALOGUES = frozenset(
    {
        "Ses01M_impro01", "Ses01M_script03_1", "Ses02F_impro02", "Ses02F_impro07",
        "Ses02M_script01_2", "Ses03F_impro01", "Ses03M_impro02", "Ses03M_impro08a",
        "Ses03M_script02_2", "Ses03M_script03_2", "Ses04F_impro07", "Ses04F_script02_1",
    }
)
IEMOCAP_TEST_SESSIONS = frozenset({5})


def speaker_letter(speaker: str) -> str:
    """``Ses01F_impro01_F000`` -> ``F``: the character after the last underscore."""
    return speaker.rsplit("_", 1)[-1][:1]


# --------------------------------------------------------------------------- MELD

MELD_LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")

# Official release: CSV name and clip folder per split.
MELD_OFFICIAL_CSV = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
MELD_CLIP_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
MELD_OFFICIAL_COLUMNS = (
    "Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID",
    "Utterance_ID", "Season", "Episode", "StartTime", "EndTime",
)
