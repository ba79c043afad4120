"""The model card of a model folder (`magtkd.card`, docs/METHOD.md §9): Hugging Face's YAML front matter with the
kept model's test figures exactly, and a body whose figures are the metrics documents' (the kept model, per-class
F1, mean ± std over seeds, the test-selected figure labelled as such)."""

from __future__ import annotations

import numpy as np
import pytest

from magtkd import results
from magtkd.card import model_card

yaml = pytest.importorskip("yaml")  # comes with transformers; the card itself is written without it

LABELS = ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]
KEYS = ("text", "audio", "audio_kd", "video", "video_kd")


def doc(seed: int, test_every_epoch: bool = False) -> dict:
    """A metrics document's fields the card reads, with a real test report."""
    rng = np.random.default_rng(seed)
    test = results.test_report(rng.integers(0, 7, 50), rng.integers(0, 7, 50), LABELS)
    out = {"args": {"seed": seed, "epochs": 3, "learning_rate": 1e-5, "lr": 1e-4, "batch_size": 16},
           "selected_epoch": 2, "dev_weighted_f1": 0.3 + seed / 1e4, "test": test}
    if test_every_epoch:
        out["test_selected_weighted_f1"] = test["weighted_f1"] + 0.05
    return out


def config_and_docs(seeds: bool) -> tuple[dict, dict]:
    docs = {key: doc(i) for i, key in enumerate(KEYS)}
    docs["fusion"] = doc(2025, test_every_epoch=True)
    rows = [results.seed_row(s, d, LABELS) for s, d in ((2024, doc(2024, True)), (2025, docs["fusion"]))]
    summary = {**results.seeds_summary(rows), "best_seed": 2025} if seeds else None
    config = {
        "dataset": "MELD", "labels": LABELS,
        "test": {k: docs["fusion"]["test"][k] for k in ("accuracy", "weighted_f1")},
        "selection": {"seed": 2025, "selected_epoch": 2, "seeds": [2024, 2025] if seeds else [2025]},
        "seeds": summary, "sizes": {"train_dialogues": 1038, "train_utterances": 9989, "test_dialogues": 280,
                                    "test_utterances": 2610, "dev_dialogues": 114, "dev_utterances": 1109},
        "fusion": {"hidden": 768, "n_speaker": 304, "n_head": 8, "modalities": ["T", "A", "V"], "fusion": "anchor",
                   "audio_feature": "audio_kd", "video_feature": "video_kd"},
        "attention": "paper: the May-2025 release's mask", "prompt": "full",
        "training_args": {key: d["args"] for key, d in docs.items()},
        "models": {key: {"weights": f"{key}.safetensors", "record": f"{key}.json", "script": f"MELD/{key}.py"}
                   for key in docs},
    }
    return config, docs


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_front_matter_is_hugging_face_metadata_with_the_kept_models_exact_figures():
    config, docs = config_and_docs(seeds=True)
    meta = front_matter(model_card(config, docs))
    assert meta["library_name"] == "magtkd" and meta["datasets"] == ["MELD"]
    assert set(meta["metrics"]) == {"accuracy", "f1"} and "emotion-recognition-in-conversation" in meta["tags"]
    assert meta["base_model"] == ["FacebookAI/roberta-large", "facebook/data2vec-audio-base-960h",
                                  "facebook/timesformer-base-finetuned-k400"]
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"] == {"type": "meld", "name": "MELD", "split": "test"}
    figures = {m["type"]: m["value"] for m in result["metrics"]}
    assert figures == {"f1": docs["fusion"]["test"]["weighted_f1"], "accuracy": docs["fusion"]["test"]["accuracy"]}


def test_body_figures_are_the_metrics_documents():
    config, docs = config_and_docs(seeds=True)
    card = model_card(config, docs)
    test = docs["fusion"]["test"]
    assert f"| {test['accuracy']:.4f} | {test['weighted_f1']:.4f} |" in card
    for label in LABELS:
        c = test["per_class"][label]
        assert f"| {label} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1-score']:.4f} | {int(c['support'])} |" \
            in card
    mean, std = config["seeds"]["mean"], config["seeds"]["std"]
    assert f"{mean['test_weighted_f1']:.4f} ± {std['test_weighted_f1']:.4f}" in card
    assert "| 2025 (kept) |" in card
    assert f"{docs['fusion']['test_selected_weighted_f1']:.4f} (the best test epoch" in card
    assert "| train | 1038 | 9989 |" in card and "Attention: paper: the May-2025 release's mask" in card
    assert "python MELD/predict.py --model_dir magtkd-meld" in card


def test_without_a_seeds_summary_the_card_reports_the_kept_model_alone():
    config, docs = config_and_docs(seeds=False)
    card = model_card(config, docs)
    assert "mean ± std over" not in card and "(kept)" not in card
    assert f"kept model: seed 2025, epoch 2 (selected on dev) | {docs['fusion']['test']['accuracy']:.4f}" in card
