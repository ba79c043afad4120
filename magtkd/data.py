"""Prepared CSVs -> utterances -> dialogue-prefix samples (SPEC section 1).

Every stage reads its data through :func:`load_split` and :func:`build_samples`,
so the CSV schema checks, the media path rules and the prefix/speaker rules
live here once. Both our prepared CSVs and the authors' CSVs are accepted as
they are (their media paths look like ``../datasets/IEMOCAP/Session1/...``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from .recipes import DatasetSpec
from .recipes.meld import SPEAKER_MAP

log = logging.getLogger("magtkd")

# Session 5 of some IEMOCAP copies spells the dialogue-video folder ``Divx`` (SPEC section 1).
_DIVX_SPELLINGS = ("DivX", "Divx")


class DataError(ValueError):
    """Bad content in a data file; the message names the file, row/column/key and what was expected."""


@dataclass(frozen=True)
class Utterance:
    """One CSV row, typed; paths already resolved against the data folder."""

    split: str
    row: int  # 1-based data-row number in the CSV (header not counted), for messages
    dialogue_id: int
    utterance_id: int
    text: str
    speaker: str  # raw ``Speaker`` value
    speaker_key: str  # spec.speaker_of(speaker): identifies the speaker within a dialogue
    emotion: str
    label: int
    audio_path: Path
    video_path: Path
    start: float | None  # seconds within the video (IEMOCAP); None when the CSV has no times
    end: float | None

    @property
    def key(self) -> str:
        """``{Dialogue_ID}_{Utterance_ID}``: the stem of per-utterance feature files."""
        return f"{self.dialogue_id}_{self.utterance_id}"


@dataclass(frozen=True)
class Sample:
    """The dialogue prefix ``[u_0 .. u_t]`` whose label and media are those of ``u_t``."""

    utterance: Utterance
    texts: tuple[str, ...]
    speakers: tuple[int, ...]  # 0-based, by order of first appearance in the dialogue


def _preprocess_command(spec: DatasetSpec) -> str:
    return f"python {spec.name}/preprocessing.py --data_dir <data folder>"


def read_csv_checked(path: str | Path, required_columns: Iterable[str]) -> pd.DataFrame:
    """Read a CSV as strings (no number/NaN parsing) and check it has ``required_columns``.

    Texts must stay byte-exact (SPEC section 1), so every cell is read as ``str``
    and empty cells stay ``""``. UTF-8 is expected (a BOM is tolerated); CSVs
    re-saved by a spreadsheet program in cp1252 are read with a warning.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; reading it as cp1252", path)
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="cp1252")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: neither UTF-8 nor cp1252 text ({exc})") from exc
    for column in required_columns:
        if column not in frame.columns:
            raise DataError(
                f"{path}: missing column {column!r} (expected columns include "
                f"{', '.join(required_columns)}; found {', '.join(map(str, frame.columns))})"
            )
    return frame


def check_data_dir(spec: DatasetSpec, data_dir: str | Path) -> Path:
    """Return ``data_dir`` as a Path, or fail saying what the folder must contain."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"{spec.name} data folder {data_dir} does not exist; it must contain {spec.data_readme}"
        )
    return data_dir


class MediaResolver:
    """Resolve CSV media paths against the data folder (SPEC section 1).

    Authors' paths like ``../datasets/IEMOCAP/Session1/x.wav`` lose everything up
    to and including ``datasets/IEMOCAP/``; relative paths are taken from the data
    folder; ``DivX``/``Divx`` is whichever folder exists. Results are cached
    because many IEMOCAP rows share one dialogue video.
    """

    def __init__(self, spec: DatasetSpec, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.marker = f"datasets/{spec.name}/"
        self._cache: dict[str, Path] = {}

    def __call__(self, value: str) -> Path:
        if value not in self._cache:
            self._cache[value] = self._resolve(value)
        return self._cache[value]

    def _resolve(self, value: str) -> Path:
        text = value.replace("\\", "/")
        if self.marker in text:
            text = text.split(self.marker, 1)[1]
        path = Path(text)
        if not path.is_absolute():
            path = self.data_dir / path
        return _fix_divx(path)


def _fix_divx(path: Path) -> Path:
    """Swap ``DivX``<->``Divx`` in ``path`` when only the other spelling exists on disk."""
    parts = list(path.parts)
    for i, part in enumerate(parts):
        if part in _DIVX_SPELLINGS:
            other = _DIVX_SPELLINGS[1 - _DIVX_SPELLINGS.index(part)]
            parent = Path(*parts[:i])
            if not (parent / part).is_dir() and (parent / other).is_dir():
                parts[i] = other
    return Path(*parts)


def _int_cell(path: Path, row: int, column: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}: row {row}: {column} {value!r} is not an integer") from None


def _float_cell(path: Path, row: int, column: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{path}: row {row}: {column} {value!r} is not a number") from None


def load_split(spec: DatasetSpec, data_dir: str | Path, split: str) -> list[Utterance]:
    """Read ``data_dir/spec.csv_names[split]`` into utterances, in CSV order.

    Hard errors (SPEC section 6): missing folder, missing CSV, missing column,
    an emotion outside ``spec.labels``, non-integer ids; each names the file and
    the row or column.
    """
    data_dir = check_data_dir(spec, data_dir)
    if split not in spec.csv_names:
        raise KeyError(f"unknown split {split!r}; expected one of {', '.join(spec.csv_names)}")
    path = data_dir / spec.csv_names[split]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; build it from the raw release with `{_preprocess_command(spec)}` "
            f"(the folder must contain {spec.data_readme})"
        )
    frame = read_csv_checked(path, spec.required_columns)
    if frame.empty:
        raise DataError(f"{path}: no data rows")
    has_times = "Start_Time" in frame.columns and "End_Time" in frame.columns
    resolve = MediaResolver(spec, data_dir)
    utterances = []
    for index, record in enumerate(frame.to_dict("records"), start=1):
        emotion = record["Emotion"]
        if emotion not in spec.labels:
            raise DataError(
                f"{path}: row {index} (line {index + 1}): Emotion {emotion!r} is not one of "
                f"{', '.join(spec.labels)}"
            )
        utterances.append(
            Utterance(
                split=split,
                row=index,
                dialogue_id=_int_cell(path, index, "Dialogue_ID", record["Dialogue_ID"]),
                utterance_id=_int_cell(path, index, "Utterance_ID", record["Utterance_ID"]),
                text=record["Utterance"],
                speaker=record["Speaker"],
                speaker_key=spec.speaker_of(record["Speaker"]),
                emotion=emotion,
                label=spec.label_id(emotion),
                audio_path=resolve(record[spec.audio_column]),
                video_path=resolve(record[spec.video_column]),
                start=_float_cell(path, index, "Start_Time", record["Start_Time"]) if has_times else None,
                end=_float_cell(path, index, "End_Time", record["End_Time"]) if has_times else None,
            )
        )
    return utterances


def group_dialogues(utts: Sequence[Utterance]) -> list[tuple[int, list[Utterance]]]:
    """``[(dialogue_id, utterances in CSV order), ...]`` in order of first appearance."""
    groups: dict[int, list[Utterance]] = {}
    for utt in utts:
        groups.setdefault(utt.dialogue_id, []).append(utt)
    return list(groups.items())


def build_samples(utts: Sequence[Utterance]) -> list[Sample]:
    """One sample per utterance, in input order: the prefix of its dialogue (SPEC section 1).

    Speakers are numbered per dialogue by first appearance; nothing carries over
    from the previous dialogue (the reference's bug).
    """
    texts: dict[int, list[str]] = {}
    speakers: dict[int, list[int]] = {}
    numbering: dict[int, dict[str, int]] = {}
    samples = []
    for utt in utts:
        seen = numbering.setdefault(utt.dialogue_id, {})
        number = seen.setdefault(utt.speaker_key, len(seen))
        texts.setdefault(utt.dialogue_id, []).append(utt.text)
        speakers.setdefault(utt.dialogue_id, []).append(number)
        samples.append(Sample(utt, tuple(texts[utt.dialogue_id]), tuple(speakers[utt.dialogue_id])))
    return samples


def load_speaker2id(data_dir: str | Path) -> dict[str, int]:
    """Read ``data_dir/speaker2id.json`` (MELD, written by the preparation step)."""
    path = Path(data_dir) / SPEAKER_MAP
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; build it with `python MELD/preprocessing.py --data_dir {data_dir}`"
        )
    mapping = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: expected a JSON object speaker name -> id")
    for name, value in mapping.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(f"{path}: speaker {name!r} has id {value!r}; expected an integer")
    return mapping


def fusion_speaker_ids(
    spec: DatasetSpec, dialogue: Sequence[Utterance], speaker2id: dict[str, int] | None
) -> list[int]:
    """Speaker ids of one dialogue for the fusion model's speaker embedding (SPEC section 5).

    IEMOCAP: 0/1... by order of appearance in the dialogue. MELD: the global id
    from ``speaker2id.json``.
    """
    if spec.global_speaker_ids:
        if speaker2id is None:
            raise ValueError(f"{spec.name} needs speaker2id.json for fusion speaker ids")
        ids = []
        for utt in dialogue:
            if utt.speaker not in speaker2id:
                raise DataError(
                    f"{spec.csv_names[utt.split]}: row {utt.row}: speaker {utt.speaker!r} is not in "
                    f"{SPEAKER_MAP}; rebuild it with `{_preprocess_command(spec)}`"
                )
            ids.append(speaker2id[utt.speaker])
        return ids
    order: dict[str, int] = {}
    ids = [order.setdefault(utt.speaker_key, len(order)) for utt in dialogue]
    if len(order) > spec.fusion.n_speaker:
        first = dialogue[0]
        raise DataError(
            f"{spec.csv_names[first.split]}: dialogue {first.dialogue_id} has {len(order)} speakers "
            f"({', '.join(order)}); {spec.name} allows {spec.fusion.n_speaker}"
        )
    return ids
