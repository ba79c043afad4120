"""Data: dataset descriptions, CSV -> utterances -> dialogue-prefix samples, the
text prompt, torch datasets and collation, stored video frames (and their
extraction), first-stage feature pickles and the fusion's dialogue batches.

Every stage reads its data through this module, so CSV checks, media path
rules, the prefix/speaker rules and the artifact formats live here once
(docs/METHOD.md §1, §2, §4). Both our prepared CSVs and the authors' CSVs are
accepted as they are (their media paths look like ``../datasets/IEMOCAP/Session1/...``).
"""

from __future__ import annotations

import builtins
import codecs
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import logging
import math
import pickle
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from . import media, utils
from .media import FRAMES_PER_CLIP, TARGET_SAMPLE_RATE, DecoderProcess, MediaError, decode_audio_isolated, decode_windows
from .utils import (InputMissing, SubstitutionReport, UserError, atomic_path, begin_outputs, check_complete,
                    finish_outputs, output_lock)

log = logging.getLogger("magtkd")

SPLITS: tuple[str, ...] = ("train", "dev", "test")
SPEAKER_MAP = "speaker2id.json"  # MELD: speaker name -> global id, written by MELD/preprocessing.py


# --------------------------------------------------------------------------- dataset description

@dataclass(frozen=True)
class DatasetSpec:
    """Everything the shared code needs to know about one dataset; ``<DS>/config.py`` defines it."""

    name: str
    labels: tuple[str, ...]  # index order = class id
    csv_names: Mapping[str, str]  # split -> prepared CSV file name inside the data folder
    required_columns: tuple[str, ...]
    audio_column: str  # column holding the file audio is decoded from (wav or mp4)
    video_column: str
    # Seconds added on both sides of [Start_Time, End_Time] for the video window;
    # None means the whole clip (docs/METHOD.md §2, "Video").
    video_window_pad: float | None
    speaker_of: Callable[[str], str]  # CSV ``Speaker`` value -> speaker key within a dialogue
    global_speaker_ids: bool  # fusion speaker ids: False = order in dialogue, True = speaker2id.json
    n_speaker: int  # fusion speaker-embedding rows without the padding row (docs/METHOD.md §5)
    data_readme: str = ""  # what the data folder must contain (used in error messages)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def label_id(self, emotion: str) -> int:
        return self.labels.index(emotion)

    # Default locations, relative to the dataset script folder (``<repo>/<DS>``),
    # so scripts work from any working directory (docs/METHOD.md §0 layout).
    def default_data_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve().parent / "datasets" / self.name

    def default_pretrained_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve().parent / "pretrained_model"

    def default_save_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve() / self.name / "save_model"

    def default_feature_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve() / "feature"


# --------------------------------------------------------------------------- CSV -> utterances -> samples


# Session 5 of some IEMOCAP copies spells the dialogue-video folder ``Divx`` (docs/METHOD.md §1).
_DIVX_SPELLINGS = ("DivX", "Divx")


class DataError(UserError, ValueError):
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


def read_csv_checked(path: str | Path, required_columns: Iterable[str]) -> pd.DataFrame:
    """Read a CSV as strings (no number/NaN parsing) and check it has ``required_columns``.

    Texts must stay byte-exact (docs/METHOD.md §1), so every cell is read as ``str``
    and empty cells stay ``""``. UTF-8 is expected (a BOM is tolerated); CSVs
    re-saved by a spreadsheet program in cp1252 are read with a warning.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (no header row; expected columns {', '.join(required_columns)})") from None
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
        if Path(text).is_absolute() and Path(text).exists():
            return Path(text)  # an existing absolute path is meant as it is (e.g. a user's own recording)
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


def _read_utterances(spec: DatasetSpec, path: Path, data_dir: Path, split: str, labelled: bool) -> list[Utterance]:
    """The rows of a prepared CSV as utterances, in file order.

    ``labelled``: the ``Emotion`` column is required and checked; otherwise it is
    not needed, ignored when present, and every label is :data:`LABEL_PAD`.
    """
    required = spec.required_columns if labelled else tuple(c for c in spec.required_columns if c != "Emotion")
    frame = read_csv_checked(path, required)
    if frame.empty:
        raise DataError(f"{path}: no data rows")
    has_times = "Start_Time" in frame.columns and "End_Time" in frame.columns
    resolve = MediaResolver(spec, data_dir)
    utterances = []
    seen: dict[tuple[int, int], int] = {}
    for index, record in enumerate(frame.to_dict("records"), start=1):
        emotion, label = "", LABEL_PAD
        if labelled:
            emotion = record["Emotion"]
            if emotion not in spec.labels:
                raise DataError(
                    f"{path}: row {index} (line {index + 1}): Emotion {emotion!r} is not one of "
                    f"{', '.join(spec.labels)}"
                )
            label = spec.label_id(emotion)
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
                label=label,
                audio_path=resolve(record[spec.audio_column]),
                video_path=resolve(record[spec.video_column]),
                start=_float_cell(path, index, "Start_Time", record["Start_Time"]) if has_times else None,
                end=_float_cell(path, index, "End_Time", record["End_Time"]) if has_times else None,
                source=str(path),
            )
        )
        utt = utterances[-1]
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
    return utterances


def load_conversation(spec: DatasetSpec, path: str | Path, data_dir: str | Path) -> list[Utterance]:
    """A user's conversation CSV (the prepared-CSV schema, ``Emotion`` optional and ignored), in file order.

    Media paths resolve as in the dataset's CSVs (:class:`MediaResolver`; absolute
    paths as they are); ``data_dir`` need not exist. The utterances' ``split`` is
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
    utts = _read_utterances(spec, path, Path(data_dir), "conversation", labelled=False)
    seen: dict[tuple[int, int], int] = {}
    keys: dict[int, dict[str, str]] = {}
    for utt in utts:
        first = seen.setdefault((utt.dialogue_id, utt.utterance_id), utt.row)
        if first != utt.row:
            raise DataError(f"{path}: rows {first} and {utt.row} both have Dialogue_ID {utt.dialogue_id}, "
                            f"Utterance_ID {utt.utterance_id}; each utterance needs its own pair")
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


# --------------------------------------------------------------------------- predictions on a conversation


def prediction_table(spec: DatasetSpec, utterances: Sequence[Utterance], ordered: Sequence[Utterance],
                     logits: torch.Tensor) -> pd.DataFrame:
    """Predictions of a conversation in file order (``utterances``), from fusion logits in pickle order.

    ``ordered`` are the same utterances in the order of ``logits``' rows (the
    feature pickle's: grouped by dialogue). Columns: ``Dialogue_ID``,
    ``Utterance_ID``, ``Speaker``, ``Utterance``, ``emotion`` (the argmax, as the
    fusion stage predicts) and ``p_<label>`` (softmax) for every label.
    """
    if logits.shape != (len(ordered), spec.num_classes) or len(ordered) != len(utterances):
        raise ValueError(f"{len(utterances)} utterances, {len(ordered)} ordered, logits {tuple(logits.shape)}")
    row_of = {utt.key: i for i, utt in enumerate(ordered)}
    index = torch.tensor([row_of[utt.key] for utt in utterances], dtype=torch.long)
    logits = logits.detach().cpu()[index]
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    table = pd.DataFrame({
        "Dialogue_ID": [u.dialogue_id for u in utterances], "Utterance_ID": [u.utterance_id for u in utterances],
        "Speaker": [u.speaker for u in utterances], "Utterance": [u.text for u in utterances],
        "emotion": [spec.labels[i] for i in logits.argmax(-1).tolist()],
    })
    for j, label in enumerate(spec.labels):
        table[f"p_{label}"] = probs[:, j]
    return table


def prediction_summary(table: pd.DataFrame, width: int = 48) -> str:
    """A short console table: ids, speaker, emotion and its probability, the utterance cut to ``width``."""
    probability = [row[f"p_{row['emotion']}"] for _, row in table.iterrows()]
    short = table[["Dialogue_ID", "Utterance_ID", "Speaker", "emotion"]].assign(
        p=[f"{p:.2f}" for p in probability],
        Utterance=[t if len(t) <= width else t[: width - 3] + "..." for t in table["Utterance"]],
    )
    return short.to_string(index=False)


# --------------------------------------------------------------------------- the text prompt

SPEAKER_TOKENS: tuple[str, ...] = tuple(f"<s{k}>" for k in range(1, 10))
SEPARATOR = "</s>"  # RoBERTa's separator; the tokenizer maps the literal string to its id


def speaker_token(speaker: int) -> str:
    """0-based speaker number -> ``<s{speaker+1}>``; at most 9 speakers (MELD's maximum)."""
    if not 0 <= speaker < len(SPEAKER_TOKENS):
        raise ValueError(
            f"speaker number {speaker} has no token: the prompt supports speakers "
            f"0..{len(SPEAKER_TOKENS) - 1} ({SPEAKER_TOKENS[0]}..{SPEAKER_TOKENS[-1]}) within one dialogue"
        )
    return SPEAKER_TOKENS[speaker]


def build_prompt(texts: Sequence[str], speakers: Sequence[int]) -> str:
    """Prompt for the last utterance of a dialogue prefix.

    ``texts``/``speakers`` are the prefix ``[u_0 .. u_t]`` with 0-based speaker
    numbers (see :class:`Sample`).
    """
    if len(texts) != len(speakers):
        raise ValueError(f"{len(texts)} texts but {len(speakers)} speakers")
    if not texts:
        raise ValueError("empty dialogue prefix")
    context = " ".join(f"{speaker_token(s)} {text}" for text, s in zip(texts, speakers))
    return f"{context} {SEPARATOR} Now{speaker_token(speakers[-1])} feels"


def add_speaker_tokens(tokenizer: Any) -> int:
    """Add ``<s1>``..``<s9>`` as extra special tokens; return the new vocabulary size.

    The model's embeddings must be resized to the returned size (the reference
    resized the model but encoded with a tokenizer lacking the tokens). Adding
    twice is harmless. transformers 5 names the key ``extra_special_tokens``;
    ``replace_extra_special_tokens=False`` keeps any the tokenizer already has.
    """
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(SPEAKER_TOKENS)}, replace_extra_special_tokens=False
    )
    _check_speaker_tokens(tokenizer)
    return len(tokenizer)


def _check_speaker_tokens(tokenizer: Any) -> None:
    """Each speaker token must be one id, or the prompt silently loses speaker identity."""
    added = tokenizer.get_added_vocab()
    missing = [token for token in SPEAKER_TOKENS if token not in added]
    if missing:
        raise ValueError(
            f"tokenizer lacks the speaker tokens {', '.join(missing)}; "
            "call add_speaker_tokens(tokenizer) first"
        )


def encode_prompt(tokenizer: Any, prompt: str, max_tokens: int = 512) -> list[int]:
    """Token ids: the prompt as is (no BOS/EOS added), its LAST ``max_tokens-1`` ids, then the mask id."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (got {max_tokens})")
    if tokenizer.mask_token_id is None:
        raise ValueError("tokenizer has no mask token")
    _check_speaker_tokens(tokenizer)
    # verbose=False: prompts longer than the model limit are expected here; we truncate below.
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    return list(ids[-(max_tokens - 1):]) + [tokenizer.mask_token_id]


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Stack id lists with LEFT padding: ``(input_ids, attention_mask)``, both ``[B, max_len]`` long."""
    if not batch:
        raise ValueError("empty batch")
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        if ids:
            input_ids[i, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[i, width - len(ids):] = 1
    return input_ids, attention_mask


# --------------------------------------------------------------------------- torch datasets

MAX_AUDIO_SAMPLES = 400_000  # docs/METHOD.md §2: keep at most the first 400000 samples


class TextField:
    """Prompt ids (last 511 tokens + mask), left-padded."""

    name = "text"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def load(self, sample: Sample) -> list[int]:
        return encode_prompt(self.tokenizer, build_prompt(sample.texts, sample.speakers))

    def collate(self, items: list[list[int]]) -> dict[str, torch.Tensor]:
        ids, mask = left_pad(items, self.tokenizer.pad_token_id)
        return {"text_ids": ids, "text_mask": mask}


class AudioCache:
    """Each source file's decoded 16 kHz mono samples, stored the first time a stage decodes it.

    One ``<folder>/<sha1 of the resolved source path>.npz`` per source file holds the
    float32 samples exactly as `media.decode_audio_isolated` returned them (so a hit
    gives bit-identical samples) and a JSON record of the source path, size,
    modification time (ns), sample rate and the decoder's notes. A hit needs all of
    these to match the file as it is now; a changed file (size or mtime) is decoded
    again and its entry replaced. Notes of a partial decode are stored and handed
    back on every hit, so each stage reports the substitution again. Failed decodes
    (`MediaError`) are not stored: the failure may be passing (a timeout on a busy
    machine) and is reported anew by each stage that meets it. An entry that cannot
    be read is decoded again (warning naming it); entries are written atomically,
    so DataLoader workers and torchrun ranks can share the folder. If the folder
    cannot be written the clip is still returned (warning, once per folder).
    ``folder=None``: decode every time.
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self._warned = False
        if self.folder is not None and self.folder.is_dir():
            # Temporary files of a killed run; an hour's age spares another process's write in flight.
            cutoff = time.time() - 3600
            for stray in self.folder.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    if stray.stat().st_mtime < cutoff:
                        stray.unlink()

    def entry(self, source: str | Path) -> Path:
        assert self.folder is not None
        digest = hashlib.sha1(str(Path(source).resolve()).encode("utf-8", "surrogateescape")).hexdigest()
        return self.folder / f"{digest}.npz"

    def load(self, source: str | Path, sample_rate: int = TARGET_SAMPLE_RATE,
             notes: list[str] | None = None) -> np.ndarray:
        """The samples of ``source`` (cached, or decoded in the supervised child and stored); raises
        `MediaError` as `media.decode_audio_isolated` does. The decoder's notes are appended to ``notes``."""
        notes = [] if notes is None else notes
        if self.folder is None:
            return decode_audio_isolated(source, sample_rate, notes=notes)
        source = Path(source)
        key = self._key(source, sample_rate)
        entry = self.entry(source)
        if key is not None and entry.is_file():
            hit = self._read(entry, key)
            if hit is not None:
                notes.extend(hit[1])
                return hit[0]
        decoded_notes: list[str] = []
        samples = decode_audio_isolated(source, sample_rate, notes=decoded_notes)
        notes.extend(decoded_notes)
        # Keyed by the file as it was before decoding: a file replaced meanwhile is decoded again next time.
        if key is not None and key == self._key(source, sample_rate):
            self._write(entry, samples, {**key, "notes": decoded_notes})
        return samples

    @staticmethod
    def _key(source: Path, sample_rate: int) -> dict[str, Any] | None:
        try:
            stat = source.stat()
        except OSError:
            return None  # missing: the decoder raises the MediaError naming it
        return {"source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "sample_rate": int(sample_rate)}

    @staticmethod
    def _read(entry: Path, key: dict[str, Any]) -> tuple[np.ndarray, list[str]] | None:
        try:
            with np.load(entry, allow_pickle=False) as data:
                record = json.loads(str(data["record"]))
                if any(record.get(k) != v for k, v in key.items()):
                    return None  # the source changed (or another file hashed here): decode again
                samples = data["samples"]
            if samples.dtype != np.float32 or samples.ndim != 1 or not isinstance(record.get("notes"), list):
                raise ValueError(f"unexpected content (samples {samples.dtype} {samples.shape})")
        except Exception as exc:  # truncated, not an .npz, or malformed: the source is decoded again
            log.warning("audio cache entry %s for %s cannot be read (%s: %s); decoding the file again",
                        entry, key["source"], type(exc).__name__, exc)
            return None
        return samples, [str(n) for n in record["notes"]]

    def _write(self, entry: Path, samples: np.ndarray, record: dict[str, Any]) -> None:
        try:
            with atomic_path(entry) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, samples=np.ascontiguousarray(samples, dtype=np.float32),
                             record=np.array(json.dumps(record)))
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write the audio cache in %s (%s); clips are decoded again each time",
                            self.folder, exc)
                self._warned = True


class AudioField:
    """16 kHz mono, whole clip -> data2vec feature extractor -> first 400000 samples; right-padded with a mask.

    ``cache_dir``: where decoded clips are stored for later epochs and stages (`AudioCache`); None decodes
    every time.
    """

    name = "audio"

    def __init__(self, feature_extractor, max_samples: int = MAX_AUDIO_SAMPLES,
                 cache_dir: str | Path | None = None) -> None:
        self.extractor = feature_extractor
        self.max_samples = max_samples
        self.cache = AudioCache(cache_dir)

    def load(self, sample: Sample) -> tuple[np.ndarray, tuple[str, str] | None]:
        utt = sample.utterance
        try:
            # Decoded once (then read from the cache), in a supervised child process: a clip that
            # crashes or hangs the decoder is substituted.
            notes: list[str] = []
            wave = self.cache.load(utt.audio_path, TARGET_SAMPLE_RATE, notes=notes)
            problem = (str(utt.audio_path), "; ".join(notes), "audio decoded before the error") if notes else None
        except MediaError as err:
            wave, problem = np.zeros(TARGET_SAMPLE_RATE, dtype=np.float32), (str(utt.audio_path), err.reason)
        # As the authors: normalise the WHOLE clip (its mean and variance), then keep
        # the first max_samples (docs/METHOD.md §2); a minutes-long clip costs a few MB.
        values = self.extractor(wave, sampling_rate=TARGET_SAMPLE_RATE, return_tensors="np")["input_values"][0]
        return np.asarray(values[: self.max_samples], dtype=np.float32), problem

    def collate(self, items: list[tuple[np.ndarray, Any]]) -> dict[str, Any]:
        waves = [w for w, _ in items]
        length = max(len(w) for w in waves)
        values = torch.zeros(len(waves), length)
        mask = torch.zeros(len(waves), length, dtype=torch.long)
        for i, w in enumerate(waves):
            values[i, : len(w)] = torch.from_numpy(w)
            mask[i, : len(w)] = 1
        return {"audio_values": values, "audio_mask": mask, "audio_problems": [p for _, p in items]}


class VideoField:
    """Stored uint8 frames -> normalised ``pixel_values`` (8, 3, H, W)."""

    name = "video"

    def __init__(self, codec: FrameCodec, feature_dir: Path) -> None:
        self.codec = codec
        self.feature_dir = Path(feature_dir)
        check_complete(frames_record(self.feature_dir), f"the stored frames in {self.feature_dir / 'video'}",
                       "video_feature_extract.py")

    def load(self, sample: Sample) -> torch.Tensor:
        utt = sample.utterance
        return self.codec.normalize(load_frames(frame_file(self.feature_dir, utt.split, utt.key)))

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"video_pixels": torch.stack(items)}


class SampleDataset(Dataset):
    """Samples with the requested fields; items carry the label and the sample index."""

    def __init__(self, samples: Sequence[Sample], fields: Sequence[Any]) -> None:
        self.samples = list(samples)
        self.fields = list(fields)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        item = {"index": index, "label": sample.utterance.label}
        for field in self.fields:
            item[field.name] = field.load(sample)
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "index": torch.tensor([it["index"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items]),
        }
        for field in self.fields:
            batch.update(field.collate([it[field.name] for it in items]))
        return batch


def make_loader(dataset: SampleDataset, batch_size: int, shuffle: bool, num_workers: int,
                seed: int = 0) -> DataLoader:
    """A loader over ``dataset``; ``shuffle`` draws from a generator seeded with ``seed``.

    Under torchrun each rank loads its shard: shuffled loaders through a DistributedSampler
    (``seed`` + epoch), ordered ones every ``world_size``-th sample without padding, so that
    gathering the ranks' outputs by ``batch["index"]`` covers every sample once.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if utils.world_size() > 1:
        sampler = utils.train_sampler(dataset, seed) if shuffle else utils.EvalShardSampler(len(dataset))
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, collate_fn=dataset.collate, generator=generator, persistent_workers=False,
    )


def load_samples(spec: DatasetSpec, data_dir: str | Path, splits: Sequence[str] = SPLITS) -> dict[str, list[Sample]]:
    """Dialogue-prefix samples per split, in CSV order (docs/METHOD.md §1)."""
    return {split: build_samples(load_split(spec, data_dir, split)) for split in splits}


def loaders(samples: Mapping[str, Sequence[Sample]], fields: Sequence[Any], batch_size: int, num_workers: int,
            seed: int, splits: Sequence[str] = SPLITS) -> dict[str, DataLoader]:
    """One loader per split with the given fields; only ``train`` is shuffled (by a generator seeded with ``seed``)."""
    return {
        split: make_loader(SampleDataset(samples[split], fields), batch_size, shuffle=(split == "train"),
                           num_workers=num_workers, seed=seed)
        for split in splits
    }


# --------------------------------------------------------------------------- stored video frames

class FrameCodec:
    """Resize/crop frames with the videomae image processor; normalise them on load."""

    def __init__(self, image_processor) -> None:
        self.processor = image_processor
        crop = image_processor.crop_size
        self.height, self.width = int(crop["height"]), int(crop["width"])
        self.scale = float(image_processor.rescale_factor)
        self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    def resize_crop(self, frames: np.ndarray) -> np.ndarray:
        """(8, H, W, 3) RGB uint8 -> (8, 3, h, w) uint8: the processor without rescale/normalise.

        The processor's own ``resize`` and ``center_crop`` (its size rule, bilinear
        antialiased uint8 resize, crop offsets) on the 8 frames as one channels-last
        view. Calling the processor on a list of frames gives the same pixels (tested)
        but first copies every full-size frame to channels-first one at a time: 10x
        slower at 640x480, most of frame extraction's time (issue 15's profile).
        """
        p = self.processor
        if not all(hasattr(p, name) for name in ("resize", "center_crop", "do_resize", "do_center_crop")):
            out = p(list(frames), do_rescale=False, do_normalize=False, return_tensors="pt")
            return out["pixel_values"][0].round().clamp(0, 255).to(torch.uint8).numpy()
        pixels = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8)).permute(0, 3, 1, 2)
        if p.do_resize:
            pixels = p.resize(pixels, p.size, p.resample)
        if p.do_center_crop:
            pixels = p.center_crop(pixels, p.crop_size)
        return pixels.contiguous().numpy()

    def black(self) -> np.ndarray:
        """The substitute for an utterance whose frames cannot be read (docs/METHOD.md §6)."""
        return np.zeros((FRAMES_PER_CLIP, 3, self.height, self.width), dtype=np.uint8)

    def normalize(self, stored: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (8, 3, h, w) -> float32 ``pixel_values`` as the processor would give them."""
        pixels = torch.as_tensor(np.asarray(stored)).to(torch.float32) * self.scale
        return (pixels - self.mean) / self.std


def frames_record(feature_dir: Path) -> Path:
    """``<feature_dir>/video/extraction.json``: written last by video_feature_extract.py (completion record)."""
    return Path(feature_dir) / "video" / "extraction.json"


def frame_file(feature_dir: Path, split: str, key: str) -> Path:
    """``<feature_dir>/video/<split>/<Dialogue_ID>_<Utterance_ID>.npy`` (docs/METHOD.md §0)."""
    return Path(feature_dir) / "video" / split / f"{key}.npy"


def save_frames(path: Path, frames: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(frames, dtype=np.uint8))


def load_frames(path: Path) -> np.ndarray:
    if not Path(path).is_file():
        raise InputMissing(
            f"frame file {path} not found: run video_feature_extract.py for this dataset first"
        )
    try:
        frames = np.load(path, allow_pickle=False)
    except Exception as exc:  # truncated or not a .npy file
        raise FeatureFileError(
            f"cannot read frame file {path} ({type(exc).__name__}: {exc}); delete it and re-run "
            "video_feature_extract.py for this dataset (it re-extracts missing files)"
        ) from exc
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise FeatureFileError(f"{path}: expected uint8 frames of shape (8, 3, H, W), got {frames.dtype} "
                               f"{frames.shape}; delete it and re-run video_feature_extract.py")
    return frames


# --------------------------------------------------------------------------- frame extraction



@dataclass(frozen=True)
class Job:
    """One source video and the utterance windows still to extract from it."""

    video: Path
    keys: tuple[str, ...]  # "split/dia_utt", for the report
    windows: tuple[tuple[float, float] | None, ...]
    outputs: tuple[Path, ...]
    channel_order: str = "rgb"  # "bgr" reproduces the authors' OpenCV frames (docs/METHOD.md §7)


def window_of(spec: DatasetSpec, utt: Utterance) -> tuple[float, float] | None:
    """IEMOCAP: [max(start-1, 0), end+1] in the dialogue video; MELD: the whole clip."""
    if spec.video_window_pad is None or utt.start is None or utt.end is None:
        return None
    return max(utt.start - spec.video_window_pad, 0.0), utt.end + spec.video_window_pad


def plan_jobs(spec: DatasetSpec, utterances: Sequence[Utterance], feature_dir: Path,
              channel_order: str = "rgb") -> list[Job]:
    """Group utterances by source video, keeping only those whose output is missing.

    Temporary files left by a killed run are removed first; they are never read.
    """
    for split in {u.split for u in utterances}:
        for stray in (Path(feature_dir) / "video" / split).glob(".*.tmp"):
            stray.unlink(missing_ok=True)
    groups: dict[Path, list[Utterance]] = {}
    for utt in utterances:
        if not frame_file(feature_dir, utt.split, utt.key).is_file():
            groups.setdefault(utt.video_path, []).append(utt)
    return [
        Job(video, tuple(f"{u.split}/{u.key}" for u in utts), tuple(window_of(spec, u) for u in utts),
            tuple(frame_file(feature_dir, u.split, u.key) for u in utts), channel_order)
        for video, utts in groups.items()
    ]


_codec: FrameCodec | None = None  # the worker process's codec, set by _init_worker


def _init_worker(image_processor: Any) -> None:
    global _codec
    _codec = FrameCodec(image_processor)


FRAME_COUNT_NOTE = "frames chosen from the metadata count (the authors' rule)"


def run_job(job: Job) -> list[tuple[str, str, str, str]]:
    """Decode one video once, store every window's frames; return report rows
    ``(key, path, reason, replacement)``: black-frame substitutions, and whole clips whose
    metadata frame count differs from the decoded count (docs/METHOD.md §2)."""
    assert _codec is not None, "worker not initialised"
    problems: list[tuple[str, str, str, str]] = []
    counts: dict[int, tuple[int, int]] = {}
    notes: list[str] = []
    try:
        clips = decode_windows(job.video, job.windows, job.channel_order, counts, notes)
    except MediaError as err:
        clips, reason = [None] * len(job.windows), err.reason
    else:
        reason = "no frame in the utterance's time window"
    for i, (key, clip, out) in enumerate(zip(job.keys, clips, job.outputs)):
        counted = (f"metadata frame count {counts[i][0]}, decoded {counts[i][1]}"
                   if i in counts and counts[i][0] != counts[i][1] else "")
        if clip is None:
            reasons = "; ".join([*notes, reason] + ([counted] if counted else []))
            problems.append((key, str(job.video), reasons, "black frames"))
            save_frames(out, _codec.black())
        else:
            if notes:  # partially decoded: the frames come from the part before the error
                problems.append((key, str(job.video), "; ".join(notes), "frames decoded before the error"))
            save_frames(out, _codec.resize_crop(clip))
            if counted:
                problems.append((key, str(job.video), counted, FRAME_COUNT_NOTE))
    return problems


def _substitute_job(job: Job, reason: str) -> list[tuple[str, str, str]]:
    """Black frames for every window of a job whose decoder crashed or hung (the parent writes them)."""
    assert _codec is not None
    for out in job.outputs:
        save_frames(out, _codec.black())
    return [(key, str(job.video), reason) for key in job.keys]


def extract_frames(jobs: Sequence[Job], image_processor: Any, num_workers: int, report_path: Path,
                   args: Any = None) -> SubstitutionReport:
    """Run every job (one decode per source video, in parallel over videos) and keep the report current.

    Each job runs in a supervised decoder process (`media.DecoderProcess`, one per
    worker, ``max(num_workers, 1)`` of them): a source video that crashes or hangs
    the decoder loses only its own windows (black frames, listed with the
    reason) and the run goes on. The report at ``report_path`` keeps what
    earlier, interrupted runs substituted; it is rewritten whenever a job
    substitutes, and once at the end. ``<video>/extraction.json`` (the
    completion record) says ``complete: false`` while this runs and is
    rewritten last with ``complete: true``.
    """
    video_dir = report_path.parent
    # Under torchrun each rank decodes its share of the videos (the report is gathered at the end);
    # the lock is rank 0's.
    single = utils.world_size() == 1
    with output_lock(video_dir, "frames") if utils.is_main() else contextlib.nullcontext():
        record = frames_record(video_dir.parent)
        if utils.is_main():  # the report's and record's (the frames' own: plan_jobs)
            utils.remove_stale_temps(video_dir, (report_path.name, record.name))
        if single:  # under torchrun no rank knows when the others finish: no completion record
            begin_outputs(record, "video_feature_extract", args or {}, report=report_path.name)
        report = SubstitutionReport()
        if report_path.is_file():
            for item in SubstitutionReport.read(report_path):
                report.add(item.key, item.path, item.reason, item.replacement)
        jobs = utils.shard(jobs)
        _init_worker(image_processor)  # the parent writes black frames for crashed jobs
        # One supervised decoder process per worker, started here in the main thread.
        decoders = [DecoderProcess(media.VIDEO_TIMEOUT_S, _init_worker, (image_processor,)).start()
                    for _ in range(max(1, min(num_workers, len(jobs))))] if jobs else []
        idle: queue.Queue = queue.Queue()
        for decoder in decoders:
            idle.put(decoder)

        def supervised(job: Job) -> list[tuple[str, ...]]:
            decoder = idle.get()
            try:
                return decoder.call(job.video, run_job, job)
            except MediaError as err:
                return _substitute_job(job, err.reason)
            finally:
                idle.put(decoder)

        try:
            with ThreadPoolExecutor(max(1, len(decoders))) as threads:
                for problems in utils.progress(threads.map(supervised, jobs), total=len(jobs), desc="videos",
                                               leave=True):
                    for problem in problems:
                        report.add_problem(problem[0], problem[1:], "black frames")
                    if problems and single:  # keep the report current, so an interrupted run loses nothing
                        report.write(report_path)
        finally:
            for decoder in decoders:
                decoder.close()
        report.write(report_path)
        if single:
            finish_outputs(record, "video_feature_extract", args or {}, report=report_path.name,
                           substituted=len(report))
    return report


# --------------------------------------------------------------------------- first-stage feature pickles

FEATURE_KEYS: tuple[str, ...] = ("text", "audio", "video", "audio_kd", "video_kd")
META_KEYS: tuple[str, ...] = ("speakers", "labels", "dia2utt")
PICKLE_PROTOCOL = 4  # readable by every Python 3 the authors' tooling could have used


class FeatureFileError(UserError, ValueError):
    """A feature pickle that is unsafe, malformed, or does not follow the docs/METHOD.md §4 layout."""


def features_record(feature_dir: str | Path) -> Path:
    """``<feature_dir>/first_stage_features.json``: written last by extract_first_stage_features.py."""
    return Path(feature_dir) / "first_stage_features.json"


def feature_path(feature_dir: str | Path, split: str) -> Path:
    """``<feature_dir>/first_stage_{split}_features.pkl``."""
    return Path(feature_dir) / f"first_stage_{split}_features.pkl"


# --------------------------------------------------------------------------- building


def assemble_features(
    dialogue_ids: Sequence[int], utterance_ids: Sequence[int], labels: Sequence[int],
    speakers: Sequence[int], vectors: Mapping[str, np.ndarray],
) -> dict[str, Any]:
    """Group per-utterance rows (CSV order) into the docs/METHOD.md §4 layout.

    ``vectors`` maps every key of :data:`FEATURE_KEYS` to an (N, D) array whose
    row i belongs to utterance i. Dialogues are listed in order of first
    appearance; within a dialogue the rows keep their order.
    """
    n = len(dialogue_ids)
    for name, seq in (("utterance_ids", utterance_ids), ("labels", labels), ("speakers", speakers)):
        if len(seq) != n:
            raise ValueError(f"assemble_features: {name} has {len(seq)} entries, dialogue_ids has {n}")
    missing = [k for k in FEATURE_KEYS if k not in vectors]
    unknown = [k for k in vectors if k not in FEATURE_KEYS]
    if missing or unknown:
        raise ValueError(
            f"assemble_features: vectors must have exactly the keys {FEATURE_KEYS}; "
            f"missing {missing}, unknown {unknown}"
        )
    matrices: dict[str, np.ndarray] = {}
    for key in FEATURE_KEYS:
        mat = np.asarray(vectors[key])
        if mat.ndim != 2 or mat.shape[0] != n:
            raise ValueError(f"assemble_features: vectors[{key!r}] has shape {mat.shape}, expected ({n}, D)")
        matrices[key] = mat.astype(np.float32, copy=False)

    vids: list[int] = []
    out: dict[str, Any] = {"vids": vids, **{k: {} for k in (*FEATURE_KEYS, *META_KEYS)}}
    for i in range(n):
        dia = int(dialogue_ids[i])
        if dia not in out["labels"]:
            vids.append(dia)
            for k in (*FEATURE_KEYS, *META_KEYS):
                out[k][dia] = []
        out["dia2utt"][dia].append(int(utterance_ids[i]))
        out["labels"][dia].append(int(labels[i]))
        out["speakers"][dia].append(int(speakers[i]))
        for key in FEATURE_KEYS:
            # A copy, so each pickled array holds only its own row.
            out[key][dia].append(np.array(matrices[key][i], dtype=np.float32))
    return out


def save_features(path: str | Path, features: Mapping[str, Any]) -> Path:
    """Validate ``features`` strictly (float32 (D,) arrays, ints) and pickle it atomically."""
    path = Path(path)
    validate_features(features, path, FEATURE_KEYS, strict=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(dict(features), fh, protocol=PICKLE_PROTOCOL)
    return path


# --------------------------------------------------------------------------- restricted loading


def _numpy_core_module(name: str) -> Any:
    """``numpy._core.<name>`` (numpy >= 2) or ``numpy.core.<name>`` (older numpy), without warnings."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol-2 pickles store ``bytes`` as a latin-1 string.

    Only the latin-1 use is admitted; any other codec is refused.
    """
    if encoding.replace("_", "-").lower() not in {"latin1", "latin-1", "iso-8859-1"}:
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a feature pickle may name (module, name) -> object to use."""
    multiarray = _numpy_core_module("multiarray")
    numeric = _numpy_core_module("numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # Arrays written by numpy 1.x name numpy.core.*, by numpy 2.x numpy._core.*:
    # both resolve to the current numpy's functions, never to an import of the
    # named module.
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                 "bool", "str", "bytes", "bytearray"):
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = allowed[("builtins", name)]  # Python 2 pickles
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the allow-list; any other global is refused BEFORE it is imported."""

    def __init__(self, fh: io.BufferedIOBase, path: Path) -> None:
        # latin1 lets Python 2 pickles of numpy arrays load (numpy's own advice).
        super().__init__(fh, encoding="latin1")
        self.path = path
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise FeatureFileError(
                f"refusing to load {self.path}: it references the global '{module}.{name}', which is "
                "not a numpy array/dtype/scalar or a builtin container/scalar. A first-stage feature "
                "file holds only those (docs/METHOD.md §4); this file may be malicious or not a feature file"
            ) from None


def load_features(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """Load and validate a feature pickle without executing code from it.

    ``keys``: the feature keys needed (default all of :data:`FEATURE_KEYS`);
    only these are required and returned, together with ``vids`` and the
    ``speakers``/``labels``/``dia2utt`` dicts.
    """
    path = Path(path)
    wanted = tuple(FEATURE_KEYS if keys is None else keys)
    unknown = [k for k in wanted if k not in FEATURE_KEYS]
    if unknown:
        raise ValueError(f"load_features: unknown feature keys {unknown}; known: {FEATURE_KEYS}")
    if not path.is_file():
        raise FeatureFileError(
            f"feature file {path} not found: it is written by extract_first_stage_features.py "
            "(or download the authors' first-stage features into this folder)"
        )
    try:
        with open(path, "rb") as fh:
            data = _RestrictedUnpickler(fh, path).load()
    except FeatureFileError:
        raise
    except Exception as exc:  # truncated file, not a pickle, refused codec, ...
        raise FeatureFileError(f"cannot read feature file {path}: {type(exc).__name__}: {exc}; it is written by "
                               "extract_first_stage_features.py (re-run it)") from exc
    if not isinstance(data, dict):
        raise FeatureFileError(f"{path}: expected a pickled dict (docs/METHOD.md §4), got {type(data).__name__}")
    validate_features(data, path, wanted, strict=False)
    return {k: data[k] for k in ("vids", *wanted, *META_KEYS)}


# --------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def validate_features(
    data: Mapping[str, Any], path: str | Path, keys: Sequence[str] = FEATURE_KEYS, strict: bool = False,
) -> None:
    """Check the docs/METHOD.md §4 layout; errors name the file, the key and the dialogue.

    ``strict`` (used when writing) also demands float32 arrays and Python ints;
    otherwise any real floating array and numpy integers are accepted, as in
    pickles produced by older tools.
    """
    for key in ("vids", *keys, *META_KEYS):
        if key not in data:
            raise FeatureFileError(
                f"{path}: missing key {key!r}; a first-stage feature file has "
                f"{('vids', *FEATURE_KEYS, *META_KEYS)} (docs/METHOD.md §4)"
            )
    vids = data["vids"]
    if not isinstance(vids, (list, tuple)) or not all(_is_int(v) for v in vids):
        raise FeatureFileError(f"{path}: key 'vids' must be a list of int dialogue ids")
    if strict and not all(type(v) is int for v in vids):
        raise FeatureFileError(f"{path}: key 'vids' must hold Python ints (not numpy integers)")
    if len(set(vids)) != len(vids):
        raise FeatureFileError(f"{path}: key 'vids' lists a dialogue more than once")
    for key in (*keys, *META_KEYS):
        if not isinstance(data[key], dict):
            raise FeatureFileError(f"{path}: key {key!r} must be a dict dialogue id -> list, got {type(data[key]).__name__}")
    widths: dict[str, int] = {}
    for dia in vids:
        lengths: dict[str, int] = {}
        for key in (*keys, *META_KEYS):
            if dia not in data[key]:
                raise FeatureFileError(f"{path}: dialogue {dia} is listed in 'vids' but missing from {key!r}")
            value = data[key][dia]
            if not hasattr(value, "__len__"):
                raise FeatureFileError(f"{path}: {key!r}[{dia}] must be a list, got {type(value).__name__}")
            lengths[key] = len(value)
        if len(set(lengths.values())) != 1:
            raise FeatureFileError(
                f"{path}: dialogue {dia} has per-utterance lists of different lengths: {lengths}"
            )
        if lengths["labels"] == 0:
            raise FeatureFileError(f"{path}: dialogue {dia} has no utterances")
        for key in META_KEYS:
            if not all(_is_int(v) for v in data[key][dia]):
                raise FeatureFileError(f"{path}: {key!r}[{dia}] must hold ints")
            if strict and not all(type(v) is int for v in data[key][dia]):
                raise FeatureFileError(f"{path}: {key!r}[{dia}] must hold Python ints (not numpy integers)")
        for key in keys:
            for j, vec in enumerate(data[key][dia]):
                _check_vector(vec, path, key, dia, j, widths, strict)


def _check_vector(vec: Any, path: str | Path, key: str, dia: Any, j: int, widths: dict[str, int],
                  strict: bool) -> None:
    where = f"{path}: {key!r}[{dia}][{j}]"
    if not isinstance(vec, np.ndarray) or vec.ndim != 1:
        shape = getattr(vec, "shape", None)
        raise FeatureFileError(f"{where} must be a 1-D numpy array (D,), got {type(vec).__name__} {shape}")
    if strict and vec.dtype != np.float32:
        raise FeatureFileError(f"{where} has dtype {vec.dtype}, expected float32")
    if not np.issubdtype(vec.dtype, np.floating):
        raise FeatureFileError(f"{where} has dtype {vec.dtype}, expected a floating dtype (float32)")
    expected = widths.setdefault(key, vec.shape[0])
    if vec.shape[0] != expected:
        raise FeatureFileError(f"{where} has width {vec.shape[0]}, other {key!r} vectors have width {expected}")


def feature_width(features: Mapping[str, Any], key: str) -> int:
    """D of ``features[key]`` (the first utterance of the first dialogue)."""
    first = features["vids"][0]
    return int(features[key][first][0].shape[0])


# --------------------------------------------------------------------------- fusion: dialogues as tensors

LABEL_PAD = -1  # label of padded positions in a fusion batch
PACK_MIN_VALUES = 65536  # a batch's grid (dialogues x longest x width) from which packing pays on CPU


@dataclass
class DialogueBatch:
    """Whole dialogues for the fusion model. Packed (``index`` set): the real utterances' rows,
    dialogue after dialogue (docs/METHOD.md §5, "Speed"); padded: (B, L, ...) grids, the authors' layout."""

    text: torch.Tensor  # (N, H) packed, (B, L, H) padded
    audio: torch.Tensor
    video: torch.Tensor
    speakers: torch.Tensor  # (N,) packed, (B, L) padded with padding = n_speaker
    labels: torch.Tensor  # (N,) packed, (B, L) padded with padding = LABEL_PAD
    mask: torch.Tensor  # (B, L) bool, True for real utterances
    index: torch.Tensor | None = None  # (N,) flat position of each row in the B x L grid
    positions: torch.Tensor | None = None  # (N,) position of each row in its dialogue

    @property
    def inputs(self) -> tuple[torch.Tensor | None, ...]:
        """The fusion model's arguments: ``model(*batch.inputs)``."""
        return self.text, self.audio, self.video, self.speakers, self.mask, self.index, self.positions

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The real utterances of an input or output of this batch, (N, ...), in the flattened order."""
        return x if self.index is not None else x[self.mask]

    def __len__(self) -> int:
        """Real utterances in the batch (what the loss averages over)."""
        return len(self.index) if self.index is not None else int(self.mask.sum())


@dataclass
class DialogueSet:
    """One split of a feature pickle as per-dialogue tensors on the device, in the pickle's order."""

    path: Path
    vids: list
    text: list[torch.Tensor]  # (L, H) each
    audio: list[torch.Tensor]
    video: list[torch.Tensor]
    speakers: list[torch.Tensor]  # (L,) long
    labels: list[torch.Tensor]  # (L,) long

    def __len__(self) -> int:
        return len(self.vids)

    @property
    def n_utterances(self) -> int:
        return sum(len(x) for x in self.labels)

    @property
    def width(self) -> int:
        return int(self.text[0].shape[1])

    def flat_labels(self) -> list[int]:
        return torch.cat(self.labels).tolist() if self.labels else []

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[list[int]]:
        """Dialogue indices in batches: pickle order, or a seeded shuffle for training."""
        n = len(self)
        order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]

    def collate(self, indices: Sequence[int], pad_speaker: int, packed: bool | None = None) -> DialogueBatch:
        """Dialogues ``indices`` as one batch (tensors stay on the data's device): packed rows, or
        padded to the longest (``packed=False``, the authors' layout; ``pad_speaker`` fills speakers).
        ``None`` packs a batch whose grid holds at least ``PACK_MIN_VALUES`` values: below that,
        the few extra calls of packing cost more than the padding (tiny test models)."""
        lengths = [len(self.labels[i]) for i in indices]
        longest, device = max(lengths), self.labels[0].device
        if packed is None:
            packed = len(indices) * longest * self.width >= PACK_MIN_VALUES
        # Built on the host from the known lengths: no device round trip in the step.
        mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).to(device)
        if not packed:
            return DialogueBatch(
                text=pad_sequence([self.text[i] for i in indices], batch_first=True),
                audio=pad_sequence([self.audio[i] for i in indices], batch_first=True),
                video=pad_sequence([self.video[i] for i in indices], batch_first=True),
                speakers=pad_sequence([self.speakers[i] for i in indices], batch_first=True,
                                      padding_value=pad_speaker),
                labels=pad_sequence([self.labels[i] for i in indices], batch_first=True, padding_value=LABEL_PAD),
                mask=mask,
            )
        index = torch.cat([torch.arange(n) + row * longest for row, n in enumerate(lengths)])
        positions = torch.cat([torch.arange(n) for n in lengths])
        return DialogueBatch(
            text=torch.cat([self.text[i] for i in indices]), audio=torch.cat([self.audio[i] for i in indices]),
            video=torch.cat([self.video[i] for i in indices]), speakers=torch.cat([self.speakers[i] for i in indices]),
            labels=torch.cat([self.labels[i] for i in indices]), mask=mask, index=index.to(device),
            positions=positions.to(device),
        )

    def check_ids(self, what: str, limit: int, hint: str) -> None:
        """Every speaker/label id must lie in [0, limit); the error names the file and the dialogue."""
        values = self.speakers if what == "speakers" else self.labels
        for vid, ids in zip(self.vids, values):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
                raise FeatureFileError(
                    f"{self.path}: dialogue {vid} has {what} ids {sorted(set(ids.tolist()))}, "
                    f"expected 0..{limit - 1} ({hint})"
                )


def _stack(vectors: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(vectors).astype(np.float32, copy=False)).to(device)


def load_dialogues(path: Path, audio_key: str, video_key: str, device: torch.device) -> DialogueSet:
    """Load a feature pickle (restricted unpickler) for the fusion; the three streams must share one width."""
    check_complete(features_record(path.parent), f"the feature pickles in {path.parent}",
                   "extract_first_stage_features.py")
    feats = load_features(path, keys=("text", audio_key, video_key))
    if not feats["vids"]:
        raise FeatureFileError(f"{path}: 'vids' is empty; the split has no dialogues")
    first = feats["vids"][0]
    widths = {k: int(feats[k][first][0].shape[0]) for k in ("text", audio_key, video_key)}
    if len(set(widths.values())) != 1:
        raise FeatureFileError(f"{path}: the fusion streams need one width, got {widths}")
    vids = list(feats["vids"])
    return DialogueSet(
        path=path, vids=vids,
        text=[_stack(feats["text"][v], device) for v in vids],
        audio=[_stack(feats[audio_key][v], device) for v in vids],
        video=[_stack(feats[video_key][v], device) for v in vids],
        speakers=[torch.tensor([int(s) for s in feats["speakers"][v]], dtype=torch.long, device=device) for v in vids],
        labels=[torch.tensor([int(y) for y in feats["labels"][v]], dtype=torch.long, device=device) for v in vids],
    )
