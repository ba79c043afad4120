"""``<DS>/audio.py`` (stage 2, docs/METHOD.md §2, §6): one epoch on the generated data, a crashing
clip loses only itself, flags refused at parsing."""

from __future__ import annotations

import pytest

from helpers import copy_checkpoints, flags, generated_paths, one_epoch_then_evaluate, script
from magtkd.artifacts import SubstitutionReport


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_audio_trains_one_epoch_and_its_checkpoint_evaluates_alike(dataset, generated, tmp_path):
    paths = generated_paths(generated, dataset, tmp_path)
    one_epoch_then_evaluate(dataset, "audio", "audio", paths)
    # The clips were decoded once, into the feature folder's audio cache, and read back by the evaluation
    assert list((paths["feature_dir"] / "audio_cache").glob("*.npz"))


@pytest.mark.parametrize("workers", [0, 2])
def test_audio_loading_survives_a_crashing_clip(generated, untrained, bad_meld, crash_hook, tmp_path, workers):
    # An untrained audio checkpoint evaluated on the hostile copy of MELD, with an audio cache of its own
    paths = {**generated_paths(generated, "MELD", tmp_path), "data_dir": bad_meld["data_dir"],
             "save_dir": untrained("MELD")}
    paths = copy_checkpoints(paths, tmp_path, "audio.bin")
    script("MELD", "audio").main(flags(paths, train="False", num_workers=workers))
    items = {s.key: s for s in SubstitutionReport.read(paths["save_dir"] / "audio_eval_substitutions.tsv")}
    keys = bad_meld["keys"]
    assert items[keys["crash_audio"]].reason == "decoder crashed (signal 11)"
    assert items[keys["crash_audio"]].replacement == "silence"
    assert "partial decode: audio stopped at" in items[keys["random"]].reason
    assert items[keys["random"]].replacement == "audio decoded before the error"
    assert "no streams" in items[keys["moovless"]].reason  # not "no audio stream"
    assert "cannot open" in items[keys["half"]].reason and "cannot open" in items[keys["empty"]].reason
    if items[keys["crash_video"]].reason.startswith("no audio stream"):  # its moov cut before the audio track
        assert "file truncated ('moov' box" in items[keys["crash_video"]].reason


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "-1"), ("--batch_size", "0"),
                                         ("--learning_rate", "-1"), ("--num_workers", "-2")])
def test_flags_that_would_do_nothing_or_fail_deep_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        script("MELD", "audio").main([flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: expected" in capsys.readouterr().err
