"""The peers' conventions (`magtkd.peer_features`, docs/METHOD.md §9): speakers as the peers read them, dialogue
keys, and the inputs that would be silently misread refused with a line naming the row."""

from __future__ import annotations

from pathlib import Path

import pytest

from IEMOCAP.config import COMMUNITY as IEMOCAP_COMMUNITY
from magtkd import peer_features
from magtkd.dataset import Utterance
from magtkd.utils import DataError, UserError
from MELD.config import COMMUNITY as MELD_COMMUNITY


def utterance(speaker: str, key: str, row: int = 1, dialogue: int = 0) -> Utterance:
    return Utterance(split="train", row=row, dialogue_id=dialogue, utterance_id=row - 1, text="hi", speaker=speaker,
                     speaker_key=key, emotion="neu", label=4, audio_path=Path("a.wav"), video_path=Path("v.avi"),
                     start=None, end=None, source="IEMOCAP_train.csv")


def test_iemocap_speakers_are_letters_and_meld_speakers_one_hot_by_appearance():
    utts = [utterance("Ses01F_impro01_F000", "F"), utterance("Ses01F_impro01_M000", "M", 2)]
    assert peer_features.encode_speakers(IEMOCAP_COMMUNITY, utts) == ["F", "M"]
    names = ["Ross", "Rachel", "Ross", "Joey"]
    encoded = peer_features.encode_speakers(MELD_COMMUNITY, [utterance(n, n, i + 1) for i, n in enumerate(names)])
    assert [row.index(1) for row in encoded] == [0, 1, 0, 2] and all(len(row) == 9 and sum(row) == 1 for row in encoded)


def test_a_speaker_the_peers_would_misread_names_the_row():
    with pytest.raises(DataError, match="row 2: speaker 'A' .* not M or F"):
        peer_features.encode_speakers(IEMOCAP_COMMUNITY, [utterance("x_F", "F"), utterance("talk_A", "A", 2)])
    crowd = [utterance(f"s{i}", f"s{i}", i + 1) for i in range(10)]
    with pytest.raises(DataError, match="row 10: dialogue 0 has more than 9 speakers"):
        peer_features.encode_speakers(MELD_COMMUNITY, crowd)


def test_dialogue_names_come_from_the_utterance_name_and_keys_are_unique():
    assert peer_features.dialogue_name(utterance("Ses05M_script01_1b_F012", "F")) == "Ses05M_script01_1b"
    with pytest.raises(DataError, match="row 1: Speaker 'F' is not an utterance name"):
        peer_features.dialogue_name(utterance("F", "F"))
    dialogue = peer_features.PeerDialogue("Ses01F_impro01", "train", [], [], [], [], [], {})
    clash = peer_features.PeerDialogue("Ses01F_impro01", "dev", [], [], [], [], [], {})
    with pytest.raises(DataError, match="'Ses01F_impro01' occurs twice \\(train and dev\\)"):
        peer_features.check_keys([dialogue, clash])


def test_every_layout_lists_each_split_slot_the_conventions_fill():
    for (layout, loader), slots in peer_features.LAYOUTS.items():
        community = IEMOCAP_COMMUNITY if loader == "IEMOCAP" else MELD_COMMUNITY
        assert ("validVid" in slots) == bool(community.valid_splits), (layout, loader)
        assert slots[-2:] == ("trainVid", "testVid") or slots[-3:] == ("trainVid", "testVid", "validVid")
    assert peer_features.split_members(IEMOCAP_COMMUNITY, "trainVid") == ("train", "dev")
    assert peer_features.split_members(MELD_COMMUNITY, "validVid") == ("dev",)


def test_out_that_is_a_folder_or_a_json_is_refused(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        peer_features.check_out(tmp_path, tmp_path / "x.json", [])
    with pytest.raises(UserError, match="give the pickle another suffix"):
        peer_features.check_out(tmp_path / "x.json", tmp_path / "x.json", [])
