"""MELD specifics (SPEC section 1): 7 labels, one mp4 clip per utterance, named speakers."""

from __future__ import annotations

from .base import DatasetSpec, FusionDefaults

LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")

# Official release: CSV name and clip folder per split.
OFFICIAL_CSV = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
CLIP_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
OFFICIAL_COLUMNS = (
    "Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID",
    "Utterance_ID", "Season", "Episode", "StartTime", "EndTime",
)
SPEAKER_MAP = "speaker2id.json"


def same_speaker(speaker: str) -> str:
    """MELD speakers are names; the name itself is the key."""
    return speaker


MELD = DatasetSpec(
    name="MELD",
    labels=LABELS,
    csv_names={"train": "train_meld_emo.csv", "dev": "dev_meld_emo.csv", "test": "test_meld_emo.csv"},
    required_columns=("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID", "Video_Path"),
    audio_column="Video_Path",
    video_column="Video_Path",
    video_window_pad=None,
    speaker_of=same_speaker,
    global_speaker_ids=True,
    learning_rates={"text": 1e-5, "audio": 1e-5, "video": 1e-5, "kd": 1e-5},
    kd_logit_weight=0.1,
    kd_feature_weight=1.0,
    fusion=FusionDefaults(
        audio_feature="audio_kd", video_feature="video_kd", alpha=0.01, beta=0.08,
        feature_loss=False, n_speaker=304,
    ),
    data_readme=(
        "the official MELD CSVs (train_sent_emo.csv, dev_sent_emo.csv, test_sent_emo.csv) and "
        "the clip folders train_splits, dev_splits_complete, output_repeated_splits_test; "
        "after `python MELD/preprocessing.py`, {train,dev,test}_meld_emo.csv and speaker2id.json"
    ),
)
