"""Synthetic first-stage feature pickles with a learnable signal (tests and benchmarks).

Every utterance gets, in each modality, its class's prototype vector (scaled by
a per-modality signal strength: text strongest, raw video weakest) plus
Gaussian noise, so a fusion model can learn the labels and the text stream
matters most, as on the real data. Speakers follow the recipe's rule:
IEMOCAP 0/1 by order of appearance in the dialogue, MELD global ids from a pool
of ``spec.n_speaker`` names (at most 9 in one dialogue). The pickles go
through :func:`magtkd.dataset.assemble_features` / ``save_features``, i.e. the
exact docs/METHOD.md §4 layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ..artifacts import feature_path
from ..spec import SPLITS, DatasetSpec
from ..pickles import FEATURE_KEYS, assemble_features, save_features

SIGNAL = {"text": 1.0, "audio": 0.5, "video": 0.3, "audio_kd": 0.8, "video_kd": 0.6}
MAX_SPEAKERS_PER_DIALOGUE = 9


def _per_split(value: int | Mapping[str, int] | None, split: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    return int(value[split])


def _lengths(rng: np.random.Generator, n_dialogues: int, n_utterances: int | None, max_len: int,
             sd: float | None = None) -> np.ndarray:
    """Dialogue lengths: random in [2, max_len], or summing exactly to ``n_utterances``: near the mean
    (multinomial), or spread with standard deviation ``sd`` (gamma, at most ``max_len``)."""
    if n_utterances is None:
        return rng.integers(2, max_len + 1, size=n_dialogues)
    if n_utterances < n_dialogues:
        raise ValueError(f"{n_utterances} utterances cannot fill {n_dialogues} dialogues")
    if sd is None:
        extra = rng.multinomial(n_utterances - n_dialogues, np.full(n_dialogues, 1.0 / n_dialogues))
        return 1 + extra
    if n_utterances > n_dialogues * max_len:
        raise ValueError(f"{n_utterances} utterances do not fit {n_dialogues} dialogues of at most {max_len}")
    mean = n_utterances / n_dialogues
    shape = (mean / sd) ** 2
    lengths = np.clip(np.round(rng.gamma(shape, mean / shape, size=n_dialogues)), 1, max_len).astype(int)
    while (diff := n_utterances - int(lengths.sum())) != 0:  # one utterance at a time to the exact total
        i = int(rng.integers(n_dialogues))
        if diff > 0 and lengths[i] < max_len:
            lengths[i] += 1
        elif diff < 0 and lengths[i] > 1:
            lengths[i] -= 1
    return lengths


def _speakers(rng: np.random.Generator, spec: DatasetSpec, length: int, pool: int) -> list[int]:
    if spec.global_speaker_ids:
        cast = rng.choice(pool, size=int(rng.integers(1, min(MAX_SPEAKERS_PER_DIALOGUE, pool) + 1)), replace=False)
        return [int(s) for s in rng.choice(cast, size=length)]
    # Two speakers numbered by order of appearance (docs/METHOD.md §4).
    raw = rng.integers(0, 2, size=length)
    return [int(s) for s in (raw != raw[0])]


def write_synthetic_features(
    feature_dir: str | Path, spec: DatasetSpec, n_dialogues: int | Mapping[str, int] = 8, width: int = 16,
    seed: int = 0, *, n_utterances: Mapping[str, int] | None = None, max_len: int = 10, noise: float = 1.0,
    prototype_scale: float = 4.0, n_global_speakers: int | None = None,
    length_sd: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Write ``first_stage_{train,dev,test}_features.pkl`` into ``feature_dir``; return split -> path.

    ``n_dialogues`` / ``n_utterances``: per split (int or split -> int); without
    ``n_utterances`` each dialogue has 2..``max_len`` utterances; with it and
    ``length_sd`` (split -> standard deviation) the lengths spread like a real
    release's, up to ``max_len`` (padding then costs what it costs on real data). Prototypes have
    unit-variance entries times ``prototype_scale``; ``noise`` is the noise std.
    The default signal is strong on purpose: with weak signals and tiny widths
    the non-detached logit-KD terms of the IEMOCAP objective can pull the model
    to a one-class solution before cross-entropy takes hold.
    """
    rng = np.random.default_rng(seed)
    n_classes = len(spec.labels)
    pool = n_global_speakers or spec.n_speaker
    prototypes = {key: rng.normal(0.0, prototype_scale, size=(n_classes, width)) for key in FEATURE_KEYS}
    paths: dict[str, Path] = {}
    for split in SPLITS:
        lengths = _lengths(rng, _per_split(n_dialogues, split), _per_split(n_utterances, split), max_len,
                           None if length_sd is None else length_sd[split])
        dialogue_ids, utterance_ids, speakers = [], [], []
        for dia, length in enumerate(lengths):
            dialogue_ids += [dia] * int(length)
            utterance_ids += list(range(int(length)))
            speakers += _speakers(rng, spec, int(length), pool)
        labels = rng.integers(0, n_classes, size=len(dialogue_ids))
        vectors = {
            key: (SIGNAL[key] * prototypes[key][labels]
                  + noise * rng.normal(size=(len(labels), width))).astype(np.float32)
            for key in FEATURE_KEYS
        }
        features = assemble_features(dialogue_ids, utterance_ids, labels.tolist(), speakers, vectors)
        paths[split] = save_features(feature_path(feature_dir, split), features)
    return paths
