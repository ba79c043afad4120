"""A tiny IEMOCAP release in the real raw format (docs/METHOD.md §1), deterministic per seed.

Tree written under the data folder (e.g. ``datasets/IEMOCAP``)::

    Session{n}/dialog/avi/DivX/<dialog>.avi          MPEG-4 video of the whole dialogue
                                                      (Session5 spells the folder ``Divx``)
    Session{n}/dialog/transcriptions/<dialog>.txt    <utt> [SSS.ssss-EEE.eeee]: text
    Session{n}/dialog/EmoEvaluation/<dialog>.txt     header + per-utterance blocks
    Session{n}/dialog/EmoEvaluation/Categorical/<dialog>_e2_cat.txt
    Session{n}/sentences/wav/<dialog>/<utt>.wav      16 kHz mono PCM

What parsers must survive, as in the real release: dropped labels (xxx, oth,
sur, fea, dis), transcription segments that are not utterances (``..._MXX0``
with ``[BREATHING]``), an EmoEvaluation entry without a transcription line,
texts with colons and brackets, a transcription whose order differs from start
time, overlapping turns, and the ``Divx`` spelling in Session 5.

Label signal (every modality, each with its own noise; see `LabelSignal`):
text cue words (`magtkd.synthetic.text`), a wav tone whose pitch depends on the
emotion, and the dialogue video's background colour during the utterance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..artifacts import write_text
from . import text as synth_text
from .media import index_frame, tone, write_video, write_wav
from .release import IEMOCAP_DEV_DIALOGUES as DEV_DIALOGUES, IEMOCAP_LABELS as LABELS
from .release import IEMOCAP_TEST_SESSIONS as TEST_SESSIONS, speaker_letter

# --- label signal shared with the MELD generator -------------------------------

GAP_COLOR = (24, 24, 24)  # video background when nobody speaks
TONE_BASE_HZ = 220.0
TONE_RATIO = 1.26  # ~4 semitones between neighbouring labels
TONE_JITTER = 0.03  # relative, per utterance; well below half the ratio step
COLOR_JITTER = 20  # per channel, per utterance; palette colours are >= 80 apart
AUDIO_NOISE = 0.03  # Gaussian noise std on top of a 0.3-amplitude tone
SWAP_PROBABILITY = 0.1  # audio / video independently show another emotion this often

PALETTE = {
    "ang": (220, 40, 40), "exc": (240, 150, 30), "fru": (170, 40, 200), "hap": (230, 230, 50),
    "neu": (128, 128, 128), "sad": (40, 80, 220),
    "anger": (220, 40, 40), "disgust": (110, 160, 40), "fear": (150, 40, 200),
    "joy": (240, 220, 40), "neutral": (128, 128, 128), "sadness": (40, 80, 220),
    "surprise": (40, 210, 210),
}


@dataclass(frozen=True)
class UtteranceSignal:
    """What the audio and video of one utterance show (may differ from the gold label)."""

    audio_emotion: str
    video_emotion: str
    freq: float  # Hz, jittered tone of audio_emotion
    color: tuple[int, int, int]  # jittered colour of video_emotion


@dataclass(frozen=True)
class LabelSignal:
    """Per-label tone pitch and background colour for one label set.

    Tone of label i: ``TONE_BASE_HZ * TONE_RATIO**i``. Each modality shows the
    gold emotion except with probability `SWAP_PROBABILITY` (independently),
    so no single modality is a perfect copy of the label.
    """

    labels: tuple[str, ...]

    @property
    def tones(self) -> dict[str, float]:
        return {label: TONE_BASE_HZ * TONE_RATIO**i for i, label in enumerate(self.labels)}

    @property
    def colors(self) -> dict[str, tuple[int, int, int]]:
        return {label: PALETTE[label] for label in self.labels}

    def _shown(self, emotion: str, rng: np.random.Generator) -> str:
        if rng.random() < SWAP_PROBABILITY:
            others = [label for label in self.labels if label != emotion]
            return others[rng.integers(len(others))]
        return emotion

    def draw(self, emotion: str, rng: np.random.Generator) -> UtteranceSignal:
        """The audio/video signal of an utterance whose gold label is ``emotion``.

        ``emotion`` outside the label set (IEMOCAP's dropped labels) shows a
        random label.
        """
        if emotion not in self.labels:
            emotion = self.labels[rng.integers(len(self.labels))]
        audio, video = self._shown(emotion, rng), self._shown(emotion, rng)
        freq = self.tones[audio] * (1.0 + rng.uniform(-TONE_JITTER, TONE_JITTER))
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        r, g, b = (int(c) for c in np.clip(np.array(PALETTE[video]) + jitter, 0, 255))
        return UtteranceSignal(audio, video, float(freq), (r, g, b))


def nearest_label(color: np.ndarray | tuple[float, float, float], labels: tuple[str, ...]) -> str:
    """The label whose palette colour is closest to ``color`` (RGB), for read-back checks."""
    rgb = np.asarray(color, dtype=np.float64)
    return min(labels, key=lambda label: float(np.sum((np.array(PALETTE[label]) - rgb) ** 2)))


# --- IEMOCAP layout ------------------------------------------------------------

SAMPLE_RATE = 16000
FPS = 10
FRAME_HEIGHT, FRAME_WIDTH = 48, 64

# Sessions 1-4 are train+dev (dev = names in DEV_DIALOGUES), Session 5 is test.
DIALOGUES: tuple[str, ...] = (
    "Ses01F_impro01", "Ses01F_impro02", "Ses01F_script01_1", "Ses01M_impro01", "Ses01M_impro03",
    "Ses02F_impro01", "Ses02F_impro02", "Ses02F_script02_1", "Ses02M_impro03", "Ses02M_impro05",
    "Ses02M_script01_2", "Ses03F_impro01",
    "Ses03F_impro05", "Ses03F_script01_2", "Ses03M_impro08b", "Ses03M_script02_2",
    "Ses04F_impro02", "Ses04F_impro07", "Ses04F_script01_1", "Ses04M_impro02", "Ses04M_impro04",
    "Ses04M_script03_2",
    "Ses05F_impro01", "Ses05F_impro04", "Ses05F_script02_2", "Ses05M_impro03", "Ses05M_impro06",
    "Ses05M_script03_1",
)
DROPPED_LABELS: tuple[str, ...] = ("xxx", "oth", "sur", "fea", "dis", "xxx", "oth", "xxx")
# Dialogues whose transcription lists two overlapping turns out of start-time order.
REORDERED = ("Ses01F_impro01", "Ses05M_impro03")
# Dialogue holding an EmoEvaluation entry with no transcription line.
NO_TRANSCRIPT = "Ses02M_impro03"
# Dialogues with non-utterance segments (``..._MXX0 [..]: [BREATHING]``).
WITH_NONVERBAL = ("Ses01F_impro01", "Ses02F_script02_1", "Ses04M_impro02", "Ses05F_impro01")

CATEGORY = {
    "ang": "Anger", "exc": "Excited", "fru": "Frustration", "hap": "Happiness", "neu": "Neutral state",
    "sad": "Sadness", "sur": "Surprise", "fea": "Fear", "dis": "Disgust", "oth": "Other",
}
EVALUATORS = ("E1", "E2", "E3", "E4", "E5")
EMO_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]"


def session_of(dialogue: str) -> int:
    """``Ses03M_impro02`` -> 3."""
    return int(dialogue[3:5])


def split_of(dialogue: str) -> str:
    """The standard split (docs/METHOD.md §1)."""
    if session_of(dialogue) in TEST_SESSIONS:
        return "test"
    return "dev" if dialogue in DEV_DIALOGUES else "train"


def video_relpath(dialogue: str) -> str:
    """Session 5 spells the folder ``Divx`` like some copies of the release."""
    session = session_of(dialogue)
    divx = "Divx" if session == 5 else "DivX"
    return f"Session{session}/dialog/avi/{divx}/{dialogue}.avi"


def wav_relpath(dialogue: str, utterance: str) -> str:
    return f"Session{session_of(dialogue)}/sentences/wav/{dialogue}/{utterance}.wav"


@dataclass
class _Turn:
    """One turn of a dialogue, in start-time order."""

    name: str
    start: float
    end: float
    label: str  # gold label, or a dropped label, or "" for a non-verbal segment
    text: str
    signal: UtteranceSignal | None = None  # None for non-verbal segments
    transcribed: bool = True
    text_cue: bool = False
    listed_after_next: bool = False  # the transcription lists the next turn first

    @property
    def evaluated(self) -> bool:
        return self.signal is not None

    @property
    def kept(self) -> bool:
        return self.evaluated and self.transcribed and self.label in LABELS


def _time_range(turn: _Turn) -> str:
    return f"[{turn.start:08.4f}-{turn.end:08.4f}]"


def _plan_counts(rng: np.random.Generator) -> dict[str, int]:
    """Kept utterances per dialogue (7-11)."""
    return {dialogue: int(rng.integers(7, 12)) for dialogue in DIALOGUES}


def cohesive(labels: list[str], rng: np.random.Generator, mix: float = 0.3) -> list[str]:
    """Arrange a split's labels so that consecutive utterances mostly share an emotion.

    Real conversations are emotionally coherent (an IEMOCAP improvisation keeps
    one mood for many turns), so the dialogue context carries the label as well
    as the utterance itself; that is what the context models of both stages use.
    The labels are grouped by emotion, then a fraction ``mix`` of the positions
    is shuffled among themselves. The multiset (class balance) is unchanged.
    """
    grouped = sorted(labels, key=lambda label: (label, 0))
    picked = np.flatnonzero(rng.random(len(grouped)) < mix)
    moved = [grouped[i] for i in rng.permutation(picked)]
    for i, label in zip(picked, moved):
        grouped[i] = label
    return grouped


def _label_pools(counts: dict[str, int], rng: np.random.Generator) -> dict[str, list[str]]:
    """Per split, a near-balanced list of gold labels (every label present), emotionally cohesive."""
    pools: dict[str, list[str]] = {}
    for split in ("train", "dev", "test"):
        total = sum(n for d, n in counts.items() if split_of(d) == split)
        pools[split] = cohesive([LABELS[i % len(LABELS)] for i in range(total)], rng)
    return pools


def _speakers(n: int, rng: np.random.Generator) -> list[str]:
    """Speaker letters in turn order: mostly alternating, both F and M present."""
    letters = ["F" if rng.random() < 0.5 else "M"]
    for _ in range(n - 1):
        prev = letters[-1]
        letters.append(("M" if prev == "F" else "F") if rng.random() < 0.75 else prev)
    if len(set(letters)) == 1:
        letters[-1] = "M" if letters[0] == "F" else "F"
    return letters


def _build_dialogue(
    dialogue: str, labels: list[str], dropped: list[str], signal: LabelSignal, rng: np.random.Generator,
    markups: list[str],
) -> list[_Turn]:
    """The turns of one dialogue in start-time order."""
    kinds: list[str] = list(labels)
    for label in dropped:
        kinds.insert(int(rng.integers(1, len(kinds) + 1)), label)
    no_transcript_at = -1
    if dialogue == NO_TRANSCRIPT:
        no_transcript_at = int(rng.integers(1, len(kinds)))
        kinds.insert(no_transcript_at, "neu")
    letters = _speakers(len(kinds), rng)
    counters = {"F": 0, "M": 0}
    # Reordered dialogues: the first two consecutive gold-labelled turns (after
    # turn 0) overlap, and the transcription lists the later one first.
    overlap_at = -1
    if dialogue in REORDERED:
        overlap_at = next(i for i in range(1, len(kinds) - 1) if kinds[i] in LABELS and kinds[i + 1] in LABELS)
    turns: list[_Turn] = []
    t = round(float(rng.uniform(1.0, 2.0)), 4)
    for i, (label, letter) in enumerate(zip(kinds, letters)):
        duration = float(rng.uniform(0.6, 1.5))
        start, end = round(t, 4), round(t + duration, 4)
        name = f"{dialogue}_{letter}{counters[letter]:03d}"
        counters[letter] += 1
        if label in LABELS:
            markup = markups.pop(0) if markups and i != no_transcript_at else None
            text = synth_text.make_utterance(label, rng, markup=markup)
            cue = synth_text.has_cue(text, label)
        else:
            text, cue = synth_text.filler_utterance(rng), False
        turns.append(
            _Turn(name, start, end, label, text, signal.draw(label, rng), i != no_transcript_at, cue,
                  listed_after_next=i == overlap_at)
        )
        if i == overlap_at or rng.random() < 0.1:
            gap = -float(rng.uniform(0.1, 0.3))  # overlapping turns, as in real dialogues
        else:
            gap = float(rng.uniform(1.0, 1.4))  # long enough that the +-1 s video window stays in the gap
        t = end + gap
    if dialogue in WITH_NONVERBAL:
        # A breath inside the first long gap, spoken by no evaluated turn.
        for a, b in zip(turns, turns[1:]):
            if b.start - a.end > 0.8:
                letter = "M" if speaker_letter(a.name) == "F" else "F"
                nonverbal = synth_text.NONVERBAL[int(rng.integers(len(synth_text.NONVERBAL)))]
                seg = _Turn(f"{dialogue}_{letter}XX0", round(a.end + 0.2, 4), round(a.end + 0.6, 4), "", nonverbal)
                turns.insert(turns.index(b), seg)
                break
    return turns


def _transcription_order(turns: list[_Turn]) -> list[_Turn]:
    """Start-time order, except that a turn flagged ``listed_after_next`` follows the next turn."""
    order = [turn for turn in turns if turn.transcribed]
    for i, turn in enumerate(order[:-1]):
        if turn.listed_after_next:
            order[i], order[i + 1] = order[i + 1], order[i]
            break
    return order


def _transcription(order: list[_Turn]) -> str:
    return "".join(f"{turn.name} {_time_range(turn)}: {turn.text}\n" for turn in order)


def _annotations(turn: _Turn, rng: np.random.Generator) -> tuple[list[str], tuple[float, float, float]]:
    """Annotator lines (``C-E2:\\tFrustration;\\t()``, ``A-E3:\\tval 3; act 2; dom  2;\\t()``) and mean V/A/D."""
    evaluators = sorted(rng.choice(EVALUATORS, size=3, replace=False).tolist())
    self_eval = f"{speaker_letter(turn.name)}1"
    categories = list(CATEGORY)
    lines: list[str] = []
    for k, who in enumerate([*evaluators, self_eval]):
        if turn.label == "xxx":  # no majority: every evaluator says something else
            cats = [CATEGORY[categories[(k * 3 + int(rng.integers(3))) % len(categories)]]]
        else:
            cats = [CATEGORY[turn.label]]
            if rng.random() < 0.25:  # a second category, as real annotators sometimes give
                cats.append(CATEGORY[categories[int(rng.integers(len(categories)))]])
            if k == 1 and rng.random() < 0.3:  # one dissenting evaluator
                cats = [CATEGORY[categories[int(rng.integers(len(categories)))]]]
        cats = list(dict.fromkeys(cats))
        comment = "" if rng.random() < 0.8 else "mildly aggravated, staying polite"
        lines.append(f"C-{who}:\t{' '.join(c + ';' for c in cats)}\t({comment})")
    vad = rng.integers(1, 6, size=(4, 3))
    for who, (v, a, d) in zip([*evaluators, self_eval], vad):
        lines.append(f"A-{who}:\tval {v}; act {a}; dom  {d};\t()")
    mean = vad[:3].mean(axis=0)
    return lines, (float(mean[0]), float(mean[1]), float(mean[2]))


def _emo_evaluation(turns: list[_Turn], rng: np.random.Generator) -> str:
    """The EmoEvaluation file: header line, blank line, then one block per evaluated turn."""
    blocks: list[str] = []
    for turn in turns:
        if not turn.evaluated:
            continue
        lines, (v, a, d) = _annotations(turn, rng)
        header = f"[{turn.start:.4f} - {turn.end:.4f}]\t{turn.name}\t{turn.label}\t[{v:.4f}, {a:.4f}, {d:.4f}]"
        blocks.append("\n".join([header, *lines]) + "\n")
    return EMO_HEADER + "\n\n" + "\n".join(blocks) + "\n"


def _categorical(turns: list[_Turn]) -> str:
    """One evaluator's ``Categorical/<dialog>_e2_cat.txt`` (real release side file; not read)."""
    return "".join(
        f"{turn.name} :{CATEGORY[turn.label] if turn.label in CATEGORY else 'Other'}; ()\n"
        for turn in turns if turn.evaluated
    )


def _frames(turns: list[_Turn], n_frames: int) -> Iterator[np.ndarray]:
    """Dialogue video: during a turn's [start, end) its colour (the later turn wins on overlap)."""
    evaluated = [turn for turn in turns if turn.evaluated]
    for i in range(n_frames):
        t = i / FPS
        color: tuple[int, int, int] = GAP_COLOR
        for turn in evaluated:
            if turn.start <= t < turn.end and turn.signal is not None:
                color = turn.signal.color
        yield index_frame(i, FRAME_HEIGHT, FRAME_WIDTH, color)


def _write_media(root: Path, dialogue: str, turns: list[_Turn], noise_rng: np.random.Generator) -> None:
    """A wav per evaluated turn and the dialogue video (1.5 s past the last turn)."""
    for turn in turns:
        if turn.signal is not None:
            samples = tone(turn.signal.freq, turn.end - turn.start, SAMPLE_RATE, 1, noise=AUDIO_NOISE, rng=noise_rng)
            write_wav(root / wav_relpath(dialogue, turn.name), samples, SAMPLE_RATE)
    n_frames = int(np.ceil((max(turn.end for turn in turns) + 1.5) * FPS))
    write_video(root / video_relpath(dialogue), _frames(turns, n_frames), FPS, codec="mpeg4")


def write_iemocap(root: Path, seed: int = 0, *, media: bool = True) -> dict:
    """Write the synthetic IEMOCAP release into ``root``; return its manifest.

    ``media=False`` writes only the text files (transcriptions, EmoEvaluation),
    byte-identical to a full run, for fast tests of parsers. Media noise comes
    from its own random stream so the text never depends on it.

    The manifest (JSON-serialisable) lists what a correct builder must produce:
    ``splits[split]`` = {"dialogues": names sorted, "utterances": kept count},
    ``utterances`` = the kept utterances in CSV order (split, dialogues by name,
    transcription order) with their text, times, gold label and the emotions
    the audio/video actually show, ``dropped`` = evaluated utterances a builder
    must drop with the reason, plus the signal tables (``tones``, ``colors``).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng([seed, 1])
    signal = LabelSignal(LABELS)
    counts = _plan_counts(rng)
    pools = _label_pools(counts, rng)
    dropped_plan: dict[str, list[str]] = {d: [] for d in DIALOGUES}
    for k, label in enumerate(DROPPED_LABELS):
        dropped_plan[DIALOGUES[(k * 2) % len(DIALOGUES)]].append(label)
    manifest_utts: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    dropped: list[dict] = []
    for dialogue in DIALOGUES:
        split, session = split_of(dialogue), session_of(dialogue)
        labels = [pools[split].pop() for _ in range(counts[dialogue])]
        # The first dialogue of each split carries every markup pattern once.
        first = dialogue == min(d for d in DIALOGUES if split_of(d) == split)
        markups = list(synth_text.IEMOCAP_MARKUP) if first else []
        turns = _build_dialogue(dialogue, labels, dropped_plan[dialogue], signal, rng, markups)
        order = _transcription_order(turns)
        sdir = root / f"Session{session}"
        write_text(sdir / "dialog" / "transcriptions" / f"{dialogue}.txt", _transcription(order))
        write_text(sdir / "dialog" / "EmoEvaluation" / f"{dialogue}.txt", _emo_evaluation(turns, rng))
        write_text(sdir / "dialog" / "EmoEvaluation" / "Categorical" / f"{dialogue}_e2_cat.txt",
                   _categorical(turns))
        if media:
            _write_media(root, dialogue, turns, noise_rng)
        manifest_utts[split] += _kept_entries(split, dialogue, order)
        dropped += _dropped_entries(dialogue, turns)
    for split in manifest_utts:
        manifest_utts[split].sort(key=lambda u: u["dialogue"])  # stable: keeps transcription order
    return _manifest(seed, manifest_utts, dropped, signal)


def _kept_entries(split: str, dialogue: str, order: list) -> list[dict]:
    """The manifest rows of a dialogue's kept utterances, in transcription order."""
    return [{"split": split, "dialogue": dialogue, "name": turn.name, "speaker": turn.name,
             "start": turn.start, "end": turn.end, "text": turn.text, "emotion": turn.label,
             "text_cue": turn.text_cue, "audio_emotion": turn.signal.audio_emotion,
             "video_emotion": turn.signal.video_emotion, "color": list(turn.signal.color),
             "freq": turn.signal.freq, "wav": wav_relpath(dialogue, turn.name), "video": video_relpath(dialogue)}
            for turn in order if turn.kept and turn.signal is not None]


def _dropped_entries(dialogue: str, turns: list) -> list[dict]:
    """The evaluated utterances a builder must drop, with the reason."""
    return [{"dialogue": dialogue, "name": turn.name, "label": turn.label,
             "reason": "no transcription line" if not turn.transcribed else f"label {turn.label}"}
            for turn in turns if turn.evaluated and not turn.kept]


def _manifest(seed: int, manifest_utts: dict[str, list[dict]], dropped: list[dict], signal: LabelSignal) -> dict:
    """What a correct builder must produce from the written release (`write_iemocap`)."""
    return {
        "dataset": "IEMOCAP",
        "seed": seed,
        "labels": list(LABELS),
        "splits": {
            split: {
                "dialogues": sorted(d for d in DIALOGUES if split_of(d) == split),
                "utterances": len(manifest_utts[split]),
            }
            for split in ("train", "dev", "test")
        },
        "utterances": [u for split in ("train", "dev", "test") for u in manifest_utts[split]],
        "dropped": dropped,
        "reordered": list(REORDERED),
        "sample_rate": SAMPLE_RATE,
        "fps": FPS,
        "frame_size": [FRAME_HEIGHT, FRAME_WIDTH],
        "tones": signal.tones,
        "colors": {label: list(c) for label, c in signal.colors.items()},
        "gap_color": list(GAP_COLOR),
    }
