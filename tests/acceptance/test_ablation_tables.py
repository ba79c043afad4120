"""``<DS>/ablation.py`` on the demo's checkpoints (docs/METHOD.md §5, Ablation tables): the components
and kd tables, and the prompt table through text.py, the extraction and the fusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import copy_checkpoints, dataset_spec, flags, script, stage_paths
from magtkd import ablation
from magtkd.artifacts import feature_path
from magtkd.pickles import load_features
from magtkd.pretrained import text_prompt


@pytest.mark.slow
@pytest.mark.parametrize("table", ["components", "kd"])
def test_tables_on_the_demo(demo: dict, tmp_path: Path, table: str):
    paths = copy_checkpoints(stage_paths(demo["workdir"], "IEMOCAP"), tmp_path, *(
        f"{n}{s}" for n in ("text", "audio", "video", "text_KD_audio", "text_KD_video") for s in (".bin", ".json")))
    argv = ["--table", table, "--seeds", "1", "2", *flags(paths), "--device", "cpu"]
    if table == "components":
        argv += ["--epochs", "2", "--lr", "1e-3", "--batch_size", "2"]
    doc = script("IEMOCAP", "ablation").main(argv)
    keys = [v["key"] for v in doc["variants"]]
    assert keys == ([v.key for v in ablation.ablation_variants(table, dataset_spec("IEMOCAP"))])
    assert (tmp_path / "save_model" / "ablation" / f"{table}.md").is_file()
    if table == "kd":  # the demo trained one first-stage model per name: one row each, its recorded seed
        for row in doc["variants"]:
            assert len(row["seeds"]) == 1 and row["test_weighted_f1_std"] == 0.0
        audio_kd = next(r for r in doc["variants"] if r["key"] == "audio_kd")
        assert audio_kd["reference"] == "audio" and "p_value" in audio_kd


@pytest.mark.slow
def test_prompt_table_on_the_demo(demo: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two of the prompt rows end to end: the prompt goes to text.py (and its record to the extraction), never
    to the fusion; the text flags are part of a variant's setting."""
    monkeypatch.setattr(ablation, "PROMPTS", ("full", "no_speakers"))
    calls: list[tuple[str, list[str]]] = []
    real_stage = ablation.Ablation.stage
    monkeypatch.setattr(ablation.Ablation, "stage", lambda run, spec, name, argv: calls.append((name, argv))
                        or real_stage(run, spec, name, argv))
    paths = copy_checkpoints(stage_paths(demo["workdir"], "IEMOCAP"), tmp_path, *(
        f"{n}{s}" for n in ("audio", "video", "text_KD_audio", "text_KD_video") for s in (".bin", ".json")))
    argv = ["--table", "prompt", "--seeds", "1", *flags(paths), "--device", "cpu", "--text_args", "--epochs 1",
            "--epochs", "2", "--lr", "1e-3", "--batch_size", "2"]
    doc = script("IEMOCAP", "ablation").main(argv)
    assert [v["key"] for v in doc["variants"]] == ["full", "no_speakers"]
    assert [name for name, _ in calls] == ["text.py", "extract_first_stage_features.py", "multimodal_fusion.py"] * 2
    assert calls[3][1][:2] == ["--prompt", "no_speakers"]
    assert not any("--prompt" in a for name, a in calls if name != "text.py")
    folder = tmp_path / "save_model" / "ablation" / "prompt" / "no_speakers"
    assert text_prompt(folder / "save_model" / "text.json", None) == "no_speakers"
    features = load_features(feature_path(folder / "feature", "test"))
    reference = load_features(feature_path(folder.parent / "full" / "feature", "test"))
    vid = next(iter(features["text"]))
    assert not np.array_equal(features["text"][vid], reference["text"][vid])  # another text model
    assert np.array_equal(features["audio"][vid], reference["audio"][vid])  # the pipeline's audio model
    no_speakers = next(r for r in doc["variants"] if r["key"] == "no_speakers")
    assert no_speakers["reference"] == "full" and 0 < no_speakers["p_value"] <= 1
    assert no_speakers["argv"][:2] == ["--epochs", "2"]
    assert no_speakers["text_argv"] == ["--prompt", "no_speakers", "--epochs", "1"]
    assert "| prompt no_speakers | 1 |" in (tmp_path / "save_model" / "ablation" / "prompt.md").read_text()
    setting = json.loads((folder / ablation.ABLATION_RECORD).read_text())["setting"]
    assert setting["text_argv"] == ["--prompt", "no_speakers", "--epochs", "1"]  # changed: the row re-runs
    calls.clear()
    script("IEMOCAP", "ablation").main(argv)
    assert calls == []  # both rows finished with this setting
