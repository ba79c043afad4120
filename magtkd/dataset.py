"""Data: the prepared CSVs -> typed utterances -> dialogue-prefix samples, the media path rules, the
speaker rules of the prompt and of the fusion model, and a user's own conversation (docs/METHOD.md §1).

Every stage reads its data through this module, so CSV checks, media path rules
and the prefix/speaker rules live here once. Both our prepared CSVs and the
authors' CSVs are accepted as they are (their media paths look like
``../datasets/IEMOCAP/Session1/...``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .csv_files import decimal_point, read_csv_checked
from .prompt import SPEAKER_TOKENS
from .spec import LABEL_PAD, SPEAKER_MAP, SPLITS, DatasetSpec
from .utils import DataError, InputMissing


log = logging.getLogger("magtkd")




# Session 5 of some IEMOCAP copies spells the dialogue-video folder ``Divx`` (docs/METHOD.md §1).
_DIVX_SPELLINGS = ("DivX", "Divx")


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
    source: str = ""  # the CSV file the row came from, for messages

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


def check_data_dir(spec: DatasetSpec, data_dir: str | Path) -> Path:
    """Return ``data_dir`` as a Path, or fail saying what the folder must contain."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputMissing(
            f"{spec.name} data folder {data_dir} does not exist; it must contain {spec.data_readme}"
        )
    return data_dir


class MediaResolver:
    """Resolve CSV media paths against the data folder (docs/METHOD.md §1).

    Existing absolute paths are kept. Other paths like the authors'
    ``../datasets/IEMOCAP/Session1/x.wav`` lose everything up to and including
    ``datasets/IEMOCAP/``; relative paths are taken from the data folder;
    ``DivX``/``Divx`` is whichever folder exists. Results are cached because many
    IEMOCAP rows share one dialogue video.
    """

    def __init__(self, spec: DatasetSpec, data_dir: Path, csv_dir: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.csv_dir = csv_dir  # a conversation's folder, tried first (docs/METHOD.md §0)
        self.marker = f"datasets/{spec.name}/"
        self._cache: dict[str, Path] = {}
        self.origins: dict[str, int] = {}  # how many distinct paths resolved against what

    def __call__(self, value: str) -> Path:
        if value not in self._cache:
            self._cache[value] = self._resolve(value)
        return self._cache[value]

    def _resolve(self, value: str) -> Path:
        text = value.replace("\\", "/")
        if Path(text).is_absolute() and Path(text).exists():
            self._count("absolute")
            return Path(text)  # an existing absolute path is meant as it is (e.g. a user's own recording)
        if self.csv_dir is not None and not Path(text).is_absolute():
            local = _fix_divx(self.csv_dir / text)
            if local.exists():
                self._count(f"the conversation's folder {self.csv_dir}")
                return local
        self._count(f"--data_dir {self.data_dir}")
        if self.marker in text:
            text = text.split(self.marker, 1)[1]
        path = Path(text)
        if not path.is_absolute():
            path = self.data_dir / path
        return _fix_divx(path)


    def _count(self, origin: str) -> None:
        self.origins[origin] = self.origins.get(origin, 0) + 1


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


def _float_cell(path: Path, row: int, column: str, value: str, decimal_comma: bool = False) -> float:
    """A number cell; ``decimal_comma``: ``12,40`` is 12.40 (a spreadsheet's ';'-separated export in a locale
    whose decimal mark is a comma, docs/METHOD.md §6)."""
    try:
        return float(decimal_point(value) if decimal_comma else value)
    except ValueError:
        raise DataError(f"{path}: row {row}: {column} {value!r} is not a number") from None


def load_split(spec: DatasetSpec, data_dir: str | Path, split: str) -> list[Utterance]:
    """Read ``data_dir/spec.csv_names[split]`` into utterances, in CSV order.

    Hard errors (docs/METHOD.md §6): missing folder, missing CSV, missing column,
    an emotion outside ``spec.labels``, non-integer ids; each names the file and
    the row or column.
    """
    data_dir = check_data_dir(spec, data_dir)
    if split not in spec.csv_names:
        raise KeyError(f"unknown split {split!r}; expected one of {', '.join(spec.csv_names)}")
    path = data_dir / spec.csv_names[split]
    if not path.is_file():
        raise InputMissing(
            f"{path} not found; build it from the raw release with `{_preprocess_command(spec)}` "
            f"(the folder must contain {spec.data_readme})"
        )
    return _read_utterances(spec, path, data_dir, split, labelled=True)


def _read_utterances(spec: DatasetSpec, path: Path, data_dir: Path, split: str, labelled: bool,
                     csv_relative: bool = False) -> list[Utterance]:
    """The rows of a prepared CSV as utterances, in file order.

    ``labelled``: the ``Emotion`` column is required and checked; otherwise it is
    not needed, ignored when present, and every label is :data:`LABEL_PAD`.
    """
    required = spec.required_columns if labelled else tuple(c for c in spec.required_columns if c != "Emotion")
    frame = read_csv_checked(path, required)
    if frame.empty:
        raise DataError(f"{path}: no data rows")
    has_times = "Start_Time" in frame.columns and "End_Time" in frame.columns
    decimal_comma = frame.attrs.get("separator", ",") != ","
    resolve = MediaResolver(spec, data_dir, path.parent if csv_relative else None)
    utterances = []
    seen: dict[tuple[int, int], int] = {}
    for index, record in enumerate(frame.to_dict("records"), start=1):
        utt = _utterance(spec, path, split, index, record, labelled, has_times, resolve, decimal_comma)
        _check_row(path, index, utt, seen)
        utterances.append(utt)
    if csv_relative:
        log.info("%s: media paths resolved against %s", path,
                 "; ".join(f"{origin} ({n})" for origin, n in resolve.origins.items()))
    return utterances


def _utterance(spec: DatasetSpec, path: Path, split: str, index: int, record: dict[str, str], labelled: bool,
               has_times: bool, resolve: MediaResolver, decimal_comma: bool = False) -> Utterance:
    """CSV data row ``index`` (1-based) as an utterance; a cell that is not what its column needs names the row."""
    emotion, label = "", LABEL_PAD
    if labelled:
        emotion = record["Emotion"]
        if emotion not in spec.labels:
            raise DataError(
                f"{path}: row {index} (line {index + 1}): Emotion {emotion!r} is not one of "
                f"{', '.join(spec.labels)}"
            )
        label = spec.label_id(emotion)
    return Utterance(
        split=split,
        row=index,
        dialogue_id=_int_cell(path, index, "Dialogue_ID", record["Dialogue_ID"]),
        utterance_id=_int_cell(path, index, "Utterance_ID", record["Utterance_ID"]),
        text=record["Utterance"],
        speaker=record["Speaker"],
        speaker_key=spec.speaker_of(record["Speaker"]),
        emotion=emotion,
        label=label,
        audio_path=resolve(record[spec.audio_column]),
        video_path=resolve(record[spec.video_column]),
        start=_float_cell(path, index, "Start_Time", record["Start_Time"], decimal_comma) if has_times else None,
        end=_float_cell(path, index, "End_Time", record["End_Time"], decimal_comma) if has_times else None,
        source=str(path),
    )


def _check_row(path: Path, index: int, utt: Utterance, seen: dict[tuple[int, int], int]) -> None:
    """A repeated (Dialogue_ID, Utterance_ID) pair or a time span that is not one stops the read."""
    # A repeated row would be counted twice in training, features and test metrics.
    first = seen.setdefault((utt.dialogue_id, utt.utterance_id), index)
    if first != index:
        raise DataError(
            f"{path}: rows {first} and {index} (lines {first + 1} and {index + 1}) both have Dialogue_ID "
            f"{utt.dialogue_id}, Utterance_ID {utt.utterance_id}; each utterance needs its own pair: "
            "remove the duplicate row"
        )
    if utt.start is not None and utt.end is not None:
        if not (np.isfinite(utt.start) and np.isfinite(utt.end)):
            raise DataError(f"{path}: row {index} (line {index + 1}): Start_Time {utt.start} / End_Time "
                            f"{utt.end} must be finite numbers of seconds")
        if utt.start < 0 or utt.end < utt.start:
            raise DataError(f"{path}: row {index} (line {index + 1}): Start_Time {utt.start} and End_Time "
                            f"{utt.end} are not a time span (need 0 <= Start_Time <= End_Time)")


def load_conversation(spec: DatasetSpec, path: str | Path, data_dir: str | Path,
                      csv_relative: bool = False) -> list[Utterance]:
    """A user's conversation CSV (the prepared-CSV schema, ``Emotion`` optional and ignored), in file order.

    Media paths resolve as in the dataset's CSVs (:class:`MediaResolver`; absolute
    paths as they are); with ``csv_relative`` (predict.py) a relative path that exists
    beside the CSV is taken from there first (the log says which); ``data_dir`` need not exist. The utterances' ``split`` is
    ``conversation-<digest>``, a digest of what their stored frames depend on (ids,
    video files with size and modification time, time windows), so frames stored
    for one conversation are reused by a rerun but never by another conversation.
    Errors name the file and the row: a missing file or column, no rows, a
    (Dialogue_ID, Utterance_ID) pair given twice, more speakers in a dialogue than
    the prompt has tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation CSV {path} not found")
    utts = _read_utterances(spec, path, Path(data_dir), "conversation", labelled=False, csv_relative=csv_relative)
    keys: dict[int, dict[str, str]] = {}
    for utt in utts:
        speakers = keys.setdefault(utt.dialogue_id, {})
        other = speakers.setdefault(utt.speaker_key, utt.speaker)
        if other != utt.speaker:
            log.warning("%s: row %d: speakers %r and %r of dialogue %d count as one speaker (%r): %s tells "
                        "speakers apart by %s", path, utt.row, other, utt.speaker, utt.dialogue_id,
                        utt.speaker_key, spec.name, spec.speaker_of.__doc__ or "its speaker rule")
        if len(speakers) > len(SPEAKER_TOKENS):
            raise DataError(f"{path}: row {utt.row}: dialogue {utt.dialogue_id} has more than "
                            f"{len(SPEAKER_TOKENS)} speakers, the most the text prompt can tell apart")
    digest = hashlib.sha256()
    for utt in utts:
        stat = utt.video_path.stat() if utt.video_path.is_file() else None
        digest.update(repr((utt.key, str(utt.video_path), stat and (stat.st_size, stat.st_mtime_ns),
                            window_of(spec, utt))).encode("utf-8"))
    split = f"conversation-{digest.hexdigest()[:16]}"
    return [dataclasses.replace(utt, split=split) for utt in utts]


def window_of(spec: DatasetSpec, utt: Utterance) -> tuple[float, float] | None:
    """IEMOCAP: [max(start-1, 0), end+1] in the dialogue video; MELD: the whole clip."""
    if spec.video_window_pad is None or utt.start is None or utt.end is None:
        return None
    return max(utt.start - spec.video_window_pad, 0.0), utt.end + spec.video_window_pad


def group_dialogues(utts: Sequence[Utterance]) -> list[tuple[int, list[Utterance]]]:
    """``[(dialogue_id, utterances in CSV order), ...]`` in order of first appearance."""
    groups: dict[int, list[Utterance]] = {}
    for utt in utts:
        groups.setdefault(utt.dialogue_id, []).append(utt)
    return list(groups.items())


def build_samples(utts: Sequence[Utterance]) -> list[Sample]:
    """One sample per utterance, in input order: the prefix of its dialogue (docs/METHOD.md §1).

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


def load_samples(spec: DatasetSpec, data_dir: str | Path, splits: Sequence[str] = SPLITS) -> dict[str, list[Sample]]:
    """Dialogue-prefix samples per split, in CSV order (docs/METHOD.md §1)."""
    return {split: build_samples(load_split(spec, data_dir, split)) for split in splits}


def load_speaker2id(data_dir: str | Path) -> dict[str, int]:
    """Read ``data_dir/speaker2id.json`` (MELD, written by the preparation step)."""
    path = Path(data_dir) / SPEAKER_MAP
    if not path.is_file():
        raise InputMissing(
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
    spec: DatasetSpec, dialogue: Sequence[Utterance], speaker2id: dict[str, int] | None,
    padding: int | None = None,
) -> list[int]:
    """Speaker ids of one dialogue for the fusion model's speaker embedding (docs/METHOD.md §5).

    IEMOCAP: 0/1... by order of appearance in the dialogue. MELD: the global id
    from ``speaker2id.json``. A speaker the model has no row for (MELD: not in the
    map; IEMOCAP: beyond the first ``spec.n_speaker`` of the dialogue) is an error
    naming the file and row, unless ``padding`` is given (prediction on a user's
    conversation): then it gets the id ``padding``, the model's padding row, and a
    warning says so.
    """
    warned: set[str] = set()

    def unknown(utt: Utterance, why: str) -> int:
        if padding is None:
            raise DataError(f"{utt.source or spec.csv_names[utt.split]}: row {utt.row}: {why}")
        if utt.speaker not in warned:  # once per speaker and dialogue
            warned.add(utt.speaker)
            log.warning("%s: row %d: %s; it gets the fusion model's padding speaker row (id %d) in dialogue %d",
                        utt.source, utt.row, why, padding, utt.dialogue_id)
        return padding

    if spec.global_speaker_ids:
        if speaker2id is None:
            raise ValueError(f"{spec.name} needs speaker2id.json for fusion speaker ids")
        limit = math.inf if padding is None else padding
        # In a dataset split, an unknown speaker means the map is stale.
        rebuild = f"; rebuild it with `{_preprocess_command(spec)}`"
        return [speaker2id[utt.speaker] if speaker2id.get(utt.speaker, limit) < limit else
                unknown(utt, f"speaker {utt.speaker!r} is not in {SPEAKER_MAP}"
                        f"{rebuild if utt.split in spec.csv_names else ''}")
                for utt in dialogue]
    order: dict[str, int] = {}
    ids = [order.setdefault(utt.speaker_key, len(order)) for utt in dialogue]
    if len(order) > spec.n_speaker:
        if padding is None:
            first = dialogue[0]
            raise DataError(
                f"{first.source or spec.csv_names[first.split]}: dialogue {first.dialogue_id} has {len(order)} "
                f"speakers ({', '.join(order)}); {spec.name} allows {spec.n_speaker}"
            )
        ids = [i if i < spec.n_speaker else
               unknown(utt, f"speaker {utt.speaker!r} is speaker {i + 1} of dialogue {utt.dialogue_id}; "
                            f"{spec.name} allows {spec.n_speaker}")
               for i, utt in zip(ids, dialogue)]
    return ids
