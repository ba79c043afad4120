"""IEMOCAP specifics (docs/METHOD.md §1): 6 labels, dialogue-video windows, F/M speakers.

The stage scripts of this folder import ``IEMOCAP``; the preparation script also uses the release
facts below (the synthetic-data generator keeps its own copy, tests/unit/test_synthetic.py
checks that the two agree).
"""

from __future__ import annotations

from magtkd.spec import CommunityConventions, DatasetSpec

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
    video_window_pad=1.0,  # the window is [max(start - 1, 0), end + 1] seconds of the dialogue video
    speaker_of=speaker_letter,
    global_speaker_ids=False,  # fusion speaker ids 0/1 by order of appearance in the dialogue
    n_speaker=2,
    data_readme=(
        "the unpacked IEMOCAP release (Session1 ... Session5, each with dialog/avi/DivX, "
        "dialog/transcriptions, dialog/EmoEvaluation and sentences/wav) and, after "
        "`python IEMOCAP/preprocessing.py`, IEMOCAP_{train,dev,test}.csv"
    ),
    raw_files=("Session*/dialog/*/*.txt",),  # transcriptions and EmoEvaluation: what preparation reads
)


# The community's feature pickles (docs/METHOD.md §9): their label order (hap, sad, neu, ang, exc, fru),
# train + dev as their training dialogues and Session 5 as test, speakers as the letters M/F, dialogues
# keyed by name (Ses01F_impro01).
COMMUNITY = CommunityConventions(
    loader="IEMOCAP",
    labels=("hap", "sad", "neu", "ang", "exc", "fru"),
    train_splits=("train", "dev"),
    valid_splits=(),
    speakers="letter",
    dialogue_keys="name",
)
