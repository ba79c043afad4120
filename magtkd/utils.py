"""Errors the user can fix, the stage scripts' entry point, and the flag types (docs/METHOD.md §0, §6).

The ground floor of the library: it imports nothing but the standard library, so every
module (and every script's ``--help``) can use it without loading torch.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn, Sequence


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


class NonFiniteError(UserError, FloatingPointError):
    """A training loss or evaluation logits that are NaN or infinite: the run stops before publishing."""


class FeatureFileError(UserError, ValueError):
    """A stored frame file or feature pickle that is unsafe, malformed, or does not follow the
    docs/METHOD.md §4 layout."""


StageMain = Callable[[Sequence[str] | None], Any]  # a stage script's main(argv): what `run` runs


# Set by the pipeline for its stage processes: on Ctrl-C the pipeline prints the one line, not each stage.
QUIET_INTERRUPT = "MAGTKD_QUIET_INTERRUPT"


# The flags the script's parser resolved last (`magtkd.cli` records them): the knobs `limit_line` names.
PARSED: dict[str, Any] = {}


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """The stage scripts' entry point: ``if __name__ == "__main__": utils.run(main)``.

    A `UserError` becomes one line on stderr and exit status 2 (its ``status``); so do the machine's limits
    (`limit_line`: out of memory, a full disk, a read-only folder). With ``--debug`` on the command line
    they keep their traceback. Ctrl-C becomes one line naming the script and exit status 130
    (docs/METHOD.md §6). Under torchrun the line is printed once, not by every process (`speaks`).
    Anything else is unexpected and keeps its traceback. ``main(argv)`` called directly (tests) raises as usual.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        main(argv)
    except UserError as err:
        if debug:
            raise
        refuse(f"error: {err}", err.status)
    except KeyboardInterrupt as err:
        if debug:
            raise
        if not os.environ.get(QUIET_INTERRUPT):
            refuse(f"interrupted: {err if isinstance(err, Interrupted) else interrupted_line(main)}", 130)
        sys.exit(130)
    except (MemoryError, RuntimeError, OSError) as err:
        line = None if debug else limit_line(err, script_name(main), PARSED)
        if line is None:
            raise
        refuse(f"error: {line}", 2)


def refuse(line: str, status: int) -> NoReturn:
    """Print ``line`` as one line (`plain_text`; once under torchrun, `speaks`) and exit with ``status``."""
    line = plain_text(line)
    if speaks(line):
        print(line if os.environ.get("RANK", "0") == "0" else f"[rank {os.environ['RANK']}] {line}", file=sys.stderr)
    sys.exit(status)


# How long another torchrun process waits for rank 0 to print the same line before it prints its own.
RANK0_WAIT_S = 2.0


def speaks(line: str) -> bool:
    """Whether this process prints ``line``: always without torchrun; under torchrun rank 0 does (and leaves a
    mark in the temp folder), another rank only when rank 0 has not printed the same line within
    `RANK0_WAIT_S` (its own problem, e.g. the shard it reads): every process meets the same refusal, and one
    line is enough (docs/METHOD.md §6). torchrun stops the other processes once one has failed."""
    rank = os.environ.get("RANK")
    if rank is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    run_id = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}-{os.getppid()}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '')}"
    mark = Path(tempfile.gettempdir()) / f"magtkd-said-{hashlib.sha1(f'{run_id} {line}'.encode()).hexdigest()[:20]}"
    if rank == "0":
        with contextlib.suppress(OSError):
            mark.touch()
        return True
    deadline = time.monotonic() + RANK0_WAIT_S
    while time.monotonic() < deadline and not mark.exists():
        time.sleep(0.05)
    return not mark.exists()


_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")  # colours, cursor moves, titles
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")


def plain_text(text: str) -> str:
    """``text`` as one printable line: terminal escape sequences (torch's messages carry colours) removed,
    line breaks and other control characters turned into spaces."""
    return _CONTROLS.sub(" ", _ESCAPES.sub("", text)).strip()


def script_name(main: Callable[..., Any]) -> str:
    """``<folder>/<file>`` of the script whose ``main`` this is (``IEMOCAP/text.py``)."""
    script = Path(main.__code__.co_filename)
    return f"{script.parent.name}/{script.name}"


def interrupted_line(main: Callable[..., Any]) -> str:
    """What Ctrl-C in a stage script means for its outputs (every stage publishes its set at its end)."""
    return (f"{script_name(main)} stopped before publishing its outputs; the previous complete ones (if any) are "
            f"kept. Run it again to restart cleanly (training stages: add --resume True to continue from the last "
            f"completed epoch)")


# OSError numbers that are the machine's limits, not bugs: one line naming the file (docs/METHOD.md §6).
LIMIT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENAMETOOLONG)


def out_of_memory(err: BaseException) -> bool:
    """CPU (``MemoryError``, torch's allocator) or CUDA (``torch.OutOfMemoryError``) out of memory, told
    apart by name so that this module needs no torch."""
    text = str(err)
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or (isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text
                                                   or "CUBLAS_STATUS_ALLOC_FAILED" in text
                                                   # a loader worker the kernel's out-of-memory killer ended
                                                   or ("DataLoader worker" in text and "signal: Killed" in text))))


def limit_line(err: BaseException, script: str, flags: Mapping[str, Any]) -> str | None:
    """One line for an error that is a limit of the machine (`out_of_memory`, `LIMIT_ERRNOS`), naming the
    script, what ran out and the flags that help (those ``flags`` has); None for any other error."""
    cause = plain_text(str(err).splitlines()[0] if str(err) else type(err).__name__)[:200]
    if out_of_memory(err):
        where = "CUDA" if type(err).__name__ == "OutOfMemoryError" or "CUDA" in str(err) else "CPU"
        batch = flags.get("batch_size")
        return (f"{script} ran out of {where} memory"
                + (f" at --batch_size {batch} (per process)" if batch is not None else "")
                + f" ({cause}); {memory_knobs(flags)}. The previous complete outputs are kept")
    if isinstance(err, OSError) and err.errno in LIMIT_ERRNOS:
        where = f" ({err.filename})" if err.filename else ""
        return (f"{script}: {os.strerror(err.errno)}{where}: free space or choose writable folders with short names "
                "(--save_dir, --feature_dir); the previous complete outputs are kept")
    return None


def memory_knobs(flags: Mapping[str, Any]) -> str:
    """The flags of this script that lower the memory a batch needs, with values to try."""
    batch, accum = flags.get("batch_size"), flags.get("grad_accum")
    knobs = []
    if isinstance(batch, int) and batch > 1:
        knobs.append(f"a smaller --batch_size (e.g. {batch // 2}"
                     + (f" with --grad_accum {2 * accum}, the same update)" if isinstance(accum, int) else ")"))
    if flags.get("grad_checkpointing") is False:
        knobs.append("--grad_checkpointing True (recomputes activations in backward)")
    if flags.get("amp") is False:
        knobs.append("--amp True (bf16 on CUDA)")
    if flags.get("num_workers"):
        knobs.append("fewer --num_workers")
    return "try " + ", ".join(knobs) if knobs else "free memory on the machine or use a larger one"



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
