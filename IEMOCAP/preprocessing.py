"""Stage 0 - raw IEMOCAP release -> the split CSVs every stage reads (docs/METHOD.md §1).

    python IEMOCAP/preprocessing.py --data_dir datasets/IEMOCAP

Reads   <data_dir>/Session{1..5}/dialog/{transcriptions,EmoEvaluation}/*.txt
Writes  <data_dir>/IEMOCAP_{train,dev,test}.csv

``transcriptions/<dialog>.txt`` gives utterance order and text, ``EmoEvaluation/<dialog>.txt``
the gold labels. An utterance is kept when it has both a transcription line and an evaluation
header with one of the six labels (ang exc fru hap neu sad; xxx/oth/sur/fea/dis are dropped).
Session 5 is test, the 12 standard dev dialogues are dev, the rest is train; dialogues are
ordered by name within a split and renumbered from 0. The authors' CSVs differ by 53
utterances relabelled xxx -> hap (printed at the end).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from IEMOCAP.config import DEV_DIALOGUES, IEMOCAP, TEST_SESSIONS  # noqa: E402
from magtkd.dataset import check_data_dir  # noqa: E402
from magtkd.spec import SPLITS  # noqa: E402
from magtkd import cli, utils  # noqa: E402
from magtkd.artifacts import atomic_path, remove_stale_temps  # noqa: E402


COLUMNS = list(IEMOCAP.required_columns)

# `<utt_name> [START-END]: text`; the text may itself hold colons and brackets,
# so only the first `]:` after the times ends the header.
_TRANSCRIPT_LINE = re.compile(
    r"^(?P<name>\S+?)\s*\[(?P<start>\d+(?:\.\d*)?)\s*-\s*(?P<end>\d+(?:\.\d*)?)\]:(?P<text>.*)$"
)
_SESSION_DIR = re.compile(r"^Session(?P<n>\d+)$")

# Stated whenever the builder runs (docs/METHOD.md §1).
AUTHORS_NOTE = (
    "note: the authors' CSVs hold 7433 utterances, the raw release yields 7380 by the rule above: "
    "53 utterances whose raw label is xxx carry hap in those CSVs (51 train, 1 dev, 1 test), by an "
    "unpublished rule, so these CSVs cannot match theirs exactly"
)


@dataclass(frozen=True)
class _Line:
    name: str
    start: str
    end: str
    text: str


def format_time(raw: str) -> str:
    """``006.2901`` -> ``6.2901``, ``010.4750`` -> ``10.475``, ``297.0000`` -> ``297``.

    This is how the authors' CSVs print times (plain float repr, no trailing zeros).
    """
    text = repr(float(raw))
    return text[:-2] if text.endswith(".0") else text


def _read_text(path: Path) -> str:
    # The release is ASCII in practice; a stray Latin-1 byte must not abort the build.
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_transcription(path: Path) -> list[_Line]:
    """Utterance lines in file order; other lines (`[BREATHING]`, headers) are skipped.

    The first line for a name wins, so a name repeated by mistake cannot
    duplicate a row. Text is kept as written apart from surrounding whitespace.
    """
    lines: list[_Line] = []
    seen: set[str] = set()
    for raw in _read_text(path).splitlines():
        match = _TRANSCRIPT_LINE.match(raw.strip())
        if match is None or match["name"] in seen:
            continue
        seen.add(match["name"])
        lines.append(_Line(match["name"], match["start"], match["end"], match["text"].strip()))
    return lines


def read_evaluation(path: Path) -> dict[str, str]:
    """Utterance name -> gold label from the header lines `[S - E]\\tname\\tlabel\\t[V, A, D]`."""
    labels: dict[str, str] = {}
    for raw in _read_text(path).splitlines():
        if not raw.startswith("["):
            continue  # annotator lines (`C-E2:\t...`) and blank lines
        fields = raw.split("\t")
        if len(fields) >= 3:
            labels.setdefault(fields[1].strip(), fields[2].strip())
    return labels


def find_sessions(data_dir: Path) -> dict[int, Path]:
    """``{n: data_dir/Session{n}}``; error if there are none."""
    data_dir = check_data_dir(IEMOCAP, data_dir)
    sessions = {
        int(m["n"]): p for p in data_dir.iterdir() if p.is_dir() and (m := _SESSION_DIR.match(p.name))
    }
    if not sessions:
        raise FileNotFoundError(f"{data_dir} has no Session folders; it must contain {IEMOCAP.data_readme}")
    return dict(sorted(sessions.items()))


def split_of(session: int, dialogue: str) -> str:
    if session in TEST_SESSIONS:
        return "test"
    return "dev" if dialogue in DEV_DIALOGUES else "train"


def _video_folder(session_dir: Path) -> str:
    """``DivX`` unless only ``Divx`` exists on disk (some copies of Session 5)."""
    avi = session_dir / "dialog" / "avi"
    return "Divx" if (avi / "Divx").is_dir() and not (avi / "DivX").is_dir() else "DivX"


def _dialogue_rows(session: int, session_dir: Path, transcription: Path) -> list[dict[str, str]]:
    dialogue = transcription.stem
    evaluation = session_dir / "dialog" / "EmoEvaluation" / transcription.name
    if not evaluation.is_file():
        raise FileNotFoundError(f"{transcription} has no evaluation file {evaluation}")
    labels = read_evaluation(evaluation)
    video = f"Session{session}/dialog/avi/{_video_folder(session_dir)}/{dialogue}.avi"
    rows = []
    for line in read_transcription(transcription):
        label = labels.get(line.name)
        if label not in IEMOCAP.labels:
            continue  # not evaluated (segments like *_MXX0) or a dropped label (xxx, oth, sur, fea, dis)
        rows.append({
            "Utterance": line.text,
            "Speaker": line.name,
            "Start_Time": format_time(line.start),
            "End_Time": format_time(line.end),
            "Wav_Path": f"Session{session}/sentences/wav/{dialogue}/{line.name}.wav",
            "Video_Path": video,
            "Emotion": label,
        })
    return rows


def build_frames(data_dir: Path) -> dict[str, pd.DataFrame]:
    """The three split tables as strings, exactly as they are written (no I/O besides reading)."""
    dialogues: dict[str, list[tuple[str, list[dict[str, str]]]]] = {split: [] for split in SPLITS}
    for session, session_dir in find_sessions(data_dir).items():
        folder = session_dir / "dialog" / "transcriptions"
        if not folder.is_dir():
            raise FileNotFoundError(f"{session_dir} has no dialog/transcriptions folder")
        for transcription in sorted(folder.glob("*.txt")):
            if transcription.name.startswith("."):
                continue  # macOS resource forks (`._Ses01F_impro01.txt`) in some copies
            rows = _dialogue_rows(session, session_dir, transcription)
            if rows:
                dialogues[split_of(session, transcription.stem)].append((transcription.stem, rows))
    frames = {}
    for split in SPLITS:
        records = []
        for dialogue_id, (_, rows) in enumerate(sorted(dialogues[split], key=lambda d: d[0])):
            for utterance_id, row in enumerate(rows):
                records.append({**row, "Dialogue_ID": str(dialogue_id), "Utterance_ID": str(utterance_id)})
        frames[split] = pd.DataFrame(records, columns=COLUMNS, dtype=str)
    return frames


def prepare_iemocap(data_dir: Path) -> dict[str, pd.DataFrame]:
    """Build and write ``data_dir/IEMOCAP_{split}.csv`` (atomically); return the tables."""
    data_dir = Path(data_dir)
    frames = build_frames(data_dir)
    remove_stale_temps(data_dir, list(IEMOCAP.csv_names.values()))  # left by a killed earlier run
    for split, frame in frames.items():
        with atomic_path(data_dir / IEMOCAP.csv_names[split]) as tmp:
            frame.to_csv(tmp, index=False, encoding="utf-8", lineterminator="\n")
    return frames


def summary(frames: dict[str, pd.DataFrame]) -> str:
    """Counts per split (utterances, dialogues, labels), missing dev dialogues, and the authors' note."""
    lines = []
    for split, frame in frames.items():
        labels = Counter(frame["Emotion"])
        counts = ", ".join(f"{label} {labels.get(label, 0)}" for label in IEMOCAP.labels)
        lines.append(
            f"{split}: {len(frame)} utterances, {frame['Dialogue_ID'].nunique()} dialogues ({counts})"
        )
    found = {name.rsplit("_", 1)[0] for name in frames["dev"]["Speaker"]}
    if DEV_DIALOGUES - found:
        lines.append(f"dev dialogues not in this release: {', '.join(sorted(DEV_DIALOGUES - found))}")
    lines.append(AUTHORS_NOTE)
    return "\n".join(lines)


DATA_HELP = "the unpacked IEMOCAP release; the CSVs are written here"


def main(argv: Sequence[str] | None = None) -> int:
    # Flags: the release folder (IEMOCAP's default); the CSVs are written into it
    args = cli.preparation_parser(IEMOCAP, HERE, __doc__, DATA_HELP).parse_args(argv)
    try:
        frames = prepare_iemocap(args.data_dir)
    except FileNotFoundError as exc:  # DataError is a UserError already
        raise utils.InputMissing(str(exc)) from exc
    for split in SPLITS:
        print(f"wrote {args.data_dir / IEMOCAP.csv_names[split]}")
    print(summary(frames))
    return 0


if __name__ == "__main__":
    utils.run(main)
