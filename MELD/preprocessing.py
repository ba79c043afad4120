"""Stage 0 - official MELD CSVs -> the split CSVs every stage reads (docs/METHOD.md §1).

    python MELD/preprocessing.py --data_dir datasets/MELD

Reads   <data_dir>/{train,dev,test}_sent_emo.csv and the clip folders
Writes  <data_dir>/{train,dev,test}_meld_emo.csv, <data_dir>/speaker2id.json, preparation_report.tsv

Every official row and column is kept with its value byte-exact (read as strings; the texts hold
characters like U+0092 that a spreadsheet round trip corrupts), plus ``Video_Path`` =
``<clip folder>/dia{D}_utt{U}.mp4`` relative to the data folder. Missing clips do not drop rows
(later stages substitute silence / black frames, docs/METHOD.md §6); they and clips no row names
are listed in ``preparation_report.tsv``. Speaker ids follow first appearance over train, dev, test.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import CLIP_DIRS, OFFICIAL_COLUMNS, OFFICIAL_CSV, MELD  # noqa: E402
from magtkd.dataset import check_data_dir, read_csv_checked  # noqa: E402
from magtkd.spec import SPEAKER_MAP, SPLITS  # noqa: E402
from magtkd.utils import DataError  # noqa: E402
from magtkd import cli, utils  # noqa: E402
from magtkd.artifacts import SubstitutionReport, atomic_path, remove_stale_temps, write_json, write_text  # noqa: E402


REPORT_NAME = "preparation_report.tsv"
_ID = re.compile(r"^\d+$")


@dataclass
class MeldPrepared:
    """What :func:`prepare_meld` built and wrote."""

    frames: dict[str, pd.DataFrame]
    speaker2id: dict[str, int]
    # (key, path, reason, action) rows of the preparation report
    problems: list[tuple[str, str, str, str]] = field(default_factory=list)

    def count(self, reason_prefix: str) -> int:
        return sum(1 for p in self.problems if p[2].startswith(reason_prefix))


def clip_name(dialogue_id: str, utterance_id: str) -> str:
    return f"dia{dialogue_id}_utt{utterance_id}.mp4"


def read_official(data_dir: Path, split: str) -> pd.DataFrame:
    """One official CSV as strings, with its columns and ids checked."""
    path = data_dir / OFFICIAL_CSV[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the folder must contain {MELD.data_readme}")
    frame = read_csv_checked(path, OFFICIAL_COLUMNS)
    for column in ("Dialogue_ID", "Utterance_ID"):
        for row, value in enumerate(frame[column], start=1):
            if not _ID.match(value):
                raise DataError(f"{path}: row {row}: {column} {value!r} is not a non-negative integer")
    for row, value in enumerate(frame["Emotion"], start=1):
        if value not in MELD.labels:
            raise DataError(f"{path}: row {row}: Emotion {value!r} is not one of {', '.join(MELD.labels)}")
    return frame


def with_video_paths(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    """The official table plus ``Video_Path`` (relative to the data folder)."""
    out = frame.copy()
    out["Video_Path"] = [
        f"{CLIP_DIRS[split]}/{clip_name(d, u)}" for d, u in zip(frame["Dialogue_ID"], frame["Utterance_ID"])
    ]
    return out


def speaker_map(frames: dict[str, pd.DataFrame]) -> dict[str, int]:
    """Speaker name -> id by first appearance over train, then dev, then test."""
    mapping: dict[str, int] = {}
    for split in SPLITS:
        for name in frames[split]["Speaker"]:
            mapping.setdefault(name, len(mapping))
    return mapping


def check_clips(data_dir: Path, split: str, frame: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """Rows whose clip is missing, and clips that no row names."""
    folder = data_dir / CLIP_DIRS[split]
    on_disk = {p.name for p in folder.glob("*.mp4")} if folder.is_dir() else set()
    named = set()
    problems = []
    for path in frame["Video_Path"]:
        name = path.rsplit("/", 1)[1]
        named.add(name)
        if name not in on_disk:
            problems.append((f"{split}/{name[:-4]}", path, "missing clip", "row kept"))
    for name in sorted(on_disk - named):
        problems.append((f"{split}/{name[:-4]}", f"{CLIP_DIRS[split]}/{name}", "no CSV row names this clip",
                         "ignored"))
    return problems


def write_report(path: Path, problems: list[tuple[str, str, str, str]]) -> None:
    """TSV in the :class:`SubstitutionReport` layout so ``SubstitutionReport.read`` parses it."""
    body = "".join("\t".join(p) + "\n" for p in problems)
    write_text(path, SubstitutionReport.header + body)


def prepare_meld(data_dir: Path) -> MeldPrepared:
    """Build and write the three ``{split}_meld_emo.csv``, ``speaker2id.json`` and the report."""
    data_dir = check_data_dir(MELD, data_dir)
    frames = {split: with_video_paths(read_official(data_dir, split), split) for split in SPLITS}
    speakers = speaker_map(frames)
    problems = [p for split in SPLITS for p in check_clips(data_dir, split, frames[split])]
    remove_stale_temps(data_dir, [*MELD.csv_names.values(), SPEAKER_MAP, REPORT_NAME])  # a killed run's temps
    for split, frame in frames.items():
        with atomic_path(data_dir / MELD.csv_names[split]) as tmp:
            frame.to_csv(tmp, index=False, encoding="utf-8", lineterminator="\n")
    write_json(data_dir / SPEAKER_MAP, speakers)
    write_report(data_dir / REPORT_NAME, problems)
    return MeldPrepared(frames, speakers, problems)


def summary(data_dir: Path, result: MeldPrepared) -> str:
    lines = []
    for split, frame in result.frames.items():
        labels = Counter(frame["Emotion"])
        counts = ", ".join(f"{label} {labels.get(label, 0)}" for label in MELD.labels)
        missing = sum(1 for p in result.problems if p[0].startswith(f"{split}/") and p[2] == "missing clip")
        folder = data_dir / CLIP_DIRS[split]
        where = "" if folder.is_dir() else f" (folder {folder} does not exist)"
        lines.append(
            f"{split}: {len(frame)} utterances, {frame['Dialogue_ID'].nunique()} dialogues, "
            f"{frame['Speaker'].nunique()} speakers ({counts}); {missing} clips missing{where}"
        )
    lines.append(f"{len(result.speaker2id)} speakers in {data_dir / SPEAKER_MAP}")
    lines.append(
        f"{result.count('missing')} missing clips (rows kept) and {result.count('no CSV row')} clips "
        f"without a row listed in {data_dir / REPORT_NAME}"
    )
    return "\n".join(lines)


DATA_HELP = "folder with the official CSVs and clip folders; outputs are written here"


def main(argv: Sequence[str] | None = None) -> int:
    # Flags: the release folder (MELD's default); the CSVs are written into it
    args = cli.preparation_parser(MELD, HERE, __doc__, DATA_HELP).parse_args(argv)
    try:
        result = prepare_meld(args.data_dir)
    except FileNotFoundError as exc:  # DataError is a UserError already
        raise utils.InputMissing(str(exc)) from exc
    for split in SPLITS:
        print(f"wrote {args.data_dir / MELD.csv_names[split]}")
    print(summary(args.data_dir, result))
    return 0


if __name__ == "__main__":
    utils.run(main)
