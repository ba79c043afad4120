"""``<DS>/text.py`` (stage 1, docs/METHOD.md §2): one epoch on the generated data, its objective,
prompt variants, flags and errors, interruption and --resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import (FixedEncoder, REPO, SUBPROCESS_ENV, assert_same_tensors, dataset_spec, flags, generated_paths,
                     kill_after_first_epoch, one_epoch_then_evaluate, random_batch, script, stage_paths,
                     text_command)
from magtkd import loaders, pipeline, utils
from magtkd.dataset import load_split
from magtkd.loaders import TextField
from magtkd.pretrained import load_tokenizer, PretrainedMissingError, representation_width, text_prompt
from magtkd.predictions import ID_COLUMNS, read_predictions
from magtkd.prompt import SPEAKER_TOKENS
from magtkd.results import summary
from magtkd.utils import DataError, UserError
from MELD.config import MELD


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_text_trains_one_epoch_and_its_checkpoint_evaluates_alike(dataset, generated, tmp_path):
    paths = generated_paths(generated, dataset, tmp_path)
    doc = one_epoch_then_evaluate(dataset, "text", "text", paths)
    assert doc["args"]["prompt"] == "full"
    # Every dev and test prediction as a row (the test rows rewritten by --train False, the same model)
    spec = dataset_spec(dataset)
    for split in ("dev", "test"):
        frame = read_predictions(paths["save_dir"] / f"text_predictions_{split}.csv")
        utterances = load_split(spec, paths["data_dir"], split)
        assert list(frame.columns) == [*ID_COLUMNS, "gold", "predicted", *(f"p_{label}" for label in spec.labels)]
        assert frame[list(ID_COLUMNS)].values.tolist() == [[u.dialogue_id, u.utterance_id, u.speaker, u.text]
                                                          for u in utterances]
        assert frame["gold"].tolist() == [u.emotion for u in utterances]
        index = {label: i for i, label in enumerate(spec.labels)}
        assert summary(frame["gold"].map(index), frame["predicted"].map(index)) == \
            {k: doc[split][k] for k in ("accuracy", "weighted_f1")}
    # D follows the audio/video width, not the text model's (docs/METHOD.md §2, Text)
    assert doc["width"] == representation_width(generated / "pretrained_model")


@pytest.mark.parametrize("name", ["text", "audio", "video"])
def test_first_stage_objective_is_the_cross_entropy(name):
    _, logits, _, _, batch = random_batch(seed=3)
    objective = script("MELD", name).objective
    assert torch.equal(objective(FixedEncoder(None, logits), batch), F.cross_entropy(logits.float(), batch["labels"]))


def test_missing_pretrained_folder_names_it_and_the_download(generated, tmp_path):
    paths = generated_paths(generated, "IEMOCAP", tmp_path)
    paths["pretrained_dir"] = tmp_path / "no_models"
    with pytest.raises(PretrainedMissingError) as info:
        script("IEMOCAP", "text").main(flags(paths, train="False", device="cpu"))
    message = str(info.value)
    assert str((tmp_path / "no_models" / "roberta-large").resolve()) in message
    assert "hf download FacebookAI/roberta-large" in message


@pytest.mark.slow
def test_help_works_from_another_directory(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "IEMOCAP" / "text.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "python IEMOCAP/text.py" in done.stdout and "--train TRAIN" in done.stdout
    assert "--pretrained_dir" in done.stdout


def test_first_stage_help_lists_seeds(capsys):
    with pytest.raises(SystemExit):
        script("MELD", "text").main(["--help"])
    assert "--seeds SEEDS [SEEDS ...]" in capsys.readouterr().out


@pytest.mark.slow
def test_interrupted_training_is_incomplete_and_redone(generated, tmp_path, monkeypatch):
    paths = {"data_dir": generated / "datasets" / "MELD", "pretrained_dir": generated / "pretrained_model",
             "save_dir": tmp_path / "save_model", "feature_dir": tmp_path / "feature"}
    # Temp files killed writes leave: the checkpoint, the training state (the largest write) and a plot.
    strays = [paths["save_dir"] / f".{name}.dead1234.tmp" for name in ("text.bin", "text.state.pt", "text_curves.png")]
    strays[0].parent.mkdir(parents=True)
    for stray in strays:
        stray.write_bytes(b"")
    real_evaluate, calls = loaders.SampleBatches.evaluate, []

    def dies_in_epoch_two(self, model, split, config):
        calls.append(split)
        if len(calls) > 2:  # dev + test of epoch 1 done; "killed" during epoch 2's dev pass
            raise KeyboardInterrupt
        return real_evaluate(self, model, split, config)

    monkeypatch.setattr(loaders.SampleBatches, "evaluate", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        script("MELD", "text").main(flags(paths, epochs=2, batch_size=8, learning_rate=1e-3))
    monkeypatch.undo()
    assert not any(stray.exists() for stray in strays)  # the killed writes' temp files are removed at the next start
    assert not (paths["save_dir"] / ".text.lock").exists()
    # Nothing published: epoch 1's checkpoint and record are in progress, and the record says so.
    assert not (paths["save_dir"] / "text.bin").exists() and not (paths["save_dir"] / "text.json").exists()
    assert (paths["save_dir"] / "text.bin.partial").is_file()
    record = json.loads((paths["save_dir"] / "text.json.partial").read_text())
    assert record["complete"] is False
    with pytest.raises(UserError, match=r"text.bin not found: it is written by MELD/text.py"):
        script("MELD", "text").main(flags(paths, train="False"))
    ctx = pipeline.Context(MELD, paths["data_dir"], paths["pretrained_dir"], paths["save_dir"], paths["feature_dir"])
    text_stage = next(s for s in pipeline.STAGES if s.name == "text")
    assert not pipeline.up_to_date(text_stage, ctx)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.slow
def test_user_errors_are_one_line_with_status_2_and_debug_shows_the_traceback(generated, tmp_path, capsys):
    data_dir = tmp_path / "MELD"
    shutil.copytree(generated / "datasets" / "MELD", data_dir)
    csv = data_dir / MELD.csv_names["dev"]
    csv.write_text(csv.read_text().replace("Emotion", "Feeling", 1))
    command = [str(REPO / "MELD" / "text.py"), "--data_dir", str(data_dir),
               "--pretrained_dir", str(generated / "pretrained_model"), "--device", "cpu"]
    run = _cli(*command)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {csv}: missing column 'Emotion'")
    assert "Traceback" not in run.stderr
    # The same through pipeline.run in this process: --debug re-raises (Python then prints the traceback).
    with pytest.raises(SystemExit) as exit_:
        utils.run(script("MELD", "text").main, [*command[1:-2], "--device", "gpu"])
    assert exit_.value.code == 2
    with pytest.raises(DataError, match="missing column 'Emotion'"):
        utils.run(script("MELD", "text").main, [*command[1:], "--debug"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --device gpu: not a device name; use cpu, cuda or cuda:N")


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


@pytest.mark.slow
def test_text_prompt_no_speakers_is_recorded_and_used(generated: Path, tmp_path: Path):
    paths = stage_paths(generated, "IEMOCAP")
    paths["save_dir"] = tmp_path
    script("IEMOCAP", "text").main(flags(paths, epochs="1", prompt="no_speakers", device="cpu"))
    record = tmp_path / "text.json"
    assert json.loads(record.read_text())["args"]["prompt"] == "no_speakers"
    assert text_prompt(record, None) == "no_speakers"
    with pytest.raises(utils.UserError, match="--prompt full but the text model was trained with --prompt no_speakers"):
        text_prompt(record, "full")
    tokenizer = load_tokenizer(paths["pretrained_dir"])
    from magtkd.dataset import load_samples
    from magtkd.prompt import add_speaker_tokens

    add_speaker_tokens(tokenizer)
    speaker_ids = set(tokenizer.convert_tokens_to_ids(list(SPEAKER_TOKENS)))
    samples = load_samples(dataset_spec("IEMOCAP"), paths["data_dir"], ("test",))["test"]
    field = TextField(tokenizer, text_prompt(record, None))
    assert all(not speaker_ids & set(field.load(s)) for s in samples)
    assert any(speaker_ids & set(TextField(tokenizer).load(s)) for s in samples)
    # the extraction builds the recorded prompt: an explicit contradicting flag stops it before any work
    for name in ("audio", "video", "text_KD_audio", "text_KD_video"):
        (tmp_path / f"{name}.bin").write_bytes(b"")
    with pytest.raises(utils.UserError, match="trained with --prompt no_speakers"):
        script("IEMOCAP", "extract_first_stage_features").main(flags(paths, prompt="full", device="cpu"))


@pytest.mark.slow
def test_text_killed_and_resumed_ends_bit_identical(generated: Path, small_iemocap: Path, tmp_path: Path) -> None:
    epochs = ["--epochs", "3"]  # killed after epoch 1 (or 2 on a slow machine), resumed to the end
    pdir = generated / "pretrained_model"
    full = subprocess.Popen([sys.executable, *text_command(small_iemocap, pdir, tmp_path / "full", *epochs,
                                                          "--save_state", "True")],
                            env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    resumed_dir = tmp_path / "resumed"
    # One command to start and to restart: --resume True starts at epoch 1 and saves the state every epoch
    command = [sys.executable, *text_command(small_iemocap, pdir, resumed_dir, *epochs, "--resume", "True")]
    killed_at = kill_after_first_epoch(command, resumed_dir / "text.state.pt")
    assert 1 <= killed_at < 3
    again = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from epoch {killed_at} of 3" in again.stderr
    assert f"epoch {killed_at}/3" not in again.stderr and "epoch 3/3" in again.stderr
    assert full.wait() == 0, full.stderr.read()[-2000:]

    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    assert_same_tensors(load(resumed_dir / "text.bin"), load(tmp_path / "full" / "text.bin"))
    assert_same_tensors(load(resumed_dir / "text.state.pt")["model"], load(tmp_path / "full" / "text.state.pt")["model"])
    curve = lambda d: [(e["epoch"], e["train_loss"], e["dev"]) for e in json.loads((d / "text.json").read_text())["epochs"]]  # noqa: E731
    assert curve(resumed_dir) == curve(tmp_path / "full")
