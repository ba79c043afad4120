"""The stages' command lines (`magtkd.cli`): default folders, seeds, the audio cache flags, precision
defaults, and flags refused at parsing (docs/METHOD.md §6, §7)."""

from __future__ import annotations

import pytest

from helpers import REPO, dataset_spec, remount_read_only, script, tmpfs
from IEMOCAP.config import IEMOCAP
from magtkd import cli, utils
from magtkd.cli import paths_parser


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_default_folders_do_not_depend_on_the_working_directory(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = paths_parser(dataset_spec(dataset), REPO / dataset, None).parse_args([])
    assert args.data_dir == REPO / "datasets" / dataset
    assert args.pretrained_dir == REPO / "pretrained_model"
    assert args.save_dir == REPO / dataset / dataset / "save_model"
    assert args.feature_dir == REPO / dataset / "feature"
    assert args.device is None


def test_seed_list_defaults_and_errors():
    assert cli.seed_list(2024, None, True) == [2024]
    assert cli.seed_list(2024, [3, 1], True) == [3, 1]
    with pytest.raises(utils.UserError, match=r"--seeds lists \[3\] more than once"):
        cli.seed_list(0, [3, 1, 3], True)
    with pytest.raises(utils.UserError, match="--train False"):
        cli.seed_list(0, [1, 2], False)
    assert cli.seed_tag(5, [5]) == "" and cli.seed_tag(5, [5, 6]) == "_seed5"


def test_audio_cache_flags():
    import argparse
    from pathlib import Path

    from magtkd.cli import add_audio_cache_flags, audio_cache_dir

    parser = add_audio_cache_flags(argparse.ArgumentParser())

    def folder(argv):
        args = parser.parse_args(argv)
        return audio_cache_dir(args.audio_cache, args.audio_cache_dir, Path("feat"))

    assert folder([]) == Path("feat") / "audio_cache"
    assert folder(["--audio_cache_dir", "/x/c"]) == Path("/x/c")
    assert folder(["--audio_cache", "False"]) is None


def _help(dataset: str, name: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO / dataset / f"{name}.py"), "--help"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())


def test_precision_defaults_of_the_stage_flags():
    text, kd_help = _help("IEMOCAP", "text"), _help("MELD", "KD")
    assert "--amp AMP bf16 autocast on CUDA; default False: fp32, as the authors (CPU always runs fp32)" in text
    assert "(default: False) --" not in text.split("--amp AMP", 1)[1][:200]  # the default shown once
    assert "--deterministic DETERMINISTIC" in text and "reference_kd_clip" not in text
    assert "--amp AMP fp16 autocast on CUDA with a gradient scaler" in kd_help
    assert "--reference_kd_clip REFERENCE_KD_CLIP clip the still-SCALED gradients" in kd_help
    args = cli.training_parser(IEMOCAP, ".", None, epochs=1, batch_size=1, learning_rate=1e-5).parse_args([])
    assert args.amp is False and args.deterministic is True and not hasattr(args, "reference_kd_clip")
    kd = cli.training_parser(IEMOCAP, ".", None, epochs=1, batch_size=1, learning_rate=1e-5, kd=True)
    args = kd.parse_args([])
    assert args.amp is True and args.reference_kd_clip is False and args.deterministic is True
    assert kd.parse_args(["--reference_kd_clip", "True", "--amp", "False"]).reference_kd_clip is True
    with pytest.raises(SystemExit):
        kd.parse_args(["--reference_kd_clip", "maybe"])


@pytest.mark.parametrize("name, argv, message", [
    ("KD", ["--tau", "0"], "--tau: expected a number > 0"),
    ("KD", ["--tau", "-1"], "--tau: expected a number > 0"),
    ("multimodal_fusion", ["--dropout", "1.5"], r"--dropout: expected a number in \[0, 1\)"),
    ("multimodal_fusion", ["--dropout", "1"], r"--dropout: expected a number in \[0, 1\)"),
    ("text", ["--seeds", "-5"], "--seeds: expected an integer in 0..4294967295"),
    ("text", ["--seed", "4294967296"], "--seed: expected an integer in 0..4294967295"),
    ("multimodal_fusion", ["--seed", "-1"], "--seed: expected an integer in 0..4294967295"),
])
def test_flags_that_make_the_loss_undefined_are_refused_at_parsing(name, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        script("MELD", name).main(argv)
    assert exit_.value.code == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


# --------------------------------------------------------------------------- paths checked before any work


def fusion_flags(save_dir, *extra: str) -> list[str]:
    return ["--save_dir", str(save_dir), *extra]


def fusion_parser():
    return cli.fusion_parser(IEMOCAP, REPO / "IEMOCAP", None, audio_feature="audio_kd", video_feature="video",
                             alpha=0.7, beta=0.8, feature_loss=True)


def test_an_output_folder_the_filesystem_cannot_hold_is_refused_at_parsing(tmp_path):
    """A name over the filesystem's NAME_MAX, a file where the folder must be: one line naming the flag, before
    any data is read (docs/METHOD.md §6, "Limits")."""
    long = tmp_path / ("x" * 300) / "save_model"
    with pytest.raises(utils.UserError, match=r"--save_dir .*: the name x{24}\.\.\. is 300 bytes long; the "
                                              r"filesystem of .* allows 255: choose a shorter name"):
        fusion_parser().parse_args(fusion_flags(long))
    (tmp_path / "file").write_text("")
    with pytest.raises(utils.UserError, match=r"--feature_dir .*file/feature: .*file is a file, where --feature_dir "
                                              r"needs a folder"):
        cli.paths_parser(IEMOCAP, REPO / "IEMOCAP", None, writes=("feature_dir",)).parse_args(
            ["--feature_dir", str(tmp_path / "file" / "feature")])
    # An input folder is not written: only its length is checked (a --train False checkpoint folder may be read-only)
    args = cli.training_parser(IEMOCAP, REPO / "IEMOCAP", None, epochs=1, batch_size=4, learning_rate=1e-5) \
        .parse_args(["--train", "False", "--save_dir", str(tmp_path / "file" / "save")])
    assert args.save_dir == tmp_path / "file" / "save" and utils.PARSED["batch_size"] == 4


def test_a_read_only_output_folder_is_refused_at_parsing(tmp_path):
    with tmpfs(tmp_path / "ro") as folder:
        remount_read_only(folder)
        with pytest.raises(utils.UserError, match=r"--save_dir .*ro/save_model: its nearest existing folder .*ro is "
                                                  r"not writable \(read-only or another user's\)"):
            fusion_parser().parse_args(fusion_flags(folder / "save_model"))


def test_pipeline_help_lists_its_environment_variables(monkeypatch):
    monkeypatch.setenv("EPOCHS", "3")
    parser = cli.pipeline_parser(None)
    text = parser.format_help()
    assert parser.parse_args([]).epochs == 3
    for flag, variable in cli.PIPELINE_ENV.items():
        assert f"{variable} (--{flag})" in " ".join(text.split())
        assert f"${variable}" in " ".join(text.split())


def test_a_flag_error_under_torchrun_is_printed_by_rank_0_only(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(utils, "RANK0_WAIT_S", 0.2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_:
            fusion_parser().parse_args(["--epochs", "0"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("error: argument --epochs: expected an integer >= 1, got '0'") == (rank == "0")
