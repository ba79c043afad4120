"""A tiny MELD release in the official format (docs/METHOD.md §1, §6), deterministic per seed.

Tree written under the data folder (e.g. ``datasets/MELD``)::

    train_sent_emo.csv, dev_sent_emo.csv, test_sent_emo.csv   official columns
    train_splits/dia{D}_utt{U}.mp4                            H.264 + stereo AAC
    dev_splits_complete/dia{D}_utt{U}.mp4
    output_repeated_splits_test/dia{D}_utt{U}.mp4

The CSVs are written like the official ones: UTF-8 without BOM, ``\\n`` line
ends, minimal quoting (timestamps ``"00:16:16,059"`` are quoted for their
comma, inner quotes doubled), texts with commas, double quotes, apostrophes,
``’``, ``é`` and the U+0092 mojibake; ``Sr No.`` has gaps; train has no
dialogue ``TRAIN_MISSING_DIALOGUE`` (like the real train split's missing 60).

The real release's faults, one of each, listed in the manifest's ``faults``:
a missing clip (dev), a corrupt clip (train, garbage bytes), a clip without an
audio stream (test), an overlong clip (test, 61 s at 2 fps and 32x24 so it is
cheap to write; its CSV times look normal) and an extra clip that no CSV row
names (train).

Label signal: as for IEMOCAP (`magtkd.synthetic.iemocap.LabelSignal`): cue
words in the text, a tone pitch per emotion in the audio, a background colour
per emotion in every frame of the clip, each modality with its own noise.
The clips' tones carry no additive noise: FFmpeg's AAC encoder takes twice as
long on noisy audio, and MELD has a clip per utterance; the audio's noise is
the per-utterance pitch jitter, a random loudness and the label swaps.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..artifacts import write_bytes, write_text
from . import text as synth_text
from .iemocap import LabelSignal, cohesive
from .media import index_frame, tone, write_video
from .release import MELD_CLIP_DIRS as CLIP_DIRS, MELD_LABELS as LABELS
from .release import MELD_OFFICIAL_COLUMNS as OFFICIAL_COLUMNS, MELD_OFFICIAL_CSV as OFFICIAL_CSV

FPS = 10
FRAME_HEIGHT, FRAME_WIDTH = 48, 64
SAMPLE_RATES = (44100, 48000)  # the real clips use both
DIALOGUES_PER_SPLIT = {"train": 40, "dev": 8, "test": 12}
TRAIN_MISSING_DIALOGUE = 6
# Each split holds every label once; its other rows are drawn with these weights:
# mildly skewed towards neutral like MELD, without a dominant class.
LABEL_WEIGHTS = {
    "anger": 0.12, "disgust": 0.10, "fear": 0.10, "joy": 0.16, "neutral": 0.28, "sadness": 0.10, "surprise": 0.14,
}
MAIN_CAST = ("Chandler", "Joey", "Monica", "Phoebe", "Rachel", "Ross")
GUESTS = {
    "train": ("The Interviewer", "Mrs. Geller", "Gunther", "All"),
    "dev": ("Gunther",),
    "test": ("Mr. Heckles", "Janice", "All"),
}
OVERLONG = {"seconds": 61.0, "fps": 2, "height": 24, "width": 32}
SENTIMENT = {"anger": "negative", "disgust": "negative", "fear": "negative", "joy": "positive",
             "neutral": "neutral", "sadness": "negative"}


def clip_relpath(split: str, dialogue_id: int, utterance_id: int) -> str:
    """Clip path relative to the data folder, e.g. ``train_splits/dia0_utt0.mp4``."""
    return f"{CLIP_DIRS[split]}/dia{dialogue_id}_utt{utterance_id}.mp4"


def timestamp(ms: int) -> str:
    """Milliseconds -> the official ``HH:MM:SS,mmm``."""
    seconds, milli = divmod(ms, 1000)
    minutes, sec = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours:02d}:{minute:02d}:{sec:02d},{milli:03d}"


def _labels(n: int, rng: np.random.Generator) -> list[str]:
    """Every label once, then weighted draws, shuffled."""
    weights = np.array([LABEL_WEIGHTS[label] for label in LABELS])
    extra = rng.choice(len(LABELS), size=max(n - len(LABELS), 0), p=weights / weights.sum())
    pool = list(LABELS)[:n] + [LABELS[i] for i in extra]
    return [pool[i] for i in rng.permutation(n)]


def _dialogue_ids(split: str) -> list[int]:
    n = DIALOGUES_PER_SPLIT[split]
    if split != "train":
        return list(range(n))
    return [d for d in range(n + 1) if d != TRAIN_MISSING_DIALOGUE]


def _plan_split(split: str, rng: np.random.Generator, signal: LabelSignal) -> list[dict]:
    """The rows of one split (dicts holding the CSV fields plus the media plan)."""
    ids = _dialogue_ids(split)
    sizes = [int(rng.integers(3, 8)) for _ in ids]
    if split == "train":
        sizes[1] = 6  # one dialogue with five speakers
    labels = cohesive(_labels(sum(sizes), rng), rng)
    markups = list(synth_text.MELD_MARKUP)
    cast = list(MAIN_CAST) + list(GUESTS[split])
    rows: list[dict] = []
    serial = 1
    for k, (dialogue_id, size) in enumerate(zip(ids, sizes)):
        n_speakers = 5 if (split == "train" and k == 1) else int(rng.integers(2, min(size, 4) + 1))
        speakers = [cast[i] for i in rng.choice(len(cast), size=n_speakers, replace=False)]
        order = speakers + [speakers[int(rng.integers(n_speakers))] for _ in range(size - n_speakers)]
        order = [order[0]] + [order[1:][i] for i in rng.permutation(size - 1)]
        season, episode = int(rng.integers(1, 11)), int(rng.integers(1, 25))
        sample_rate = SAMPLE_RATES[int(rng.integers(len(SAMPLE_RATES)))]
        clock = int(rng.integers(0, 1_300_000))
        if rng.random() < 0.3:
            serial += int(rng.integers(1, 5))  # the official Sr No. has gaps
        for utterance_id in range(size):
            emotion = labels.pop()
            # Every third row carries a markup until each pattern was used once.
            markup = markups.pop(0) if markups and len(rows) % 3 == 1 else None
            text = synth_text.make_utterance(emotion, rng, markup=markup)
            duration_ms = int(rng.integers(600, 1501))
            start, end = clock, clock + duration_ms
            clock = end + (0 if rng.random() < 0.2 else int(rng.integers(100, 2000)))
            sentiment = SENTIMENT.get(emotion) or ("positive" if rng.random() < 0.5 else "negative")
            shown = signal.draw(emotion, rng)
            rows.append({
                "Sr No.": serial, "Utterance": text, "Speaker": order[utterance_id], "Emotion": emotion,
                "Sentiment": sentiment, "Dialogue_ID": dialogue_id, "Utterance_ID": utterance_id,
                "Season": season, "Episode": episode, "StartTime": timestamp(start), "EndTime": timestamp(end),
                "_signal": shown, "_sample_rate": sample_rate, "_seconds": duration_ms / 1000,
                "_amplitude": float(rng.uniform(0.2, 0.4)),
                "_text_cue": synth_text.has_cue(text, emotion),
            })
            serial += 1
    return rows


def _csv_text(rows: list[dict]) -> str:
    """The official CSV text: minimal quoting, ``\\n`` line ends."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerow(OFFICIAL_COLUMNS)
    for row in rows:
        writer.writerow([row[column] for column in OFFICIAL_COLUMNS])
    return buffer.getvalue()


def _write_clip(
    path: Path, signal_color: tuple[int, int, int], freq: float, seconds: float, sample_rate: int,
    amplitude: float, *, with_audio: bool = True, fps: int = FPS,
    height: int = FRAME_HEIGHT, width: int = FRAME_WIDTH,
) -> None:
    """One clip: every frame in the emotion colour (index-coded), a stereo tone as AAC."""
    n_frames = max(1, int(round(seconds * fps)))
    frames = (index_frame(i, height, width, signal_color) for i in range(n_frames))
    audio = tone(freq, seconds, sample_rate, channels=2, amplitude=amplitude) if with_audio else None
    write_video(path, frames, fps, codec="libx264", audio=audio,
                sample_rate=sample_rate if with_audio else None, audio_codec="aac")


def _write_row_media(path: Path, row: dict, fault: str | None, noise_rng: np.random.Generator) -> None:
    """The clip of one CSV row, or its fault (nothing, garbage bytes, no audio, overlong)."""
    shown = row["_signal"]
    if fault == "missing":
        path.unlink(missing_ok=True)  # a tree written earlier into root may hold it
    elif fault == "corrupt":
        write_bytes(path, noise_rng.bytes(4096))
    elif fault == "overlong":
        _write_clip(path, shown.color, shown.freq, OVERLONG["seconds"], row["_sample_rate"], row["_amplitude"],
                    fps=OVERLONG["fps"], height=OVERLONG["height"], width=OVERLONG["width"])
    else:
        _write_clip(path, shown.color, shown.freq, row["_seconds"], row["_sample_rate"], row["_amplitude"],
                    with_audio=fault != "no_audio")


def write_meld(root: Path, seed: int = 0, *, media: bool = True) -> dict:
    """Write the synthetic MELD release into ``root``; return its manifest.

    ``media=False`` writes only the three CSVs (byte-identical to a full run)
    and the same manifest, for fast tests of parsers.

    Manifest (JSON-serialisable): ``splits[split]`` = {"csv", "rows",
    "dialogues" (ids), "clip_dir"}; ``faults`` = {"missing", "corrupt",
    "no_audio", "overlong", "extra"} -> clip paths relative to ``root``;
    ``speakers`` = names in order of first appearance over train, dev, test
    (the expected ``speaker2id.json`` order); ``utterances`` = one entry per CSV
    row with its split, ids, text, gold emotion, the emotions the audio/video
    show, the clip path, sample rate and fault (or None); ``tones``/``colors``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng([seed, 1])  # media bytes only: the CSVs never depend on it
    signal = LabelSignal(LABELS)
    plans = {split: _plan_split(split, rng, signal) for split in ("train", "dev", "test")}
    fault_of = _fault_rows(plans)
    faults: dict[str, list[str]] = {fault: [] for fault in ("missing", "corrupt", "no_audio", "overlong", "extra")}
    utterances: list[dict] = []
    speakers: list[str] = []
    for split, rows in plans.items():
        write_text(root / OFFICIAL_CSV[split], _csv_text(rows))
        for index, row in enumerate(rows):
            rel = clip_relpath(split, row["Dialogue_ID"], row["Utterance_ID"])
            fault = fault_of.get((split, index))
            if media:
                _write_row_media(root / rel, row, fault, noise_rng)
            if fault:
                faults[fault].append(rel)
            if row["Speaker"] not in speakers:
                speakers.append(row["Speaker"])
            utterances.append(_utterance_entry(split, row, rel, fault))
    faults["extra"].append(_extra_clip(root, plans["train"][-1], signal, rng, media))
    return {
        "dataset": "MELD",
        "seed": seed,
        "labels": list(LABELS),
        "splits": {
            split: {
                "csv": OFFICIAL_CSV[split], "rows": len(rows), "clip_dir": CLIP_DIRS[split],
                "dialogues": sorted({row["Dialogue_ID"] for row in rows}),
            }
            for split, rows in plans.items()
        },
        "faults": faults,
        "speakers": speakers,
        "utterances": utterances,
        "fps": FPS,
        "frame_size": [FRAME_HEIGHT, FRAME_WIDTH],
        "overlong": dict(OVERLONG),
        "tones": signal.tones,
        "colors": {label: list(c) for label, c in signal.colors.items()},
    }


def _extra_clip(root: Path, last: dict, signal: LabelSignal, rng: np.random.Generator, media: bool) -> str:
    """A clip no CSV row names: one utterance past the end of the last train dialogue (``last`` row)."""
    extra = clip_relpath("train", last["Dialogue_ID"], last["Utterance_ID"] + 1)
    shown = signal.draw(LABELS[int(rng.integers(len(LABELS)))], rng)
    if media:
        _write_clip(root / extra, shown.color, shown.freq, 1.0, SAMPLE_RATES[0], 0.3)
    return extra


def _fault_rows(plans: dict[str, list[dict]]) -> dict[tuple[str, int], str]:
    """(split, row index) -> the fault its clip gets: one of each real fault (docs/METHOD.md §1 lists where
    they sit in the real release)."""
    overlong = next(i for i, r in enumerate(plans["test"]) if r["Dialogue_ID"] == 2)
    no_audio = len(plans["test"]) // 2 + (len(plans["test"]) // 2 == overlong)
    fault_rows = {
        "corrupt": ("train", len(plans["train"]) // 3),
        "missing": ("dev", len(plans["dev"]) // 2),
        "no_audio": ("test", no_audio),
        "overlong": ("test", overlong),
    }
    return {(split, index): fault for fault, (split, index) in fault_rows.items()}


def _utterance_entry(split: str, row: dict, clip: str, fault: str | None) -> dict:
    """A CSV row's manifest entry: its ids, text, gold emotion, what its media show, its clip and fault."""
    shown = row["_signal"]
    return {
        "split": split, "dialogue_id": row["Dialogue_ID"], "utterance_id": row["Utterance_ID"],
        "speaker": row["Speaker"], "text": row["Utterance"], "emotion": row["Emotion"],
        "text_cue": row["_text_cue"], "audio_emotion": shown.audio_emotion,
        "video_emotion": shown.video_emotion, "color": list(shown.color), "freq": shown.freq,
        "clip": clip, "sample_rate": row["_sample_rate"],
        "seconds": OVERLONG["seconds"] if fault == "overlong" else row["_seconds"],
        "fault": fault,
    }
