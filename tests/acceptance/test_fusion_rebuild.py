"""One rebuild of a trained fusion model (docs/METHOD.md §5; `magtkd.checkpoints.trained_fusion`): a model
trained with non-default settings evaluates with a bare ``--train False`` and through ``predict.py`` to
its own predictions, a contradicting flag names both values, and the evaluation loads no media or
Hugging Face library."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from helpers import REPO, dataset_spec, script, stage_paths
from magtkd.artifacts import FIRST_STAGE_MODELS, StageFiles
from magtkd.utils import UserError

TRAINED = ["--n_head", "4", "--audio_feature", "audio", "--epochs", "3", "--lr", "1e-3", "--batch_size", "2",
           "--dropout", "0.1", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """The demo's IEMOCAP first-stage models and features, and a fusion model trained on them with
    ``--n_head 4 --audio_feature audio`` (neither the default) into a save folder of its own."""
    paths = stage_paths(demo["workdir"], "IEMOCAP")
    save = tmp_path_factory.mktemp("rebuild") / "save_model"
    save.mkdir()
    for name, _ in FIRST_STAGE_MODELS.values():
        for suffix in (".bin", ".json"):
            shutil.copy2(paths["save_dir"] / f"{name}{suffix}", save / f"{name}{suffix}")
    script("IEMOCAP", "multimodal_fusion").main(["--feature_dir", str(paths["feature_dir"]), "--save_dir",
                                                 str(save), *TRAINED])
    files = StageFiles.fusion(save)
    return {"paths": {**paths, "save_dir": save}, "files": files,
            "preds": json.loads(files.predictions.read_text())["preds"]}


@pytest.mark.slow
def test_bare_train_false_rebuilds_the_trained_model(trained):
    paths = trained["paths"]
    record = json.loads(trained["files"].metrics.read_text())
    assert record["args"]["n_head"] == 4 and record["args"]["audio_feature"] == "audio"
    evaluated = script("IEMOCAP", "multimodal_fusion").main([
        "--feature_dir", str(paths["feature_dir"]), "--save_dir", str(paths["save_dir"]), "--train", "False",
        "--device", "cpu"])
    assert evaluated["preds"] == trained["preds"]


@pytest.mark.slow
def test_a_flag_that_contradicts_the_record_names_both(trained):
    paths = trained["paths"]
    argv = ["--feature_dir", str(paths["feature_dir"]), "--save_dir", str(paths["save_dir"]), "--train", "False"]
    with pytest.raises(UserError, match=r"--n_head 8 but checkpoint .*multimodal_fusion_best.bin "
                                        r"\(multimodal_fusion_metrics.json\) was trained with --n_head 4"):
        script("IEMOCAP", "multimodal_fusion").main([*argv, "--n_head", "8"])
    with pytest.raises(UserError, match=r"--audio_feature audio_kd but .* was trained with --audio_feature audio"):
        script("IEMOCAP", "multimodal_fusion").main([*argv, "--audio_feature", "audio_kd"])


@pytest.mark.slow
def test_predict_rebuilds_it_the_same_way(trained, tmp_path):
    paths = trained["paths"]
    conversation = paths["data_dir"] / dataset_spec("IEMOCAP").csv_names["test"]
    out = tmp_path / "predictions.csv"
    script("IEMOCAP", "predict").main(["--conversation", str(conversation), "--out", str(out),
                                       "--data_dir", str(paths["data_dir"]), "--pretrained_dir",
                                       str(paths["pretrained_dir"]), "--save_dir", str(paths["save_dir"]),
                                       "--feature_dir", str(tmp_path / "feature"), "--device", "cpu"])
    labels = dataset_spec("IEMOCAP").labels
    # The prepared test CSV lists its dialogues' utterances together: file order is the pickle's order.
    assert pd.read_csv(out)["emotion"].tolist() == [labels[p] for p in trained["preds"]]


@pytest.mark.slow
def test_evaluation_only_loads_no_media_or_hugging_face_library(trained):
    paths = trained["paths"]
    code = ("import runpy, sys; sys.argv = ['multimodal_fusion.py'] + sys.argv[1:]; "
            "exec('try:\\n runpy.run_path(sys.argv[0], run_name=\"__main__\")\\nexcept SystemExit as e:\\n "
            "assert not e.code, e.code'); "
            "print('LOADED', [m for m in ('av', 'torchaudio', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code, "--feature_dir", str(paths["feature_dir"]), "--save_dir",
                           str(paths["save_dir"]), "--train", "False", "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO / "IEMOCAP", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "LOADED []"
