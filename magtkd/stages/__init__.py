"""Stage entry points; the per-dataset scripts in IEMOCAP/ and MELD/ call these."""

from pathlib import Path
from typing import Any, Callable, Sequence

from ..recipes import RECIPES


def entry(run: Callable[..., Any], dataset: str, script: str, doc: str | None, *lead: Any
          ) -> Callable[[Sequence[str] | None], Any]:
    """``main(argv=None)`` of a dataset script: ``run(*lead, spec, script_dir, argv, doc)``.

    Keeps the per-dataset scripts to a docstring and one call, so nothing is
    duplicated between ``IEMOCAP/`` and ``MELD/``.
    """
    spec, script_dir = RECIPES[dataset], Path(script).resolve().parent

    def main(argv: Sequence[str] | None = None) -> Any:
        return run(*lead, spec, script_dir, argv, doc)

    return main
