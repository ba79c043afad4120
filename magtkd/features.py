"""Everything under ``feature/``: frame extraction (stage 3), the first-stage models run
over every utterance (stage 7), the feature pickles (their building, restricted
loading and validation) and the fusion's dialogues as tensors (docs/METHOD.md §0, §4, §5).
"""

from __future__ import annotations

import builtins
import codecs
import contextlib
import importlib
import io
import logging
import pickle
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from . import media, utils
from .artifacts import (FIRST_STAGE_MODELS, CheckpointError, StageFiles, SubstitutionReport, atomic_path, begin_outputs, check_complete,
                        FEATURES_REPORT, feature_path, features_record, finish_outputs, frames_record, output_lock,
                        remove_stale_temps, write_json)
from .dataset import (LABEL_PAD, SPLITS, DatasetSpec, FeatureFileError, FrameCodec, Sample, SampleDataset, Utterance,
                      frame_file, fusion_speaker_ids, make_loader, save_frames, window_of)
from .engine import (DialogueBatches, FitConfig, autocast, concat_chunks, evaluate_checkpoint, in_dataset_order,
                     note_problems, to_device)
from .media import DecoderProcess, MediaError, decode_windows
from .model import (AnchorGatedTransformer, check_fusion_record, fusion_width, infer_sizes_from_checkpoint,
                    load_fusion_checkpoint, read_fusion_state)
from .pretrained import load_checkpoint, load_encoder, text_prompt

log = logging.getLogger("magtkd")


# --------------------------------------------------------------------------- frame extraction

@dataclass(frozen=True)
class Job:
    """One source video and the utterance windows still to extract from it."""

    video: Path
    keys: tuple[str, ...]  # "split/dia_utt", for the report
    windows: tuple[tuple[float, float] | None, ...]
    outputs: tuple[Path, ...]
    channel_order: str = "rgb"  # "bgr" reproduces the authors' OpenCV frames (docs/METHOD.md §7)


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
    # Under torchrun each rank decodes its share of the videos; rank 0 holds the lock and writes the
    # record and the report (gathered at the end, once every rank has finished its videos).
    single = utils.world_size() == 1
    with output_lock(video_dir, "frames") if utils.is_main() else contextlib.nullcontext():
        record = frames_record(video_dir.parent)
        if utils.is_main():  # the report's and record's temps (the frames' own: plan_jobs)
            remove_stale_temps(video_dir, (report_path.name, record.name))
            begin_outputs(record, "video_feature_extract", args or {}, report=report_path.name)
        utils.barrier()  # no rank writes a frame before the record says the set is being rewritten
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
        report.write(report_path)  # under torchrun a gather: every rank has finished its share
        if utils.is_main():
            finish_outputs(record, "video_feature_extract", args or {}, report=report_path.name,
                           substituted=len(SubstitutionReport.read(report_path)))
    return report


# --------------------------------------------------------------------------- first-stage feature pickles

FEATURE_KEYS: tuple[str, ...] = ("text", "audio", "video", "audio_kd", "video_kd")
META_KEYS: tuple[str, ...] = ("speakers", "labels", "dia2utt")
PICKLE_PROTOCOL = 4  # readable by every Python 3 the authors' tooling could have used






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
    if not np.isfinite(vec).all():
        # One NaN spreads through the fusion's attention to the whole dialogue (docs/METHOD.md §6).
        raise FeatureFileError(
            f"{path}: feature {key!r} of dialogue {dia}, utterance {j} holds non-finite values "
            f"({int(np.isnan(vec).sum())} NaN, {int(np.isinf(vec).sum())} inf of {vec.shape[0]}); re-run "
            "extract_first_stage_features.py (and the first-stage model that gives NaN, if it does)")


def feature_width(features: Mapping[str, Any], key: str) -> int:
    """D of ``features[key]`` (the first utterance of the first dialogue)."""
    first = features["vids"][0]
    return int(features[key][first][0].shape[0])


# --------------------------------------------------------------------------- fusion: dialogues as tensors

PACK_MIN_VALUES = 65536  # a batch's grid (dialogues x longest x width) from which packing pays on CPU


@dataclass
class DialogueBatch:
    """Whole dialogues for the fusion model. Packed (``index`` set): the real utterances' rows,
    dialogue after dialogue (docs/METHOD.md §5, "Speed"); padded: (B, L, ...) grids, the authors' layout."""

    text: torch.Tensor | None  # (N, H) packed, (B, L, H) padded; None: a modality the model does not read
    audio: torch.Tensor | None
    video: torch.Tensor | None
    speakers: torch.Tensor  # (N,) packed, (B, L) padded with padding = n_speaker
    labels: torch.Tensor  # (N,) packed, (B, L) padded with padding = LABEL_PAD
    mask: torch.Tensor  # (B, L) bool, True for real utterances
    index: torch.Tensor | None = None  # (N,) flat position of each row in the B x L grid
    positions: torch.Tensor | None = None  # (N,) position of each row in its dialogue

    @property
    def inputs(self) -> tuple[torch.Tensor | None, ...]:
        """The fusion model's arguments: ``model(*batch.inputs)``."""
        return self.text, self.audio, self.video, self.speakers, self.mask, self.index, self.positions

    def rows(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """The real utterances of an input or output of this batch, (N, ...), in the flattened order
        (None stays None: an output an ablation variant does not have)."""
        return x if x is None or self.index is not None else x[self.mask]

    def __len__(self) -> int:
        """Real utterances in the batch (what the loss averages over)."""
        return len(self.index) if self.index is not None else int(self.mask.sum())


@dataclass
class DialogueSet:
    """One split of a feature pickle as per-dialogue tensors on the device, in the pickle's order."""

    path: Path
    vids: list
    text: list[torch.Tensor] | None  # (L, H) each; None: not read (--modalities without T)
    audio: list[torch.Tensor] | None
    video: list[torch.Tensor] | None
    speakers: list[torch.Tensor]  # (L,) long
    labels: list[torch.Tensor]  # (L,) long

    def __len__(self) -> int:
        return len(self.vids)

    @property
    def n_utterances(self) -> int:
        return sum(len(x) for x in self.labels)

    @property
    def width(self) -> int:
        return int(next(s for s in (self.text, self.audio, self.video) if s is not None)[0].shape[1])

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
        streams = (self.text, self.audio, self.video)
        if not packed:
            text, audio, video = (None if stream is None else pad_sequence([stream[i] for i in indices], batch_first=True)
                                  for stream in streams)
            return DialogueBatch(
                text=text, audio=audio, video=video,
                speakers=pad_sequence([self.speakers[i] for i in indices], batch_first=True,
                                      padding_value=pad_speaker),
                labels=pad_sequence([self.labels[i] for i in indices], batch_first=True, padding_value=LABEL_PAD),
                mask=mask,
            )
        index = torch.cat([torch.arange(n) + row * longest for row, n in enumerate(lengths)])
        positions = torch.cat([torch.arange(n) for n in lengths])
        text, audio, video = (None if stream is None else torch.cat([stream[i] for i in indices]) for stream in streams)
        return DialogueBatch(
            text=text, audio=audio, video=video, speakers=torch.cat([self.speakers[i] for i in indices]),
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


def load_dialogues(path: Path, audio_key: str, video_key: str, device: torch.device,
                   modalities: Sequence[str] = ("T", "A", "V"), reader: DatasetSpec | None = None,
                   script: str = "") -> DialogueSet:
    """Load a feature pickle (restricted unpickler) for the fusion; the streams read must share one width.

    Only the streams of ``modalities`` (T = ``text``, A = ``audio_key``, V = ``video_key``) are required,
    validated and read; the others stay None (docs/METHOD.md §5, "Ablation variants"). ``reader``: the
    dataset of the ``script`` that reads the pickle; the features' record (`features_record`) must name
    the same dataset and labels, and the pickle's width.
    """
    record = check_complete(features_record(path.parent), f"the feature pickles in {path.parent}",
                            "extract_first_stage_features.py")
    if record is not None and reader is not None:
        check_features_record(record, path, reader, script)
    keys = {m: key for m, key in zip("TAV", ("text", audio_key, video_key)) if m in modalities}
    feats = load_features(path, keys=tuple(dict.fromkeys(keys.values())))
    if not feats["vids"]:
        raise FeatureFileError(f"{path}: 'vids' is empty; the split has no dialogues")
    first = feats["vids"][0]
    widths = {k: int(feats[k][first][0].shape[0]) for k in keys.values()}
    if len(set(widths.values())) != 1:
        raise FeatureFileError(f"{path}: the fusion streams need one width, got {widths}")
    width = record.get("width") if record is not None else None
    if width is not None and int(width) != next(iter(widths.values())):
        raise FeatureFileError(f"{path} has width {next(iter(widths.values()))} but {features_record(path.parent)} says "
                               f"{width}: the pickle is not the one extract_first_stage_features.py wrote there")
    vids = list(feats["vids"])
    streams = {m: [_stack(feats[key][v], device) for v in vids] if m in keys else None
               for m, key in zip("TAV", ("text", audio_key, video_key))}
    return DialogueSet(
        path=path, vids=vids, text=streams["T"], audio=streams["A"], video=streams["V"],
        speakers=[torch.tensor([int(s) for s in feats["speakers"][v]], dtype=torch.long, device=device) for v in vids],
        labels=[torch.tensor([int(y) for y in feats["labels"][v]], dtype=torch.long, device=device) for v in vids],
    )


def check_features_record(record: Mapping[str, Any], path: Path, reader: DatasetSpec, script: str) -> None:
    """The pickles' dataset and labels (their record) must be the reading script's; both sides named."""
    written, labels = record.get("dataset"), record.get("labels")
    if (written is not None and written != reader.name) or (labels is not None and list(labels) != list(reader.labels)):
        raise FeatureFileError(
            f"the feature pickles in {path.parent} are {written}'s ({features_record(path.parent)}: dataset "
            f"{written}, labels {labels}) but {script or reader.name} reads {reader.name}'s (labels "
            f"{list(reader.labels)}); point --feature_dir at the features {reader.name}/extract_first_stage_features.py "
            "writes")


# --------------------------------------------------------------------------- first-stage inference

@torch.inference_mode()
def representations(models: Mapping[str, nn.Module], loader, device: torch.device, amp: bool,
                    report: SubstitutionReport | None = None) -> dict[str, np.ndarray]:
    """(N, D) float32 representations of each encoder (``encoder.encode(batch)``), in dataset order
    (gathered from every rank under torchrun).

    All encoders run on the same batches, so encoders sharing an input decode each clip once.
    """
    outputs: dict[str, list[np.ndarray]] = {key: [] for key in models}
    index = []
    for batch in utils.progress(loader, desc="batches"):
        note_problems(batch, loader.dataset, report)
        index.append(batch["index"])
        batch = to_device(batch, device)
        for key, encoder in models.items():
            with autocast(device, amp):
                rep, _ = encoder.encode(batch)
            outputs[key].append(rep.float().cpu().numpy())
    local = {key: np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
             for key, chunks in outputs.items()}
    return in_dataset_order(concat_chunks(index), local)



def check_first_stage_checkpoints(spec: DatasetSpec, save_dir: Path) -> None:
    """Fail before any work when one of the five checkpoints is missing, naming it and its script."""
    for name, script in FIRST_STAGE_MODELS.values():
        if not (Path(save_dir) / f"{name}.bin").is_file():
            raise CheckpointError(f"checkpoint {Path(save_dir) / f'{name}.bin'} not found: it is written by "
                                  f"{spec.name}/{script}")


def first_stage_features(
    spec: DatasetSpec, samples: Mapping[str, Sequence[Sample]], *, pretrained_dir: Path, save_dir: Path,
    feature_dir: Path, device: torch.device, batch_size: int, num_workers: int, amp: bool,
    report: SubstitutionReport | None = None, audio_cache: Path | None = None, prompt: str | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{split: {feature key: (N, D) float32}}``: the five first-stage models over each split's samples.

    One input group at a time (its encoders loaded from ``save_dir``, in eval
    mode, then freed), in sample order; video reads the frames stored under
    ``feature_dir``, audio the clips cached in ``audio_cache`` (decoded and stored on a miss).
    Used by the extraction stage and by prediction, so both compute the same features; the text prompt is
    the variant ``text.json`` recorded (``prompt``: an explicit ``--prompt``, which must agree).
    """
    check_first_stage_checkpoints(spec, save_dir)
    prompt = text_prompt(StageFiles.first_stage(save_dir, "text").metrics, prompt)
    vectors: dict[str, dict[str, np.ndarray]] = {split: {} for split in samples}
    # Grouped by the input they share (text; audio, audio_kd; video, video_kd) so each clip is decoded once.
    for modality in ("text", "audio", "video"):
        encoders, field = {}, None
        for key, (name, script) in FIRST_STAGE_MODELS.items():
            if key.split("_")[0] != modality:
                continue
            encoder, field = load_encoder(modality, pretrained_dir, spec.num_classes, feature_dir, audio_cache,
                                          prompt)
            load_checkpoint(encoder, Path(save_dir) / f"{name}.bin", f"{spec.name}/{script}", spec.name)
            encoders[key] = encoder.to(device).eval()
        for split, split_samples in samples.items():
            loader = make_loader(SampleDataset(split_samples, [field]), batch_size, shuffle=False,
                                 num_workers=num_workers, pin_memory=device.type == "cuda")
            vectors[split].update(representations(encoders, loader, device, amp, report))
            log.info("%s: %s features for %s done", spec.name, "/".join(encoders), split)
        del encoders
    return vectors


def write_feature_pickles(spec: DatasetSpec, dialogues: Mapping[str, Sequence[tuple[int, list[Utterance]]]],
                          vectors: Mapping[str, Mapping[str, np.ndarray]], feature_dir: Path,
                          report: SubstitutionReport, args: Any,
                          speaker2id: Mapping[str, int] | None = None) -> dict[str, Path]:
    """Stage 7's artifact set: one pickle per split, the substitution report, and the completion record
    (incomplete before the first pickle changes, complete after the last; docs/METHOD.md §4).

    Speakers: per dialogue by appearance, or the global ids of ``speaker2id`` (MELD; `fusion_speaker_ids`).
    Called by every rank: the report gathers the ranks' substitutions; rank 0 writes.
    """
    script = f"{spec.name}/extract_first_stage_features.py"
    record = features_record(feature_dir)
    pickles = [feature_path(feature_dir, split).name for split in dialogues]
    report_path = Path(feature_dir) / FEATURES_REPORT
    paths: dict[str, Path] = {}
    with output_lock(feature_dir, "first_stage_features") if utils.is_main() else contextlib.nullcontext():
        if utils.is_main():
            remove_stale_temps(feature_dir, [*pickles, record.name, report_path.name])
            begin_outputs(record, script, args, dataset=spec.name, labels=list(spec.labels), pickles=pickles)
            for split, split_dialogues in dialogues.items():
                utts = [u for _, dialogue in split_dialogues for u in dialogue]
                speakers = [s for _, dialogue in split_dialogues for s in fusion_speaker_ids(spec, dialogue, speaker2id)]
                features = assemble_features([u.dialogue_id for u in utts], [u.utterance_id for u in utts],
                                             [u.label for u in utts], speakers,
                                             {key: np.asarray(v) for key, v in vectors[split].items()})
                paths[split] = save_features(feature_path(feature_dir, split), features)
                log.info("%s: wrote %s (%d dialogues, %d utterances)", spec.name, paths[split],
                         len(features["vids"]), len(utts))
        report.write(report_path)  # a collective under torchrun: every rank calls it
        if utils.is_main():
            width = int(next(iter(vectors.values()))["text"].shape[1])
            finish_outputs(record, script, args, dataset=spec.name, labels=list(spec.labels), pickles=pickles,
                           width=width)
    return paths


# --------------------------------------------------------------------------- the fusion's inputs and its evaluation

def fusion_label_names(spec: DatasetSpec, n_classes: int) -> list[str]:
    """The dataset's label names, or ``0..n-1`` for a model with another class count (``--clsNum``)."""
    return list(spec.labels) if n_classes == spec.num_classes else [str(i) for i in range(n_classes)]


def fusion_training_data(spec: DatasetSpec, args: Any, device: torch.device
                         ) -> tuple[dict[str, DialogueSet], dict[str, Any]]:
    """The three feature pickles as per-dialogue tensors on the device, checked against the fusion flags
    (one width, ``--hidden_dim``/``--n_head``, speaker and label ids), and the sizes of the model they feed.

    Speakers: ``spec.n_speaker`` rows (MELD: or the largest global id + 1 in the pickles, whichever is
    larger), or ``--n_speaker``.
    """
    data = {split: load_dialogues(feature_path(args.feature_dir, split), args.audio_feature, args.video_feature,
                                  device, args.modalities, spec, f"{spec.name}/multimodal_fusion.py")
                for split in SPLITS}
    width = fusion_width(args.hidden_dim, args.n_head, data["train"].width, str(data["train"].path))
    for split in ("dev", "test"):
        if data[split].width != width:
            raise FeatureFileError(f"{data[split].path} has width {data[split].width}, {data['train'].path} has {width}")
    n_speaker = spec.n_speaker
    if spec.global_speaker_ids:
        n_speaker = max(n_speaker, 1 + max(int(s.max()) for split in SPLITS for s in data[split].speakers))
    n_speaker = args.n_speaker if args.n_speaker is not None else n_speaker
    for split in SPLITS:
        data[split].check_ids("speakers", n_speaker, f"n_speaker {n_speaker}; see --n_speaker")
        data[split].check_ids("labels", args.clsNum, f"{args.clsNum} classes; see --clsNum")
    sizes = {"hidden": width, "n_speaker": n_speaker, "n_classes": args.clsNum,
             **{f"{s}_dialogues": len(data[s]) for s in SPLITS},
             **{f"{s}_utterances": data[s].n_utterances for s in SPLITS},
             # The ablation variant (docs/METHOD.md §5): read back by --train False, predict.py and the tables
             "variant": utils.fusion_variant(args)}
    return data, sizes


def evaluate_fusion(spec: DatasetSpec, args: Any, device: torch.device) -> dict[str, Any]:
    """``multimodal_fusion.py --train False``: only the test pickle (the streams of the checkpoint's variant)
    and the checkpoint are read; the sizes and the variant come from the checkpoint (a variant flag that
    contradicts it is an error). Writes the test labels and predictions (``multimodal_fusion_best.json``)."""
    stage = f"{spec.name} multimodal_fusion (evaluation)"
    files = StageFiles.fusion(args.save_dir)
    record = check_fusion_record(args.save_dir, spec.name, files.checkpoint)
    sizes = infer_sizes_from_checkpoint(read_fusion_state(files.checkpoint), with_variant=True)
    variant = utils.fusion_variant(args, sizes["variant"], f"checkpoint {files.checkpoint}")
    if int(sizes["n_classes"]) != args.clsNum:
        raise CheckpointError(f"checkpoint {files.checkpoint} predicts {sizes['n_classes']} classes"
                              f"{' (' + str(record['dataset']) + ')' if record else ''} but this run has "
                              f"{args.clsNum} ({spec.name}, --clsNum); use the checkpoint "
                              f"{spec.name}/multimodal_fusion.py writes")
    test = load_dialogues(feature_path(args.feature_dir, "test"), args.audio_feature, args.video_feature, device,
                          variant["modalities"], spec, f"{spec.name}/multimodal_fusion.py")
    width = fusion_width(args.hidden_dim, args.n_head, test.width, str(test.path))
    if sizes["hidden"] != width:
        raise CheckpointError(f"checkpoint {files.checkpoint} has width {sizes['hidden']} but the features in "
                              f"{test.path} have width {width}")
    n_speaker, n_classes = sizes["n_speaker"], int(sizes["n_classes"])
    if n_speaker is not None:
        test.check_ids("speakers", n_speaker, f"the checkpoint {files.checkpoint} has {n_speaker} speakers")
    test.check_ids("labels", n_classes, f"the checkpoint {files.checkpoint} has {n_classes} classes")
    separate = bool(args.separate_text_blocks or sizes["separate_text_blocks"])
    utils.log_start(stage, args, device, {"hidden": width, "n_speaker": n_speaker, "n_classes": n_classes,
                                          "separate_text_blocks": separate, "test_dialogues": len(test),
                                          "test_utterances": test.n_utterances, "variant": variant})
    fusion = AnchorGatedTransformer(width, n_classes, n_speaker, args.n_head, args.dropout, separate, **variant)
    load_fusion_checkpoint(fusion, files.checkpoint)
    fusion.to(device)
    names = fusion_label_names(spec, n_classes)
    config = FitConfig(stage=stage, script=f"{spec.name}/multimodal_fusion.py", dataset=spec.name, labels=names,
                       files=files, epochs=1, seed=args.seed, args=vars(args))
    data = DialogueBatches({"test": test}, args.batch_size, args.packed)
    result = evaluate_checkpoint(fusion, data, config, checkpoint_loaded=True)
    write_json(files.predictions, {"labels": result["labels"], "preds": result["preds"]})
    return {**result, "stage": stage, "variant": variant, "paths": {"predictions": str(files.predictions)}}
