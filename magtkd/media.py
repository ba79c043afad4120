"""Media decoding with PyAV: audio to 16 kHz mono, 8 frames per time window (docs/METHOD.md §2, §6).

Audio: the reference loaded audio at 22.05 kHz and declared it 16 kHz to
data2vec; we decode at the file's own rate, down-mix to mono (mean of channels)
and resample with `torchaudio.functional.resample` to the rate the model was
trained on.

Video: an IEMOCAP dialogue video serves every utterance of the dialogue; the
reference decoded the whole video again for each utterance, which made frame
extraction quadratic in dialogue length. `decode_windows` opens the file once
and decodes it forward once for all windows, choosing the frames exactly as
the authors' OpenCV loop does, and holds only the chosen frames (memory does
not grow with the length of a window or of the video).

Both raise `MediaError` for a file they cannot read, and the audio decoders
also for a clip with a NaN or infinite sample (`check_finite`; video frames are
uint8 from the codec's conversion, so they cannot hold one); stages catch it to
substitute silence / black frames and list the utterance in their report.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import torch
import torchaudio.functional as AF


log = logging.getLogger("magtkd")


TARGET_SAMPLE_RATE = 16000


FRAMES_PER_CLIP = 8


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


def missing_stream(path: Path, kind: str) -> MediaError:
    """"no <kind> stream", saying so when the file is cut short: an mp4 cut inside its moov atom still
    opens with the streams described before the cut, and its lost track is damage, not a silent clip."""
    try:
        with open(path, "rb") as handle:
            size, offset = os.fstat(handle.fileno()).st_size, 0
            while offset + 8 <= size:  # the ISO-BMFF top-level boxes: 32-bit size (1: 64-bit follows) + type
                handle.seek(offset)
                header = handle.read(16)
                box, kind_of_box = int.from_bytes(header[:4], "big"), header[4:8].decode("latin-1")
                box = int.from_bytes(header[8:16], "big") if box == 1 and len(header) == 16 else box
                if box < 8 or (offset == 0 and kind_of_box != "ftyp"):  # "to the end", or not an mp4 (wav, avi)
                    break
                if offset + box > size:
                    return MediaError(path, f"no {kind} stream: file truncated ({kind_of_box!r} box at byte "
                                            f"{offset} needs {box} bytes, the file ends {size - offset} bytes in)")
                offset += box
    except OSError:
        pass
    return MediaError(path, f"no {kind} stream")


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a media container for reading (single entry point so tests can count opens)."""
    return av.open(str(path), "r")


def resample_audio(path: str | os.PathLike, mono: np.ndarray, native_sr: int,
                   target_sr: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """float32 mono of shape (n,) at ``target_sr``, from ``mono`` at ``native_sr`` (the file ``path``'s).

    `torchaudio.functional.resample`; a clip already at ``target_sr`` is returned as decoded.
    Raises `MediaError` for ``path`` if the result holds a non-finite sample (`check_finite`).
    """
    if native_sr != target_sr:
        mono = AF.resample(torch.from_numpy(mono), native_sr, target_sr).numpy()
    return check_finite(path, np.ascontiguousarray(mono, dtype=np.float32), "audio")


def check_finite(path: str | os.PathLike, samples: np.ndarray, kind: str) -> np.ndarray:
    """``samples``, or a `MediaError` for ``path`` if any is NaN or infinite.

    A float file can store NaN/inf samples (and a float32 down-mix or resampling
    can overflow to inf); normalisation would spread them over the whole clip and
    the model's output would be NaN. Such a clip is unreadable media: the caller
    substitutes it and reports it, like a corrupt file.
    """
    if not np.isfinite(samples).all():
        raise MediaError(path, f"non-finite samples (NaN/inf) in the decoded {kind}")
    return samples


def decode_audio_native(path: str | os.PathLike, notes: list[str] | None = None) -> tuple[int, np.ndarray]:
    """``(native rate, float32 mono)`` of the whole first audio stream of ``path``, not resampled.

    The whole clip is decoded, also for MELD's clips that run for minutes: the
    authors normalise the whole clip before keeping its first 400000 samples
    (docs/METHOD.md §2). Memory stays modest: one mono float32 copy at the
    native rate (a 5-minute 48 kHz clip is 58 MB) while decoding. Raises
    `MediaError` naming the file when it is missing, cannot be opened, has no
    audio stream, yields no samples, or yields a non-finite sample. A decode
    error after some audio was read keeps what was read (logged, and described
    in ``notes`` when given, so the caller can report it).

    Only PyAV runs here (no torch), so this is what the isolated decoder
    process runs (`decode_audio_isolated`, which resamples with `resample_audio`).
    """
    path = Path(path)
    container = open_checked(path)
    with container:
        if not container.streams.audio:
            raise missing_stream(path, "audio")
        stream = container.streams.audio[0]
        # Convert whatever sample format the codec emits to planar float at the
        # stream's own rate and layout; down-mixing follows, resampling is `resample_audio`'s.
        converter = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        native_sr: int | None = None
        have = 0
        try:
            for frame in container.decode(stream):
                if native_sr is None:
                    native_sr = int(frame.sample_rate)
                for converted in converter.resample(frame):
                    planar = converted.to_ndarray()  # (channels, n)
                    chunks.append(planar.mean(axis=0, dtype=np.float32))
                    have += planar.shape[1]
        except (av.error.FFmpegError, ValueError) as exc:
            if not chunks:
                raise MediaError(path, f"cannot decode audio: {exc}") from exc
            log.warning("%s: audio decoding stopped early (%s); keeping %d samples", path, exc, have)
            if notes is not None:
                notes.append(f"partial decode: audio stopped at {have / native_sr:.2f} s ({exc})")
    if not chunks or have == 0 or native_sr is None:
        raise MediaError(path, "no audio samples")
    return native_sr, check_finite(path, np.concatenate(chunks), "audio")


CHANNEL_ORDERS = {"rgb": "rgb24", "bgr": "bgr24"}


def window_frames(fps: float, start: float, end: float) -> tuple[int, int]:
    """0-based ``(first, last)`` frame indices of the time window ``[start, end]`` (docs/METHOD.md §2).

    The authors' OpenCV loop tests the 1-based position it reports after
    reading a frame: frame ``i`` is in the window when
    ``start * fps <= i + 1 <= end * fps``. ``first > last`` means no frame.
    """
    return max(math.ceil(start * fps) - 1, 0), math.floor(end * fps) - 1


def window_step(fps: float, start: float, end: float, k: int = FRAMES_PER_CLIP) -> int:
    """IEMOCAP: ``floor(fps * (end - start) / k)``, from the window's duration (not its frame count).

    A step of 0 (a window shorter than ``k`` frames: IEMOCAP windows last at
    least 1 s, so only at rates under 8 fps) would divide by zero in the
    authors' loop; we use 1, i.e. every frame, as their MELD rule does for short clips.
    """
    return max(math.floor(fps * (end - start) / k), 1)


def clip_step(frame_count: int, k: int = FRAMES_PER_CLIP) -> int:
    """MELD: ``frame_count // k`` with the container's frame count; under ``k`` frames, 1 (all frames)."""
    return max(frame_count // k, 1)


def kept_indices(first: int, last: int | float, step: int, k: int = FRAMES_PER_CLIP) -> list[int]:
    """Frames whose running count in the window (1 at ``first``) is a multiple of ``step``; the first ``k``.

    Fewer than ``k`` when the window ends first; the caller repeats the last
    frame it actually read (`decode_windows`).
    """
    if step < 1 or k <= 0:
        raise ValueError(f"kept_indices needs step >= 1 and k > 0, got step={step}, k={k}")
    return [i for i in (first + step * j - 1 for j in range(1, k + 1)) if i <= last]


def metadata_frame_count(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                         fps: float) -> int:
    """The container's frame count as OpenCV reports it: ``nb_frames``, else ``round(duration * fps)``."""
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    else:
        return 0
    return int(math.floor(seconds * fps + 0.5))


def stream_fps(stream: av.video.stream.VideoStream) -> float | None:
    """The container's frame rate (OpenCV's ``CAP_PROP_FPS``): average rate, else the guessed rate."""
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


@dataclass
class _Window:
    """A requested window while decoding: the frame indices it keeps and the frames read so far."""

    index: int  # position in the caller's list
    start: float | None  # seconds; None = the whole clip (MELD)
    end: float | None
    first: int = 0
    last: float = math.inf
    wanted: list[int] = field(default_factory=list)  # frame indices to keep, in order
    frames: list[np.ndarray] = field(default_factory=list)


def _plan(window: _Window, container: av.container.InputContainer, stream: av.video.stream.VideoStream,
          path: Path) -> int | None:
    """Fill ``window.first/last/wanted`` by the authors' rule; returns the metadata frame count of a clip."""
    fps = stream_fps(stream)
    if window.start is None:
        count = metadata_frame_count(container, stream, fps or 0.0)
        window.wanted = kept_indices(0, math.inf, clip_step(count))
        return count
    if fps is None:
        raise MediaError(path, "no frame rate in the video stream")
    window.first, window.last = window_frames(fps, window.start, window.end)
    window.wanted = kept_indices(window.first, window.last, window_step(fps, window.start, window.end))
    return None


def _finish(window: _Window) -> np.ndarray | None:
    """The kept frames, the last repeated up to 8 (window past the end of the video); None if none."""
    if not window.frames:
        return None
    frames = window.frames + [window.frames[-1]] * (FRAMES_PER_CLIP - len(window.frames))
    return np.stack(frames)


def decode_windows(
    path: str | os.PathLike, windows: Sequence[tuple[float, float] | None], channel_order: str = "rgb",
    frame_counts: dict[int, tuple[int, int]] | None = None, notes: list[str] | None = None,
) -> list[np.ndarray | None]:
    """Sample ``FRAMES_PER_CLIP`` frames from each time window of one video, as the authors' loop does.

    A window ``(ts, te)`` in seconds holds the frames ``i`` (0-based, decode
    order) with ``ts * fps <= i + 1 <= te * fps``; it keeps the frames whose
    running count in it is a multiple of ``floor(fps * (te - ts) / 8)``, the
    first 8 (`window_frames`, `window_step`, `kept_indices`). ``None`` stands
    for the whole clip (MELD): step ``frame_count // 8`` from the container's
    metadata. When fewer than 8 frames are kept (the window runs past the end
    of the video) the last one is repeated; a window with no kept frame gives
    ``None`` (the caller substitutes black frames and reports it,
    docs/METHOD.md §6). Frames are ``(8, H, W, 3)`` uint8 in ``channel_order``
    (``rgb``, or ``bgr`` as OpenCV hands them to the authors' processors).

    For whole-clip windows, ``frame_counts[i]`` receives ``(metadata count,
    decoded count)``: the clip is decoded to its end to count its frames.

    The file is opened once and decoded forward once for all windows, stopping
    after the last kept frame of the last window (or at the end, with a
    whole-clip window). Memory stays bounded: only the kept frames (at most 8
    per window) are converted and held. If decoding fails midway, every window
    keeps the frames decoded before the failure (described in ``notes`` when
    given). Raises `MediaError` if the
    file is missing, cannot be opened, has no video stream, or (time windows)
    no frame rate.
    """
    path = Path(path)
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {sorted(CHANNEL_ORDERS)}, got {channel_order!r}")
    requested = _requested(path, windows)
    if not requested:
        return []
    container = open_checked(path)
    with container:
        if not container.streams.video:
            raise missing_stream(path, "video")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-level threads: same frames, faster decode
        metadata: dict[int, int] = {}
        wanted: dict[int, list[_Window]] = {}
        for window in requested:
            count = _plan(window, container, stream, path)
            if count is not None:
                metadata[window.index] = count
            for i in window.wanted:
                wanted.setdefault(i, []).append(window)
        decoded = _decode_kept(container, stream, wanted, CHANNEL_ORDERS[channel_order], bool(metadata), path, notes)
    if frame_counts is not None:
        for index, count in metadata.items():
            frame_counts[index] = (count, decoded)
    return [_finish(window) for window in requested]


def _requested(path: Path, windows: Sequence[tuple[float, float] | None]) -> list[_Window]:
    """The windows as `_Window` s (``None``: the whole clip); a window that ends before it starts is an error."""
    requested: list[_Window] = []
    for i, window in enumerate(windows):
        if window is None:
            requested.append(_Window(i, None, None))
            continue
        t0, t1 = float(window[0]), float(window[1])
        if not t0 <= t1:
            raise ValueError(f"{path}: window {i} has start {t0} after end {t1}")
        requested.append(_Window(i, t0, t1))
    return requested


def _decode_kept(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                 wanted: dict[int, list[_Window]], pixel_format: str, to_the_end: bool, path: Path,
                 notes: list[str] | None) -> int:
    """Decode forward once, handing each kept frame (converted once) to the windows that want it; stop after
    the last kept frame unless ``to_the_end`` (a whole clip's frames are counted). Returns the frames decoded;
    a decoding error keeps what was read (described in ``notes``)."""
    decoded, last_needed = 0, max(wanted, default=-1)
    try:
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            if i in wanted:
                array = frame.to_ndarray(format=pixel_format)
                for window in wanted[i]:
                    window.frames.append(array)
            if i >= last_needed and not to_the_end:
                break
    except (av.error.FFmpegError, ValueError) as exc:
        log.warning("%s: video decoding stopped early (%s); windows keep the frames read so far", path, exc)
        if notes is not None:
            notes.append(f"partial decode: video stopped after frame {decoded} ({exc})")
    return decoded
