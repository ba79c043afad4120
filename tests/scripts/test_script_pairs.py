"""Each stage script exists once per dataset (``IEMOCAP/<name>.py``, ``MELD/<name>.py``) and the two copies are
the same code: they differ only in the dataset they name and in the per-dataset values they declare at their
top (docs/METHOD.md §0). So a test of one copy is a test of both, and a change to one copy that is not made to
the other fails here.

Compared: the syntax trees without the module docstring, with the dataset's name replaced by a placeholder
everywhere (names, imports, strings, docstrings of functions), and with the VALUES of the declared per-dataset
constants left out (`DECLARED`; their names and places are compared). Not compared: ``config.py`` (it is the
dataset's description: labels, splits, speakers) and ``preprocessing.py`` (the raw releases differ in format:
IEMOCAP's transcription and evaluation files against MELD's official CSVs); both are tested on their own.
"""

from __future__ import annotations

import ast
import difflib

import pytest

from helpers import REPO

DATASETS = ("IEMOCAP", "MELD")
# The per-dataset values a stage script may declare: stage defaults (learning rates, fusion weights and
# feature keys), KD's loss weights, predict.py's unknown-speaker rule, the preparation's --data_dir help.
DECLARED = frozenset({"DEFAULTS", "KD_WEIGHTS", "UNKNOWN_SPEAKERS", "DATA_HELP"})
DATASET_SPECIFIC = {"config.py": "the dataset's description", "preprocessing.py": "the raw releases' formats"}
PLACEHOLDER = "<DATASET>"


def scripts(dataset: str) -> set[str]:
    return {p.name for p in (REPO / dataset).iterdir() if p.suffix in (".py", ".sh")}


PAIRED = sorted(scripts("IEMOCAP") - set(DATASET_SPECIFIC))


class Anonymise(ast.NodeTransformer):
    """The dataset's name replaced by `PLACEHOLDER` wherever the source can spell it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _text(self, text):
        return text.replace(self.name, PLACEHOLDER) if isinstance(text, str) else text

    def visit_Constant(self, node):
        return ast.copy_location(ast.Constant(self._text(node.value)), node)

    def visit_Name(self, node):
        node.id = self._text(node.id)
        return node

    def visit_Attribute(self, node):
        self.generic_visit(node)
        node.attr = self._text(node.attr)
        return node

    def visit_alias(self, node):
        node.name, node.asname = self._text(node.name), self._text(node.asname)
        return node

    def visit_ImportFrom(self, node):
        self.generic_visit(node)
        node.module = self._text(node.module)
        return node

    def visit_FunctionDef(self, node):
        self.generic_visit(node)
        node.name = self._text(node.name)
        return node

    def visit_arg(self, node):
        node.arg = self._text(node.arg)
        return node


def normalised(dataset: str, name: str) -> tuple[ast.Module, dict[str, str]]:
    """The script's tree as compared, and the declared constants' values (source text) it left out."""
    tree = ast.parse((REPO / dataset / name).read_text(encoding="utf-8"))
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the module docstring: it describes this dataset's stage in words
    declared = {}
    for node in body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in DECLARED:
            declared[node.targets[0].id] = ast.unparse(node.value)
            node.value = ast.Constant("<declared per dataset>")
    tree.body = body
    return ast.fix_missing_locations(Anonymise(dataset).visit(tree)), declared


def test_both_datasets_have_the_same_scripts():
    assert scripts("IEMOCAP") == scripts("MELD")
    assert set(DATASET_SPECIFIC) <= scripts("IEMOCAP")
    assert {"text.py", "audio.py", "video_feature_extract.py", "video.py", "KD.py", "extract_first_stage_features.py",
            "multimodal_fusion.py", "predict.py", "ablation.py", "pipeline.py", "run.sh"} <= set(PAIRED)


@pytest.mark.parametrize("name", [n for n in PAIRED if n.endswith(".py")])
def test_the_two_copies_differ_only_in_the_dataset_and_its_declared_values(name):
    (iemocap, iemocap_values), (meld, meld_values) = (normalised(dataset, name) for dataset in DATASETS)
    if ast.dump(iemocap) != ast.dump(meld):
        diff = difflib.unified_diff(ast.unparse(iemocap).splitlines(), ast.unparse(meld).splitlines(),
                                    f"IEMOCAP/{name}", f"MELD/{name}", lineterm="", n=1)
        pytest.fail(f"IEMOCAP/{name} and MELD/{name} differ beyond the dataset's name and its declared values:\n"
                    + "\n".join(diff))
    assert set(iemocap_values) == set(meld_values)  # declared by both copies, in the same place


def test_the_declared_values_are_the_documented_per_dataset_defaults():
    """What the pair test leaves out is what the copies are meant to differ in (docs/METHOD.md §2, §3, §5)."""
    values = {dataset: {name: normalised(dataset, name)[1] for name in PAIRED if name.endswith(".py")}
              for dataset in DATASETS}
    differing = {(name, key) for name in values["IEMOCAP"] for key in values["IEMOCAP"][name]
                 if values["IEMOCAP"][name][key] != values["MELD"][name][key]}
    assert differing == {("audio.py", "DEFAULTS"), ("KD.py", "KD_WEIGHTS"), ("multimodal_fusion.py", "DEFAULTS"),
                         ("predict.py", "UNKNOWN_SPEAKERS")}


def test_the_two_run_sh_differ_only_in_the_dataset():
    texts = {dataset: (REPO / dataset / "run.sh").read_text(encoding="utf-8").replace(dataset, PLACEHOLDER)
             for dataset in DATASETS}
    assert texts["IEMOCAP"] == texts["MELD"]
