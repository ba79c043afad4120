"""CSV files as people save them: the encodings (UTF-8 with or without a BOM, UTF-16, a spreadsheet's
cp1252), the separators (``,`` ``;`` tab) and double-quoted cells, read as strings; a record that cannot be
split is one error naming the file and the line (docs/METHOD.md §1, §6, "CSV files").

Every CSV the project reads (the split CSVs, MELD's official ones, a user's conversation) comes through
`read_csv_checked`.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from .utils import DataError

log = logging.getLogger("magtkd")


# The separators a CSV may use: a spreadsheet saves ';' where the decimal mark is a comma (Excel in
# European locales) and tab in its "Unicode text" export (docs/METHOD.md §6, "CSV files").
SEPARATORS = (",", ";", "\t")
_SEPARATOR_NAMES = {",": "','", ";": "';'", "\t": "tab"}
_DECIMAL_COMMA = re.compile(r"\s*[+-]?\d+,\d+\s*")


def read_csv_checked(path: str | Path, required_columns: Iterable[str]) -> pd.DataFrame:
    """Read a CSV as strings (no number/NaN parsing) and check it has ``required_columns``.

    Texts must stay byte-exact (docs/METHOD.md §1), so every cell is read as ``str``
    and empty cells stay ``""``. UTF-8 is expected (a BOM is tolerated; UTF-16 with a BOM,
    a spreadsheet's "Unicode text", too); CSVs re-saved by a spreadsheet program in cp1252
    are read with a warning. The separator is the one of ``,`` ``;`` tab under which the
    header names the required columns (`SEPARATORS`); cells may be quoted in double quotes
    (``""`` inside them is one quote); the frame's ``attrs["separator"]`` records it. A row
    the parser cannot split is one error naming the file and the line (docs/METHOD.md §6).
    """
    path, required = Path(path), list(required_columns)
    text = _decoded(path)
    separator = _separator(text, required)
    rows = _rows(path, text, separator)
    if not rows:
        raise DataError(f"{path}: empty file (no header row; expected columns {', '.join(required)})")
    header = [cell.strip() for cell in rows[0][1]]
    frame = pd.DataFrame([cells for _, cells in rows[1:]], columns=header, dtype=str)
    frame.attrs["separator"] = separator
    for column in required:
        if column not in frame.columns:
            hint = "" if len(header) > 1 else "; the header is one column: separate the cells by , ; or tab"
            raise DataError(f"{path}: missing column {column!r} (expected columns include {', '.join(required)}; "
                            f"found {', '.join(header)}{hint})")
    return frame


def _rows(path: Path, text: str, separator: str) -> list[tuple[int, list[str]]]:
    """``(line, cells)`` of each record, every record as long as the header: a short one (a spreadsheet
    leaves out empty cells at a row's end) padded with ``""``; a longer one is an error naming its line
    unless its extra cells are empty. Records of empty cells after the last data row are dropped."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator, quotechar='"', doublequote=True,
                        strict=True)
    rows: list[tuple[int, list[str]]] = []
    name = _SEPARATOR_NAMES[separator]
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(_parse_problem(path, line, name, str(exc))) from None
        width = len(rows[0][1]) if rows else len(cells)
        if len(cells) > width and any(cells[width:]):
            raise DataError(f"{path}: line {line} has {len(cells)} cells separated by {name}, the header has "
                            f"{width}: put a cell that holds {name} in double quotes (a quote inside it doubled: \"\")")
        if cells:  # a blank line is no record
            rows.append((line, cells[:width] + [""] * (width - len(cells))))
    while len(rows) > 1 and not any(rows[-1][1]):
        rows.pop()
    return rows


def _parse_problem(path: Path, line: int, separator: str, message: str) -> str:
    """The csv module's complaint about the record starting at ``line`` as one line saying what was expected."""
    if "unexpected end of data" in message:
        return (f"{path}: line {line}: a cell opens a double quote that is never closed; quotes in a cell come in "
                f"pairs (\"\" for a quote inside a quoted cell)")
    if "expected after" in message:
        return (f"{path}: line {line}: a quoted cell goes on after its closing double quote; expected {separator} "
                f"or the line's end there (a quote inside a quoted cell is written \"\")")
    return f"{path}: line {line}: not a CSV record with {separator} between cells ({message})"


def _decoded(path: Path) -> str:
    """The file's text: UTF-16 when it starts with its BOM, else UTF-8 (BOM dropped), else cp1252 (warned)."""
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; reading it as cp1252", path)
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: neither UTF-8 nor cp1252 text ({exc})") from None


def _separator(text: str, required: Sequence[str]) -> str:
    """The separator under which the header line names the most ``required`` columns (``,`` on a tie);
    without any, the one `csv.Sniffer` finds in the first lines, else ``,``."""
    header = text.split("\n", 1)[0].rstrip("\r")
    found = {sep: len(set(required) & {cell.strip() for cell in next(csv.reader([header], delimiter=sep), [])})
             for sep in SEPARATORS}
    best = max(SEPARATORS, key=lambda sep: found[sep])
    if found[best]:
        return best
    try:
        return csv.Sniffer().sniff(text[:65536], delimiters="".join(SEPARATORS)).delimiter
    except csv.Error:
        return ","


def decimal_point(value: str) -> str:
    """A number cell with a decimal comma (``12,40``: a ';'-separated export in a locale whose decimal mark is
    a comma) with a decimal point instead; any other text as it is."""
    return value.replace(",", ".") if _DECIMAL_COMMA.fullmatch(value) else value
