"""Data: dataset descriptions, CSV -> utterances -> dialogue-prefix samples, the text
prompt, the torch fields and datasets, their loaders, and the stored-frame format
that the video field reads (docs/METHOD.md §1, §2).

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
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from . import utils
from .artifacts import atomic_path, check_complete, frames_record
from .media import FRAMES_PER_CLIP, TARGET_SAMPLE_RATE, AudioCache, MediaError
from .utils import InputMissing, UserError

log = logging.getLogger("magtkd")

SPLITS: tuple[str, ...] = ("train", "dev", "test")
LABEL_PAD = -1  # label of unlabelled utterances (a conversation) and of padded positions in a fusion batch
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


class FeatureFileError(UserError, ValueError):
    """A stored frame file or feature pickle that is unsafe, malformed, or does not follow the
    docs/METHOD.md §4 layout."""


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
    resolve = MediaResolver(spec, data_dir, path.parent if csv_relative else None)
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
    if csv_relative:
        log.info("%s: media paths resolved against %s", path,
                 "; ".join(f"{origin} ({n})" for origin, n in resolve.origins.items()))
    return utterances


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


PROMPTS = utils.PROMPT_VARIANTS  # text.py --prompt (docs/METHOD.md §2, Prompt variants); utils holds them for the flag


def build_prompt(texts: Sequence[str], speakers: Sequence[int], variant: str = "full") -> str:
    """Prompt for the last utterance of a dialogue prefix (`encode_prompt` appends the mask token).

    ``texts``/``speakers`` are the prefix ``[u_0 .. u_t]`` with 0-based speaker
    numbers (see :class:`Sample`). ``variant`` (ablations, docs/METHOD.md §2):
    ``full`` the paper's ``<sA> u_0 ... <sK> u_t </s> Now<sK> feels``; ``no_template`` the
    context alone (the mask follows ``u_t``); ``no_speakers`` the full prompt without any
    speaker token (``u_0 ... u_t </s> Now feels``); ``no_context`` ``<sK> u_t </s> Now<sK> feels``.
    """
    if len(texts) != len(speakers):
        raise ValueError(f"{len(texts)} texts but {len(speakers)} speakers")
    if not texts:
        raise ValueError("empty dialogue prefix")
    if variant not in PROMPTS:
        raise ValueError(f"prompt variant must be one of {', '.join(PROMPTS)}, got {variant!r}")
    if variant == "no_context":
        texts, speakers = texts[-1:], speakers[-1:]
    if variant == "no_speakers":
        return f"{' '.join(texts)} {SEPARATOR} Now feels"
    context = " ".join(f"{speaker_token(s)} {text}" for text, s in zip(texts, speakers))
    if variant == "no_template":
        return context
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
    """Prompt ids (last 511 tokens + mask), left-padded; ``prompt``: the `build_prompt` variant."""

    name = "text"

    def __init__(self, tokenizer, prompt: str = "full") -> None:
        if prompt not in PROMPTS:
            raise ValueError(f"prompt variant must be one of {', '.join(PROMPTS)}, got {prompt!r}")
        self.tokenizer, self.prompt = tokenizer, prompt

    def load(self, sample: Sample) -> list[int]:
        return encode_prompt(self.tokenizer, build_prompt(sample.texts, sample.speakers, self.prompt))

    def collate(self, items: list[list[int]]) -> dict[str, torch.Tensor]:
        ids, mask = left_pad(items, self.tokenizer.pad_token_id)
        return {"text_ids": ids, "text_mask": mask}


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
                seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader over ``dataset``; ``shuffle`` draws from a generator seeded with ``seed``.

    Under torchrun each rank loads its shard: shuffled loaders through a DistributedSampler
    (``seed`` + epoch), ordered ones every ``world_size``-th sample without padding, so that
    gathering the ranks' outputs by ``batch["index"]`` covers every sample once. ``pin_memory`` (CUDA
    runs) lets the engine's ``non_blocking`` copies overlap with compute.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if utils.world_size() > 1:
        sampler = utils.train_sampler(dataset, seed) if shuffle else utils.EvalShardSampler(len(dataset))
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, collate_fn=dataset.collate, generator=generator, persistent_workers=False,
        pin_memory=pin_memory,
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


