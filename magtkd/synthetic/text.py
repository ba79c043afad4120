"""Utterance text for the synthetic datasets: emotion cue words among neutral fillers.

The text signal (docs/METHOD.md §1 label sets): most utterances contain two cue
words typical of their emotion, surrounded by fillers shared by every emotion,
so a text model can beat the majority class without the task being a lookup;
a fraction carry no cue at all. Markup fragments reproduce what the real
releases hold and parsers must survive: IEMOCAP texts with brackets and colons,
MELD texts with commas, double quotes, apostrophes, accented letters and the
U+0092 mojibake of the official CSVs.
"""

from __future__ import annotations

import re

import numpy as np

IEMOCAP_WORDS: dict[str, tuple[str, ...]] = {
    "ang": ("furious", "outraged", "livid", "enraged"),
    "exc": ("thrilled", "amazing", "fantastic", "ecstatic"),
    "fru": ("frustrating", "annoying", "useless", "pointless"),
    "hap": ("happy", "glad", "lovely", "pleased"),
    "neu": ("routine", "ordinary", "usual", "regular"),
    "sad": ("sad", "lonely", "heartbroken", "gloomy"),
}

MELD_WORDS: dict[str, tuple[str, ...]] = {
    "anger": ("furious", "mad", "angry", "livid"),
    "disgust": ("gross", "disgusting", "yuck", "nasty"),
    "fear": ("scared", "afraid", "terrified", "nervous"),
    "joy": ("happy", "great", "wonderful", "yay"),
    "neutral": ("routine", "usual", "normal", "ordinary"),
    "sadness": ("sad", "sorry", "lonely", "crying"),
    "surprise": ("wow", "unbelievable", "shocked", "whoa"),
}

# Shared by every emotion: they carry no label information.
FILLERS: tuple[str, ...] = (
    "well", "you know", "I mean", "so", "honestly", "look", "listen", "um",
    "about the car", "at the office", "this morning", "with my friend",
    "right now", "after lunch", "in the kitchen", "at the airport",
)

# Sentence patterns; {f1}/{f2} are fillers, {cue}/{cue2} two different cue words
# of the emotion. Four cues per emotion, two per utterance: on ~60-90 training
# utterances a bag of words then reaches ~80-90 % (one cue of six: ~45 %).
CUE_TEMPLATES: tuple[str, ...] = (
    "{f1}, {cue} {f2}, {cue2}.", "{cue}! {f1} {f2}, so {cue2}.", "{f1} {cue2} {f2}, {cue}?",
)
PLAIN_TEMPLATES: tuple[str, ...] = ("{f1}, {f2}.", "{f1} {f2}?")

# Markup around an utterance {u}. IEMOCAP: brackets and colons inside the text
# (docs/METHOD.md §1 says the text "may itself contain colons and brackets"),
# including a "]:" that a greedy parser of `<name> [START-END]: text` would split on.
IEMOCAP_MARKUP: tuple[str, ...] = (
    "[LAUGHTER] {u}", "{u} [GARBAGE]", "Listen: {u}", "She wrote [sic]: {u}",
)
# MELD: the characters of the official CSVs (comma, doubled quotes, ’, é, U+0092).
MELD_MARKUP: tuple[str, ...] = (
    'He said, "{u}"', "{u} It’s true.", "{u} It\x92s true.", "{u} At the café.",
    "{u} That\x92s déjà vu.", "{u} Don't, please.",
)

# Text of IEMOCAP transcription segments that are not evaluated utterances
# (names like `Ses01F_impro01_MXX0`, docs/METHOD.md §1).
NONVERBAL: tuple[str, ...] = ("[BREATHING]", "[LAUGHTER]", "[GARBAGE]")

CUE_PROBABILITY = 0.85  # the rest get fillers only: the text signal is strong, not perfect
MARKUP_PROBABILITY = 0.15


def _label_set(emotion: str) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    if emotion in IEMOCAP_WORDS:
        return IEMOCAP_WORDS, IEMOCAP_MARKUP
    if emotion in MELD_WORDS:
        return MELD_WORDS, MELD_MARKUP
    known = ", ".join([*IEMOCAP_WORDS, *MELD_WORDS])
    raise KeyError(f"unknown emotion {emotion!r}; expected one of: {known}")


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _render(template: str, f1: str, f2: str, cue: str = "", cue2: str = "") -> str:
    return _capitalise(template.format(f1=f1, f2=f2, cue=cue, cue2=cue2))


def filler_utterance(rng: np.random.Generator) -> str:
    """An utterance of fillers only (no label information)."""
    f1, f2 = (FILLERS[i] for i in rng.choice(len(FILLERS), size=2, replace=False))
    return _render(PLAIN_TEMPLATES[rng.integers(len(PLAIN_TEMPLATES))], f1, f2)


def make_utterance(emotion: str, rng: np.random.Generator, *, markup: str | None = None) -> str:
    """One utterance for ``emotion`` (an IEMOCAP or MELD label), drawn with ``rng``.

    With probability `CUE_PROBABILITY` it contains two cue words of the emotion;
    with probability `MARKUP_PROBABILITY` (or always, when ``markup`` names one
    of the label set's markup patterns) it is wrapped in a markup pattern.
    """
    words, patterns = _label_set(emotion)
    if markup is not None and markup not in patterns:
        raise ValueError(f"markup {markup!r} is not one of {patterns}")
    if rng.random() < CUE_PROBABILITY:
        cues = words[emotion]
        f1, f2 = (FILLERS[i] for i in rng.choice(len(FILLERS), size=2, replace=False))
        cue, cue2 = (cues[i] for i in rng.choice(len(cues), size=2, replace=False))
        text = _render(CUE_TEMPLATES[rng.integers(len(CUE_TEMPLATES))], f1, f2, cue, cue2)
    else:
        text = filler_utterance(rng)
    if markup is None and rng.random() < MARKUP_PROBABILITY:
        markup = patterns[rng.integers(len(patterns))]
    return markup.format(u=text) if markup is not None else text


def has_cue(text: str, emotion: str) -> bool:
    """Whether ``text`` contains a cue word of ``emotion`` (case-insensitive)."""
    words, _ = _label_set(emotion)
    return any(re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) for word in words[emotion])


def corpus() -> list[str]:
    """Every word and sentence pattern the generator can emit, for tokenizer training.

    Each cue word appears in each template (fillers cycled), every filler pair in
    each filler-only template, and every markup pattern once, so a BPE model
    trained on this list has seen every piece of synthetic text.
    """
    lines: list[str] = []
    k = 0
    for words in (IEMOCAP_WORDS, MELD_WORDS):
        for cues in words.values():
            for i, cue in enumerate(cues):
                for template in CUE_TEMPLATES:
                    f1, f2 = FILLERS[k % len(FILLERS)], FILLERS[(k + 7) % len(FILLERS)]
                    lines.append(_render(template, f1, f2, cue, cues[(i + 1) % len(cues)]))
                    k += 1
    for i, f1 in enumerate(FILLERS):
        for f2 in FILLERS[i + 1 :]:
            for template in PLAIN_TEMPLATES:
                lines.append(_render(template, f1, f2))
                lines.append(_render(template, f2, f1))
    sample = _render(CUE_TEMPLATES[0], FILLERS[0], FILLERS[1], *IEMOCAP_WORDS["neu"][:2])
    lines.extend(pattern.format(u=sample) for pattern in (*IEMOCAP_MARKUP, *MELD_MARKUP))
    lines.extend(NONVERBAL)
    return lines
