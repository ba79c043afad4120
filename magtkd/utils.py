"""Errors the user can fix, the stage scripts' entry point, and the flag types (docs/METHOD.md §0, §6).

The ground floor of the library: it imports nothing but the standard library, so every
module (and every script's ``--help``) can use it without loading torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a CSV row, a checkpoint that does not fit).

    `run` prints its message as one line and exits with status 2 (no traceback
    unless ``--debug``); the message names the flag/file/row/key and what to do.
    The library's own error types (DataError, FeatureFileError, CheckpointError,
    ...) derive from it.
    """

    status = 2  # the exit status `run` ends with (the pipeline passes on a stage's own)


class InputMissing(UserError, FileNotFoundError):
    """An input file or folder that does not exist; the message says which stage writes it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line `run` prints for it (the pipeline names the stage that was running)."""


class DataError(UserError, ValueError):
    """Bad content in a data file; the message names the file, row/column/key and what was expected."""


class FeatureFileError(UserError, ValueError):
    """A stored frame file or feature pickle that is unsafe, malformed, or does not follow the
    docs/METHOD.md §4 layout."""


StageMain = Callable[[Sequence[str] | None], Any]  # a stage script's main(argv): what `run` runs


# Set by the pipeline for its stage processes: on Ctrl-C the pipeline prints the one line, not each stage.
QUIET_INTERRUPT = "MAGTKD_QUIET_INTERRUPT"


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """The stage scripts' entry point: ``if __name__ == "__main__": utils.run(main)``.

    A `UserError` becomes one line on stderr and exit status 2 (its ``status``); with ``--debug``
    on the command line it keeps its traceback. Ctrl-C becomes one line naming the script and exit
    status 130 (docs/METHOD.md §6). Anything else is unexpected and keeps its traceback.
    ``main(argv)`` called directly (tests) raises as usual.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        main(argv)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.status)
    except KeyboardInterrupt as err:
        if debug:
            raise
        if not os.environ.get(QUIET_INTERRUPT):
            print(f"interrupted: {err if isinstance(err, Interrupted) else interrupted_line(main)}",
                  file=sys.stderr)
        sys.exit(130)


def interrupted_line(main: Callable[..., Any]) -> str:
    """What Ctrl-C in a stage script means for its outputs (every stage publishes its set at its end)."""
    script = Path(main.__code__.co_filename)
    name = f"{script.parent.name}/{script.name}"
    return (f"{name} stopped before publishing its outputs; the previous complete ones (if any) are kept. "
            f"Run it again to restart cleanly (training stages: add --resume True to continue from the last "
            f"completed epoch)")



# --------------------------------------------------------------------------- flag types


def _checked_number(kind: type, low: float, inclusive: bool, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= low if inclusive else value > low) or value != value:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


# Flag types that refuse values which would silently do nothing (``--epochs 0``) or fail deep
# inside torch (``--batch_size 0``, ``--learning_rate -1``): the error names the flag.
positive_int = _checked_number(int, 1, True, "an integer >= 1")


nonnegative_int = _checked_number(int, 0, True, "an integer >= 0")


positive_float = _checked_number(float, 0.0, False, "a number > 0")


nonnegative_float = _checked_number(float, 0.0, True, "a number >= 0")


def probability(text: str) -> float:
    """A dropout rate in [0, 1): 1 drops everything and scales by 1/(1-p) = inf (a NaN loss)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


SEED_MAX = 2**32 - 1  # numpy.random.seed accepts 0 .. 2**32 - 1 (set_seed seeds numpy with it)


def seed_int(text: str) -> int:
    """A seed numpy accepts (0 .. 2**32 - 1): `set_seed` would fail on anything else after the data is read."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{SEED_MAX} (numpy's seed range), got {text!r}")
    return value


def str2bool(value: str | bool) -> bool:
    """Parse ``--train False`` properly (the reference's ``type=bool`` made any value True)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes", "y", "t"}:
        return True
    if lowered in {"false", "0", "no", "n", "f"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")
