"""The scripts' ArgumentParser (docs/METHOD.md §0, §6 "Limits"): help that keeps the script docstring's layout
and shows each default once; after parsing, the resolved flags recorded and every path flag checked against the
filesystem before any work; and the parser a script builds, taken for the README's flag tables. Standard
library only, so ``--help`` starts at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from . import utils
from .utils import UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keep the script docstring's layout (it holds the exact command) and show each flag's default once:
    not when its help already says what the default is, and never as ``(default: None)``; a flag without
    a default says ``(required)``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.required:
            return f"{help_text} (required)"
        if action.default is None or "default" in help_text.lower() or action.default is argparse.SUPPRESS:
            return help_text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The scripts' parser: after parsing it records the resolved flags (`magtkd.utils.PARSED`, for the
    one-line out-of-memory message) and checks, before any work, every path flag against the filesystem
    (`check_path`): the outputs in ``outputs`` (flag -> the boolean flag that must be True for the script to
    write there, None: always) must be creatable and writable (docs/METHOD.md §6, "Limits")."""

    capture: list["Parser"] | None = None  # set by `parser_of`: stop at the parse and hand the parser over

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outputs: dict[str, str | None] = {}

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        if Parser.capture is not None:
            Parser.capture.append(self)
            raise _Captured
        parsed, extra = super().parse_known_args(args, namespace)
        flags = vars(parsed)
        utils.PARSED.clear()
        utils.PARSED.update(flags)
        for action in self._actions:
            value = flags.get(action.dest)
            if isinstance(value, Path):
                condition = self.outputs.get(action.dest, "")
                written = action.dest in self.outputs and (condition is None or flags.get(condition) is True)
                check_path(value, f"--{action.dest}", written, folder=action.dest != "out")
        return parsed, extra

    def error(self, message: str) -> NoReturn:
        """argparse's usage and error (exit status 2), printed once under torchrun (`magtkd.utils.speaks`)."""
        if not utils.speaks(f"{self.prog}: error: {message}"):
            sys.exit(2)
        super().error(message)

    def writes(self, *names: str, when: str | None = None) -> "Parser":
        """Declare the path flags ``names`` outputs (written when the flag ``when`` is True; None: always)."""
        self.outputs.update(dict.fromkeys(names, when))
        return self


class _Captured(Exception):
    """`parser_of`'s stop: the script built its parser and is about to parse."""


def parser_of(main: Callable[[Sequence[str] | None], Any]) -> Parser:
    """The parser a script's ``main`` builds, taken at its parse (nothing runs after it): the README's flag
    tables (`flag_table`)."""
    Parser.capture = []
    try:
        main([])
    except _Captured:
        return Parser.capture[-1]
    finally:
        Parser.capture = None
    raise TypeError(f"{main.__module__}.main parsed no flags with a magtkd.cli parser")


def check_path(path: Path, flag: str, written: bool, folder: bool = True) -> None:
    """Refuse, before any work, a path the filesystem cannot hold (a name longer than its NAME_MAX, the whole
    longer than its PATH_MAX) and, when the script ``written`` there, one it cannot create or write (a file
    in the way, a read-only or foreign folder); ``folder``: a folder, else a file (docs/METHOD.md §6)."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if os.path.exists(p))  # (Path.exists raises on a long name)
    anchor = existing if existing.is_dir() else existing.parent
    name_max, path_max = _limit(anchor, "PC_NAME_MAX", 255), _limit(anchor, "PC_PATH_MAX", 4096)
    for part in path.relative_to(existing).parts:
        if len(os.fsencode(part)) > name_max:
            raise UserError(f"{flag} {path}: the name {part[:24]}... is {len(os.fsencode(part))} bytes long; the "
                            f"filesystem of {anchor} allows {name_max}: choose a shorter name")
    if len(os.fsencode(str(path))) + 100 > path_max:  # room for the artifact names inside the folder
        raise UserError(f"{flag} {path}: the path is {len(os.fsencode(str(path)))} bytes long; the filesystem of "
                        f"{anchor} allows {path_max} for a whole path (with the file names inside): choose a "
                        "shorter one")
    if not written:
        return
    if existing != anchor and (folder or existing != path):  # a file where a folder must be
        raise UserError(f"{flag} {path}: {existing} is a file, where {flag} needs a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {'the folder' if existing == path else 'its nearest existing folder'} "
                        f"{anchor} is not writable (read-only or another user's): choose a folder you can write")


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default
