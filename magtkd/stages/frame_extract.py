"""Stage 3: decode 8 frames per utterance and store them as uint8 (SPEC section 2, Video).

Writes ``<feature_dir>/video/{train,dev,test}/{Dialogue_ID}_{Utterance_ID}.npy``
(uint8, ``(8, 3, H, W)`` after the videomae processor's resize and centre crop)
and ``<feature_dir>/video/substitutions.tsv`` listing every utterance whose
frames could not be read (black frames were stored instead).

Each source video is opened and decoded ONCE for all the utterances it serves
(an IEMOCAP dialogue video holds every utterance of the dialogue; the reference
decoded the whole video again for each one). Source videos are processed in
parallel with ``--num_workers``. Resumable: an existing ``.npy`` is complete
(written atomically) and skipped; a video whose outputs all exist is not opened.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from .. import pretrained
from ..cli import log_start, parse, paths_parser, setup_logging
from ..data import Utterance, load_split
from ..frames import FrameCodec, frame_file, save_frames
from ..media.errors import MediaError
from ..media.video import decode_windows
from ..recipes import SPLITS, DatasetSpec
from ..report import SubstitutionReport

log = logging.getLogger("magtkd")


@dataclass(frozen=True)
class Job:
    """One source video and the utterance windows still to extract from it."""

    video: Path
    keys: tuple[str, ...]  # "split/dia_utt", for the report
    windows: tuple[tuple[float, float] | None, ...]
    outputs: tuple[Path, ...]


def window_of(spec: DatasetSpec, utt: Utterance) -> tuple[float, float] | None:
    """IEMOCAP: [max(start-1, 0), end+1] in the dialogue video; MELD: the whole clip."""
    if spec.video_window_pad is None or utt.start is None or utt.end is None:
        return None
    return max(utt.start - spec.video_window_pad, 0.0), utt.end + spec.video_window_pad


def plan_jobs(spec: DatasetSpec, utterances: Sequence[Utterance], feature_dir: Path) -> list[Job]:
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
            tuple(frame_file(feature_dir, u.split, u.key) for u in utts))
        for video, utts in groups.items()
    ]


_codec: FrameCodec | None = None


def _init_worker(pretrained_dir: Path) -> None:
    global _codec
    _codec = FrameCodec(pretrained.load_image_processor(pretrained_dir))


def run_job(job: Job) -> list[tuple[str, str, str]]:
    """Decode one video once, store every window's frames; return substitutions."""
    assert _codec is not None, "worker not initialised"
    problems: list[tuple[str, str, str]] = []
    try:
        clips = decode_windows(job.video, job.windows)
    except MediaError as err:
        clips, reason = [None] * len(job.windows), err.reason
    else:
        reason = "no frame in the utterance's time window"
    for key, clip, out in zip(job.keys, clips, job.outputs):
        if clip is None:
            problems.append((key, str(job.video), reason))
            save_frames(out, _codec.black())
        else:
            save_frames(out, _codec.resize_crop(clip))
    return problems


def main(spec: DatasetSpec, script_dir: Path, argv: Sequence[str] | None = None,
         description: str | None = None) -> dict:
    # Arguments
    args = parse(paths_parser(spec, script_dir, description), argv)
    setup_logging()
    feature_dir = Path(args.feature_dir)

    # Data: the utterances still missing, grouped by source video
    utterances = [u for split in SPLITS for u in load_split(spec, args.data_dir, split)]
    jobs = plan_jobs(spec, utterances, feature_dir)
    todo = sum(len(j.keys) for j in jobs)
    log_start(f"{spec.name} video_feature_extract", args, "cpu",
              {"utterances": len(utterances), "to_extract": todo, "source_videos": len(jobs)})

    # Loop: one decode per source video, in parallel over videos
    started = time.time()
    report_path = feature_dir / "video" / "substitutions.tsv"
    report = SubstitutionReport()
    if report_path.is_file():  # keep what earlier (interrupted) runs substituted
        for item in SubstitutionReport.read(report_path):
            report.add(item.key, item.path, item.reason, item.replacement)
    pool = None
    if args.num_workers > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(args.num_workers, initializer=_init_worker, initargs=(args.pretrained_dir,))
        results = pool.map(run_job, jobs)
    else:
        _init_worker(args.pretrained_dir)
        results = map(run_job, jobs)
    try:
        for problems in tqdm(results, total=len(jobs), desc="videos", disable=None):
            for key, path, reason in problems:
                report.add(key, path, reason, "black frames")
            if problems:  # keep the report current, so an interrupted run loses nothing
                report.write(report_path)
    finally:
        if pool is not None:
            pool.shutdown()

    # Artifact: the report (the frame files were written atomically above)
    report.write(report_path)
    seconds = time.time() - started
    log.info("%s: stored %d utterances from %d videos in %.1f s; %d substituted (see %s)",
             spec.name, todo, len(jobs), seconds, len(report), report_path)
    return {"extracted": todo, "videos": len(jobs), "substituted": len(report), "seconds": seconds}
