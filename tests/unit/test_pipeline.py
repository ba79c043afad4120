"""The pipeline's stage list (`magtkd.pipeline`; docs/METHOD.md §0): torchrun launchers, seeds, stale
records, and the error a demo worker process sends back."""

from __future__ import annotations

import sys

import pytest

from helpers import dataset_spec
from magtkd import cli, pipeline
from magtkd.artifacts import finish_outputs


def test_pipeline_launches_the_data_parallel_stages_with_torchrun() -> None:
    by_name = {stage.name: stage for stage in pipeline.STAGES}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    for name in ("text", "audio", "frames", "video", "kd_audio", "kd_video", "features"):
        assert pipeline.launcher(by_name[name], 3) == torchrun
    for name in ("preprocessing", "fusion"):
        assert pipeline.launcher(by_name[name], 3) == [sys.executable]
    assert pipeline.launcher(by_name["text"], 1) == [sys.executable]
    assert cli.pipeline_parser(None).parse_args(["--nproc_per_node", "2"]).nproc_per_node == 2


def test_pipeline_passes_seeds_to_training_stages_only(tmp_path):
    from magtkd.pipeline import STAGES, Context, Options, stage_argv

    options = Options(None, 0, None, None, None, False, (1, 2), "--lr 1e-3", False, False, 1)
    ctx = Context(dataset_spec("IEMOCAP"), tmp_path, tmp_path, tmp_path, tmp_path)
    for stage in STAGES:
        argv = stage_argv(stage, ctx, options)
        if stage.kind in ("train", "fusion"):
            assert argv[argv.index("--seeds"):][:3] == ["--seeds", "1", "2"], stage.name
        else:
            assert "--seeds" not in argv, stage.name


def test_changed_flags_compares_values_not_spellings(tmp_path):
    record = tmp_path / "multimodal_fusion_metrics.json"
    finish_outputs(record, "x", {"lr": 0.001, "packed": True, "seeds": [1, 2], "epochs": 3, "device": "cpu"})
    same = ["--lr", "1e-3", "--packed", "--seeds", "1", "2", "--epochs=3", "--device", "cuda"]
    assert pipeline.changed_flags(record, same) == []
    assert pipeline.changed_flags(record, ["--seeds", "1", "3", "--dropout", "0.1"]) == [
        "--seeds [1, 2] then, 1 3 now", "--dropout None then, 0.1 now"]


def test_a_stage_failure_keeps_its_exit_status_when_it_comes_from_a_demo_worker_process():
    # The demo runs the datasets side by side in worker processes; their errors come back pickled.
    import pickle

    from magtkd.pipeline import PipelineError

    err = pickle.loads(pickle.dumps(PipelineError("[MELD] stage 'text' (text.py) failed: --epochs 0", 2)))
    assert isinstance(err, PipelineError)
    assert (str(err), err.status) == ("[MELD] stage 'text' (text.py) failed: --epochs 0", 2)


def test_a_second_pipeline_on_the_same_folders_stops_at_once_naming_the_first(tmp_path):
    """The whole pipeline holds one lock on its save and feature folders (docs/METHOD.md §6): a second one
    there stops before any stage with the one line naming the first; another save folder runs."""
    from magtkd.utils import UserError

    spec = dataset_spec("IEMOCAP")
    ran: list[str] = []
    mains = {stage.script: (lambda argv, name=stage.script: ran.append(name)) for stage in pipeline.STAGES}
    folders = {"save_dir": tmp_path / "save", "feature_dir": tmp_path / "feature"}
    argv = [item for flag, path in folders.items() for item in (f"--{flag}", str(path))] + ["--in_process"]
    first = pipeline.Context(spec, tmp_path / "data", tmp_path / "models", *folders.values())
    with pipeline.pipeline_lock(first, "IEMOCAP pipeline: python IEMOCAP/pipeline.py --epochs 1"):
        with pytest.raises(UserError, match=r"save is in use: another run \(PID \d+: IEMOCAP pipeline: python "
                                            r"IEMOCAP/pipeline.py --epochs 1 \(since .*\)\) is writing IEMOCAP "
                                            r"pipeline outputs there"):
            pipeline.main(spec, tmp_path, mains, None, argv)
        assert ran == []
        other = ["--save_dir", str(tmp_path / "other"), "--feature_dir", str(tmp_path / "other_feature")]
        pipeline.main(spec, tmp_path, mains, None, other + ["--in_process", "--force"])
    assert ran == [stage.script for stage in pipeline.STAGES]
    assert not (tmp_path / "save" / ".pipeline.lock").exists()
def test_pipeline_passes_dist_timeout_on_when_given_and_it_is_no_reason_to_rerun(tmp_path):
    from magtkd.pipeline import STAGES, Context, Options, stage_argv

    ctx = Context(dataset_spec("IEMOCAP"), tmp_path, tmp_path, tmp_path, tmp_path)
    args = cli.pipeline_parser(None).parse_args(["--dist_timeout", "45"])
    assert args.dist_timeout == 45.0 and cli.pipeline_parser(None).parse_args([]).dist_timeout is None
    given = Options(None, None, None, None, None, False, None, "", False, False, 2, args.dist_timeout)
    unset = Options(None, None, None, None, None, False, None, "", False, False, 2)
    for stage in STAGES:
        argv = stage_argv(stage, ctx, given)
        if stage.kind == "prepare":  # preprocessing joins no process group
            assert "--dist_timeout" not in argv
        else:
            assert argv[argv.index("--dist_timeout"):][:2] == ["--dist_timeout", "45.0"], stage.name
        assert "--dist_timeout" not in stage_argv(stage, ctx, unset)  # each stage's own default (30)
    record = tmp_path / "multimodal_fusion_metrics.json"
    finish_outputs(record, "x", {"dist_timeout": 30.0, "save_state": None})
    assert pipeline.changed_flags(record, ["--dist_timeout", "45.0", "--save_state", "True"]) == []
