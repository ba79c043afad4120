"""Media decoding with PyAV: audio to 16 kHz mono, 8 frames per time window (docs/METHOD.md §2, §6).

Audio: the reference loaded audio at 22.05 kHz and declared it 16 kHz to
data2vec; we decode at the file's own rate, down-mix to mono (mean of channels)
and resample with `torchaudio.functional.resample` to the rate the model was
trained on.

Video: an IEMOCAP dialogue video serves every utterance of the dialogue; the
reference decoded the whole video again for each utterance, which made frame
extraction quadratic in dialogue length. `decode_windows` opens the file once
and decodes it forward once for all windows, holding only frames that open
windows may still sample (memory does not grow with the length of a window or
of the video).

Both raise `MediaError` for a file they cannot read; stages catch it to
substitute silence / black frames and list the utterance in their report.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import av
import numpy as np
import torch
import torchaudio.functional as AF

log = logging.getLogger("magtkd")

TARGET_SAMPLE_RATE = 16000
FRAMES_PER_CLIP = 8


# --------------------------------------------------------------------------- errors and opening

class MediaError(Exception):
    """A media file that cannot be decoded: missing, corrupt, or lacking the stream."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep the two-argument signature picklable for DataLoader workers
        return (type(self), (self.path, self.reason))


def open_checked(path: Path) -> av.container.InputContainer:
    """``_open(path)``, with a missing or unopenable file turned into a MediaError."""
    if not path.is_file():
        raise MediaError(path, "file not found")
    try:
        return _open(path)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(path, f"cannot open: {exc}") from exc


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a media container for reading (single entry point so tests can count opens)."""
    return av.open(str(path), "r")


# --------------------------------------------------------------------------- audio




def _native_needed(max_samples: int | None, native_sr: int, target_sr: int) -> int | None:
    """Native-rate samples that suffice for ``max_samples`` output samples.

    10 ms extra cover the resampling filter's look-ahead, so the kept prefix is
    the same as when the whole clip is resampled (up to float rounding).
    """
    if max_samples is None:
        return None
    return math.ceil(max_samples * native_sr / target_sr) + math.ceil(native_sr / 100)


def decode_audio(
    path: str | os.PathLike, target_sr: int = TARGET_SAMPLE_RATE, max_samples: int | None = None
) -> np.ndarray:
    """Decode the first audio stream of ``path`` to float32 mono of shape (n,) at ``target_sr``.

    Decoding stops once ``max_samples`` samples (counted at ``target_sr``) are
    covered: MELD has clips that run for minutes and the audio encoder keeps only
    a prefix anyway (docs/METHOD.md §2). Raises `MediaError` naming the file when it
    is missing, cannot be opened, has no audio stream, or yields no samples. A
    decode error after some audio was read keeps what was read (logged).
    """
    path = Path(path)
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    container = open_checked(path)
    with container:
        if not container.streams.audio:
            raise MediaError(path, "no audio stream")
        stream = container.streams.audio[0]
        # Convert whatever sample format the codec emits to planar float at the
        # stream's own rate and layout; down-mixing and resampling happen below.
        converter = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        native_sr: int | None = None
        needed: int | None = None
        have = 0
        try:
            for frame in container.decode(stream):
                if native_sr is None:
                    native_sr = int(frame.sample_rate)
                    needed = _native_needed(max_samples, native_sr, target_sr)
                for converted in converter.resample(frame):
                    planar = converted.to_ndarray()  # (channels, n)
                    chunks.append(planar.mean(axis=0, dtype=np.float32))
                    have += planar.shape[1]
                if needed is not None and have >= needed:
                    break
        except (av.error.FFmpegError, ValueError) as exc:
            if not chunks:
                raise MediaError(path, f"cannot decode audio: {exc}") from exc
            log.warning("%s: audio decoding stopped early (%s); keeping %d samples", path, exc, have)
    if not chunks or have == 0 or native_sr is None:
        raise MediaError(path, "no audio samples")
    mono = np.concatenate(chunks)
    if native_sr != target_sr:
        mono = AF.resample(torch.from_numpy(mono), native_sr, target_sr).numpy()
    if max_samples is not None:
        mono = mono[:max_samples]
    return np.ascontiguousarray(mono, dtype=np.float32)


# --------------------------------------------------------------------------- video




def sample_positions(n: int, k: int = FRAMES_PER_CLIP) -> list[int]:
    """0-based positions of the ``k`` frames taken from a window of ``n`` frames.

    docs/METHOD.md §2 (the reference's rule): ``step = n // k`` and positions
    ``step * j - 1`` for j = 1..k; with fewer than ``k`` frames take them all and
    repeat the last; no frames -> no positions.
    """
    if n < 0 or k <= 0:
        raise ValueError(f"sample_positions needs n >= 0 and k > 0, got n={n}, k={k}")
    if n == 0:
        return []
    if n < k:
        return list(range(n)) + [n - 1] * (k - n)
    step = n // k
    return [step * j - 1 for j in range(1, k + 1)]


# Windows expected to hold fewer frames than this keep every frame (cheap); longer
# ones keep only the positions `sample_positions` can pick for any frame count
# within +-ESTIMATE_SLACK of the count predicted from the stream's frame rate.
KEEP_ALL_BELOW = 64
ESTIMATE_SLACK = 0.03


@dataclass
class _Window:
    """A requested window while decoding: its bounds and the frames it holds so far."""

    index: int  # position in the caller's list
    start: float
    end: float  # exclusive; +inf for a whole-clip window
    keep: frozenset[int] | None = None  # positions to hold; None = all
    count: int = 0  # frames seen in the window
    frames: dict[int, av.VideoFrame] = field(default_factory=dict)  # position -> frame


def _candidates(lo: int, hi: int, k: int = FRAMES_PER_CLIP) -> frozenset[int]:
    """Every position `sample_positions(n, k)` can return for some ``lo <= n <= hi``."""
    positions = set(range(min(k, max(hi, 0))))  # n < k: all frames (and the repeated last)
    for step in range(max(lo, k) // k, hi // k + 1):
        positions.update(step * j - 1 for j in range(1, k + 1))
    return frozenset(p for p in positions if p >= 0)


def _estimate_frames(stream: av.video.stream.VideoStream, start: float, end: float) -> float | None:
    """Frames the stream should have in ``[start, end)``, from its rate and duration metadata."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate or stream.time_base is None:
        return None
    first = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    last = first + float(stream.duration * stream.time_base) if stream.duration else float("inf")
    if start == float("-inf") and end == float("inf") and stream.frames:
        return float(stream.frames)
    span = min(end, last) - max(start, first)
    if span == float("inf"):
        return None
    return max(span, 0.0) * float(rate)


def _keep_for(stream: av.video.stream.VideoStream, window: _Window) -> frozenset[int] | None:
    """Positions a window must hold, or None to hold all (short or unpredictable windows).

    A long MELD clip can run for minutes; holding all its frames would take
    gigabytes, while the frames `sample_positions` can pick for any count near
    the predicted one are a few percent of them. If the real count falls outside
    the prediction, `decode_windows` decodes that window again with the exact count.
    """
    estimate = _estimate_frames(stream, window.start, window.end)
    if estimate is None:
        return None
    hi = math.ceil(estimate * (1 + ESTIMATE_SLACK)) + FRAMES_PER_CLIP
    if hi < KEEP_ALL_BELOW:
        return None
    lo = max(0, math.floor(estimate * (1 - ESTIMATE_SLACK)) - FRAMES_PER_CLIP)
    return _candidates(lo, hi)


def _pick(window: _Window) -> np.ndarray | None:
    """Convert only the sampled frames of a closed window to an (8, H, W, 3) RGB array.

    Raises KeyError when a sampled position was not held (the frame count fell
    outside the prediction); the caller then decodes the window again.
    """
    if window.count == 0:
        return None
    positions = sample_positions(window.count)
    converted: dict[int, np.ndarray] = {}
    for p in positions:
        if p not in converted:
            converted[p] = window.frames[p].to_ndarray(format="rgb24")
    return np.stack([converted[p] for p in positions])


KeepRule = Callable[["av.video.stream.VideoStream", _Window], "frozenset[int] | None"]


def _decode_pass(
    path: Path, windows: list[_Window], keep: KeepRule
) -> tuple[dict[int, np.ndarray | None], list[_Window]]:
    """One open and one forward decode serving all ``windows``.

    Returns the sampled frames per window index, and the windows whose sampled
    positions were not held (to be decoded again with their exact frame count).
    """
    results: dict[int, np.ndarray | None] = {w.index: None for w in windows}
    missed: list[_Window] = []
    pending = sorted(windows, key=lambda w: w.start, reverse=True)  # pop() gives the earliest start
    last_end = max(w.end for w in windows)
    container = open_checked(path)

    def close(window: _Window) -> None:
        try:
            results[window.index] = _pick(window)
        except KeyError:
            missed.append(window)
        window.frames = {}

    with container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-level threads: same frames, faster decode
        frame_step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
        active: list[_Window] = []
        previous_t: float | None = None
        try:
            for frame in container.decode(stream):
                if frame.time is not None:
                    t = float(frame.time)
                else:  # no timestamp: assume constant rate after the previous frame
                    t = 0.0 if previous_t is None else previous_t + frame_step
                previous_t = t
                if t >= last_end:
                    break
                while pending and pending[-1].start <= t:
                    window = pending.pop()
                    window.keep = keep(stream, window)
                    active.append(window)
                still_open = []
                for window in active:
                    if t >= window.end:
                        close(window)
                        continue
                    if window.keep is None or window.count in window.keep:
                        window.frames[window.count] = frame
                    window.count += 1
                    still_open.append(window)
                active = still_open
                if not active and not pending:
                    break
        except (av.error.FFmpegError, ValueError) as exc:
            log.warning(
                "%s: video decoding stopped early (%s); windows keep the frames read so far", path, exc
            )
        for window in active:
            close(window)
    return results, missed


def decode_windows(
    path: str | os.PathLike, windows: Sequence[tuple[float, float] | None]
) -> list[np.ndarray | None]:
    """Sample ``FRAMES_PER_CLIP`` RGB frames from each time window of one video.

    A window ``(t0, t1)`` (seconds on the stream's own timestamps) holds the
    frames whose timestamp ``t`` satisfies ``t0 <= t < t1``; ``None`` stands for
    the whole clip (MELD). For each window the frames at `sample_positions` are
    returned as an ``(8, H, W, 3)`` uint8 array, or ``None`` when the window has
    no frame (the caller substitutes black frames and reports it, docs/METHOD.md §6).

    The file is opened once and decoded forward once, stopping after the last
    window's end. Memory stays bounded: open windows hold references to decoded
    frames (shared between overlapping windows), long windows only those at the
    positions that can be sampled for a frame count near the one predicted from
    the stream's rate, and only the 8 chosen frames are converted to RGB. A
    window whose real count misses the prediction (variable frame rate, wrong
    metadata) is decoded again in one more pass with its exact count. If
    decoding fails midway, every window keeps the frames decoded before the
    failure. Raises `MediaError` if the file is missing, cannot be opened, or has
    no video stream.
    """
    path = Path(path)
    requested: list[_Window] = []
    for i, window in enumerate(windows):
        if window is None:
            requested.append(_Window(i, float("-inf"), float("inf")))
            continue
        t0, t1 = float(window[0]), float(window[1])
        if not t0 <= t1:
            raise ValueError(f"{path}: window {i} has start {t0} after end {t1}")
        requested.append(_Window(i, t0, t1))
    if not requested:
        return []
    results, missed = _decode_pass(path, requested, _keep_for)
    if missed:
        exact = {w.index: frozenset(sample_positions(w.count)) for w in missed}
        retry = [_Window(w.index, w.start, w.end) for w in missed]
        again, still_missed = _decode_pass(path, retry, lambda _stream, w: exact[w.index])
        results.update(again)
        for window in still_missed:  # the second decode disagreed with the first: give up on it
            log.warning("%s: window %d decoded differently twice; no frames", path, window.index)
    return [results[i] for i in range(len(requested))]
