"""The README's demo figures are what the demo gives (docs/METHOD.md §0, "The README's figures"): its
generated block, rebuilt from the session's demo run, has the same table and kept-model figures. They depend
on the CPU's arithmetic, so on another machine kind this test tells that the README's figures are not this
machine's (`python docs/update_readme.py demo DIR` rewrites them)."""

from __future__ import annotations

import importlib.util

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


def test_the_readme_demo_figures_are_the_demo_run(demo):
    spec = importlib.util.spec_from_file_location("update_readme", REPO / "docs" / "update_readme.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _, table, kept, _ = tool.demo_run(str(demo["workdir"]))
    lines = tool.block(tool.README.read_text(encoding="utf-8"), "demo-results").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    quoted = lines[start:next(i for i in range(start, len(lines) + 1) if i == len(lines) or not lines[i].startswith("|"))]
    # Every column but the seconds (the machine's load), and the kept model's line
    assert [tool.figures(row) for row in quoted] == [tool.figures(row) for row in table] and len(table) == 4, \
        "run python docs/update_readme.py demo <a demo folder>"
    assert kept.startswith("Kept model") and kept in lines
