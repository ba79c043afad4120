"""Audio decoding: first audio stream -> mono float32 at 16 kHz (SPEC sections 2 and 6).

The reference loaded audio at 22.05 kHz and declared it 16 kHz to data2vec; we
decode at the file's own rate, down-mix to mono (mean of channels) and resample
with `torchaudio.functional.resample` to the rate the model was trained on.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import av
import numpy as np
import torch
import torchaudio.functional as AF

from ..report import SubstitutionReport
from .errors import MediaError, open_checked

__all__ = ["TARGET_SAMPLE_RATE", "MediaError", "decode_audio", "load_audio"]

log = logging.getLogger("magtkd")

TARGET_SAMPLE_RATE = 16000


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a media container for reading (single entry point so tests can count opens)."""
    return av.open(str(path), "r")


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
    a prefix anyway (SPEC section 2). Raises `MediaError` naming the file when it
    is missing, cannot be opened, has no audio stream, or yields no samples. A
    decode error after some audio was read keeps what was read (logged).
    """
    path = Path(path)
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    container = open_checked(path, _open)
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


def load_audio(
    path: str | os.PathLike,
    *,
    key: str,
    report: SubstitutionReport | None,
    target_sr: int = TARGET_SAMPLE_RATE,
    max_samples: int | None = None,
    fallback_seconds: float = 1.0,
) -> np.ndarray:
    """`decode_audio`, or silence when the file is unreadable (SPEC section 6).

    The reference substituted a 5 s buffer of ones; we use ``fallback_seconds``
    of zeros (capped at ``max_samples``), keep the utterance, and record it in
    ``report`` under ``key`` (the report warns once per file). Without a report
    the substitution is still logged.
    """
    try:
        return decode_audio(path, target_sr=target_sr, max_samples=max_samples)
    except MediaError as err:
        n = max(1, int(round(fallback_seconds * target_sr)))
        if max_samples is not None:
            n = min(n, max_samples)
        if report is not None:
            report.add(key, err.path, err.reason, "silence")
        else:
            log.warning("unreadable media %s (%s): using silence for %s", err.path, err.reason, key)
        return np.zeros(n, dtype=np.float32)
