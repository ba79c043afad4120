"""CSV files as people save them (`magtkd.csv_files`; docs/METHOD.md §6, "CSV files"): a record the reader
cannot split is one line naming the file and the line; the authors' and the official CSVs read as pandas
reads them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from helpers import REFERENCE
from magtkd.csv_files import decimal_point, read_csv_checked
from magtkd.utils import DataError


@pytest.mark.parametrize("body, message", [
    ("0,0,a,b\n", r"x.csv: line 2 has 4 cells separated by ',', the header has 3: put a cell that holds ',' in "
                  r"double quotes"),
    ('0,0,"Hi\n0,1,b\n', r"x.csv: line 2: a cell opens a double quote that is never closed"),
    ('0,0,"Hi" there\n', r"x.csv: line 2: a quoted cell goes on after its closing double quote; expected ','"),
])
def test_a_row_the_reader_cannot_split_is_one_line_naming_file_and_line(tmp_path: Path, body: str,
                                                                          message: str) -> None:
    path = tmp_path / "x.csv"
    path.write_text("Dialogue_ID,Utterance_ID,Utterance\n" + body, encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        read_csv_checked(path, ["Utterance"])
    assert "\n" not in str(err.value)
    (tmp_path / "y.csv").write_text("Dialogue_ID|Utterance_ID|Utterance\n0|0|a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"missing column 'Utterance' .*found Dialogue_ID\|Utterance_ID\|Utterance; "
                                        r"the header is one column: separate the cells by , ; or tab"):
        read_csv_checked(tmp_path / "y.csv", ["Utterance"])


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="needs ../shared/reference")
def test_the_authors_and_official_csvs_read_as_pandas_reads_them() -> None:
    for path in sorted(REFERENCE.rglob("*.csv")):
        expected = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        pd.testing.assert_frame_equal(read_csv_checked(path, ["Utterance"]), expected)


def test_decimal_commas_only_where_a_number_has_one():
    assert [decimal_point(v) for v in ("12,40", " 3,5 ", "12.40", "1,234,5", "a,b")] == \
        ["12.40", " 3.5 ", "12.40", "1,234,5", "a,b"]
