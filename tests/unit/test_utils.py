"""Running a stage's main (`magtkd.utils.run`; docs/METHOD.md §6): user errors, Ctrl-C and bugs."""

from __future__ import annotations

import pytest

from magtkd import utils
from magtkd.utils import DataError


def test_ctrl_c_in_a_stage_is_one_line_and_exit_130(capsys):
    def main(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        utils.run(main, [])
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted: unit/test_utils.py stopped")
    assert "Run it again to restart cleanly" in err


def test_unexpected_failures_keep_their_traceback():
    def broken(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        utils.run(broken, [])

    def user(argv):
        raise DataError("x.csv: row 3: bad")

    with pytest.raises(SystemExit) as exit_:
        utils.run(user, [])
    assert exit_.value.code == 2
    with pytest.raises(DataError):
        utils.run(user, ["--debug"])
