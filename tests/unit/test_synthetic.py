"""The synthetic IEMOCAP and MELD releases (`magtkd.synthetic`): real raw formats, faults,
determinism, label signal (docs/METHOD.md §1, §6 describe the formats and faults they must reproduce),
the media writers, the release facts shared with the recipe configs, and the generator's command line."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import subprocess
import sys
import wave
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pandas as pd
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

import IEMOCAP.config as iemocap_config
import MELD.config as meld_config
from helpers import REFERENCE, REPO
from IEMOCAP.config import DEV_DIALOGUES, LABELS as IEMOCAP_LABELS
from magtkd import pretrained
from magtkd.pretrained import PRETRAINED
from magtkd.synthetic import release, text as synth_text
from magtkd.synthetic.__main__ import generate
from magtkd.synthetic.iemocap import GAP_COLOR, nearest_label, video_relpath, wav_relpath, write_iemocap
from magtkd.synthetic.media import index_frame, read_index, tone, write_video, write_wav
from magtkd.synthetic.meld import write_meld
from MELD.config import CLIP_DIRS, LABELS as MELD_LABELS, OFFICIAL_COLUMNS, OFFICIAL_CSV
from MELD.preprocessing import REPORT_NAME


SPLITS = ("train", "dev", "test")

TRANSCRIPTION_LINE = re.compile(r"^(?P<name>\S+) \[(?P<start>\d{3}\.\d{4})-(?P<end>\d{3}\.\d{4})\]: (?P<text>.*)$")

EMO_HEADER = re.compile(
    r"^\[(?P<start>\d+\.\d{4}) - (?P<end>\d+\.\d{4})\]\t(?P<name>\S+)\t(?P<label>[a-z]{3})"
    r"\t\[\d\.\d{4}, \d\.\d{4}, \d\.\d{4}\]$"
)

CATEGORY_LINE = re.compile(r"^C-[EFM]\d:\t(?:[A-Z][a-z]+(?: [a-z]+)?; ?)+\t\([^()]*\)$")

ATTRIBUTE_LINE = re.compile(r"^A-[EFM]\d:\tval [1-5]; act [1-5]; dom  [1-5];\t\(\)$")

TIMESTAMP = re.compile(r"^\d{2}:\d{2}:\d{2},\d{3}$")


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("synthetic")
    iemocap = write_iemocap(root / "IEMOCAP", seed=0)
    meld = write_meld(root / "MELD", seed=0)
    return SimpleNamespace(
        root=root, iemocap_root=root / "IEMOCAP", meld_root=root / "MELD",
        iemocap=iemocap, meld=meld,
    )


def _dialogue_files(root: Path, kind: str) -> dict[str, Path]:
    """dialogue name -> its transcription or EmoEvaluation file."""
    return {p.stem: p for p in sorted(root.glob(f"Session*/dialog/{kind}/*.txt"))}


def _emo_blocks(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", path
    assert lines[1] == "", path
    blocks, current = [], []
    for line in lines[2:]:
        if line:
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    assert not current, f"{path}: the last block is not followed by a blank line"
    return blocks


def _parse_iemocap(root: Path) -> dict[str, list[dict]]:
    """The docs/METHOD.md §1 rule, written independently: kept utterances per split, in CSV order."""
    headers: dict[str, dict] = {}
    for path in _dialogue_files(root, "EmoEvaluation").values():
        for block in _emo_blocks(path):
            m = EMO_HEADER.match(block[0])
            headers[m["name"]] = m.groupdict()
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for dialogue, path in sorted(_dialogue_files(root, "transcriptions").items()):
        split = "test" if dialogue.startswith("Ses05") else "dev" if dialogue in DEV_DIALOGUES else "train"
        for line in path.read_text(encoding="utf-8").splitlines():
            m = TRANSCRIPTION_LINE.match(line)
            header = headers.get(m["name"])
            if header and header["label"] in IEMOCAP_LABELS:
                out[split].append({
                    "dialogue": dialogue, "name": m["name"], "start": float(m["start"]),
                    "end": float(m["end"]), "text": m["text"], "emotion": header["label"],
                })
    return out


def _peak_hz(samples: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / sample_rate)[int(np.argmax(spectrum))])


def _nearest_tone(freq: float, tones: dict[str, float]) -> str:
    return min(tones, key=lambda label: abs(math.log(tones[label] / freq)))


def _colour_of(frame: np.ndarray) -> np.ndarray:
    """Mean RGB of the frame's lower half (the upper half holds the index code)."""
    h = frame.shape[0]
    return frame[h // 2 + 3 : h - 3, 3:-3].reshape(-1, 3).astype(np.float64).mean(axis=0)


def _decode_audio(path: Path) -> tuple[np.ndarray, int, int]:
    """(mono float samples, sample rate, channels) of the first audio stream."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray() for frame in container.decode(stream)]
        return np.concatenate(chunks, axis=1).mean(axis=0), stream.rate, stream.channels


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"\w+|[^\w\s]", text))


@pytest.mark.slow
def test_iemocap_layout_and_split(trees: SimpleNamespace) -> None:
    root, manifest = trees.iemocap_root, trees.iemocap
    assert sorted(p.name for p in root.iterdir()) == [f"Session{n}" for n in range(1, 6)]
    splits = manifest["splits"]
    assert [len(splits[s]["dialogues"]) for s in SPLITS] == [16, 6, 6]
    assert set(splits["dev"]["dialogues"]) <= DEV_DIALOGUES
    assert not set(splits["train"]["dialogues"]) & DEV_DIALOGUES
    assert all(d.startswith("Ses05") for d in splits["test"]["dialogues"])
    assert all(splits[s]["utterances"] > 0 for s in SPLITS)
    for split in SPLITS:
        for dialogue in splits[split]["dialogues"]:
            session = int(dialogue[3:5])
            base = root / f"Session{session}" / "dialog"
            divx = "Divx" if session == 5 else "DivX"
            assert (base / "avi" / divx / f"{dialogue}.avi").is_file()
            assert (base / "transcriptions" / f"{dialogue}.txt").is_file()
            assert (base / "EmoEvaluation" / f"{dialogue}.txt").is_file()
    assert not (root / "Session5" / "dialog" / "avi" / "DivX").exists()


@pytest.mark.slow
def test_iemocap_transcription_format(trees: SimpleNamespace) -> None:
    texts, nonverbal, reordered, overlaps = [], 0, [], 0
    for dialogue, path in _dialogue_files(trees.iemocap_root, "transcriptions").items():
        raw = path.read_bytes()
        assert b"\r" not in raw and raw.endswith(b"\n")
        starts, spans = [], []
        for line in raw.decode("utf-8").splitlines():
            m = TRANSCRIPTION_LINE.match(line)
            assert m, f"{path}: bad line {line!r}"
            assert m["name"].startswith(dialogue + "_")
            assert float(m["start"]) < float(m["end"])
            if re.search(r"_[FM]XX\d$", m["name"]):
                nonverbal += 1
                assert m["text"] in synth_text.NONVERBAL
                continue
            assert re.search(r"_[FM]\d{3}$", m["name"]), m["name"]
            texts.append(m["text"])
            starts.append(float(m["start"]))
            spans.append((float(m["start"]), float(m["end"])))
        if starts != sorted(starts):
            reordered.append(dialogue)
        spans.sort()
        overlaps += sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])  # next turn starts before this ends
    assert nonverbal >= 2 and overlaps >= 2
    assert sorted(reordered) == sorted(trees.iemocap["reordered"])
    assert any(":" in t for t in texts) and any("[" in t and "]" in t for t in texts)
    assert any("]:" in t for t in texts)  # a greedy `]: ` split would cut this text


@pytest.mark.slow
def test_iemocap_emo_evaluation_format(trees: SimpleNamespace) -> None:
    root = trees.iemocap_root
    transcribed = {
        TRANSCRIPTION_LINE.match(line)["name"]: TRANSCRIPTION_LINE.match(line)
        for path in _dialogue_files(root, "transcriptions").values()
        for line in path.read_text(encoding="utf-8").splitlines()
    }
    labels, untranscribed = Counter(), []
    for dialogue, path in _dialogue_files(root, "EmoEvaluation").items():
        letters = set()
        for block in _emo_blocks(path):
            m = EMO_HEADER.match(block[0])
            assert m, f"{path}: bad header {block[0]!r}"
            assert all(CATEGORY_LINE.match(line) for line in block[1:] if line.startswith("C-")), block
            assert all(ATTRIBUTE_LINE.match(line) for line in block[1:] if line.startswith("A-")), block
            assert {line[:2] for line in block[1:]} == {"C-", "A-"}
            labels[m["label"]] += 1
            letters.add(m["name"].rsplit("_", 1)[1][0])
            wav = root / wav_relpath(dialogue, m["name"])
            assert wav.is_file(), wav
            if m["name"] not in transcribed:
                untranscribed.append(m["name"])
                continue
            t = transcribed[m["name"]]
            assert (float(t["start"]), float(t["end"])) == (float(m["start"]), float(m["end"]))
        assert letters == {"F", "M"}, dialogue
    assert set(labels) == set(IEMOCAP_LABELS) | {"xxx", "oth", "sur", "fea", "dis"}
    assert len(untranscribed) == 1
    reasons = {d["name"]: d["reason"] for d in trees.iemocap["dropped"]}
    assert reasons[untranscribed[0]] == "no transcription line"
    nonverbal_wavs = list(root.glob("Session*/sentences/wav/*/*XX*.wav"))
    assert nonverbal_wavs == []


@pytest.mark.slow
def test_iemocap_manifest_matches_the_raw_files(trees: SimpleNamespace) -> None:
    parsed = _parse_iemocap(trees.iemocap_root)
    keys = ("dialogue", "name", "start", "end", "text", "emotion")
    for split in SPLITS:
        expected = [{k: u[k] for k in keys} for u in trees.iemocap["utterances"] if u["split"] == split]
        assert parsed[split] == expected, split
        assert len(expected) == trees.iemocap["splits"][split]["utterances"]
        assert set(u["emotion"] for u in expected) == set(IEMOCAP_LABELS), split
    counts = Counter(u["emotion"] for u in trees.iemocap["utterances"])
    assert max(counts.values()) <= 2 * min(counts.values())


@pytest.mark.slow
def test_iemocap_media_carry_the_label_signal(trees: SimpleNamespace) -> None:
    root, manifest = trees.iemocap_root, trees.iemocap
    fps, (height, width) = manifest["fps"], manifest["frame_size"]
    by_video = defaultdict(list)
    for utt in manifest["utterances"]:
        by_video[utt["video"]].append(utt)
        with wave.open(str(root / utt["wav"])) as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
            assert wav.getnframes() == round((utt["end"] - utt["start"]) * 16000)
            samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2") / 32768.0
        assert _nearest_tone(_peak_hz(samples, 16000), manifest["tones"]) == utt["audio_emotion"], utt["name"]
    for rel, utts in by_video.items():
        with av.open(str(root / rel)) as container:
            assert container.format.name == "avi"
            stream = container.streams.video[0]
            assert stream.codec_context.name == "mpeg4"
            assert (stream.width, stream.height, int(stream.average_rate)) == (width, height, fps)
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        last_end = max(u["end"] for u in utts)
        assert len(frames) >= math.ceil(last_end * fps)  # the video spans the whole dialogue
        assert [read_index(f) for f in frames] == list(range(len(frames)))
        assert np.abs(_colour_of(frames[0]) - GAP_COLOR).max() < 12  # before the first turn
        for utt in utts:
            # 0.1-0.2 s into the turn: inside it, and before any overlapping next turn begins.
            i = math.ceil(utt["start"] * fps - 1e-9) + 1
            colour = _colour_of(frames[i])
            assert nearest_label(colour, IEMOCAP_LABELS) == utt["video_emotion"], (rel, utt["name"])
            assert np.abs(colour - utt["color"]).max() < 24  # MPEG-4 quantisation


def test_iemocap_paths_follow_the_authors_csvs() -> None:
    csv_path = REFERENCE / "IEMOCAP" / "IEMOCAP_train.csv"
    if not csv_path.is_file():
        pytest.skip("reference CSVs not available")
    rows = pd.read_csv(csv_path, nrows=50)
    prefix = "../datasets/IEMOCAP/"
    for row in rows.itertuples():
        dialogue = Path(row.Video_Path).stem
        assert prefix + wav_relpath(dialogue, row.Speaker) == row.Wav_Path
        assert prefix + video_relpath(dialogue) == row.Video_Path  # Sessions 1-4 spell DivX


@pytest.mark.slow
def test_meld_csvs_are_written_like_the_official_files(trees: SimpleNamespace) -> None:
    utterances = ""
    speakers_by_split = {}
    for split in SPLITS:
        path = trees.meld_root / OFFICIAL_CSV[split]
        raw = path.read_bytes()
        assert not raw.startswith(b"\xef\xbb\xbf") and b"\r" not in raw and raw.endswith(b"\n")
        text = raw.decode("utf-8")
        assert text.split("\n", 1)[0] == ",".join(OFFICIAL_COLUMNS)
        rows = list(csv.reader(io.StringIO(text)))
        rewritten = io.StringIO()
        csv.writer(rewritten, quoting=csv.QUOTE_MINIMAL, lineterminator="\n").writerows(rows)
        assert rewritten.getvalue() == text  # minimal quoting, nothing else
        assert '""' in text and ',"00:' in text  # doubled quotes; timestamps quoted for their comma
        df = pd.read_csv(path, keep_default_na=False)
        assert tuple(df.columns) == OFFICIAL_COLUMNS
        for column in ("Sr No.", "Dialogue_ID", "Utterance_ID", "Season", "Episode"):
            assert df[column].dtype.kind == "i", column
        assert df["StartTime"].map(TIMESTAMP.match).all() and df["EndTime"].map(TIMESTAMP.match).all()
        assert (df["EndTime"] > df["StartTime"]).all()
        assert df["Sr No."].is_monotonic_increasing and df["Sr No."].diff().max() > 1
        assert set(df["Emotion"]) == set(MELD_LABELS), split
        assert set(df["Sentiment"]) <= {"positive", "negative", "neutral"}
        for _, group in df.groupby("Dialogue_ID"):
            assert group["Utterance_ID"].tolist() == list(range(len(group)))
            assert 3 <= len(group) <= 7 and group["Speaker"].nunique() <= 5
            assert group["Season"].nunique() == 1 and group["Episode"].nunique() == 1
        ids = sorted(set(df["Dialogue_ID"]))
        if split == "train":
            assert ids != list(range(len(ids))) and df.groupby("Dialogue_ID")["Speaker"].nunique().max() == 5
        else:
            assert ids == list(range(len(ids)))
        assert len(df) == trees.meld["splits"][split]["rows"]
        utterances += "".join(df["Utterance"])
        speakers_by_split[split] = list(dict.fromkeys(df["Speaker"]))
    for char in (",", '"', "'", "’", "é", "\x92"):
        assert char in utterances, repr(char)
    first_seen = list(dict.fromkeys(s for split in SPLITS for s in speakers_by_split[split]))
    assert trees.meld["speakers"] == first_seen
    assert set.intersection(*(set(v) for v in speakers_by_split.values()))  # speakers shared across splits


@pytest.mark.slow
def test_meld_csv_header_and_timestamps_match_the_official_release(trees: SimpleNamespace) -> None:
    official = REFERENCE / "MELD" / "dev_sent_emo.csv"
    if not official.is_file():
        pytest.skip("official MELD CSVs not available")
    official_lines = official.read_text(encoding="utf-8").split("\n", 2)
    ours = (trees.meld_root / "dev_sent_emo.csv").read_text(encoding="utf-8").split("\n", 2)
    assert ours[0] == official_lines[0]
    official_row = next(csv.reader([official_lines[1]]))
    our_row = next(csv.reader([ours[1]]))
    assert TIMESTAMP.match(official_row[-1]) and TIMESTAMP.match(our_row[-1])


@pytest.mark.slow
def test_meld_clips_and_faults(trees: SimpleNamespace) -> None:
    root, manifest = trees.meld_root, trees.meld
    faults = manifest["faults"]
    assert {k: len(v) for k, v in faults.items()} == {
        "missing": 1, "corrupt": 1, "no_audio": 1, "overlong": 1, "extra": 1,
    }
    assert faults["missing"][0].startswith(CLIP_DIRS["dev"] + "/")
    assert faults["corrupt"][0].startswith(CLIP_DIRS["train"] + "/")
    assert faults["no_audio"][0].startswith(CLIP_DIRS["test"] + "/")
    assert not (root / faults["missing"][0]).exists()
    with pytest.raises(av.error.FFmpegError):
        av.open(str(root / faults["corrupt"][0]))
    with av.open(str(root / faults["no_audio"][0])) as container:
        assert not container.streams.audio and container.streams.video
    with av.open(str(root / faults["overlong"][0])) as container:
        assert container.duration / 1e6 >= 60
        assert container.streams.video[0].codec_context.name == "h264" and container.streams.audio
    named = {u["clip"] for u in manifest["utterances"]}
    on_disk = {str(p.relative_to(root)) for d in CLIP_DIRS.values() for p in (root / d).glob("*.mp4")}
    assert on_disk - named == set(faults["extra"])
    assert named - on_disk == set(faults["missing"])
    overlong = next(u for u in manifest["utterances"] if u["fault"] == "overlong")
    row = pd.read_csv(root / OFFICIAL_CSV["test"], keep_default_na=False).query(
        f"Dialogue_ID == {overlong['dialogue_id']} and Utterance_ID == {overlong['utterance_id']}"
    ).iloc[0]
    assert row["StartTime"][:5] == row["EndTime"][:5]  # the CSV times look like a normal short clip


@pytest.mark.slow
def test_meld_clips_carry_the_label_signal(trees: SimpleNamespace) -> None:
    root, manifest = trees.meld_root, trees.meld
    rates = Counter()
    for utt in manifest["utterances"]:
        if utt["fault"] in ("missing", "corrupt"):
            continue
        path = root / utt["clip"]
        with av.open(str(path)) as container:
            assert "mp4" in container.format.name
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            fps = int(stream.average_rate)
        assert len(frames) == max(1, round(utt["seconds"] * fps))
        assert [read_index(f) for f in frames] == list(range(len(frames)))
        colour = _colour_of(frames[len(frames) // 2])
        assert nearest_label(colour, MELD_LABELS) == utt["video_emotion"], utt["clip"]
        if utt["fault"] == "no_audio":
            continue
        samples, rate, channels = _decode_audio(path)
        assert channels == 2 and rate == utt["sample_rate"]
        rates[rate] += 1
        assert _nearest_tone(_peak_hz(samples, rate), manifest["tones"]) == utt["audio_emotion"], utt["clip"]
    assert set(rates) == {44100, 48000}


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["iemocap", "meld"])
def test_every_modality_beats_the_majority_class(trees: SimpleNamespace, dataset: str) -> None:
    utts = getattr(trees, dataset)["utterances"]
    train = [u for u in utts if u["split"] == "train"]
    test = [u for u in utts if u["split"] != "train"]
    majority = Counter(u["emotion"] for u in test).most_common(1)[0][1] / len(test)
    assert majority < 0.35
    for key in ("audio_emotion", "video_emotion"):
        agreement = np.mean([u[key] == u["emotion"] for u in utts])
        assert 0.8 <= agreement < 1.0, key  # strong, but not a copy of the label
    vectorizer = CountVectorizer(token_pattern=r"[a-zA-Z]+")
    model = LogisticRegression(max_iter=2000).fit(
        vectorizer.fit_transform([u["text"] for u in train]), [u["emotion"] for u in train]
    )
    predicted = model.predict(vectorizer.transform([u["text"] for u in test]))
    accuracy = np.mean(predicted == np.array([u["emotion"] for u in test]))
    assert accuracy > majority + 0.25, (accuracy, majority)


def test_text_generator() -> None:
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [synth_text.make_utterance("fru", a) for _ in range(20)] == [
        synth_text.make_utterance("fru", b) for _ in range(20)
    ]
    texts = [synth_text.make_utterance("joy", np.random.default_rng(i)) for i in range(50)]
    assert 0.6 < np.mean([synth_text.has_cue(t, "joy") for t in texts]) < 1.0
    forced = synth_text.make_utterance("anger", np.random.default_rng(0), markup='He said, "{u}"')
    assert forced.startswith('He said, "') and forced.endswith('"')
    with pytest.raises(KeyError, match="unknown emotion 'happy'"):
        synth_text.make_utterance("happy", np.random.default_rng(0))
    with pytest.raises(ValueError, match="markup"):
        synth_text.make_utterance("ang", np.random.default_rng(0), markup='He said, "{u}"')


@pytest.mark.slow
def test_corpus_covers_every_generated_text(trees: SimpleNamespace) -> None:
    vocabulary = set().union(*(_tokens(line) for line in synth_text.corpus()))
    texts = [u["text"] for u in trees.iemocap["utterances"] + trees.meld["utterances"]]
    for path in _dialogue_files(trees.iemocap_root, "transcriptions").values():
        texts += [TRANSCRIPTION_LINE.match(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    missing = {token for t in texts for token in _tokens(t)} - vocabulary
    assert not missing


@pytest.mark.slow
def test_generation_is_deterministic(trees: SimpleNamespace, tmp_path: Path) -> None:
    # IEMOCAP is cheap: regenerate everything and compare every byte (media included).
    again = write_iemocap(tmp_path / "IEMOCAP", seed=0)
    assert again == trees.iemocap
    first, second = trees.iemocap_root, tmp_path / "IEMOCAP"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    # MELD: the text-only run writes the same CSVs and manifest as the full run.
    meld = write_meld(tmp_path / "MELD", seed=0, media=False)
    assert meld == trees.meld
    assert sorted(p.name for p in (tmp_path / "MELD").iterdir()) == sorted(OFFICIAL_CSV.values())
    for name in OFFICIAL_CSV.values():
        assert (tmp_path / "MELD" / name).read_bytes() == (trees.meld_root / name).read_bytes()
    other = write_meld(tmp_path / "MELD1", seed=1, media=False)
    assert other["utterances"] != trees.meld["utterances"]


@pytest.mark.slow
def test_meld_clips_are_the_same_bytes_again(trees: SimpleNamespace, generated: Path) -> None:
    # x264 with its default rate control encoded about one tiny clip in a hundred differently from run
    # to run, which moved the demo's MELD figures; the whole tree, media included, must repeat. The second
    # run is the session's generated MELD (the same generator, seed 0), which its preparation completed with
    # the prepared CSVs, the speaker map and the preparation report.
    first, second = trees.meld_root, generated / "datasets" / "MELD"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    again = {p.relative_to(second) for p in second.rglob("*") if p.is_file()}
    prepared = {Path(name) for name in (*meld_config.MELD.csv_names.values(), "speaker2id.json", REPORT_NAME)}
    assert again - set(files) == prepared
    assert files == sorted(again - prepared)
    assert [str(rel) for rel in files if (first / rel).read_bytes() != (second / rel).read_bytes()] == []


def test_iemocap_facts_equal_the_recipe_config():
    assert release.IEMOCAP_LABELS == iemocap_config.LABELS
    assert release.IEMOCAP_DEV_DIALOGUES == iemocap_config.DEV_DIALOGUES
    assert release.IEMOCAP_TEST_SESSIONS == iemocap_config.TEST_SESSIONS
    for speaker in ("Ses01F_impro01_F000", "Ses01F_impro01_M012", "Ses05M_script01_1_F003", "Ses03M_impro08a_MXX0"):
        assert release.speaker_letter(speaker) == iemocap_config.speaker_letter(speaker)


def test_meld_facts_equal_the_recipe_config():
    assert release.MELD_LABELS == meld_config.LABELS
    assert release.MELD_OFFICIAL_CSV == meld_config.OFFICIAL_CSV
    assert release.MELD_CLIP_DIRS == meld_config.CLIP_DIRS
    assert release.MELD_OFFICIAL_COLUMNS == meld_config.OFFICIAL_COLUMNS


def test_the_generator_imports_no_recipe_folder():
    code = ("import sys, magtkd.synthetic.__main__, magtkd.synthetic.iemocap, magtkd.synthetic.meld; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('IEMOCAP', 'MELD')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO)
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("suffix, codec", [(".avi", "mpeg4"), (".mp4", "libx264")])
@pytest.mark.parametrize("size", [(48, 64), (120, 160)])
def test_index_round_trip_through_lossy_codecs(tmp_path, suffix, codec, size):
    indices = [0, 1, 2, 5, 255, 256, 1023, 1024, 2047, 2048, 3000, 3999, 4000, 4095, 1365, 2730]
    rng = np.random.default_rng(0)
    colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in indices]
    path = tmp_path / f"clip{suffix}"
    write_video(path, (index_frame(i, *size, color=c) for i, c in zip(indices, colors)), 25, codec=codec)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == {"mpeg4": "mpeg4", "libx264": "h264"}[codec]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert [f.shape for f in frames] == [(*size, 3)] * len(indices)
    assert [read_index(f) for f in frames] == indices
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_write_video_with_audio_and_wav(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, np.stack([index_frame(i, 48, 64) for i in range(10)]), 10, codec="libx264",
                audio=tone(440, 1.0, 48000, channels=2), sample_rate=48000)
    with av.open(str(path)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
        assert container.streams.audio[0].channels == 2
        assert container.streams.audio[0].rate == 48000
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "clip.xyz", [index_frame(0, 48, 64)], 10)
    write_wav(tmp_path / "a.wav", tone(100, 0.5, 8000, channels=2), 8000)
    with av.open(str(tmp_path / "a.wav")) as container:
        stream = container.streams.audio[0]
        assert (stream.rate, stream.channels, stream.codec_context.name) == (8000, 2, "pcm_s16le")


def test_generate_rejects_unknown_part(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected one of all, data, models"):
        generate(tmp_path, what="everything")


@pytest.mark.slow
def test_cli_writes_models(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "magtkd.synthetic", "--what", "models", "--out", str(tmp_path), "--seed", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["pretrained_model"]
    assert sorted(os.listdir(tmp_path / "pretrained_model")) == sorted(PRETRAINED)
    assert "pretrained stand-ins" in result.stderr
    tok = pretrained.load_tokenizer(tmp_path / "pretrained_model")
    assert tok("</s>", add_special_tokens=False).input_ids == [tok.sep_token_id]
