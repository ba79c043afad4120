"""MELD specifics (docs/METHOD.md §1): 7 labels, one mp4 clip per utterance, named speakers.

The stage scripts of this folder import ``MELD``; the preparation script also uses the release
facts below (the synthetic-data generator keeps its own copy, tests/unit/test_synthetic.py
checks that the two agree).
"""

from __future__ import annotations

from magtkd.spec import SPEAKER_MAP, CommunityConventions, DatasetSpec

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")

# Official release: CSV name and clip folder per split.
OFFICIAL_CSV = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
CLIP_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
OFFICIAL_COLUMNS = (
    "Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID",
    "Utterance_ID", "Season", "Episode", "StartTime", "EndTime",
)


def same_speaker(speaker: str) -> str:
    """MELD speakers are names; the name itself is the key."""
    return speaker


MELD = DatasetSpec(
    name="MELD",
    labels=LABELS,
    csv_names={"train": "train_meld_emo.csv", "dev": "dev_meld_emo.csv", "test": "test_meld_emo.csv"},
    required_columns=("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID", "Video_Path"),
    audio_column="Video_Path",  # audio is decoded straight from the mp4 clip
    video_column="Video_Path",
    video_window_pad=None,  # the whole clip
    speaker_of=same_speaker,
    global_speaker_ids=True,  # fusion speaker ids from speaker2id.json
    n_speaker=304,
    data_readme=(
        "the official MELD CSVs (train_sent_emo.csv, dev_sent_emo.csv, test_sent_emo.csv) and "
        "the clip folders train_splits, dev_splits_complete, output_repeated_splits_test; "
        f"after `python MELD/preprocessing.py`, {{train,dev,test}}_meld_emo.csv and {SPEAKER_MAP}"
    ),
    raw_files=tuple(OFFICIAL_CSV.values()),
)


# The community's feature pickles (docs/METHOD.md §9): their label order, the official train split as their
# training dialogues and dev in the validation slot, speakers one-hot by order of appearance in the dialogue
# (at most 9), Dialogue_IDs offset per split (dev from max train id + 1, test after dev), and the official
# Sentiment column as neutral 0, positive 1, negative 2.
COMMUNITY = CommunityConventions(
    loader="MELD",
    labels=("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
    train_splits=("train",),
    valid_splits=("dev",),
    speakers="one_hot",
    speaker_slots=9,
    dialogue_keys="offset",
    sentiments=("neutral", "positive", "negative"),
)
