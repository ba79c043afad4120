"""Stages 1-6 of the demo (docs/METHOD.md §2, §3, §6): unimodal and KD checkpoints with their metrics,
evaluation-only runs against copies of them, stored frames, substitution reports and the audio cache,
checkpoints of the authors' layout or the other dataset. Nothing the demo trained is trained again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (all_utterances, authors_layout, copy_checkpoints, digest, expected_npy, flags, npy_files, script,
                     stage_paths)
from IEMOCAP.config import IEMOCAP
from magtkd import decoder, media
from magtkd.artifacts import SubstitutionReport
from magtkd.checkpoints import CheckpointError
from magtkd.dataset import load_split
from magtkd.frames import frame_file, FrameCodec, load_frames
from magtkd.pretrained import load_image_processor
from magtkd.spec import SPLITS
from magtkd.synthetic.meld import write_meld
from magtkd.synthetic.models import AV_HIDDEN, TEXT_HIDDEN
from magtkd.utils import FeatureFileError
from MELD.config import MELD


DATASETS = {"IEMOCAP": IEMOCAP, "MELD": MELD}

MODALITIES = ("text", "audio", "video")

FRAME_SHAPE = (8, 3, 32, 32)  # 8 frames, RGB, the stand-in processor's 32x32 crop


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("modality", MODALITIES)
def test_checkpoint_is_plain_state_dict_with_metrics_json(demo, dataset, modality):
    save_dir = stage_paths(demo["workdir"], dataset)["save_dir"]
    state = torch.load(save_dir / f"{modality}.bin", map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and state
    assert all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    num_classes = DATASETS[dataset].num_classes
    if modality == "text":
        # D follows the audio/video width (32), not the text model's (48) (docs/METHOD.md §2, Text).
        assert tuple(state["project.weight"].shape) == (AV_HIDDEN, TEXT_HIDDEN)
        assert tuple(state["classifier.weight"].shape) == (num_classes, AV_HIDDEN)
    else:
        assert tuple(state["classifier.weight"].shape) == (num_classes, AV_HIDDEN)

    doc = json.loads((save_dir / f"{modality}.json").read_text(encoding="utf-8"))
    assert doc["checkpoint"] == f"{modality}.bin"
    args = doc["args"]
    assert args["train"] is True and args["batch_size"] == 4 and args["seed"] == 2024
    assert Path(args["save_dir"]) == save_dir
    epochs = doc["epochs"]
    assert [row["epoch"] for row in epochs] == list(range(1, args["epochs"] + 1))
    for row in epochs:
        assert {"accuracy", "weighted_f1"} <= set(row["dev"]) and isinstance(row["train_loss"], float)
    # Selection: the first epoch with the best dev weighted F1 (docs/METHOD.md §2).
    dev = [row["dev"]["weighted_f1"] for row in epochs]
    assert doc["selected_epoch"] == 1 + dev.index(max(dev))
    assert doc["dev_weighted_f1"] == max(dev)
    test = doc["test"]
    selected = epochs[doc["selected_epoch"] - 1]["test"]
    assert selected == {"accuracy": test["accuracy"], "weighted_f1": test["weighted_f1"]}
    per_class = test["per_class"]
    for label in DATASETS[dataset].labels:
        assert {"precision", "recall", "f1-score", "support"} <= set(per_class[label])
    support = sum(per_class[label]["support"] for label in DATASETS[dataset].labels)
    assert support == len(load_split(DATASETS[dataset], stage_paths(demo["workdir"], dataset)["data_dir"], "test"))


@pytest.fixture(scope="module")
def evaluated(demo, tmp_path_factory):
    """evaluated(dataset, modality): one ``--train False`` run against a copy of the demo's checkpoint.

    The copy holds the checkpoint and the training run's substitution report (if
    any), so the demo's own files stay untouched whatever the run writes.
    """
    runs: dict[tuple[str, str], dict] = {}

    def run(dataset: str, modality: str) -> dict:
        if (dataset, modality) not in runs:
            demo_paths = stage_paths(demo["workdir"], dataset)
            names = [f"{modality}.bin"]
            if (demo_paths["save_dir"] / f"{modality}_substitutions.tsv").is_file():
                names.append(f"{modality}_substitutions.tsv")
            paths = copy_checkpoints(demo_paths, tmp_path_factory.mktemp(f"eval_{dataset}_{modality}"), *names)
            result = script(dataset, modality).main(flags(paths, train="False", device="cpu"))
            runs[(dataset, modality)] = {"paths": paths, "demo_paths": demo_paths, "result": result}
        return runs[(dataset, modality)]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("modality", MODALITIES)
def test_evaluation_only_reproduces_saved_test_metrics(evaluated, dataset, modality):
    run = evaluated(dataset, modality)
    saved = json.loads((run["demo_paths"]["save_dir"] / f"{modality}.json").read_text(encoding="utf-8"))["test"]
    result = run["result"]
    assert result["accuracy"] == saved["accuracy"]
    assert result["weighted_f1"] == saved["weighted_f1"]
    assert result["per_class"] == saved["per_class"]
    # Evaluation writes no checkpoint and no metrics JSON.
    bin_name = f"{modality}.bin"
    assert (run["paths"]["save_dir"] / bin_name).read_bytes() == (run["demo_paths"]["save_dir"] / bin_name).read_bytes()
    assert not (run["paths"]["save_dir"] / f"{modality}.json").exists()


@pytest.mark.slow
def test_evaluation_only_keeps_the_training_substitution_report(evaluated):
    run = evaluated("MELD", "audio")
    trained = SubstitutionReport.read(run["demo_paths"]["save_dir"] / "audio_substitutions.tsv")
    assert {s.key.split("/")[0] for s in trained} == set(SPLITS)  # the training run saw all three splits
    assert SubstitutionReport.read(run["paths"]["save_dir"] / "audio_substitutions.tsv") == trained
    evaluated_report = SubstitutionReport.read(run["paths"]["save_dir"] / "audio_eval_substitutions.tsv")
    assert evaluated_report == [t for t in trained if t.key.startswith("test/")]


@pytest.mark.slow
@pytest.mark.parametrize("dataset, modality", [("IEMOCAP", "text"), ("MELD", "audio"), ("IEMOCAP", "video")])
def test_authors_checkpoint_evaluates_like_ours(demo, tmp_path, dataset, modality):
    # --train False on a checkpoint laid out as the authors' code writes it gives the test metrics of
    # the same weights saved by us.
    demo_paths = stage_paths(demo["workdir"], dataset)
    paths = copy_checkpoints(demo_paths, tmp_path, f"{modality}.bin")
    ours = torch.load(paths["save_dir"] / f"{modality}.bin", weights_only=True)
    hidden = next(v for k, v in ours.items() if k.endswith("embeddings.word_embeddings.weight")).shape[1] \
        if modality == "text" else 0
    torch.save(authors_layout(ours, modality, hidden), paths["save_dir"] / f"{modality}.bin")
    result = script(dataset, modality).main(flags(paths, train="False", device="cpu"))
    saved = json.loads((demo_paths["save_dir"] / f"{modality}.json").read_text(encoding="utf-8"))["test"]
    assert result["accuracy"] == saved["accuracy"] and result["per_class"] == saved["per_class"]


STUDENTS = ("audio", "video")


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("student", STUDENTS)
def test_kd_checkpoint_and_metrics_json(demo, dataset, student):
    save_dir = stage_paths(demo["workdir"], dataset)["save_dir"]
    name = f"text_KD_{student}.bin"
    state = torch.load(save_dir / name, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values())
    # A student checkpoint: the same keys and shapes as the unimodal model of its modality.
    unimodal = torch.load(save_dir / f"{student}.bin", map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in unimodal.items()}
    doc = json.loads((save_dir / f"text_KD_{student}.json").read_text(encoding="utf-8"))
    assert doc["checkpoint"] == name
    assert doc["args"]["student"] == student and doc["args"]["teacher"] == "text"
    dev = [row["dev"]["weighted_f1"] for row in doc["epochs"]]
    assert len(dev) == doc["args"]["epochs"] and doc["selected_epoch"] == 1 + dev.index(max(dev))
    for label in DATASETS[dataset].labels:
        assert {"precision", "recall", "f1-score", "support"} <= set(doc["test"]["per_class"][label])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_kd_objective_defaults_per_dataset(demo, dataset):
    expected = {"IEMOCAP": (1.0, 0.0), "MELD": (0.1, 1.0)}[dataset]  # docs/METHOD.md §3
    for student in STUDENTS:
        save_dir = stage_paths(demo["workdir"], dataset)["save_dir"]
        args = json.loads((save_dir / f"text_KD_{student}.json").read_text(encoding="utf-8"))["args"]
        assert (args["logit_weight"], args["feature_weight"]) == expected
        assert args["tau"] == 2.0


@pytest.fixture(scope="module")
def kd_evaluated(demo, tmp_path_factory):
    """kd_evaluated(dataset, student): ``KD.py --train False`` against copies of the demo's checkpoints."""
    runs: dict[tuple[str, str], dict] = {}

    def run(dataset: str, student: str) -> dict:
        if (dataset, student) not in runs:
            demo_paths = stage_paths(demo["workdir"], dataset)
            names = ["text.bin", f"text_KD_{student}.bin"] + (["audio.bin"] if student == "audio" else [])
            report = f"text_KD_{student}_substitutions.tsv"
            if (demo_paths["save_dir"] / report).is_file():
                names.append(report)
            paths = copy_checkpoints(demo_paths, tmp_path_factory.mktemp(f"kd_eval_{dataset}_{student}"), *names)
            result = script(dataset, "KD").main(flags(paths, train="False", student=student, device="cpu"))
            runs[(dataset, student)] = {"paths": paths, "demo_paths": demo_paths, "result": result}
        return runs[(dataset, student)]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("student", STUDENTS)
def test_kd_evaluation_only_reproduces_saved_test_metrics(kd_evaluated, dataset, student):
    run = kd_evaluated(dataset, student)
    doc = json.loads((run["demo_paths"]["save_dir"] / f"text_KD_{student}.json").read_text(encoding="utf-8"))
    result = run["result"]
    assert result["accuracy"] == doc["test"]["accuracy"]
    assert result["weighted_f1"] == doc["test"]["weighted_f1"]
    assert result["per_class"] == doc["test"]["per_class"]
    for name in ("text.bin", f"text_KD_{student}.bin"):  # evaluation changes no checkpoint
        assert digest(run["paths"]["save_dir"] / name) == digest(run["demo_paths"]["save_dir"] / name)
    assert not (run["paths"]["save_dir"] / f"text_KD_{student}.json").exists()


@pytest.mark.slow
def test_kd_evaluation_only_keeps_the_training_substitution_report(kd_evaluated):
    run = kd_evaluated("MELD", "audio")
    trained = SubstitutionReport.read(run["demo_paths"]["save_dir"] / "text_KD_audio_substitutions.tsv")
    assert {s.key.split("/")[0] for s in trained} == set(SPLITS)
    assert SubstitutionReport.read(run["paths"]["save_dir"] / "text_KD_audio_substitutions.tsv") == trained
    evaluated_report = SubstitutionReport.read(run["paths"]["save_dir"] / "text_KD_audio_eval_substitutions.tsv")
    assert evaluated_report == [t for t in trained if t.key.startswith("test/")]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_frames_stored_for_every_utterance_as_uint8(demo, dataset):
    paths = stage_paths(demo["workdir"], dataset)
    files = npy_files(paths["feature_dir"])
    assert set(files) == expected_npy(DATASETS[dataset], paths["data_dir"])
    for name in files:
        frames = np.load(paths["feature_dir"] / "video" / name, allow_pickle=False)
        assert frames.dtype == np.uint8 and frames.shape == FRAME_SHAPE, name


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_normalised_frames_equal_processor_pixel_values(demo, dataset):
    spec, paths = DATASETS[dataset], stage_paths(demo["workdir"], dataset)
    processor = load_image_processor(paths["pretrained_dir"])
    codec = FrameCodec(processor)
    substituted = {s.key for s in SubstitutionReport.read(paths["feature_dir"] / "video" / "substitutions.tsv")}
    checked = 0
    for split in SPLITS:
        for utt in load_split(spec, paths["data_dir"], split)[:2]:
            if f"{split}/{utt.key}" in substituted:
                continue
            # docs/METHOD.md §2 window: IEMOCAP [max(start-1, 0), end+1) in the dialogue video; MELD whole clip.
            window = None if dataset == "MELD" else (max(utt.start - 1.0, 0.0), utt.end + 1.0)
            (clip,) = media.decode_windows(utt.video_path, [window])
            assert clip is not None and clip.shape[0] == 8
            expected = processor(list(clip), return_tensors="pt")["pixel_values"][0]
            stored = np.load(frame_file(paths["feature_dir"], split, utt.key))
            loaded = codec.normalize(stored)
            assert loaded.dtype == torch.float32 and loaded.shape == expected.shape
            assert torch.allclose(loaded, expected, atol=1 / 255, rtol=0), f"{split}/{utt.key}"
            checked += 1
    assert checked >= 5


@pytest.fixture(scope="module")
def meld_faults(tmp_path_factory) -> dict[str, set[str]]:
    """fault kind -> utterance keys "split/dia_utt" of the generated MELD (the demo's seed 0)."""
    manifest = write_meld(tmp_path_factory.mktemp("meld_manifest"), seed=0, media=False)
    faults: dict[str, set[str]] = {}
    for utt in manifest["utterances"]:
        if utt["fault"]:
            faults.setdefault(utt["fault"], set()).add(f"{utt['split']}/{utt['dialogue_id']}_{utt['utterance_id']}")
    assert set(faults) == {"missing", "corrupt", "no_audio", "overlong"}
    return faults


@pytest.mark.slow
def test_video_substitution_report_and_black_frames(demo, meld_faults):
    feature_dir = stage_paths(demo["workdir"], "MELD")["feature_dir"]
    items = SubstitutionReport.read(feature_dir / "video" / "substitutions.tsv")
    assert {s.key for s in items} == meld_faults["missing"] | meld_faults["corrupt"]
    assert all(s.replacement == "black frames" and s.path.endswith(".mp4") for s in items)
    reasons = {s.key: s.reason for s in items}
    assert "not found" in reasons[next(iter(meld_faults["missing"]))]
    for key in meld_faults["missing"] | meld_faults["corrupt"]:
        split, stem = key.split("/")
        assert not np.load(frame_file(feature_dir, split, stem)).any(), key
    for key in meld_faults["no_audio"] | meld_faults["overlong"]:  # readable video: real frames
        split, stem = key.split("/")
        assert np.load(frame_file(feature_dir, split, stem)).any(), key
    iemocap = stage_paths(demo["workdir"], "IEMOCAP")["feature_dir"]
    assert SubstitutionReport.read(iemocap / "video" / "substitutions.tsv") == []


@pytest.mark.slow
def test_audio_substitution_report_lists_silence(demo, meld_faults):
    save_dir = stage_paths(demo["workdir"], "MELD")["save_dir"]
    items = SubstitutionReport.read(save_dir / "audio_substitutions.tsv")
    expected = meld_faults["missing"] | meld_faults["corrupt"] | meld_faults["no_audio"]
    assert {s.key for s in items} == expected
    assert len(items) == len(expected)
    assert all(s.replacement == "silence" for s in items)
    assert "no audio" in next(s.reason for s in items if s.key in meld_faults["no_audio"])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_audio_cache_holds_each_readable_clip_once(demo, meld_faults, dataset, monkeypatch):
    # The demo's audio stages stored every readable clip once in <feature_dir>/audio_cache (failures are
    # not stored: each stage reports them again); a later read gives the samples decoding gives.
    from magtkd.decoder import AudioCache

    paths = stage_paths(demo["workdir"], dataset)
    cache = AudioCache(paths["feature_dir"] / "audio_cache")
    unreadable = meld_faults["missing"] | meld_faults["corrupt"] | meld_faults["no_audio"] if dataset == "MELD" else set()
    utterances = all_utterances(DATASETS[dataset], paths["data_dir"])
    readable = [u for u in utterances if f"{u.split}/{u.key}" not in unreadable]
    assert len(readable) < len(utterances) or dataset == "IEMOCAP"
    assert {p.name for p in cache.folder.glob("*.npz")} == {cache.entry(u.audio_path).name for u in readable}
    assert not list(cache.folder.glob(".*.tmp"))
    monkeypatch.setattr(decoder, "decode_audio_isolated", lambda *a, **k: pytest.fail("decoded again"))
    for utt in readable[:: max(len(readable) // 4, 1)]:
        native_sr, mono = media.decode_audio_native(utt.audio_path)  # the same decoding, in this process
        assert np.array_equal(cache.load(utt.audio_path), media.resample_audio(utt.audio_path, mono, native_sr)), utt.key


@pytest.mark.slow
def test_mismatched_checkpoint_names_file_and_keys(demo, tmp_path):
    paths = stage_paths(demo["workdir"], "IEMOCAP")
    save_dir = tmp_path / "save_model"
    save_dir.mkdir()
    shutil.copy(paths["save_dir"] / "text.bin", save_dir / "video.bin")
    text_keys = set(torch.load(paths["save_dir"] / "text.bin", weights_only=True))
    video_keys = set(torch.load(paths["save_dir"] / "video.bin", weights_only=True))
    with pytest.raises(CheckpointError) as info:
        script("IEMOCAP", "video").main(flags({**paths, "save_dir": save_dir}, train="False", device="cpu"))
    message = str(info.value)
    assert str(save_dir / "video.bin") in message
    assert "missing keys" in message and sorted(video_keys - text_keys)[0] in message
    assert "unexpected keys" in message and sorted(text_keys - video_keys)[0] in message
    assert "video.py" in message


@pytest.mark.slow
def test_first_stage_checkpoint_of_the_other_dataset_is_refused(demo, tmp_path):
    paths = stage_paths(demo["workdir"], "MELD")
    iemocap = copy_checkpoints(stage_paths(demo["workdir"], "IEMOCAP"), tmp_path, "text.bin", "text.json")
    with pytest.raises(CheckpointError, match=r"trained on IEMOCAP .* needs a MELD checkpoint written by MELD/text.py"):
        script("MELD", "text").main(flags({**paths, "save_dir": iemocap["save_dir"]}, train="False"))


@pytest.mark.slow
def test_truncated_checkpoint_and_frame_file_name_the_file_and_the_stage(demo, tmp_path):
    paths = copy_checkpoints(stage_paths(demo["workdir"], "MELD"), tmp_path, "text.bin")
    blob = (paths["save_dir"] / "text.bin").read_bytes()
    (paths["save_dir"] / "text.bin").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*text.bin .*truncated.*re-run MELD/text.py"):
        script("MELD", "text").main(flags(paths, train="False"))
    npy = tmp_path / "0_0.npy"
    npy.write_bytes(next((paths["feature_dir"] / "video" / "test").glob("*.npy")).read_bytes()[:100])
    with pytest.raises(FeatureFileError, match=r"cannot read frame file .*0_0.npy.*video_feature_extract.py"):
        load_frames(npy)
