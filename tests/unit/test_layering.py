"""The library's layering (docs/METHOD.md §0, "The library's rooms"): the fusion model needs only torch, no
library module imports a dataset folder, and each room stays small enough to read."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from helpers import REPO

LIBRARY = sorted((REPO / "magtkd").rglob("*.py"))
HEAVY = ("av", "torchaudio", "transformers")


def test_the_fusion_model_loads_no_media_or_hugging_face_library():
    code = ("import sys, magtkd.model, magtkd.fusion_data, magtkd.checkpoints; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_no_library_module_imports_a_dataset_folder(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        assert not [n for n in names if n.split(".")[0] in ("IEMOCAP", "MELD")], f"{path}:{node.lineno}"
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "spec_from_file_location", "run_path"):
            assert "numpy" in ast.unparse(node), f"{path}:{node.lineno} loads a module by name: {ast.unparse(node)}"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    assert len(source.splitlines()) <= 500, f"{path} has {len(source.splitlines())} lines"
    assert ast.get_docstring(tree), f"{path} opens without a docstring saying its purpose"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{path}:{node.lineno} {node.name} has {length} lines"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_no_library_function_takes_the_argparse_namespace(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in node.args.args + node.args.kwonlyargs:
                annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                assert "Namespace" not in annotation, f"{path}:{node.lineno} {node.name}({arg.arg}: {annotation})"
                assert not (arg.arg == "args" and annotation in ("", "Any")), \
                    f"{path}:{node.lineno} {node.name} takes an untyped args"
