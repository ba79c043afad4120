"""The shared CSV reader, dialogue-prefix samples, speaker numbering and user conversation CSVs
(`magtkd.dataset`; docs/METHOD.md §1)."""

from __future__ import annotations

import csv
import dataclasses
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from helpers import REFERENCE, all_utterances, meld_conversation
from IEMOCAP.config import IEMOCAP
from magtkd import spec
from magtkd.artifacts import write_json
from magtkd.dataset import (Utterance, build_samples, fusion_speaker_ids, group_dialogues, load_conversation,
                            load_speaker2id, load_split, read_csv_checked, window_of)
from magtkd.spec import SPLITS
from magtkd.utils import DataError
from MELD.config import MELD

IEMOCAP_COLUMNS = list(IEMOCAP.required_columns)


def write_csv(path: Path, columns: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def iemocap_row(dialog: str, speaker: str, dia: int, utt: int, text: str, emotion: str = "neu",
                prefix: str = "") -> list[str]:
    session = dialog[4]
    return [
        text, f"{dialog}_{speaker}", str(dia), "1.5", "2.25",
        f"{prefix}Session{session}/sentences/wav/{dialog}/{dialog}_{speaker}.wav",
        f"{prefix}Session{session}/dialog/avi/DivX/{dialog}.avi", emotion, str(utt),
    ]


def two_dialogues(root: Path, prefix: str = "") -> Path:
    """Dialogue 0 (F, M, F) then dialogue 1 starting with M: numbering must restart."""
    rows = [
        iemocap_row("Ses01F_impro01", "F000", 0, 0, "Excuse me.", prefix=prefix),
        iemocap_row("Ses01F_impro01", "M000", 0, 1, "Do you have your forms?", "fru", prefix),
        iemocap_row("Ses01F_impro01", "F001", 0, 2, "Yeah.", prefix=prefix),
        iemocap_row("Ses01F_impro02", "M000", 1, 0, "Hi.", "exc", prefix),
        iemocap_row("Ses01F_impro02", "F000", 1, 1, "Hello, \"you\".", "hap", prefix),
    ]
    return write_csv(root / "IEMOCAP_train.csv", IEMOCAP_COLUMNS, rows)


def test_samples_prefixes_and_speaker_numbering(tmp_path: Path) -> None:
    two_dialogues(tmp_path)
    utts = load_split(IEMOCAP, tmp_path, "train")
    assert [u.key for u in utts] == ["0_0", "0_1", "0_2", "1_0", "1_1"]
    assert [u.speaker_key for u in utts] == ["F", "M", "F", "M", "F"]
    assert [u.label for u in utts] == [4, 2, 4, 1, 3]
    assert (utts[0].row, utts[4].row) == (1, 5)
    assert (utts[0].start, utts[0].end) == (1.5, 2.25)
    samples = build_samples(utts)
    assert [(s.texts, s.speakers) for s in samples] == [
        (("Excuse me.",), (0,)),
        (("Excuse me.", "Do you have your forms?"), (0, 1)),
        (("Excuse me.", "Do you have your forms?", "Yeah."), (0, 1, 0)),
        (("Hi.",), (0,)),  # no carry-over: M is speaker 0 of the new dialogue
        (("Hi.", "Hello, \"you\"."), (0, 1)),
    ]
    assert [s.utterance for s in samples] == utts
    assert [(d, [u.utterance_id for u in us]) for d, us in group_dialogues(utts)] == [(0, [0, 1, 2]), (1, [0, 1])]
    assert fusion_speaker_ids(IEMOCAP, utts[3:], None) == [0, 1]
    assert fusion_speaker_ids(IEMOCAP, utts[:3], None) == [0, 1, 0]


def meld_rows(rows: list[tuple[str, str, int, int]]) -> tuple[list[str], list[list[str]]]:
    columns = ["Sr No.", "Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID", "Video_Path", "Wav_Path"]
    body = [
        [str(i + 1), f"text {i}", spk, emo, str(d), str(u),
         f"../datasets/MELD/train_splits/dia{d}_utt{u}.mp4", f"../datasets/MELD/train_wav/dia{d}_utt{u}.wav"]
        for i, (spk, emo, d, u) in enumerate(rows)
    ]
    return columns, body


def test_meld_authors_style_csv_and_global_speakers(tmp_path: Path) -> None:
    columns, rows = meld_rows([
        ("Joey", "joy", 5, 0), ("Ross", "anger", 5, 1), ("Rachel", "fear", 5, 3), ("Ross", "neutral", 5, 4),
        ("Rachel", "surprise", 2, 0), ("Joey", "sadness", 2, 1),
    ])
    write_csv(tmp_path / "train_meld_emo.csv", columns, rows)
    utts = load_split(MELD, tmp_path, "train")
    assert utts[0].video_path == utts[0].audio_path == tmp_path / "train_splits" / "dia5_utt0.mp4"
    assert utts[0].start is None and utts[0].key == "5_0"
    samples = build_samples(utts)
    assert [s.speakers for s in samples] == [(0,), (0, 1), (0, 1, 2), (0, 1, 2, 1), (0,), (0, 1)]
    assert [d for d, _ in group_dialogues(utts)] == [5, 2]
    write_json(tmp_path / "speaker2id.json", {"Rachel": 0, "Joey": 1, "Ross": 2})
    speaker2id = load_speaker2id(tmp_path)
    assert fusion_speaker_ids(MELD, utts[:4], speaker2id) == [1, 2, 0, 2]
    with pytest.raises(DataError, match=r"train_meld_emo.csv: row 2: speaker 'Ross' is not in speaker2id.json"):
        fusion_speaker_ids(MELD, utts[:4], {"Joey": 0, "Rachel": 1})
    with pytest.raises(ValueError, match="needs speaker2id.json"):
        fusion_speaker_ids(MELD, utts, None)


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = two_dialogues(tmp_path)
    text = path.read_text(encoding="utf-8").replace(",Emotion,", ",Feeling,", 1)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=r"IEMOCAP_train.csv: missing column 'Emotion'"):
        load_split(IEMOCAP, tmp_path, "train")
    with pytest.raises(DataError, match=r"IEMOCAP_train.csv: missing column 'Nope'"):
        read_csv_checked(path, ["Utterance", "Nope"])


def test_bad_emotion_names_file_row_and_value(tmp_path: Path) -> None:
    rows = [iemocap_row("Ses01F_impro01", "F000", 0, 0, "a"), iemocap_row("Ses01F_impro01", "M000", 0, 1, "b", "xxx")]
    write_csv(tmp_path / "IEMOCAP_dev.csv", IEMOCAP_COLUMNS, rows)
    with pytest.raises(DataError, match=r"IEMOCAP_dev.csv: row 2 \(line 3\): Emotion 'xxx' is not one of ang"):
        load_split(IEMOCAP, tmp_path, "dev")


def test_bad_ids_and_times(tmp_path: Path) -> None:
    row = iemocap_row("Ses01F_impro01", "F000", 0, 0, "a")
    write_csv(tmp_path / "IEMOCAP_test.csv", IEMOCAP_COLUMNS, [row[:2] + ["x"] + row[3:]])
    with pytest.raises(DataError, match=r"IEMOCAP_test.csv: row 1: Dialogue_ID 'x' is not an integer"):
        load_split(IEMOCAP, tmp_path, "test")
    write_csv(tmp_path / "IEMOCAP_test.csv", IEMOCAP_COLUMNS, [row[:3] + [""] + row[4:]])
    with pytest.raises(DataError, match=r"IEMOCAP_test.csv: row 1: Start_Time '' is not a number"):
        load_split(IEMOCAP, tmp_path, "test")


def test_missing_folder_and_csv(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist; it must contain the unpacked IEMOCAP release"):
        load_split(IEMOCAP, tmp_path / "absent", "train")
    with pytest.raises(FileNotFoundError, match=r"train_sent_emo.csv"):
        load_split(MELD, tmp_path / "absent", "train")
    with pytest.raises(FileNotFoundError, match=r"IEMOCAP_dev.csv not found; .*python IEMOCAP/preprocessing.py"):
        load_split(IEMOCAP, tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match=r"speaker2id.json not found; .*python MELD/preprocessing.py"):
        load_speaker2id(tmp_path)


def test_authors_paths_and_divx(tmp_path: Path) -> None:
    two_dialogues(tmp_path, prefix="../datasets/IEMOCAP/")
    utts = load_split(IEMOCAP, tmp_path, "train")
    wav = tmp_path / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"
    assert utts[0].audio_path == wav
    # neither spelling on disk: the CSV's spelling stays
    assert utts[0].video_path == tmp_path / "Session1/dialog/avi/DivX/Ses01F_impro01.avi"
    (tmp_path / "Session1/dialog/avi/Divx").mkdir(parents=True)
    utts = load_split(IEMOCAP, tmp_path, "train")
    assert utts[0].video_path == tmp_path / "Session1/dialog/avi/Divx/Ses01F_impro01.avi"
    # and the other way round: a CSV saying Divx when the folder is DivX
    path = tmp_path / "IEMOCAP_train.csv"
    path.write_text(path.read_text(encoding="utf-8").replace("/DivX/", "/Divx/"), encoding="utf-8")
    (tmp_path / "Session1/dialog/avi/Divx").rmdir()
    (tmp_path / "Session1/dialog/avi/DivX").mkdir()
    utts = load_split(IEMOCAP, tmp_path, "train")
    assert utts[0].video_path == tmp_path / "Session1/dialog/avi/DivX/Ses01F_impro01.avi"


def test_fusion_speakers_beyond_iemocap_limit(tmp_path: Path) -> None:
    rows = [iemocap_row("Ses01F_impro01", s, 0, i, "a") for i, s in enumerate(["F000", "M000", "X000"])]
    write_csv(tmp_path / "IEMOCAP_train.csv", IEMOCAP_COLUMNS, rows)
    utts = load_split(IEMOCAP, tmp_path, "train")
    with pytest.raises(DataError, match="dialogue 0 has 3 speakers"):
        fusion_speaker_ids(IEMOCAP, utts, None)


def test_utterance_is_frozen(tmp_path: Path) -> None:
    two_dialogues(tmp_path)
    utt: Utterance = load_split(IEMOCAP, tmp_path, "train")[0]
    with pytest.raises(AttributeError):
        utt.text = "changed"  # type: ignore[misc]


@pytest.mark.skipif(not (REFERENCE / "IEMOCAP").is_dir(), reason="reference CSVs not available")
def test_authors_iemocap_csvs_load_as_they_are(tmp_path: Path) -> None:
    for split in SPLITS:
        shutil.copy(REFERENCE / "IEMOCAP" / IEMOCAP.csv_names[split], tmp_path)
    sizes = {split: load_split(IEMOCAP, tmp_path, split) for split in SPLITS}
    assert {s: len(u) for s, u in sizes.items()} == {"train": 5163, "dev": 647, "test": 1623}
    assert {s: len(group_dialogues(u)) for s, u in sizes.items()} == {"train": 108, "dev": 12, "test": 31}
    first = sizes["train"][0]
    assert first.audio_path == tmp_path / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"
    assert (first.start, first.end, first.text) == (6.2901, 8.2357, "Excuse me.")
    assert max(max(s.speakers) for s in build_samples(sizes["test"])) == 1


def _csv(tmp_path: Path, rows: list[str]) -> Path:
    data_dir = tmp_path / "IEMOCAP"
    data_dir.mkdir(exist_ok=True)
    header = "Dialogue_ID,Utterance_ID,Utterance,Speaker,Emotion,Video_Path,Wav_Path,Start_Time,End_Time"
    assert set(IEMOCAP.required_columns) <= set(header.split(","))
    (data_dir / IEMOCAP.csv_names["train"]).write_text("\n".join([header, *rows]) + "\n")
    return data_dir


@pytest.mark.parametrize("rows, message", [
    (["0,0,hi,Ses01_M,neu,v.avi,a.wav,0,1", "0,1,yo,Ses01_F,neu,v.avi,b.wav,1,2", "0,0,hi,Ses01_M,neu,v.avi,a.wav,0,1"],
     r"IEMOCAP_train.csv: rows 1 and 3 \(lines 2 and 4\) both have Dialogue_ID 0, Utterance_ID 0"),
    (["0,0,hi,Ses01_M,neu,v.avi,a.wav,nan,1"], r"IEMOCAP_train.csv: row 1 \(line 2\).*must be finite"),
    (["0,0,hi,Ses01_M,neu,v.avi,a.wav,0,1", "0,1,yo,Ses01_F,neu,v.avi,b.wav,5,2"],
     r"IEMOCAP_train.csv: row 2 \(line 3\): Start_Time 5.0 and End_Time 2.0 are not a time span"),
])
def test_csv_rows_that_would_silently_mislead_are_refused(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_split(IEMOCAP, _csv(tmp_path, rows), "train")


def test_window_rule_of_the_extraction_stage(generated):
    utts = all_utterances(IEMOCAP, generated / "datasets" / "IEMOCAP")
    for utt in utts:
        assert window_of(IEMOCAP, utt) == (max(utt.start - 1.0, 0.0), utt.end + 1.0)
    early = dataclasses.replace(utts[0], start=0.4, end=1.2)
    assert window_of(IEMOCAP, early) == (0.0, 2.2)
    meld = load_split(MELD, generated / "datasets" / "MELD", "test")[0]
    assert window_of(MELD, meld) is None


def test_fusion_speaker_ids_with_a_padding_row(generated):
    """IEMOCAP: a third speaker is an error in the pipeline, the padding row in prediction."""
    utts = load_split(IEMOCAP, generated / "datasets" / "IEMOCAP", "test")[:3]
    three = [dataclasses.replace(u, speaker=f"Ses05_{k}000", speaker_key=k) for u, k in zip(utts, "FMX")]
    assert fusion_speaker_ids(IEMOCAP, three[:2], None) == fusion_speaker_ids(IEMOCAP, three[:2], None, 2) == [0, 1]
    with pytest.raises(DataError, match=r"IEMOCAP_test\.csv: dialogue .* has 3 speakers \(F, M, X\); IEMOCAP allows 2"):
        fusion_speaker_ids(IEMOCAP, three, None)
    assert fusion_speaker_ids(IEMOCAP, three, None, padding=2) == [0, 1, 2]


def test_load_conversation_checks(generated, tmp_path, caplog):
    data_dir = generated / "datasets" / "IEMOCAP"
    source = pd.read_csv(data_dir / IEMOCAP.csv_names["test"], dtype=str, keep_default_na=False).iloc[:3]
    twice = pd.concat([source, source.iloc[:1]])
    twice.to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(DataError, match=r"twice\.csv: rows 1 and 4 \(lines 2 and 5\) both have Dialogue_ID"):
        load_conversation(IEMOCAP, tmp_path / "twice.csv", data_dir)
    with pytest.raises(FileNotFoundError, match=r"conversation CSV .*absent\.csv not found"):
        load_conversation(IEMOCAP, tmp_path / "absent.csv", data_dir)
    # IEMOCAP tells speakers apart by one letter: two names sharing it are one speaker, with a warning
    names = source.assign(Speaker=["Alice", "Bob", "Anna"])
    names.to_csv(tmp_path / "names.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="magtkd"):
        utts = load_conversation(IEMOCAP, tmp_path / "names.csv", data_dir)
    assert "'Alice' and 'Anna'" in caplog.text and [u.speaker_key for u in utts] == ["A", "B", "A"]
    assert all(u.label == spec.LABEL_PAD and u.emotion == "" for u in utts)
    assert len({u.split for u in utts}) == 1 and utts[0].split.startswith("conversation-")


def test_relative_media_resolve_against_the_conversation_folder_first(generated, tmp_path, caplog):
    conv = meld_conversation(generated, tmp_path / "talk", copy_clips=True)
    caplog.set_level(logging.INFO, logger="magtkd")
    utts = load_conversation(MELD, conv, generated / "datasets" / "MELD", csv_relative=True)
    assert all(u.video_path.parent.parent == tmp_path / "talk" for u in utts)
    assert "resolved against the conversation's folder" in caplog.text
    # Without a copy beside the CSV, --data_dir is next.
    conv = meld_conversation(generated, tmp_path / "elsewhere")
    utts = load_conversation(MELD, conv, generated / "datasets" / "MELD", csv_relative=True)
    assert all(u.video_path.is_relative_to(generated / "datasets" / "MELD") for u in utts)
    assert f"--data_dir {generated / 'datasets' / 'MELD'} (3)" in caplog.text


# --------------------------------------------------------------------------- CSV dialects (docs/METHOD.md §6)


def excel_export(source: Path, target: Path, separator: str, encoding: str = "utf-8-sig") -> Path:
    """``source`` as a spreadsheet in a comma-decimal locale saves it: ``separator`` between cells, every cell
    with the separator, a quote or a line break quoted, decimal commas, CRLF, a BOM, empty rows at the end."""
    with source.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    numbers = {rows[0].index(c) for c in ("Start_Time", "End_Time") if c in rows[0]}
    rows = [[cell.replace(".", ",") if i in numbers and r else cell for i, cell in enumerate(row)]
            for r, row in enumerate(rows)]
    with target.open("w", encoding=encoding, newline="") as handle:
        csv.writer(handle, delimiter=separator, lineterminator="\r\n").writerows(rows + [[""] * len(rows[0])] * 2)
    return target


@pytest.mark.parametrize("separator, encoding", [(";", "utf-8-sig"), ("\t", "utf-16"), (";", "cp1252")])
def test_a_spreadsheet_export_reads_as_its_comma_original(tmp_path: Path, separator: str, encoding: str) -> None:
    original = two_dialogues(tmp_path)
    rows = [iemocap_row("Ses01F_impro03", "F000", 2, 0, 'She said "no; never", then\nleft.')]
    with original.open("a", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)
    (tmp_path / "export").mkdir()
    exported = excel_export(original, tmp_path / "export" / "IEMOCAP_train.csv", separator, encoding)
    ours, theirs = load_split(IEMOCAP, tmp_path, "train"), load_split(IEMOCAP, exported.parent, "train")
    fields = ("key", "text", "speaker", "emotion", "label", "start", "end")
    assert [[getattr(u, f) for f in fields] for u in theirs] == [[getattr(u, f) for f in fields] for u in ours]
    assert theirs[-1].text == 'She said "no; never", then\nleft.' and theirs[0].start == 1.5
    assert read_csv_checked(exported, ["Utterance"]).attrs["separator"] == separator
