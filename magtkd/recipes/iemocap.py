"""IEMOCAP specifics (SPEC section 1): 6 labels, dialogue-video windows, F/M speakers."""

from __future__ import annotations

from .base import DatasetSpec, FusionDefaults

LABELS = ("ang", "exc", "fru", "hap", "neu", "sad")

# The standard split of this line of work: Sessions 1-4 train+dev, Session 5 test.
DEV_DIALOGUES = frozenset(
    {
        "Ses01M_impro01", "Ses01M_script03_1", "Ses02F_impro02", "Ses02F_impro07",
        "Ses02M_script01_2", "Ses03F_impro01", "Ses03M_impro02", "Ses03M_impro08a",
        "Ses03M_script02_2", "Ses03M_script03_2", "Ses04F_impro07", "Ses04F_script02_1",
    }
)
TEST_SESSIONS = frozenset({5})


def speaker_letter(speaker: str) -> str:
    """``Ses01F_impro01_F000`` -> ``F``: the character after the last underscore."""
    return speaker.rsplit("_", 1)[-1][:1]


IEMOCAP = DatasetSpec(
    name="IEMOCAP",
    labels=LABELS,
    csv_names={"train": "IEMOCAP_train.csv", "dev": "IEMOCAP_dev.csv", "test": "IEMOCAP_test.csv"},
    required_columns=(
        "Utterance", "Speaker", "Dialogue_ID", "Start_Time", "End_Time",
        "Wav_Path", "Video_Path", "Emotion", "Utterance_ID",
    ),
    audio_column="Wav_Path",
    video_column="Video_Path",
    video_window_pad=1.0,
    speaker_of=speaker_letter,
    global_speaker_ids=False,
    learning_rates={"text": 1e-5, "audio": 5e-6, "video": 1e-5, "kd": 1e-5},
    kd_logit_weight=1.0,
    kd_feature_weight=0.0,
    fusion=FusionDefaults(
        audio_feature="audio_kd", video_feature="video", alpha=0.7, beta=0.8,
        feature_loss=True, n_speaker=2,
    ),
    data_readme=(
        "the unpacked IEMOCAP release (Session1 ... Session5, each with dialog/avi/DivX, "
        "dialog/transcriptions, dialog/EmoEvaluation and sentences/wav) and, after "
        "`python IEMOCAP/preprocessing.py`, IEMOCAP_{train,dev,test}.csv"
    ),
)
