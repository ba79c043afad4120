"""Reliability (issue 16): a clip that crashes the decoder loses only that clip; interrupted stages leave
artifact sets that say so; what does not fit is refused; bad flags and data are one clear line; one run
per output set.

Everything runs on the generated data; trainings are avoided (evaluation-only runs against copies of
the demo's artifacts) except one interrupted 1-epoch text training.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, copy_checkpoints, flags, script, stage_paths
from IEMOCAP.config import IEMOCAP
from magtkd import cli, decoder, engine, loaders, media, pipeline, results, runtime, spec, utils
from magtkd.dataset import load_split
from magtkd.frames import frame_file, load_frames
from magtkd.utils import DataError, FeatureFileError
from magtkd.decoder import DecoderProcess
from magtkd.media import MediaError
from magtkd.artifacts import StageFiles, SubstitutionReport, output_lock
from magtkd.checkpoints import CheckpointError
from magtkd.utils import UserError
from MELD.config import MELD

# Plain PyAV, no project code: decode the first video or audio stream of argv[1].
PLAIN_AV = {
    "video": "import av, sys\nc = av.open(sys.argv[1])\nc.streams.video[0].thread_type = 'AUTO'\n"
             "[f.to_ndarray(format='rgb24') for f in c.decode(c.streams.video[0])]\n",
    "audio": "import av, sys\nc = av.open(sys.argv[1])\n[f for f in c.decode(c.streams.audio[0])]\n",
}


# One plain-PyAV process tries each cut in a forked child (import once, fork per cut) and prints the
# first cut whose child died of a signal.
FIRST_CRASH = (
    "import av, os, sys\n"
    "kind, cuts = sys.argv[1], sys.argv[2:]\n"
    "code = {'video': %r, 'audio': %r}[kind].split('import av, sys\\n', 1)[1]\n"
    "for cut in cuts:\n"
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        try:\n"
    "            exec(code, {'av': av, 'sys': type('S', (), {'argv': [None, cut]})})\n"
    "        finally:\n"
    "            os._exit(0)\n"
    "    if os.WIFSIGNALED(os.waitpid(pid, 0)[1]):\n"
    "        print(cut)\n"
    "        break\n"
) % (PLAIN_AV["video"], PLAIN_AV["audio"])


def _cut_until_av_crashes(clips: list[Path], out_dir: Path) -> dict[str, Path]:
    """Clips cut inside their moov atom on which plain PyAV dies of a signal while decoding video / audio."""
    cuts = []
    for clip in clips:
        data = clip.read_bytes()
        moov = data.rfind(b"moov") - 4
        for i in range(1, 32):
            cut = out_dir / f"cut_{clip.stem}_{i}.mp4"
            cut.write_bytes(data[: moov + (len(data) - moov) * i // 32])
            cuts.append(str(cut))
    found = {}
    for kind in PLAIN_AV:
        run = subprocess.run([sys.executable, "-c", FIRST_CRASH, kind, *cuts], capture_output=True, text=True,
                             timeout=600)
        if run.stdout.strip():
            found[kind] = Path(run.stdout.strip().splitlines()[0])
    return found


@pytest.fixture(scope="module")
def bad_meld(generated, tmp_path_factory) -> dict:
    """A copy of the generated MELD whose test split has a clip on which PyAV itself crashes while decoding
    video, one while decoding audio (if this PyAV build crashes on no cut, a clip whose decoder child is made
    to die of SIGSEGV through decoder.run_in_decoder), random bytes mid-file, half a file, an empty file and a clip
    cut before its moov atom."""
    root = tmp_path_factory.mktemp("bad_meld")
    data_dir = root / "MELD"
    shutil.copytree(generated / "datasets" / "MELD", data_dir)
    test = load_split(MELD, data_dir, "test")
    healthy = [u for u in test if u.video_path.is_file() and b"moov" in u.video_path.read_bytes()
               and b"ftyp" in u.video_path.read_bytes()[:12] and media.decode_windows(u.video_path, [None])[0] is not None]
    names = ("crash_video", "crash_audio", "random", "half", "empty", "moovless")
    victims = {name: healthy[i] for i, name in enumerate(names)}
    crashes = _cut_until_av_crashes([u.video_path for u in healthy[len(names):len(names) + 4]], root)
    original = victims["random"].video_path.read_bytes()
    random_bytes = bytearray(original)
    start = len(original) // 3
    random_bytes[start:start + 4000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    contents = {
        "random": bytes(random_bytes),
        "half": original[: len(original) // 2],
        "empty": b"",
        "moovless": original[: original.rfind(b"moov") + 100],
    }
    hooked = []
    for kind in ("video", "audio"):
        if kind in crashes:
            contents[f"crash_{kind}"] = crashes[kind].read_bytes()
        else:
            hooked.append(str(victims[f"crash_{kind}"].video_path))
    for name, content in contents.items():
        victims[name].video_path.write_bytes(content)
    return {"data_dir": data_dir, "keys": {k: f"test/{u.key}" for k, u in victims.items()},
            "paths": {k: u.video_path for k, u in victims.items()}, "hooked": hooked}


def crash_on(paths: frozenset, path: str, fn, args):
    """A `decoder.run_in_decoder` that kills the decoder child (SIGSEGV) for ``paths``, else decodes."""
    if path in paths:
        os.kill(os.getpid(), signal.SIGSEGV)
    return fn(*args)


@pytest.fixture
def crash_hook(bad_meld, monkeypatch):
    if bad_meld["hooked"]:  # no cut crashes this PyAV build: the decoder child is made to die of SIGSEGV instead
        monkeypatch.setattr(decoder, "run_in_decoder", functools.partial(crash_on, frozenset(bad_meld["hooked"])))


@pytest.mark.parametrize("kind", ["video", "audio"])
def test_plain_pyav_crashes_on_the_cut_clip(bad_meld, kind):
    path = bad_meld["paths"][f"crash_{kind}"]
    if str(path) in bad_meld["hooked"]:
        pytest.skip(f"no cut of the generated clips crashes this PyAV build's {kind} decoding; isolation is "
                    "tested through decoder.run_in_decoder")
    run = subprocess.run([sys.executable, "-c", PLAIN_AV[kind], str(path)], capture_output=True)
    assert run.returncode < 0


def test_decoder_child_crash_and_timeout_lose_only_that_call(bad_meld, crash_hook, generated):
    healthy = next((generated / "datasets" / "MELD" / "train_splits").glob("*.mp4"))
    crash = bad_meld["paths"]["crash_video"]
    with DecoderProcess(30) as child:
        with pytest.raises(MediaError, match=r"decoder crashed \(signal 11\)") as err:
            child.call(crash, media.decode_windows, crash, [None])
        assert err.value.path == str(crash)
        clip = child.call(healthy, media.decode_windows, healthy, [None])[0]  # a fresh child serves the next file
        assert clip.shape[0] == 8
    with pytest.raises(MediaError, match=r"decoder crashed \(signal 11\)"):
        decoder.decode_audio_isolated(bad_meld["paths"]["crash_audio"])
    with DecoderProcess(0.5) as slow:
        with pytest.raises(MediaError, match=r"decoder timed out after 0.5 s"):
            slow.call("hang.mp4", time.sleep, 30)
        assert slow.call("next.mp4", sum, [1, 2]) == 3
    samples = decoder.decode_audio_isolated(healthy)
    native_sr, mono = media.decode_audio_native(healthy)  # the same decoding in this process
    assert np.array_equal(samples, media.resample_audio(healthy, mono, native_sr))


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


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_audio_loading_survives_a_crashing_clip(demo, bad_meld, crash_hook, tmp_path, workers):
    paths = copy_checkpoints(stage_paths(demo["workdir"], "MELD"), tmp_path, "audio.bin", "audio.json")
    # its own audio cache: the demo's holds the demo's clips (test_audio_cache_holds_each_readable_clip_once)
    paths["data_dir"], paths["feature_dir"] = bad_meld["data_dir"], tmp_path / "feature"
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


def test_a_track_lost_to_truncation_is_not_reported_as_a_clip_without_that_stream(generated, tmp_path):
    clip = next((generated / "datasets" / "MELD" / "train_splits").glob("*.mp4"))
    data = clip.read_bytes()
    moov = data.rfind(b"moov") - 4
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: moov + 200])
    assert media.missing_stream(cut, "audio").reason == (
        f"no audio stream: file truncated ('moov' box at byte {moov} needs "
        f"{int.from_bytes(data[moov:moov + 4], 'big')} bytes, the file ends 200 bytes in)")
    assert media.missing_stream(clip, "video").reason == "no video stream"  # whole: the stream is simply absent
    wav = next((generated / "datasets" / "IEMOCAP").rglob("*.wav"))  # not an mp4: nothing to say about boxes
    assert media.missing_stream(wav, "audio").reason == "no audio stream"


# --------------------------------------------------------------------------- outputs that know they are complete


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


def _copy_demo(demo, tmp_path: Path, name: str) -> dict[str, Path]:
    src = stage_paths(demo["workdir"], name)
    paths = dict(src)
    for key in ("save_dir", "feature_dir"):
        paths[key] = tmp_path / name / key
        shutil.copytree(src[key], paths[key])
    return paths


def _mark_incomplete(record: Path) -> None:
    """Rewrite a completion record as a killed run leaves it (its time stamp kept, so only completeness changes)."""
    stamp = record.stat()
    doc = json.loads(record.read_text())
    record.write_text(json.dumps({**doc, "complete": False}))
    os.utime(record, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


@pytest.mark.slow
def test_pipeline_reruns_exactly_the_interrupted_stage(demo, tmp_path, monkeypatch, caplog):
    paths = _copy_demo(demo, tmp_path, "IEMOCAP")
    ran: list[str] = []
    monkeypatch.setattr(pipeline, "run_stage", lambda stage, *_: ran.append(stage.script))
    argv = [*[x for k in ("data_dir", "pretrained_dir", "save_dir", "feature_dir")
              for x in (f"--{k}", str(paths[k]))], "--in_process"]
    script("IEMOCAP", "pipeline").main(argv)
    assert ran == []  # a complete copy: everything up to date
    for record in (paths["save_dir"] / "audio.json", paths["feature_dir"] / "video" / "extraction.json",
                   paths["feature_dir"] / "first_stage_features.json"):
        _mark_incomplete(record)
    caplog.set_level(logging.INFO, logger="magtkd")
    script("IEMOCAP", "pipeline").main(argv)
    assert ran == ["audio.py", "video_feature_extract.py", "extract_first_stage_features.py"]
    assert "says its last run did not finish; re-running audio.py" in caplog.text


@pytest.mark.slow
def test_downstream_stages_refuse_incomplete_frames_and_features(demo, tmp_path):
    paths = _copy_demo(demo, tmp_path, "IEMOCAP")
    _mark_incomplete(paths["feature_dir"] / "video" / "extraction.json")
    with pytest.raises(UserError, match=r"stored frames .* incomplete.*re-run video_feature_extract.py"):
        script("IEMOCAP", "video").main(flags(paths, train="False"))
    _mark_incomplete(paths["feature_dir"] / "first_stage_features.json")
    with pytest.raises(UserError, match=r"feature pickles .* incomplete.*re-run extract_first_stage_features.py"):
        script("IEMOCAP", "multimodal_fusion").main(["--feature_dir", str(paths["feature_dir"]),
                                                     "--save_dir", str(paths["save_dir"]), "--train", "False"])


@pytest.mark.slow
def test_fusion_removes_stale_temps_and_publishes_a_complete_record(demo, tmp_path):
    feature_dir = stage_paths(demo["workdir"], "IEMOCAP")["feature_dir"]
    save_dir = tmp_path / "save"
    save_dir.mkdir()
    strays = [save_dir / f".{name}.x1y2.tmp" for name in
              ("multimodal_fusion_best.bin", "multimodal_fusion.state.pt", "multimodal_fusion_confusion.png")]
    for stray in strays:
        stray.write_bytes(b"")
    script("IEMOCAP", "multimodal_fusion").main(["--feature_dir", str(feature_dir), "--save_dir", str(save_dir),
                                                 "--epochs", "1", "--batch_size", "4"])
    assert not any(stray.exists() for stray in strays)
    record = json.loads(StageFiles.fusion(save_dir).metrics.read_text())
    assert record["complete"] is True and record["dataset"] == "IEMOCAP"
    assert record["labels"] == list(IEMOCAP.labels) and record["width"] > 0


# --------------------------------------------------------------------------- refuse what does not fit


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


# --------------------------------------------------------------------------- validation up front, one line


def _csv(tmp_path: Path, rows: list[str]) -> Path:
    data_dir = tmp_path / "IEMOCAP"
    data_dir.mkdir(exist_ok=True)
    header = "Dialogue_ID,Utterance_ID,Utterance,Speaker,Emotion,Video_Path,Wav_Path,Start_Time,End_Time"
    assert set(IEMOCAP.required_columns) <= set(header.split(","))
    (data_dir / IEMOCAP.csv_names["train"]).write_text("\n".join([header, *rows]) + "\n")
    return data_dir


@pytest.mark.parametrize("rows, message", [
    (["0,0,hi,Ses01_M,neu,v.avi,a.wav,0,1", "0,1,yo,Ses01_F,neu,v.avi,b.wav,1,2", "0,0,hi,Ses01_M,neu,v.avi,a.wav,0,1"],
     r"IEMOCAP_train.csv: rows 1 and 3 \(lines 2 and 4\) both have Dialogue_ID 0, Utterance_ID 0"),
    (["0,0,hi,Ses01_M,neu,v.avi,a.wav,nan,1"], r"IEMOCAP_train.csv: row 1 \(line 2\).*must be finite"),
    (["0,0,hi,Ses01_M,neu,v.avi,a.wav,0,1", "0,1,yo,Ses01_F,neu,v.avi,b.wav,5,2"],
     r"IEMOCAP_train.csv: row 2 \(line 3\): Start_Time 5.0 and End_Time 2.0 are not a time span"),
])
def test_csv_rows_that_would_silently_mislead_are_refused(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_split(IEMOCAP, _csv(tmp_path, rows), "train")


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "-1"), ("--batch_size", "0"),
                                         ("--learning_rate", "-1"), ("--num_workers", "-2")])
def test_flags_that_would_do_nothing_or_fail_deep_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        script("MELD", "audio").main([flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: expected" in capsys.readouterr().err


def test_fusion_flags_are_checked_before_any_work(capsys):
    for flag in (["--batch_size", "0"], ["--lr", "0"], ["--epochs", "-3"]):
        with pytest.raises(SystemExit) as exit_:
            script("MELD", "multimodal_fusion").main([*flag, "--train", "False"])
        assert exit_.value.code == 2 and f"argument {flag[0]}" in capsys.readouterr().err


def test_unknown_device_is_a_user_error():
    with pytest.raises(UserError, match=r"--device gpu: not a device name; use cpu, cuda or cuda:N"):
        runtime.resolve_device("gpu")


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


def test_unexpected_failures_keep_their_traceback():
    def broken(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        utils.run(broken, [])

    def user(argv):
        raise DataError("x.csv: row 3: bad")

    with pytest.raises(SystemExit) as exit_:
        utils.run(user, [])
    assert exit_.value.code == 2
    with pytest.raises(DataError):
        utils.run(user, ["--debug"])


@pytest.mark.slow
def test_run_sh_resolves_relative_folders_against_the_callers_directory(tmp_path):
    run = subprocess.run(["bash", str(REPO / "MELD" / "run.sh"), "--data_dir", "relative/MELD"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 2  # the stage's user error passes through, named once, without the command's repr
    assert str(tmp_path / "relative" / "MELD") in run.stderr
    assert not (REPO / "relative").exists()
    assert run.stderr.strip().splitlines()[-1].endswith(
        "[MELD] stage 'preprocessing' (preprocessing.py) failed (exit status 2; its message is above)")


# --------------------------------------------------------------------------- one run per output set


@pytest.mark.slow
def test_second_fusion_run_into_the_same_folder_stops(demo, tmp_path):
    feature_dir = stage_paths(demo["workdir"], "IEMOCAP")["feature_dir"]
    save_dir = tmp_path / "save"
    argv = ["--feature_dir", str(feature_dir), "--save_dir", str(save_dir), "--epochs", "1"]
    with output_lock(save_dir, StageFiles.fusion(save_dir).lock_name):  # the first run, still going
        with pytest.raises(UserError, match=rf"{save_dir} is in use: another run \(PID {os.getpid()}\)"):
            script("IEMOCAP", "multimodal_fusion").main(argv)
    assert not StageFiles.fusion(save_dir).checkpoint.exists()


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_preprocessing_removes_the_temps_of_a_killed_run(generated, tmp_path, dataset):
    data_dir = tmp_path / dataset
    shutil.copytree(generated / "datasets" / dataset, data_dir)
    spec = {"IEMOCAP": IEMOCAP, "MELD": MELD}[dataset]
    names = list(spec.csv_names.values()) + (["speaker2id.json", "preparation_report.tsv"] if dataset == "MELD" else [])
    strays = [data_dir / f".{name}.k1ll.tmp" for name in names]
    for stray in strays:
        stray.write_bytes(b"half a file")
    script(dataset, "preprocessing").main(["--data_dir", str(data_dir)])
    assert [stray.name for stray in strays if stray.exists()] == []
    assert all((data_dir / name).stat().st_size > 0 for name in names)


def test_seeds_summary_removes_the_temps_of_a_killed_run(tmp_path):
    files, docs = {}, {}
    for seed, f1 in ((1, 0.4), (2, 0.6)):
        files[seed] = StageFiles.fusion(tmp_path, cli.seed_tag(seed, [1, 2]))
        assert files[seed].checkpoint.name == f"multimodal_fusion_best_seed{seed}.bin"
        files[seed].checkpoint.write_bytes(bytes([seed]))
        docs[seed] = {"stage": "test", "args": {"epochs": 1}, "sizes": {}, "selected_epoch": 1, "dev_weighted_f1": f1,
                      "test": {"accuracy": 0.5, "weighted_f1": f1, "per_class": {"a": {"f1-score": f1}}}}
    strays = [tmp_path / f".{name}.k1ll.tmp" for name in
              ("multimodal_fusion_seeds.json", "multimodal_fusion_seeds.md", "multimodal_fusion_best.bin")]
    for stray in strays:
        stray.write_bytes(b"")
    doc = results.finish_seeds(docs, files, StageFiles.fusion(tmp_path), ["a"])["seeds"]
    assert doc["best_seed"] == 2 and (tmp_path / "multimodal_fusion_best.bin").read_bytes() == bytes([2])
    assert [stray.name for stray in strays if stray.exists()] == []
    assert json.loads((tmp_path / "multimodal_fusion_seeds.json").read_text())["mean"]["test_weighted_f1"] == 0.5


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".multimodal_fusion.lock"
    lock.write_text(f"{dead.pid}\n")
    caplog.set_level(logging.WARNING, logger="magtkd")
    with output_lock(tmp_path, "multimodal_fusion") as held:
        assert held.read_text().strip() == str(os.getpid())
    assert f"taking over the stale lock {lock} of PID {dead.pid}" in caplog.text
    assert not lock.exists()
