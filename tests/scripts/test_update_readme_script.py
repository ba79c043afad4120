"""Help that helps and a README that says what the code does (``docs/update_readme.py``; docs/METHOD.md §0):
every flag of every script has a help text and shows its default once, the README's flag tables are what
the parsers give, and the pipeline's environment variables are listed where a user looks."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys

import pytest

from helpers import REPO
from magtkd import cli, flag_parser


def docs_tool():
    """``docs/update_readme.py`` as a module (it is a script, not part of the library)."""
    spec = importlib.util.spec_from_file_location("update_readme", REPO / "docs" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = docs_tool()


def assert_helpful(where: str, parser: argparse.ArgumentParser) -> None:
    """Each flag: a help text that names its default exactly once (or says it is required)."""
    formatter = flag_parser.HelpFormatter(parser.prog)
    for action in parser._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:
            continue
        text = formatter._expand_help(action) if action.help else ""
        assert action.help, f"{where} {action.option_strings}: no help text"
        mentions = len(re.findall(r"\bdefault\b", text, re.I)) + text.count("(required)")
        assert mentions == 1, f"{where} {action.option_strings}: the default shown {mentions} times: {text!r}"


@pytest.mark.parametrize("script", TOOL.SCRIPTS)
def test_every_flag_of_every_script_has_a_help_text_and_one_default(script):
    for dataset, parser in TOOL.parsers(script).items():
        assert parser.formatter_class is flag_parser.HelpFormatter
        assert_helpful(f"{dataset}/{script}", parser)


def test_the_demo_and_the_data_generator_help_too(monkeypatch):
    from magtkd.synthetic import __main__ as generator, demo

    class Captured(Exception):
        pass

    def capture(self, args=None, namespace=None):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    for name, main in (("python -m magtkd.synthetic.demo", demo.main), ("python -m magtkd.synthetic", generator.main)):
        with pytest.raises(Captured) as got:
            main([])
        assert_helpful(name, got.value.args[0])


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_every_benchmark_flag_has_a_help_text_and_shows_its_default(path):
    """Read from the source (importing the benchmarks loads every heavy library): the help formatter that shows
    defaults, and each flag's help, which names the default itself or leaves it to the formatter."""
    source = path.read_text(encoding="utf-8")
    assert "formatter_class=HelpFormatter" in source
    for call in ast.walk(ast.parse(source)):
        if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "add_argument":
            keywords = {k.arg: k.value for k in call.keywords}
            flag = ast.literal_eval(call.args[0])
            assert "help" in keywords, f"{path.name} {flag}: no help text"
            text = ast.unparse(keywords["help"])
            if "SUPPRESS" in text:
                continue
            shown = "default" in text.lower() or keywords.get("action") is not None or \
                (ast.unparse(keywords.get("default", ast.Constant(None))) != "None") or \
                ast.unparse(keywords.get("required", ast.Constant(False))) == "True"  # shown as (required)
            assert shown and text.lower().count("default") <= 1, f"{path.name} {flag}: default not shown once"


def test_the_readme_flag_tables_are_what_the_parsers_give():
    readme = TOOL.README.read_text(encoding="utf-8")
    for name, body in TOOL.flag_blocks().items():
        found = TOOL.block(readme, name)
        assert found is not None, f"README.md has no <!-- {name} --> block"
        assert found.rstrip() == body.rstrip(), f"README.md <!-- {name} --> is stale: run python docs/update_readme.py flags"


def test_the_pipeline_environment_variables_are_listed_where_a_user_looks():
    shown = TOOL.parsers("pipeline.py")["IEMOCAP"].format_help()  # what bash IEMOCAP/run.sh --help prints
    places = {"run.sh --help": " ".join(shown.split()), "README.md": (REPO / "README.md").read_text()}
    for dataset in ("IEMOCAP", "MELD"):
        for name in ("run.sh", "pipeline.py"):
            places[f"{dataset}/{name}"] = (REPO / dataset / name).read_text(encoding="utf-8")
    for flag, variable in cli.PIPELINE_ENV.items():
        for where, text in places.items():
            assert re.search(rf"\b{variable}\b", text), f"{variable} is missing from {where}"
        assert f"{variable} (--{flag})" in places["run.sh --help"]


def test_readme_blocks_are_rewritten_in_place_between_their_markers(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- flags: KD.py -->\nold\n<!-- /flags -->\n\nafter\n", encoding="utf-8")
    monkeypatch.setattr(TOOL, "README", readme)
    monkeypatch.setattr(TOOL, "flag_blocks", lambda: {"flags: KD.py": "| new |"})
    assert TOOL.main(["flags", "--check"]) == 1
    assert TOOL.main(["flags"]) == 0 and TOOL.main(["flags", "--check"]) == 0
    assert readme.read_text(encoding="utf-8") == "# x\n\n<!-- flags: KD.py -->\n| new |\n<!-- /flags -->\n\nafter\n"
    assert sys.modules.get("update_readme") is None  # the tool stays a script, loaded by path
