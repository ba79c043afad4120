"""``<DS>/video_feature_extract.py`` (stage 3, docs/METHOD.md §2, §6) on the generated data: the authors' frames
stored (IEMOCAP), each dialogue video opened once, a crashing clip (MELD), kill and resume."""

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

from helpers import REPO, all_utterances, authors_loop, expected_npy, flags, generated_paths, npy_files, script
from IEMOCAP.config import IEMOCAP
from magtkd import media, spec
from magtkd.artifacts import SubstitutionReport
from magtkd.dataset import load_split
from magtkd.frames import frame_file, FrameCodec
from magtkd.spec import SPLITS
from magtkd.synthetic.media import read_index
from MELD.config import MELD


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


@pytest.mark.parametrize("workers", [0, 2])
def test_frame_extraction_survives_a_crashing_clip(bad_meld, crash_hook, generated, tmp_path, workers):
    feature_dir = tmp_path / "feature"
    argv = ["--data_dir", str(bad_meld["data_dir"]), "--pretrained_dir", str(generated / "pretrained_model"),
            "--feature_dir", str(feature_dir), "--num_workers", str(workers)]
    (feature_dir / "video" / "test").mkdir(parents=True)
    strays = [feature_dir / "video" / name for name in
              (".substitutions.tsv.k1ll.tmp", ".extraction.json.k1ll.tmp", "test/.0_0.npy.k1ll.tmp")]
    for stray in strays:  # left by a killed run's writes
        stray.write_bytes(b"")
    result = script("MELD", "video_feature_extract").main(argv)
    assert not any(stray.exists() for stray in strays)
    total = sum(len(load_split(MELD, bad_meld["data_dir"], s)) for s in spec.SPLITS)
    assert result["extracted"] == total
    items = {s.key: s for s in SubstitutionReport.read(feature_dir / "video" / "substitutions.tsv")}
    keys = bad_meld["keys"]
    assert items[keys["crash_video"]].reason == "decoder crashed (signal 11)"
    assert items[keys["crash_video"]].replacement == "black frames"
    rows = SubstitutionReport.read(feature_dir / "video" / "substitutions.tsv")
    partial = [r for r in rows if r.key == keys["random"] and r.replacement == "frames decoded before the error"]
    assert len(partial) == 1 and "partial decode: video stopped after" in partial[0].reason
    assert "cannot open" in items[keys["half"]].reason and "cannot open" in items[keys["empty"]].reason
    assert "no streams" in items[keys["moovless"]].reason
    for name in ("crash_video", "half", "empty", "moovless"):
        split, stem = keys[name].split("/")
        assert not np.load(frame_file(feature_dir, split, stem)).any()
    split, stem = keys["random"].split("/")
    assert np.load(frame_file(feature_dir, split, stem)).any()
    record = json.loads((feature_dir / "video" / "extraction.json").read_text())
    assert record["complete"] is True and record["substituted"] == len(rows)
