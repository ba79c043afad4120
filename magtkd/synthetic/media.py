"""Media writers for the synthetic datasets: index-coded frames, tones, WAV, AVI/MP4.

Synthetic clips stand in for the real releases (IEMOCAP dialogue AVIs with MPEG-4
video, MELD MP4 clips with H.264 video and stereo AAC audio, 16 kHz WAVs), so the
decoders (`magtkd.media`) are exercised on the same containers and codecs. Each
frame carries its own index in large black/white blocks, so tests can check which
frames a decoder returned even after lossy compression (docs/METHOD.md §2, video
sampling). Every file is written atomically through `magtkd.utils.atomic_path`.
"""

from __future__ import annotations

import os
import wave
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator

import av
import numpy as np

from ..artifacts import atomic_path

# The index is coded as INDEX_BITS blocks laid out BIT_ROWS x BIT_COLS in the top
# half of the frame. 12 bits cover indices 0..4095 (a 5-minute dialogue at 10 fps
# is 3000 frames). Blocks are ~10x12 pixels at 64x48: large enough that MPEG-4 /
# H.264 quantisation cannot flip a pure black/white block's centre.
INDEX_BITS = 12
BIT_ROWS = 2
BIT_COLS = 6
MIN_HEIGHT = 16
MIN_WIDTH = 24

_CONTAINERS = {".avi": "avi", ".mp4": "mp4", ".m4v": "mp4", ".mkv": "matroska", ".mov": "mov"}


def _block(r: int, c: int, height: int, width: int) -> tuple[slice, slice]:
    """Pixel rows/cols of bit block (r, c); the band is the top half of the frame."""
    band = height // 2
    rows = slice(r * band // BIT_ROWS, (r + 1) * band // BIT_ROWS)
    cols = slice(c * width // BIT_COLS, (c + 1) * width // BIT_COLS)
    return rows, cols


def index_frame(
    index: int, height: int, width: int, color: tuple[int, int, int] = (128, 128, 128)
) -> np.ndarray:
    """An (H, W, 3) uint8 RGB frame: background ``color`` with ``index`` coded in blocks.

    Bit ``b`` (least significant first) is block ``b`` in row-major order of the
    2 x 6 grid filling the top half: white for 1, black for 0.
    """
    if not 0 <= index < 2**INDEX_BITS:
        raise ValueError(f"frame index {index} outside 0..{2**INDEX_BITS - 1}")
    if height < MIN_HEIGHT or width < MIN_WIDTH:
        raise ValueError(
            f"frame {width}x{height} too small for the index code (min {MIN_WIDTH}x{MIN_HEIGHT})"
        )
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = np.asarray(color, dtype=np.uint8)
    for bit in range(INDEX_BITS):
        rows, cols = _block(bit // BIT_COLS, bit % BIT_COLS, height, width)
        frame[rows, cols] = 255 if (index >> bit) & 1 else 0
    return frame


def read_index(frame: np.ndarray) -> int:
    """Decode the index written by `index_frame` from a (possibly lossy) RGB frame.

    Only the central half of each block is read (block edges are where
    compression rings), and a block counts as 1 when its mean is above mid-grey.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) frame, got shape {frame.shape}")
    height, width = frame.shape[:2]
    luma = frame.astype(np.float32).mean(axis=2)
    index = 0
    for bit in range(INDEX_BITS):
        rows, cols = _block(bit // BIT_COLS, bit % BIT_COLS, height, width)
        h, w = rows.stop - rows.start, cols.stop - cols.start
        centre = luma[rows.start + h // 4 : rows.stop - h // 4, cols.start + w // 4 : cols.stop - w // 4]
        if centre.mean() > 127.5:
            index |= 1 << bit
    return index


def tone(
    freq: float,
    seconds: float,
    sample_rate: int,
    channels: int = 1,
    amplitude: float = 0.3,
    noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """A sine tone, float32 of shape (n, channels), optionally plus Gaussian noise.

    All channels carry the same tone (independent noise per channel), so a mono
    down-mix keeps the tone's amplitude. Values are clipped to [-1, 1].
    """
    n = int(round(seconds * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    wave_ = (amplitude * np.sin(2 * np.pi * freq * t))[:, None].repeat(channels, axis=1)
    if noise > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        wave_ = wave_ + noise * rng.standard_normal(wave_.shape)
    return np.clip(wave_, -1.0, 1.0).astype(np.float32)


def _as_2d(samples: np.ndarray) -> np.ndarray:
    """(n,) or (n, ch) float samples -> (n, ch) float32 clipped to [-1, 1]."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2 or samples.shape[1] < 1:
        raise ValueError(f"audio samples must be (n,) or (n, channels), got shape {samples.shape}")
    return np.clip(samples, -1.0, 1.0)


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int) -> None:
    """Write float samples in [-1, 1] ((n,) or (n, channels)) as a PCM s16 WAV.

    Uses the standard library writer: WAV is plain interleaved PCM, so there is
    nothing for an encoder to do, and the samples round-trip exactly at s16.
    """
    data = _as_2d(samples)
    pcm = np.round(data * 32767.0).astype("<i2")
    with atomic_path(path) as tmp:
        with wave.open(str(tmp), "wb") as out:
            out.setnchannels(data.shape[1])
            out.setsampwidth(2)
            out.setframerate(int(sample_rate))
            out.writeframes(pcm.tobytes())


def _layout(channels: int) -> str:
    if channels == 1:
        return "mono"
    if channels == 2:
        return "stereo"
    return f"{channels}c"


def _container_of(path: Path, container: str | None) -> str:
    if container is not None:
        return container
    try:
        return _CONTAINERS[path.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"{path}: cannot infer a container from suffix {path.suffix!r}; pass container= "
            f"(known suffixes: {', '.join(sorted(_CONTAINERS))})"
        ) from None


def _check_frame(frame: np.ndarray, shape: tuple[int, ...] | None, index: int) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"video frame {index}: expected (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    if shape is not None and frame.shape != shape:
        raise ValueError(f"video frame {index}: shape {frame.shape} differs from the first frame's {shape}")
    return frame


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: int,
    *,
    codec: str = "mpeg4",
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
    audio_codec: str = "aac",
    container: str | None = None,
) -> None:
    """Encode RGB uint8 frames (an (N, H, W, 3) array or any iterable of (H, W, 3)).

    The container comes from the suffix (.avi -> avi, .mp4 -> mp4) unless given;
    the temporary file ends in ``.tmp``, so the format is always passed
    explicitly. Video is ``yuv420p`` at ``fps`` with pts = frame index. Optional
    ``audio`` ((n,) or (n, channels) float in [-1, 1] at ``sample_rate``) goes in
    a second stream, interleaved with the video so a long clip streams through
    the muxer instead of buffering. Frames are consumed one at a time, so a
    generator of frames keeps memory flat for long videos.
    """
    path = Path(path)
    fmt = _container_of(path, container)
    if audio is not None and not sample_rate:
        raise ValueError(f"{path}: audio given without sample_rate")
    audio_data = _as_2d(audio) if audio is not None else None
    iterator: Iterator[np.ndarray] = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError(f"{path}: no video frames to write")
    first = _check_frame(first, None, 0)
    height, width = first.shape[:2]
    if codec in ("mpeg4", "libx264", "h264") and (height % 2 or width % 2):
        raise ValueError(f"{path}: yuv420p needs even frame sizes, got {width}x{height}")

    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format=fmt) as out:
            vstream = _video_stream(out, codec, fps, width, height)
            muxer = None
            if audio_data is not None:
                layout = _layout(audio_data.shape[1])
                muxer = _AudioMuxer(out, out.add_stream(audio_codec, rate=int(sample_rate), layout=layout),
                                    audio_data, int(sample_rate))
            index = 0
            frame = first
            shape = first.shape
            while frame is not None:
                vframe = av.VideoFrame.from_ndarray(frame, format="rgb24")
                vframe.pts = index
                out.mux(vstream.encode(vframe))
                index += 1
                if muxer is not None:
                    muxer.until(int(round(index * sample_rate / fps)))
                nxt = next(iterator, None)
                frame = None if nxt is None else _check_frame(nxt, shape, index)
            out.mux(vstream.encode(None))
            if muxer is not None:
                muxer.finish()


def _video_stream(out: Any, codec: str, fps: int, width: int, height: int) -> Any:
    vstream = out.add_stream(codec, rate=int(fps))
    vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
    vstream.time_base = Fraction(1, int(fps))
    # The generated data must be the same bytes for the same seed. One encoder thread:
    # frame-threaded x264 output depends on thread timing. And a constant quantizer: with its
    # default rate control (CRF) x264 still encoded about one tiny clip in a hundred differently
    # from run to run (at most 2 levels apart once decoded); with QP 23 three runs of the MELD
    # tree came out identical.
    vstream.codec_context.thread_count = 1
    if codec == "libx264":
        vstream.codec_context.options = {"qp": "23"}
    return vstream


class _AudioMuxer:
    """Muxes (n, channels) float audio into ``stream`` in chunks, interleaved with the video frames,
    so a long clip streams through the muxer instead of buffering."""

    def __init__(self, out: Any, stream: Any, audio: np.ndarray, sample_rate: int) -> None:
        self.out, self.stream, self.audio, self.rate = out, stream, audio, sample_rate
        self.written = 0  # audio samples muxed so far

    def until(self, end: int) -> None:
        end = min(end, len(self.audio))
        if end <= self.written:
            return
        chunk = np.ascontiguousarray(self.audio[self.written:end].T)
        aframe = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=_layout(chunk.shape[0]))
        aframe.sample_rate = self.rate
        aframe.pts = self.written
        aframe.time_base = Fraction(1, self.rate)
        self.out.mux(self.stream.encode(aframe))
        self.written = end

    def finish(self) -> None:
        self.until(len(self.audio))
        self.out.mux(self.stream.encode(None))
