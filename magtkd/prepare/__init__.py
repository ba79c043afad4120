"""Data preparation: raw releases -> the CSVs every stage reads (SPEC section 1)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data import DataError
from ..recipes import SPLITS, DatasetSpec


def cli(spec: DatasetSpec, script_dir: Path, argv: Sequence[str] | None, description: str | None,
        data_help: str, prepare: Callable[[Path], Any], summary: Callable[[Path, Any], str]) -> int:
    """``python <DS>/preprocessing.py [--data_dir D]``: prepare, list the written CSVs, print counts."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=spec.default_data_dir(script_dir), help=data_help)
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        result = prepare(args.data_dir)
    except (FileNotFoundError, DataError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    for split in SPLITS:
        print(f"wrote {args.data_dir / spec.csv_names[split]}")
    print(summary(args.data_dir, result))
    return 0
