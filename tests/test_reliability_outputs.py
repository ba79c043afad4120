"""Reliability (issue 24): failed writes (disk full, read-only folder) are one line naming the file and
the cause and leave no temp file; Ctrl-C is one line and exit 130; the pipeline re-runs a stage whose
recorded arguments differ; wrong or incomplete pretrained folders are refused (docs/METHOD.md §6)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, script
from magtkd import artifacts, pipeline, pretrained, utils
from magtkd.artifacts import StageFiles, WriteError, finish_outputs
from test_reliability_numbers import fusion, make_features


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "64k") -> Path:
    """A tiny tmpfs at ``folder`` (needs root); the test is skipped where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


# --------------------------------------------------------------------------- failed writes

def test_disk_full_during_torch_save_is_one_line_and_leaves_no_temp(tmp_path):
    with tmpfs(tmp_path / "small") as folder:
        (folder / "text.bin").write_bytes(b"previous")
        with pytest.raises(WriteError, match=r"cannot write .*text.bin: No space left on device"):
            artifacts.save_state_dict(folder / "text.bin", torch.nn.Linear(200, 200))
        assert sorted(os.listdir(folder)) == ["text.bin"]
        assert (folder / "text.bin").read_bytes() == b"previous"


def test_disk_full_during_a_text_write_is_one_line(tmp_path):
    with tmpfs(tmp_path / "small") as folder:
        with pytest.raises(WriteError, match=r"cannot write .*big.json: No space left on device"):
            artifacts.write_json(folder / "big.json", {"x": "y" * 200_000})
        assert os.listdir(folder) == []


def test_read_only_folder_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro") as folder:
        remount_read_only(folder)
        with pytest.raises(WriteError, match=r"cannot write .*a.json: Read-only file system \(the folder .* is not "
                                             r"writable"):
            artifacts.write_json(folder / "a.json", {})


@pytest.mark.slow
def test_fusion_evaluation_into_a_read_only_save_dir_is_one_line_with_status_2(tmp_path, capsys):
    features, save = make_features(tmp_path / "feature"), tmp_path / "save"
    fusion(features, save, "--epochs", "1")
    with tmpfs(tmp_path / "ro", size="16m") as folder:
        for path in save.iterdir():
            shutil.copy2(path, folder / path.name)
        remount_read_only(folder)
        argv = ["--feature_dir", str(features), "--save_dir", str(folder), "--device", "cpu", "--train", "False"]
        with pytest.raises(SystemExit) as exit_:
            utils.run(script("IEMOCAP", "multimodal_fusion").main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write ") and "multimodal_fusion_best.json: Read-only file system" in err[-1]
    assert "Traceback" not in "\n".join(err)


# --------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_in_a_stage_is_one_line_and_exit_130(capsys):
    def main(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        utils.run(main, [])
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted: tests/test_reliability_outputs.py stopped")
    assert "Run it again to restart cleanly" in err


def test_ctrl_c_in_the_pipeline_names_the_stage(tmp_path, monkeypatch, capsys):
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "run", interrupted)
    argv = ["--data_dir", str(tmp_path / "d"), "--save_dir", str(tmp_path / "s"),
            "--feature_dir", str(tmp_path / "f"), "--pretrained_dir", str(tmp_path / "p")]
    with pytest.raises(SystemExit) as exit_:
        utils.run(script("MELD", "pipeline").main, argv)
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("interrupted: [MELD] stage 'preprocessing' (preprocessing.py) was interrupted; the previous "
                       "complete outputs are kept. Run the same command again: finished stages are skipped and "
                       "'preprocessing' restarts cleanly")


@pytest.mark.slow
def test_sigint_to_a_real_stage_process_is_one_line(generated, tmp_path):
    command = [sys.executable, str(REPO / "MELD" / "text.py"), "--data_dir", str(generated / "datasets" / "MELD"),
               "--pretrained_dir", str(generated / "pretrained_model"), "--save_dir", str(tmp_path / "save"),
               "--feature_dir", str(tmp_path / "feature"), "--epochs", "50", "--batch_size", "2"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    for line in proc.stderr:  # wait until training runs
        lines.append(line)
        if "sizes" in line or "epoch 1" in line:
            break
    proc.send_signal(2)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1].startswith("interrupted: MELD/text.py stopped before publishing")


# --------------------------------------------------------------------------- stale results

def test_pipeline_reruns_a_stage_whose_recorded_arguments_differ(generated, tmp_path, monkeypatch, caplog):
    data_dir = generated / "datasets" / "MELD"
    save = tmp_path / "save"
    files = StageFiles.first_stage(save, "text")
    save.mkdir()
    files.checkpoint.write_bytes(b"x")
    finish_outputs(files.metrics, "MELD text", {"epochs": 1, "learning_rate": 0.001, "seed": 2024, "device": "cpu"},
                   dataset="MELD")
    ran: list[str] = []
    monkeypatch.setattr(pipeline, "run_stage", lambda stage, *_: ran.append(stage.script))
    caplog.set_level(logging.INFO, logger="magtkd")
    base = ["--data_dir", str(data_dir), "--save_dir", str(save), "--feature_dir", str(tmp_path / "f"),
            "--pretrained_dir", str(generated / "pretrained_model"), "--learning_rate", "1e-3", "--device", "cuda"]
    script("MELD", "pipeline").main(base + ["--epochs", "1"])
    assert "text.py" not in ran  # same settings (the device is not one that changes outputs)
    ran.clear()
    script("MELD", "pipeline").main(base + ["--epochs", "3"])
    assert "text.py" in ran
    assert "text: re-running text.py, its outputs were made with other settings (--epochs 1 then, 3 now)" in caplog.text


def test_changed_flags_compares_values_not_spellings(tmp_path):
    record = tmp_path / "multimodal_fusion_metrics.json"
    finish_outputs(record, "x", {"lr": 0.001, "packed": True, "seeds": [1, 2], "epochs": 3, "device": "cpu"})
    same = ["--lr", "1e-3", "--packed", "--seeds", "1", "2", "--epochs=3", "--device", "cuda"]
    assert pipeline.changed_flags(record, same) == []
    assert pipeline.changed_flags(record, ["--seeds", "1", "3", "--dropout", "0.1"]) == [
        "--seeds [1, 2] then, 1 3 now", "--dropout None then, 0.1 now"]


# --------------------------------------------------------------------------- the right pretrained model

def test_videomae_folder_where_timesformer_belongs_is_the_wrong_model(generated, tmp_path):
    shutil.copytree(generated / "pretrained_model" / "videomae-base", tmp_path / "timesformer-base-finetuned-k400")
    with pytest.raises(pretrained.PretrainedMismatchError,
                       match=r"holds another model \(model_type 'videomae'.*needs model_type 'timesformer'.*wrong "
                             r"model, not an incomplete download.*hf download facebook/timesformer"):
        pretrained.load_video_backbone(tmp_path)


@pytest.mark.parametrize("name, loader", [("roberta-large", pretrained.load_tokenizer),
                                          ("data2vec-audio-base-960h", pretrained.load_audio_backbone),
                                          ("videomae-base", pretrained.load_image_processor)])
def test_a_config_of_another_model_type_is_refused(generated, tmp_path, name, loader):
    folder = tmp_path / name
    shutil.copytree(generated / "pretrained_model" / name, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(pretrained.PretrainedMismatchError, match=rf"{name} needs model_type"):
        loader(tmp_path)


def test_missing_backbone_weights_are_an_incomplete_download(generated, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "timesformer-base-finetuned-k400"
    shutil.copytree(generated / "pretrained_model" / folder.name, folder)
    state = load_file(folder / "model.safetensors")
    dropped = next(k for k in state if k.endswith("layernorm.weight"))
    del state[dropped]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(pretrained.PretrainedMissingError,
                       match=r"1 backbone weights are missing .*layernorm.weight.*incomplete or corrupt.*hf download"):
        pretrained.load_video_backbone(tmp_path)
