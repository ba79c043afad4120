"""Stages 7-8 of the demo (docs/METHOD.md §4, §5, §6): the first-stage feature pickles, vectors that come
from their checkpoints whatever the batch size, and the fusion reading them (the other dataset's checkpoint
refused; killed and resumed to the same model)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (REPO, SUBPROCESS_ENV, assert_same_tensors, copy_checkpoints, digest, flags,
                     kill_after_first_epoch, script, stage_paths, tiny_iemocap)
from IEMOCAP.config import IEMOCAP, speaker_letter
from magtkd import utils
from magtkd.artifacts import StageFiles, feature_path
from magtkd.checkpoints import load_checkpoint
from magtkd.dataset import build_samples, group_dialogues, load_speaker2id, load_split
from magtkd.loaders import SampleDataset
from magtkd.pickles import FEATURE_KEYS, load_features
from magtkd.pretrained import load_encoder
from magtkd.spec import SPLITS
from magtkd.synthetic.models import AV_HIDDEN, TEXT_HIDDEN
from magtkd.utils import UserError
from MELD.config import MELD


DATASETS = {"IEMOCAP": IEMOCAP, "MELD": MELD}

PICKLE_KEYS = {"vids", *FEATURE_KEYS, "speakers", "labels", "dia2utt"}

CHECKPOINTS = {"text": "text.bin", "audio": "audio.bin", "video": "video.bin",
               "audio_kd": "text_KD_audio.bin", "video_kd": "text_KD_video.bin"}


def expected_speakers(spec, dialogue: list, speaker2id: dict | None) -> list[int]:
    if speaker2id is not None:
        return [speaker2id[u.speaker] for u in dialogue]
    order: dict[str, int] = {}
    return [order.setdefault(speaker_letter(u.speaker), len(order)) for u in dialogue]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("split", SPLITS)
def test_feature_pickle_layout(demo, dataset, split):
    spec, paths = DATASETS[dataset], stage_paths(demo["workdir"], dataset)
    path = feature_path(paths["feature_dir"], split)
    with open(path, "rb") as handle:  # our own file: the exact top-level keys
        assert set(pickle.load(handle)) == PICKLE_KEYS
    features = load_features(path)  # the restricted unpickler admits it
    assert set(features) == PICKLE_KEYS

    utts = load_split(spec, paths["data_dir"], split)
    dialogues = group_dialogues(utts)
    speaker2id = load_speaker2id(paths["data_dir"]) if dataset == "MELD" else None
    vids = features["vids"]
    assert vids == [dia for dia, _ in dialogues] and all(type(v) is int for v in vids)
    for key in FEATURE_KEYS + ("speakers", "labels", "dia2utt"):
        assert isinstance(features[key], dict) and list(features[key]) == vids, key
    for dia, dialogue in dialogues:
        assert features["dia2utt"][dia] == [u.utterance_id for u in dialogue]
        assert features["labels"][dia] == [u.label for u in dialogue]
        assert features["speakers"][dia] == expected_speakers(spec, dialogue, speaker2id)
        for key in ("speakers", "labels", "dia2utt"):
            assert all(type(v) is int for v in features[key][dia])
        for key in FEATURE_KEYS:
            vectors = features[key][dia]
            assert isinstance(vectors, list) and len(vectors) == len(dialogue)
            for vec in vectors:
                # D is the audio/video width (32), not the text model's (48) (docs/METHOD.md §2).
                assert isinstance(vec, np.ndarray) and vec.dtype == np.float32 and vec.shape == (AV_HIDDEN,)
                assert np.isfinite(vec).all()
    assert AV_HIDDEN != TEXT_HIDDEN
    if dataset == "IEMOCAP":
        assert {s for dia in vids for s in features["speakers"][dia]} == {0, 1}
    flat = {key: np.stack([v for dia in vids for v in features[key][dia]]) for key in FEATURE_KEYS}
    for a, b in (("audio", "audio_kd"), ("video", "video_kd"), ("text", "audio")):
        assert not np.allclose(flat[a], flat[b]), (a, b)  # each key has its own model


@pytest.mark.slow
def test_feature_vectors_come_from_their_checkpoints(demo):
    """The first batch of IEMOCAP test, run through each checkpoint, gives the pickle's vectors."""
    paths = stage_paths(demo["workdir"], "IEMOCAP")
    utts = load_split(IEMOCAP, paths["data_dir"], "test")
    features = load_features(feature_path(paths["feature_dir"], "test"))
    flat = {key: [v for dia in features["vids"] for v in features[key][dia]] for key in FEATURE_KEYS}
    order = [u for _, dialogue in group_dialogues(utts) for u in dialogue]
    assert order == utts  # CSV order is already grouped by dialogue here
    batch_rows = 16  # extract_first_stage_features.py's default --batch_size, so batches match
    samples = build_samples(utts)[:batch_rows]
    with torch.inference_mode():
        for key, checkpoint in CHECKPOINTS.items():
            modality = key.removesuffix("_kd")
            model, field = load_encoder(modality, paths["pretrained_dir"], IEMOCAP.num_classes, paths["feature_dir"])
            load_checkpoint(model, paths["save_dir"] / checkpoint, "test").eval()
            dataset = SampleDataset(samples, [field])
            batch = dataset.collate([dataset[i] for i in range(len(samples))])
            rep, _ = model.encode(batch)
            expected = np.stack(flat[key][:batch_rows])
            assert np.allclose(rep.numpy(), expected, atol=1e-5), (key, np.abs(rep.numpy() - expected).max())


def flat_by_key(features: dict, key: str) -> dict[tuple[int, int], np.ndarray]:
    """(dialogue id, utterance id) -> vector of one feature key."""
    return {(dia, utt): vec for dia in features["vids"]
            for utt, vec in zip(features["dia2utt"][dia], features[key][dia])}


@pytest.fixture(scope="module")
def extracted_twice(demo, generated, tmp_path_factory):
    """IEMOCAP features extracted with --batch_size 1 and 8 from the demo's checkpoints.

    A few rows per split keep it quick (the prefixes of the kept rows are whole);
    the demo's stored frames are copied into each feature folder.
    """
    paths = stage_paths(demo["workdir"], "IEMOCAP")
    data_dir = tiny_iemocap(generated, tmp_path_factory.mktemp("extract_data"), {"train": 12, "dev": 6, "test": 10})
    out = {}
    for batch_size in (1, 8):
        feature_dir = tmp_path_factory.mktemp(f"features_bs{batch_size}")
        shutil.copytree(paths["feature_dir"] / "video", feature_dir / "video")
        strays = [feature_dir / f".{name}.k1ll.tmp" for name in  # left by a killed run's writes
                  ("first_stage_test_features.pkl", "first_stage_features.json", "first_stage_substitutions.tsv")]
        for stray in strays:
            stray.write_bytes(b"")
        before = {name: digest(paths["save_dir"] / name) for name in CHECKPOINTS.values()}
        script("IEMOCAP", "extract_first_stage_features").main(
            flags({**paths, "data_dir": data_dir, "feature_dir": feature_dir}, batch_size=batch_size, device="cpu"))
        assert {name: digest(paths["save_dir"] / name) for name in CHECKPOINTS.values()} == before
        assert not any(stray.exists() for stray in strays)  # removed at the start
        out[batch_size] = {split: load_features(feature_path(feature_dir, split)) for split in SPLITS}
    # The demo's own extraction (--batch_size 16, all rows), for the rows kept here.
    out[16] = {split: load_features(feature_path(paths["feature_dir"], split)) for split in SPLITS}
    return out


@pytest.mark.slow
def test_extraction_metadata_does_not_depend_on_batch_size(extracted_twice):
    for split in SPLITS:
        one, eight, full = (extracted_twice[b][split] for b in (1, 8, 16))
        for key in ("vids", "speakers", "labels", "dia2utt"):
            assert one[key] == eight[key], (split, key)
        kept = flat_by_key(one, "text")
        assert kept and set(kept) <= set(flat_by_key(full, "text"))
        for dia in one["vids"]:  # the kept rows are prefixes of the demo's dialogues
            n = len(one["labels"][dia])
            assert one["labels"][dia] == full["labels"][dia][:n]
            assert one["speakers"][dia] == full["speakers"][dia][:n]


@pytest.mark.slow
@pytest.mark.parametrize("key", [
    "text", "video", "video_kd",
    "audio", "audio_kd",
])
def test_extracted_features_do_not_depend_on_batch_size(extracted_twice, key):
    for split in SPLITS:
        one, eight, full = (flat_by_key(extracted_twice[b][split], key) for b in (1, 8, 16))
        assert list(one) == list(eight)
        a, b = np.stack(list(one.values())), np.stack(list(eight.values()))
        assert np.allclose(a, b, atol=1e-5, rtol=0), (split, np.abs(a - b).max())
        c = np.stack([full[k] for k in one])
        assert np.allclose(a, c, atol=1e-5, rtol=0), (split, np.abs(a - c).max())


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_fusion_labels_follow_the_test_pickle(demo, dataset):
    paths = stage_paths(demo["workdir"], dataset)
    test = load_features(feature_path(paths["feature_dir"], "test"))
    out = json.loads((paths["save_dir"] / "multimodal_fusion_best.json").read_text(encoding="utf-8"))
    assert out["labels"] == [y for dia in test["vids"] for y in test["labels"][dia]]
    assert len(out["preds"]) == len(out["labels"])
    assert set(out["preds"]) <= set(range(DATASETS[dataset].num_classes))


@pytest.mark.slow
def test_meld_fusion_checkpoint_on_iemocap_features_is_refused(demo, tmp_path):
    meld_save = stage_paths(demo["workdir"], "MELD")["save_dir"]
    iemocap_features = stage_paths(demo["workdir"], "IEMOCAP")["feature_dir"]
    with pytest.raises(UserError, match=r"trained on MELD features.*IEMOCAP/multimodal_fusion.py"):
        script("IEMOCAP", "multimodal_fusion").main(["--feature_dir", str(iemocap_features),
                                                     "--save_dir", str(meld_save), "--train", "False"])
    # Without its metrics JSON (as the authors' checkpoints come) the class count still gives it away.
    bare = copy_checkpoints({"save_dir": meld_save}, tmp_path, StageFiles.fusion(meld_save).checkpoint.name)["save_dir"]
    with pytest.raises(UserError, match=r"was not trained for IEMOCAP: it has 7 classes, IEMOCAP has 6"):
        script("IEMOCAP", "multimodal_fusion").main(["--feature_dir", str(iemocap_features),
                                                     "--save_dir", str(bare), "--train", "False"])


# --------------------------------------------------------------------------- the fusion on the demo's features, killed

def fusion_command(features: Path, save_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "IEMOCAP" / "multimodal_fusion.py"), "--feature_dir", str(features),
            "--save_dir", str(save_dir), "--lr", "1e-3", "--batch_size", "2", "--dropout", "0.1", "--device", "cpu",
            *extra]


@pytest.mark.slow
def test_fusion_killed_and_resumed_ends_bit_identical(demo: dict, tmp_path: Path, caplog) -> None:
    features = demo["workdir"] / "IEMOCAP" / "feature"
    epochs = ["--epochs", "4"]  # killed after epoch 1 (or a later one on a slow machine), resumed to the end
    full = subprocess.run(fusion_command(features, tmp_path / "full", *epochs, "--save_state", "True"),
                          env=SUBPROCESS_ENV, capture_output=True, text=True, cwd=REPO)
    assert full.returncode == 0, full.stderr[-2000:]
    save_dir = tmp_path / "resumed"
    # The same command starts (saving the state every epoch) and restarts the run
    command = fusion_command(features, save_dir, *epochs, "--resume", "True")
    killed_at = kill_after_first_epoch(command, StageFiles.fusion(save_dir).state)
    assert 1 <= killed_at < 4
    again = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from epoch {killed_at} of 4" in again.stderr

    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    ours, full_files = StageFiles.fusion(save_dir), StageFiles.fusion(tmp_path / "full")
    assert_same_tensors(load(ours.checkpoint), load(full_files.checkpoint))
    assert_same_tensors(load(ours.state)["model"], load(full_files.state)["model"])
    metrics = lambda d: json.loads(StageFiles.fusion(d).metrics.read_text())  # noqa: E731
    strip = lambda curve: [{k: v for k, v in e.items() if not k.endswith(("seconds", "samples_per_second"))} for e in curve]  # noqa: E731
    assert strip(metrics(save_dir)["epochs"]) == strip(metrics(tmp_path / "full")["epochs"])
    assert metrics(save_dir)["complete"] and metrics(save_dir)["selected_epoch"] == metrics(tmp_path / "full")["selected_epoch"]

    # Other training flags: refused, naming them. Without --resume: the state is ignored, and says so.
    fusion = script("IEMOCAP", "multimodal_fusion")
    argv = fusion_command(features, save_dir)[2:]
    with pytest.raises(utils.UserError, match="--epochs 4 then, 5 now"):
        fusion.main(argv + ["--epochs", "5", "--resume", "True"])
    caplog.set_level("INFO", logger="magtkd")
    fusion.main(argv + ["--epochs", "1", "--save_state", "True"])
    assert "ignoring the training state" in caplog.text and "resuming" not in caplog.text
    assert load(ours.state)["epoch"] == 1
