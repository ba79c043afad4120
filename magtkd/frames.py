"""Stored video frames (stage 3): the uint8 frame format, its codec, and the extraction that decodes
each source video once for all its utterances (docs/METHOD.md §0, §2, §6).
"""

from __future__ import annotations

import contextlib
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import runtime
from .artifacts import (SubstitutionReport, atomic_path, begin_outputs, finish_outputs, frames_record, output_lock,
                        remove_stale_temps)
from .dataset import Utterance, window_of
from .decoder import VIDEO_TIMEOUT_S, DecoderProcess
from .media import FRAMES_PER_CLIP, MediaError, decode_windows
from .spec import DatasetSpec
from .utils import FeatureFileError, InputMissing


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



# --------------------------------------------------------------------------- extraction


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


def extract_frames(jobs: Sequence[Job], image_processor: Any, num_workers: int | None, report_path: Path,
                   record_args: Mapping[str, Any] | None = None) -> SubstitutionReport:
    """Run every job (one decode per source video, in parallel over videos) and keep the report current.

    Each job runs in a supervised decoder process (`magtkd.decoder.DecoderProcess`, one per
    worker, ``max(num_workers, 1)`` of them; None: one): a source video that crashes or hangs
    the decoder loses only its own windows (black frames, listed with the
    reason) and the run goes on. The report at ``report_path`` keeps what
    earlier, interrupted runs substituted; it is rewritten whenever a job
    substitutes, and once at the end. ``<video>/extraction.json`` (the
    completion record, holding ``record_args``) says ``complete: false`` while this runs and is
    rewritten last with ``complete: true``.
    """
    video_dir, record_args = report_path.parent, dict(record_args or {})
    # Under torchrun each rank decodes its share of the videos; rank 0 holds the lock and writes the
    # record and the report (gathered at the end, once every rank has finished its videos).
    with output_lock(video_dir, "frames") if runtime.is_main() else contextlib.nullcontext():
        record = frames_record(video_dir.parent)
        if runtime.is_main():  # the report's and record's temps (the frames' own: plan_jobs)
            remove_stale_temps(video_dir, (report_path.name, record.name))
            begin_outputs(record, "video_feature_extract", record_args, report=report_path.name)
        runtime.barrier()  # no rank writes a frame before the record says the set is being rewritten
        report = SubstitutionReport()
        if report_path.is_file():
            for item in SubstitutionReport.read(report_path):
                report.add(item.key, item.path, item.reason, item.replacement)
        _run_jobs(runtime.shard(jobs), image_processor, num_workers or 0, report, report_path)
        report.write(report_path)  # under torchrun a gather: every rank has finished its share
        if runtime.is_main():
            finish_outputs(record, "video_feature_extract", record_args, report=report_path.name,
                           substituted=len(SubstitutionReport.read(report_path)))
    return report


def _run_jobs(jobs: Sequence[Job], image_processor: Any, num_workers: int, report: SubstitutionReport,
              report_path: Path) -> None:
    """This rank's jobs through a pool of supervised decoders, their problems added to ``report``."""
    _init_worker(image_processor)  # the parent writes black frames for crashed jobs
    pool = _DecoderPool(max(1, min(num_workers, len(jobs))) if jobs else 0, image_processor)
    try:
        with ThreadPoolExecutor(max(1, pool.size)) as threads:
            for problems in runtime.progress(threads.map(pool.run, jobs), total=len(jobs), desc="videos",
                                             leave=True):
                for problem in problems:
                    report.add_problem(problem[0], problem[1:], "black frames")
                if problems and runtime.world_size() == 1:  # keep the report current: an interruption loses nothing
                    report.write(report_path)
    finally:
        pool.close()


class _DecoderPool:
    """Supervised decoder processes (started here, in the main thread); each job borrows an idle one."""

    def __init__(self, size: int, image_processor: Any) -> None:
        self.decoders = [DecoderProcess(VIDEO_TIMEOUT_S, _init_worker, (image_processor,)).start()
                         for _ in range(size)]
        self.idle: queue.Queue = queue.Queue()
        for decoder in self.decoders:
            self.idle.put(decoder)

    @property
    def size(self) -> int:
        return len(self.decoders)

    def run(self, job: Job) -> list[tuple[str, ...]]:
        """``run_job`` in a decoder; a crash or hang of the decoder substitutes the job's windows."""
        decoder = self.idle.get()
        try:
            return decoder.call(job.video, run_job, job)
        except MediaError as err:
            return _substitute_job(job, err.reason)
        finally:
            self.idle.put(decoder)

    def close(self) -> None:
        for decoder in self.decoders:
            decoder.close()
