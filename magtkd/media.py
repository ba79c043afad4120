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

import faulthandler
import logging
import math
import multiprocessing
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

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
        container = _open(path)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(path, f"cannot open: {exc}") from exc
    if not container.streams:  # e.g. an mp4 cut before its moov atom: no stream is described
        container.close()
        raise MediaError(path, "cannot open: no streams (truncated or corrupt container)")
    return container


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
    path: str | os.PathLike, target_sr: int = TARGET_SAMPLE_RATE, max_samples: int | None = None,
    notes: list[str] | None = None,
) -> np.ndarray:
    """Decode the first audio stream of ``path`` to float32 mono of shape (n,) at ``target_sr``.

    Decoding stops once ``max_samples`` samples (counted at ``target_sr``) are
    covered: MELD has clips that run for minutes and the audio encoder keeps only
    a prefix anyway (docs/METHOD.md §2). Raises `MediaError` naming the file when it
    is missing, cannot be opened, has no audio stream, or yields no samples. A
    decode error after some audio was read keeps what was read (logged, and
    described in ``notes`` when given, so the caller can report it).
    """
    native_sr, mono = decode_audio_native(path, None if max_samples is None else (max_samples, target_sr), notes)
    if native_sr != target_sr:
        mono = AF.resample(torch.from_numpy(mono), native_sr, target_sr).numpy()
    if max_samples is not None:
        mono = mono[:max_samples]
    return np.ascontiguousarray(mono, dtype=np.float32)


def decode_audio_native(
    path: str | os.PathLike, limit: tuple[int, int] | None = None, notes: list[str] | None = None
) -> tuple[int, np.ndarray]:
    """``(native rate, float32 mono)`` of the first audio stream: `decode_audio` before resampling.

    ``limit = (max_samples, target_sr)`` stops decoding once that many target-rate
    samples are covered. Only PyAV runs here (no torch), so this is what an
    isolated decoder process runs (`decode_audio_isolated`).
    """
    max_samples, target_sr = limit if limit is not None else (None, TARGET_SAMPLE_RATE)
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
            if notes is not None:
                notes.append(f"partial decode: audio stopped at {have / native_sr:.2f} s ({exc})")
    if not chunks or have == 0 or native_sr is None:
        raise MediaError(path, "no audio samples")
    return native_sr, np.concatenate(chunks)


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
    path: Path, windows: list[_Window], keep: KeepRule, notes: list[str] | None = None
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
            if notes is not None:
                where = f"after {previous_t:.2f} s" if previous_t is not None else "before the first frame"
                notes.append(f"partial decode: video stopped {where} ({exc})")
        for window in active:
            close(window)
    return results, missed


def decode_windows(
    path: str | os.PathLike, windows: Sequence[tuple[float, float] | None], notes: list[str] | None = None
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
    failure (described in ``notes`` when given). Raises `MediaError` if the file
    is missing, cannot be opened, or has no video stream.
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
    results, missed = _decode_pass(path, requested, _keep_for, notes)
    if missed:
        exact = {w.index: frozenset(sample_positions(w.count)) for w in missed}
        retry = [_Window(w.index, w.start, w.end) for w in missed]
        again, still_missed = _decode_pass(path, retry, lambda _stream, w: exact[w.index])
        results.update(again)
        for window in still_missed:  # the second decode disagreed with the first: give up on it
            log.warning("%s: window %d decoded differently twice; no frames", path, window.index)
    return [results[i] for i in range(len(requested))]


# --------------------------------------------------------------------------- isolated decoding

# PyAV/FFmpeg can crash the whole process (a segfault on an mp4 cut inside its
# moov atom) or hang on a broken file; no exception handler helps there. So
# decoding runs in a long-lived child process that the parent supervises: a
# crash or a hang past the timeout loses only the file in flight (a MediaError
# naming the signal or the timeout), and the child is restarted for the next
# file. Healthy files pay one pipe round trip each.
AUDIO_TIMEOUT_S = 120.0  # one clip's audio prefix (<= 25 s at 16 kHz) decodes in well under a second
VIDEO_TIMEOUT_S = 900.0  # one source video (an IEMOCAP dialogue video runs for minutes)
CRASH_HOOK = "MAGTKD_TEST_DECODER_CRASH"  # tests: paths (os.pathsep-separated) whose decoding kills the child


def _serve(conn: Any, parent_end: Any, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """The decoder child's loop: run ``fn(*args)`` calls sent by the parent, reply ``(ok, value)``."""
    parent_end.close()  # so the parent's death reads as end-of-file here
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    faulthandler.disable()  # a crash here is reported by the parent, naming the file
    # A forked child must not enter OpenMP regions the parent's thread pool owned (GNU OpenMP
    # deadlocks after fork); one intra-op thread keeps torch ops inline, as in DataLoader workers.
    torch.set_num_threads(1)
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        path, fn, args, hook = request
        if hook and str(path) in hook.split(os.pathsep):
            os.kill(os.getpid(), signal.SIGSEGV)
        try:
            reply = (True, fn(*args))
        except Exception as exc:  # returned to the parent, which raises it there
            reply = (False, exc if _picklable(exc) else MediaError(path, f"{type(exc).__name__}: {exc}"))
        conn.send(reply)


def _picklable(exc: BaseException) -> bool:
    import pickle

    try:
        pickle.dumps(exc)
    except Exception:
        return False
    return True


class DecoderProcess:
    """A supervised child process that runs decoding calls one at a time.

    ``call(path, fn, *args)`` returns ``fn(*args)`` computed in the child, or
    raises what it raised. If the child dies (signal, abort) or exceeds
    ``timeout`` seconds, a `MediaError` for ``path`` says so ("decoder crashed
    (signal 11)", "decoder timed out after 120 s") and the next call starts a
    fresh child. ``initializer(*initargs)`` runs in each new child.
    """

    def __init__(self, timeout: float, initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> None:
        self.timeout = float(timeout)
        self.initializer, self.initargs = initializer, initargs
        self._process: Any = None
        self._conn: Any = None
        self._owner = os.getpid()

    def _start(self) -> None:
        # fork: the child starts at once with the parent's imports (the pools and
        # DataLoader workers of this project fork the same way on Linux).
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        parent, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, parent, self.initializer, self.initargs),
                                        daemon=True)
        # DataLoader workers are daemonic, and multiprocessing refuses children of daemonic
        # processes; this child is tied to its parent by the pipe (it exits at end-of-file) and
        # is daemonic itself, so the worker's exit still ends it.
        config = multiprocessing.current_process()._config
        daemonic = config.get("daemon")
        config["daemon"] = False
        try:
            self._process.start()
        finally:
            config["daemon"] = daemonic
        child.close()
        self._conn = parent

    def start(self) -> "DecoderProcess":
        """Start the child now (else the first `call` does)."""
        if self._owner != os.getpid():  # inherited through a fork: the child belongs to the parent
            self._process, self._conn, self._owner = None, None, os.getpid()
        if self._process is None or not self._process.is_alive():
            self._discard()
            self._start()
        return self

    def call(self, path: str | os.PathLike, fn: Callable[..., Any], *args: Any) -> Any:
        self.start()
        try:
            self._conn.send((str(path), fn, args, os.environ.get(CRASH_HOOK)))
            ready = self._conn.poll(self.timeout)
            if not ready:
                self._discard(kill=True)
                raise MediaError(path, f"decoder timed out after {self.timeout:g} s")
            ok, value = self._conn.recv()
        except (EOFError, ConnectionError, BrokenPipeError):
            code = self._discard()
            reason = (f"decoder crashed (signal {-code})" if code is not None and code < 0
                      else f"decoder process exited (status {code})")
            raise MediaError(path, reason) from None
        if not ok:
            raise value
        return value

    def _discard(self, kill: bool = False) -> int | None:
        """Forget the current child (killed first when ``kill``); returns its exit code."""
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        if kill and process.is_alive():
            process.kill()
        process.join(5)
        return process.exitcode

    def close(self) -> None:
        if self._conn is not None and self._owner == os.getpid():
            try:
                self._conn.send(None)
            except OSError:
                pass
            if self._process is not None:
                self._process.join(5)
        self._discard(kill=True)

    def __enter__(self) -> "DecoderProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_audio_decoder: DecoderProcess | None = None  # one per process (DataLoader workers get their own)


def decode_audio_isolated(
    path: str | os.PathLike, target_sr: int = TARGET_SAMPLE_RATE, max_samples: int | None = None,
    notes: list[str] | None = None,
) -> np.ndarray:
    """`decode_audio`, with the PyAV part in a supervised child (`DecoderProcess`): a crash or hang
    while decoding ``path`` raises a `MediaError` for ``path`` instead of taking the process down.
    Resampling happens here, in the calling process."""
    global _audio_decoder
    if _audio_decoder is None or _audio_decoder._owner != os.getpid():
        _audio_decoder = DecoderProcess(AUDIO_TIMEOUT_S)
    _audio_decoder.timeout = AUDIO_TIMEOUT_S
    limit = None if max_samples is None else (max_samples, target_sr)
    native_sr, mono, child_notes = _audio_decoder.call(path, _decode_audio_with_notes, str(path), limit)
    if notes is not None:
        notes.extend(child_notes)
    if native_sr != target_sr:
        mono = AF.resample(torch.from_numpy(mono), native_sr, target_sr).numpy()
    if max_samples is not None:
        mono = mono[:max_samples]
    return np.ascontiguousarray(mono, dtype=np.float32)


def _decode_audio_with_notes(path: str, limit: tuple[int, int] | None) -> tuple[int, np.ndarray, list[str]]:
    notes: list[str] = []
    native_sr, mono = decode_audio_native(path, limit, notes)
    return native_sr, mono, notes
