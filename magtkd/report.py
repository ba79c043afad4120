"""Substitution report: every utterance whose media could not be read (SPEC section 6).

Unreadable media never stops a run and never drops an utterance: the stage
substitutes silence or black frames, logs ONE warning per file, and lists the
utterance here. The report is written atomically next to the stage's outputs.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from .io import write_text

log = logging.getLogger("magtkd")


@dataclass(frozen=True)
class Substitution:
    key: str  # utterance key, e.g. "train/dia3_utt1" or "dev/12_4"
    path: str  # media file that could not be read
    reason: str  # why (missing, corrupt, no audio stream, ...)
    replacement: str  # what was used instead ("silence", "black frames")


class SubstitutionReport:
    """Collects substitutions; warns once per media file; writes a TSV report."""

    header = "key\tpath\treason\treplacement\n"

    def __init__(self) -> None:
        self.items: list[Substitution] = []
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def add(self, key: str, path: str | Path, reason: str, replacement: str) -> None:
        path = str(path)
        with self._lock:
            self.items.append(Substitution(key, path, reason, replacement))
            if path not in self._warned:
                self._warned.add(path)
                log.warning("unreadable media %s (%s): using %s", path, reason, replacement)

    def extend(self, other: "SubstitutionReport") -> None:
        for item in other.items:
            self.add(item.key, item.path, item.reason, item.replacement)

    def __len__(self) -> int:
        return len(self.items)

    def write(self, path: str | Path) -> Path:
        """Write the report (also when empty, so a clean run is visible as such)."""
        rows = sorted(set(self.items), key=lambda s: (s.key, s.path))
        lines = [self.header] + [
            f"{s.key}\t{s.path}\t{s.reason.replace(chr(9), ' ')}\t{s.replacement}\n" for s in rows
        ]
        write_text(path, "".join(lines))
        return Path(path)

    @staticmethod
    def read(path: str | Path) -> list[Substitution]:
        lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
        return [Substitution(*line.split("\t")) for line in lines if line]
