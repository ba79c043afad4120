"""The one error type of the media decoders (SPEC section 6), and the checked open both use.

Stages catch it to substitute silence / black frames and record the utterance in
their `SubstitutionReport`; its message names the file and says what was wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import av


class MediaError(Exception):
    """A media file that cannot be decoded: missing, corrupt, or lacking the stream."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep the two-argument signature picklable for DataLoader workers
        return (type(self), (self.path, self.reason))


def open_checked(path: Path, opener: Callable[[Path], av.container.InputContainer]) -> av.container.InputContainer:
    """``opener(path)``, with a missing or unopenable file turned into a MediaError."""
    if not path.is_file():
        raise MediaError(path, "file not found")
    try:
        return opener(path)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(path, f"cannot open: {exc}") from exc
