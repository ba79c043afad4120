"""Stages 1-4 (docs/METHOD.md §0, §2, §6): unimodal checkpoints, stored frames, bad input.

Most checks read the artifacts of the session's demo run (``demo`` fixture) and
run the scripts' evaluation-only mode against them; nothing the demo trained is
trained again. Frame extraction is cheap on the generated data, so it is re-run
here (in-process, and as a killed-and-resumed subprocess).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, copy_checkpoints, flags, script, stage_paths
from IEMOCAP.config import IEMOCAP
from magtkd import decoder, media
from magtkd.dataset import load_samples, load_split
from magtkd.frames import FrameCodec, frame_file
from magtkd.loaders import AudioField, SampleDataset
from magtkd.spec import SPLITS
from magtkd.artifacts import SubstitutionReport
from magtkd.checkpoints import CheckpointError
from magtkd.pretrained import PretrainedMissingError, load_audio_encoder, load_image_processor
from magtkd.synthetic.media import read_index
from magtkd.synthetic.meld import write_meld
from magtkd.synthetic.models import AV_HIDDEN, TEXT_HIDDEN
from magtkd.cli import paths_parser
from magtkd.runtime import resolve_device
from MELD.config import MELD

DATASETS = {"IEMOCAP": IEMOCAP, "MELD": MELD}
MODALITIES = ("text", "audio", "video")
FRAME_SHAPE = (8, 3, 32, 32)  # 8 frames, RGB, the stand-in processor's 32x32 crop


def generated_paths(generated: Path, dataset: str, tmp: Path) -> dict[str, Path]:
    return {
        "data_dir": generated / "datasets" / dataset,
        "pretrained_dir": generated / "pretrained_model",
        "save_dir": tmp / "save_model",
        "feature_dir": tmp / "feature",
    }


def all_utterances(spec, data_dir: Path) -> list:
    return [u for split in SPLITS for u in load_split(spec, data_dir, split)]


def npy_files(feature_dir: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every stored frame file (temporary files excluded)."""
    root = feature_dir / "video"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*.npy"))}


def expected_npy(spec, data_dir: Path) -> set[str]:
    return {f"{u.split}/{u.key}.npy" for u in all_utterances(spec, data_dir)}


# --------------------------------------------------------------------------- checkpoints and metrics


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


# --------------------------------------------------------------------------- stored frames


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


def authors_loop(video: Path, t0: float, t1: float) -> list[int] | None:
    """The frame indices the authors' OpenCV loop picks from [t0, t1] (docs/METHOD.md §2), written out
    independently of the library: positions are 1-based after each read, step from the window's duration."""
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        fps, total = float(stream.average_rate), stream.frames
    assert total > 0
    step = max(int(fps * (t1 - t0) / 8), 1)
    kept, count = [], 0
    for i in range(total):
        if t0 * fps <= i + 1 <= t1 * fps:
            count += 1
            if count % step == 0 and len(kept) < 8:
                kept.append(i)
    return kept + [kept[-1]] * (8 - len(kept)) if kept else None


def test_decoded_frames_are_the_method_window_and_positions(generated):
    utts = all_utterances(IEMOCAP, generated / "datasets" / "IEMOCAP")
    by_video: dict[Path, list] = {}
    for utt in utts:
        by_video.setdefault(utt.video_path, []).append(utt)
    video, group = max(by_video.items(), key=lambda item: len(item[1]))
    windows = [(max(u.start - 1.0, 0.0), u.end + 1.0) for u in group]
    clips = media.decode_windows(video, windows)  # all windows of the dialogue in one call
    assert len(clips) == len(group)
    for (t0, t1), clip in zip(windows, clips):
        assert [read_index(frame) for frame in clip] == authors_loop(video, t0, t1)
    # Single windows elsewhere, and short windows (n < 8: all frames, last repeated).
    for utt in utts[::17]:
        window = (max(utt.start - 1.0, 0.0), utt.end + 1.0)
        (clip,) = media.decode_windows(utt.video_path, [window])
        assert [read_index(f) for f in clip] == authors_loop(utt.video_path, *window)
    # Short windows (positions 1..4; position 10 only; none): last frame repeated, or no frame.
    short = media.decode_windows(video, [(0.0, 0.45), (1.0, 1.05), (0.0, 0.0)])
    assert [read_index(f) for f in short[0]] == [0, 1, 2, 3, 3, 3, 3, 3]
    assert [read_index(f) for f in short[1]] == [9] * 8
    assert short[2] is None  # no position in the window (the stage substitutes black frames)


def _past_the_end_data(generated: Path, root: Path) -> tuple[Path, str]:
    """A copy of the generated IEMOCAP CSVs (media linked) where one test utterance's window runs
    past the end of its dialogue video; returns the data folder and that utterance's key."""
    import csv

    import av

    source = generated / "datasets" / "IEMOCAP"
    data_dir = root / "IEMOCAP"
    data_dir.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.is_dir():
            (data_dir / entry.name).symlink_to(entry)
    for split in SPLITS:
        shutil.copy2(source / f"IEMOCAP_{split}.csv", data_dir / f"IEMOCAP_{split}.csv")
    path = data_dir / "IEMOCAP_test.csv"
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    last = max(i for i, r in enumerate(rows) if r["Dialogue_ID"] == rows[0]["Dialogue_ID"])
    with av.open(str(data_dir / rows[last]["Video_Path"])) as container:
        stream = container.streams.video[0]
        video_seconds = stream.frames / float(stream.average_rate)
    rows[last]["End_Time"] = f"{video_seconds + 2.5:.4f}"  # window end = end + 1, 3.5 s past the end
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return data_dir, f"test/{rows[last]['Dialogue_ID']}_{rows[last]['Utterance_ID']}"


@pytest.mark.parametrize("channel_order", ["rgb", "bgr"])
def test_extraction_stage_stores_the_authors_frames(generated, tmp_path, monkeypatch, channel_order):
    # The stage end to end on dialogue videos whose frames show their own index: every stored window
    # holds exactly the frames the authors' loop picks, including one that runs past the end of the
    # video (fewer than 8 kept, the last repeated). Resize/crop is replaced by the identity so that the
    # stored frames can be read back.
    data_dir, past_end = _past_the_end_data(generated, tmp_path / "datasets")
    paths = {**generated_paths(generated, "IEMOCAP", tmp_path), "data_dir": data_dir}
    monkeypatch.setattr(FrameCodec, "resize_crop", lambda self, frames: np.ascontiguousarray(
        frames.transpose(0, 3, 1, 2)))
    script("IEMOCAP", "video_feature_extract").main(flags(paths, num_workers=0, channel_order=channel_order))
    checked, swapped = 0, 0
    for utt in all_utterances(IEMOCAP, data_dir):
        stored = np.load(frame_file(paths["feature_dir"], utt.split, utt.key)).transpose(0, 2, 3, 1)
        if channel_order == "bgr":
            rgb = media.decode_windows(utt.video_path, [(max(utt.start - 1.0, 0.0), utt.end + 1.0)])[0]
            assert np.array_equal(stored, rgb[..., ::-1])
            swapped += not np.array_equal(stored, rgb)  # coloured (not grey) frames show the swap
            stored = stored[..., ::-1]
        expected = authors_loop(utt.video_path, max(utt.start - 1.0, 0.0), utt.end + 1.0)
        assert [read_index(frame) for frame in stored] == expected, f"{utt.split}/{utt.key}"
        if f"{utt.split}/{utt.key}" == past_end:
            assert len(set(expected)) < 8 and expected[-1] == expected[-2]
        checked += 1
    assert checked == len(expected_npy(IEMOCAP, data_dir))
    assert SubstitutionReport.read(paths["feature_dir"] / "video" / "substitutions.tsv") == []
    assert swapped == (checked if channel_order == "bgr" else 0)


def test_meld_clip_with_wrong_frame_count_metadata_is_reported(generated, tmp_path, monkeypatch):
    from magtkd import frames as dataset

    utt = load_split(MELD, generated / "datasets" / "MELD", "dev")[0]
    dataset._init_worker(load_image_processor(generated / "pretrained_model"))
    (job,) = dataset.plan_jobs(MELD, [utt], tmp_path)
    assert job.windows == (None,) and dataset.run_job(job) == []  # metadata agrees with the decoded count
    with media.av.open(str(utt.video_path)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    assert 8 < decoded < 24
    # Metadata too high: the authors' step (metadata // 8) still decides; the clip is listed with both counts.
    monkeypatch.setattr(media, "metadata_frame_count", lambda container, stream, fps: 24)
    assert dataset.run_job(job) == [(f"dev/{utt.key}", str(utt.video_path),
                                     f"metadata frame count 24, decoded {decoded}", dataset.FRAME_COUNT_NOTE)]
    assert frame_file(tmp_path, "dev", utt.key).is_file()
    # So high that no frame is kept (step beyond the clip): black frames, both counts in the reason.
    monkeypatch.setattr(media, "metadata_frame_count", lambda container, stream, fps: 1000)
    assert dataset.run_job(job) == [(f"dev/{utt.key}", str(utt.video_path), "no frame in the utterance's time "
                                     f"window; metadata frame count 1000, decoded {decoded}", "black frames")]


def test_window_rule_of_the_extraction_stage(generated):
    from dataclasses import replace

    from magtkd.dataset import window_of

    utts = all_utterances(IEMOCAP, generated / "datasets" / "IEMOCAP")
    for utt in utts:
        assert window_of(IEMOCAP, utt) == (max(utt.start - 1.0, 0.0), utt.end + 1.0)
    early = replace(utts[0], start=0.4, end=1.2)
    assert window_of(IEMOCAP, early) == (0.0, 2.2)
    meld = load_split(MELD, generated / "datasets" / "MELD", "test")[0]
    assert window_of(MELD, meld) is None


@pytest.fixture(scope="module")
def extracted(generated, tmp_path_factory):
    """One uninterrupted in-process IEMOCAP frame extraction, counting container opens per path.

    Decoding runs in a supervised child process, so opens are logged to a file (one line each)."""
    tmp = tmp_path_factory.mktemp("frames_once")
    paths = generated_paths(generated, "IEMOCAP", tmp)
    opened = tmp / "opened.txt"
    real_open = media._open

    def counting_open(path):
        with open(opened, "a", encoding="utf-8") as handle:
            handle.write(f"{path}\n")
        return real_open(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(media, "_open", counting_open)
        result = script("IEMOCAP", "video_feature_extract").main(flags(paths, num_workers=0))
    opens = Counter(Path(line) for line in opened.read_text(encoding="utf-8").splitlines())
    return {"paths": paths, "opens": opens, "result": result}


def test_each_dialogue_video_is_opened_once(extracted):
    paths, opens = extracted["paths"], extracted["opens"]
    utts = all_utterances(IEMOCAP, paths["data_dir"])
    dialogues = {(u.split, u.dialogue_id) for u in utts}
    assert len(dialogues) < len(utts)  # dialogues really serve several utterances
    assert set(opens) == {u.video_path for u in utts}
    assert all(count == 1 for count in opens.values()), opens
    assert len(opens) == len(dialogues)
    assert extracted["result"]["extracted"] == len(utts)
    assert extracted["result"]["videos"] == len(dialogues)
    assert set(npy_files(paths["feature_dir"])) == expected_npy(IEMOCAP, paths["data_dir"])


def _stored_count(feature_dir: Path) -> int:
    root = feature_dir / "video"
    return sum(1 for split in SPLITS if (root / split).is_dir() for _ in (root / split).glob("*.npy"))


@pytest.mark.slow
def test_killed_extraction_resumes_to_identical_files(generated, extracted, tmp_path, monkeypatch, caplog):
    paths = generated_paths(generated, "IEMOCAP", tmp_path / "run")
    feature_dir = paths["feature_dir"]
    command = [sys.executable, str(REPO / "IEMOCAP" / "video_feature_extract.py"), *flags(paths, num_workers=0)]
    total = len(expected_npy(IEMOCAP, paths["data_dir"]))

    # 1. Start, and SIGKILL as soon as some frame files exist (cwd elsewhere: scripts work from anywhere).
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if _stored_count(feature_dir) > 0:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    stored = npy_files(feature_dir)
    if proc.returncode != -signal.SIGKILL or len(stored) >= total:
        # Finished before the kill landed: emulate one (outputs missing, no report yet).
        for name in list(stored)[::3]:
            (feature_dir / "video" / name).unlink()
        (feature_dir / "video" / "substitutions.tsv").unlink(missing_ok=True)
    missing = sorted(expected_npy(IEMOCAP, paths["data_dir"]) - set(npy_files(feature_dir)))
    assert missing
    # A write cut short by the kill leaves its temporary sibling behind (magtkd.utils.atomic_path).
    split, name = missing[0].split("/")
    stray = feature_dir / "video" / split / f".{name}.abcd1234.tmp"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"\x93NUMPY half-written")

    # 2. Resume to completion, again as a script run from another working directory.
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = npy_files(feature_dir)
    reference = npy_files(extracted["paths"]["feature_dir"])
    assert set(resumed) == set(reference) == expected_npy(IEMOCAP, paths["data_dir"])
    assert all(resumed[name] == reference[name] for name in reference)
    assert (feature_dir / "video" / "substitutions.tsv").read_bytes() == (
        extracted["paths"]["feature_dir"] / "video" / "substitutions.tsv").read_bytes()

    # 3. Nothing left to do: no video is opened, no file rewritten, the log says 0 to extract.
    stamps = {p: p.stat().st_mtime_ns for p in (feature_dir / "video").glob("*/*.npy")}
    opened: list = []
    monkeypatch.setattr(media, "_open", lambda path: opened.append(path))
    caplog.set_level("INFO", logger="magtkd")
    result = script("IEMOCAP", "video_feature_extract").main(flags(paths, num_workers=0))
    assert opened == []
    assert result["extracted"] == 0 and result["videos"] == 0
    assert "'to_extract': 0" in caplog.text and "'source_videos': 0" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


# --------------------------------------------------------------------------- substitutions (docs/METHOD.md §6)


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


# --------------------------------------------------------------------------- audio batching


@pytest.fixture(scope="module")
def audio_pair(generated):
    """The stand-in audio encoder (eval mode), and the shortest and longest of a few IEMOCAP clips."""
    model, extractor = load_audio_encoder(generated / "pretrained_model", IEMOCAP.num_classes)
    model.eval()
    samples = load_samples(IEMOCAP, generated / "datasets" / "IEMOCAP")["train"][:12]
    dataset = SampleDataset(samples, [AudioField(extractor)])
    items = [dataset[i] for i in range(len(samples))]
    lengths = [len(item["audio"][0]) for item in items]
    assert max(lengths) - min(lengths) > 1600  # the long clip is at least 0.1 s longer
    return model, dataset, items[int(np.argmin(lengths))], items[int(np.argmax(lengths))]


def test_audio_batches_are_right_padded_with_a_mask(audio_pair):
    _, dataset, short, long = audio_pair
    n, m = len(short["audio"][0]), len(long["audio"][0])
    for order in ([short, long], [long, short]):
        batch = dataset.collate(order)
        i = order.index(short)
        assert batch["audio_values"].shape == (2, m)
        assert torch.equal(batch["audio_values"][i, :n], torch.from_numpy(short["audio"][0]))
        assert batch["audio_mask"][i, :n].all() and not batch["audio_mask"][i, n:].any()
        assert not batch["audio_values"][i, n:].any()
        assert batch["audio_mask"][1 - i].all()


def test_audio_representation_does_not_depend_on_the_batch(audio_pair):
    model, dataset, short, long = audio_pair
    with torch.no_grad():
        alone = dataset.collate([short])
        rep_alone, logits_alone = model.encode(alone)
        for order in ([short, long], [long, short]):
            batch = dataset.collate(order)
            i = order.index(short)
            rep, logits = model.encode(batch)
            assert torch.allclose(rep[i], rep_alone[0], atol=1e-5), (rep[i] - rep_alone[0]).abs().max()
            assert torch.allclose(logits[i], logits_alone[0], atol=1e-5)


# --------------------------------------------------------------------------- bad input (docs/METHOD.md §6)


def test_missing_pretrained_folder_names_it_and_the_download(generated, tmp_path):
    paths = generated_paths(generated, "IEMOCAP", tmp_path)
    paths["pretrained_dir"] = tmp_path / "no_models"
    with pytest.raises(PretrainedMissingError) as info:
        script("IEMOCAP", "text").main(flags(paths, train="False", device="cpu"))
    message = str(info.value)
    assert str((tmp_path / "no_models" / "roberta-large").resolve()) in message
    assert "hf download FacebookAI/roberta-large" in message


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


def test_kd_without_text_checkpoint_says_text_py_writes_it(generated, tmp_path):
    paths = generated_paths(generated, "IEMOCAP", tmp_path)
    with pytest.raises(CheckpointError) as info:
        script("IEMOCAP", "KD").main(flags(paths, student="audio", epochs=1, device="cpu"))
    message = str(info.value)
    assert str(tmp_path / "save_model" / "text.bin") in message and "text.py" in message
    assert not (tmp_path / "save_model" / "text_KD_audio.bin").exists()


# --------------------------------------------------------------------------- running the scripts


@pytest.mark.slow
def test_help_works_from_another_directory(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "IEMOCAP" / "text.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "python IEMOCAP/text.py" in done.stdout and "--train TRAIN" in done.stdout
    assert "--pretrained_dir" in done.stdout


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_default_folders_do_not_depend_on_the_working_directory(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = paths_parser(DATASETS[dataset], REPO / dataset, None).parse_args([])
    assert args.data_dir == REPO / "datasets" / dataset
    assert args.pretrained_dir == REPO / "pretrained_model"
    assert args.save_dir == REPO / dataset / dataset / "save_model"
    assert args.feature_dir == REPO / dataset / "feature"
    assert args.device is None


def test_default_device_is_cuda_when_available_else_cpu():
    expected = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(None) == expected
    assert resolve_device("cpu") == torch.device("cpu")
