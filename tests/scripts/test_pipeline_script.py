"""``<DS>/pipeline.py`` and ``<DS>/run.sh`` (docs/METHOD.md §0, §6): every stage for one epoch,
stages re-run when their recorded settings differ, Ctrl-C names the stage, relative folders."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest

from helpers import REPO, dataset_spec, flags, generated_paths, script
from magtkd import pipeline, utils
from magtkd.artifacts import FIRST_STAGE_MODELS, StageFiles, features_record, finish_outputs, frames_record


@pytest.mark.slow
def test_every_stage_runs_for_one_epoch_then_all_are_up_to_date(generated, tmp_path, caplog):
    """``IEMOCAP/pipeline.py --epochs 1 --fusion_epochs 1`` from a raw release (two sessions of the generated
    one, without prepared CSVs: Session1 gives train and dev, Session5 test): the preparation and the eight
    stages run in order, every completion record says its run finished, the run's seconds are recorded; the
    same command again runs nothing."""
    data_dir = tmp_path / "IEMOCAP"
    data_dir.mkdir()
    for session in ("Session1", "Session5"):
        (data_dir / session).symlink_to(generated / "datasets" / "IEMOCAP" / session, target_is_directory=True)
    paths = {**generated_paths(generated, "IEMOCAP", tmp_path), "data_dir": data_dir}
    argv = flags(paths, device="cpu", epochs=1, learning_rate="1e-3", fusion_epochs=1) + ["--in_process"]
    seconds = script("IEMOCAP", "pipeline").main(argv)
    assert list(seconds) == [stage.name for stage in pipeline.STAGES]
    assert all((data_dir / name).is_file() for name in dataset_spec("IEMOCAP").csv_names.values())
    save, feature = paths["save_dir"], paths["feature_dir"]
    records = [save / f"{name}.json" for name, _ in FIRST_STAGE_MODELS.values()] + [
        StageFiles.fusion(save).metrics, frames_record(feature), features_record(feature)]
    assert {str(r): json.loads(r.read_text())["complete"] for r in records} == {str(r): True for r in records}
    assert json.loads(StageFiles.fusion(save).metrics.read_text())["args"]["epochs"] == 1
    assert json.loads((save / pipeline.RUN_RECORD).read_text())["seconds"] == seconds
    caplog.set_level(logging.INFO, logger="magtkd")
    assert script("IEMOCAP", "pipeline").main(argv) == {}
    for stage in pipeline.STAGES:
        assert f"[IEMOCAP] {stage.name}: outputs up to date, skipped" in caplog.text


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
def test_run_sh_resolves_relative_folders_against_the_callers_directory(tmp_path):
    run = subprocess.run(["bash", str(REPO / "MELD" / "run.sh"), "--data_dir", "relative/MELD"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 2  # the stage's user error passes through, named once, without the command's repr
    assert str(tmp_path / "relative" / "MELD") in run.stderr
    assert not (REPO / "relative").exists()
    assert run.stderr.strip().splitlines()[-1].endswith(
        "[MELD] stage 'preprocessing' (preprocessing.py) failed (exit status 2; its message is above)")
