"""The model card (``README.md``) of a model folder (`magtkd.hub`, docs/METHOD.md §9): Hugging Face's YAML front
matter (library, datasets, metrics, tags, base models and the test results) and a body filled from the metrics
documents alone: the data and split sizes, the selection protocol, the seeds with mean ± std and the kept seed's
figures, per-class F1, the attention version, intended use, limitations and how to run it.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .pretrained import AUDIO, PRETRAINED, TEXT, VIDEO

TASK = "emotion-recognition-in-conversation"

# What each dataset is (docs/METHOD.md §1), for the limitations.
CORPORA = {"IEMOCAP": "acted English dyadic sessions, scripted and improvised",
           "MELD": "English dialogue from the TV series Friends"}

# Where each dataset's standard split comes from (docs/METHOD.md §1); the counts are the metrics document's.
SPLIT_RULES = {
    "IEMOCAP": "Sessions 1-4 are train and dev (12 standard dev dialogues on the release), Session 5 is test "
               "(docs/METHOD.md §1).",
    "MELD": "the official train / dev / test split of the release (docs/METHOD.md §1).",
}

FIRST_STAGE = {"text": "text (RoBERTa-large, prompt)", "audio": "audio (data2vec-audio)",
               "video": "video (TimeSformer)", "audio_kd": "audio distilled from text",
               "video_kd": "video distilled from text"}


def model_card(config: Mapping[str, Any], docs: Mapping[str, Mapping[str, Any]]) -> str:
    """The README.md of a model folder: ``config`` is its config.json (``seeds``: the fusion's seeds summary when
    it describes the kept model, else None), ``docs`` the six metrics documents (first-stage feature keys, then
    ``fusion``)."""
    sections = [front_matter(config), title(config), results(config, docs["fusion"]), data(config),
                training(config, docs), usage(config), limitations(config), files(config), CITATION]
    return "\n".join(sections)


def front_matter(config: Mapping[str, Any]) -> str:
    """Hugging Face's YAML metadata; strings are JSON-quoted (valid YAML), numbers exact."""
    dataset, test = config["dataset"], config["test"]
    kept = f"kept model, seed {config['selection']['seed']}, epoch selected on dev"
    q = json.dumps
    lines = ["---", "library_name: magtkd", "tags:", f"- {TASK}", "- emotion-recognition", "- multimodal",
             "- knowledge-distillation", f"- {dataset.lower()}", "datasets:", f"- {q(dataset)}", "metrics:",
             "- accuracy", "- f1", "base_model:", *(f"- {PRETRAINED[name]}" for name in (TEXT, AUDIO, VIDEO)),
             "model-index:", f"- name: {q('magtkd-' + dataset.lower())}", "  results:", "  - task:",
             f"      type: {TASK}", f"      name: {q('Emotion recognition in conversation')}", "    dataset:",
             f"      type: {q(dataset.lower())}", f"      name: {q(dataset)}", "      split: test", "    metrics:",
             "    - type: f1", f"      name: {q('test weighted F1 (' + kept + ')')}",
             f"      value: {test['weighted_f1']!r}",  # repr: the metrics document's float exactly
             "    - type: accuracy", f"      name: {q('test accuracy (' + kept + ')')}",
             f"      value: {test['accuracy']!r}",
             "---", ""]
    return "\n".join(lines)


def title(config: Mapping[str, Any]) -> str:
    labels = ", ".join(f"`{label}`" for label in config["labels"])
    return "\n".join([
        f"# MAGTKD on {config['dataset']}", "",
        "The multi-modal anchor gated transformer with knowledge distillation (Jie Li, Shifei Ding, Lili Guo, "
        "Xuan Li, IJCAI 2025) as trained by the MAGTKD reference implementation (`magtkd`): five first-stage "
        "models (text, audio, video, and audio and video distilled from text) and the fusion model. It gives "
        f"every utterance of a conversation one of {len(config['labels'])} emotions ({labels}) from its text, "
        "audio and video, using the dialogue's earlier utterances.", ""])


def results(config: Mapping[str, Any], fusion: Mapping[str, Any]) -> str:
    """Test figures: the kept model's, mean ± std over seeds, the test-selected figure; per-class F1; seeds."""
    selection, test = config["selection"], fusion["test"]
    lines = ["## Results (test)", "", "| model | test accuracy | test weighted F1 |", "|---|---|---|",
             f"| kept model: seed {selection['seed']}, epoch {selection['selected_epoch']} (selected on dev) | "
             f"{test['accuracy']:.4f} | {test['weighted_f1']:.4f} |"]
    seeds = config.get("seeds")
    if seeds:
        mean, std = seeds["mean"], seeds["std"]
        lines.append(f"| mean ± std over {len(seeds['seeds'])} seeds (the figure to quote) | "
                     f"{mean['test_accuracy']:.4f} ± {std['test_accuracy']:.4f} | "
                     f"{mean['test_weighted_f1']:.4f} ± {std['test_weighted_f1']:.4f} |")
    if fusion.get("test_selected_weighted_f1") is not None:
        lines += ["", f"Test-selected weighted F1 of the kept seed: {fusion['test_selected_weighted_f1']:.4f} (the "
                  "best test epoch: the authors' protocol, shown only to compare with papers; it chose nothing)."]
    lines += ["", "Per class, kept model:", "", "| label | precision | recall | F1 | support |",
              "|---|---|---|---|---|"]
    for label in config["labels"]:
        c = test["per_class"][label]
        lines.append(f"| {label} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1-score']:.4f} | "
                     f"{int(c['support'])} |")
    if seeds:
        lines += ["", "Seeds (each: the epoch with the best dev weighted F1; the best dev seed is kept):", "",
                  "| seed | selected epoch | dev weighted F1 | test accuracy | test weighted F1 |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['seed']}{' (kept)' if r['seed'] == seeds.get('best_seed') else ''} | {r['selected_epoch']} | "
                  f"{r['dev_weighted_f1']:.4f} | {r['test_accuracy']:.4f} | {r['test_weighted_f1']:.4f} |"
                  for r in seeds["seeds"]]
    return "\n".join(lines + [""])


def data(config: Mapping[str, Any]) -> str:
    sizes, dataset = config["sizes"], config["dataset"]
    lines = ["## Data", "", f"{dataset}: {SPLIT_RULES.get(dataset, 'its standard split.')} The fusion model saw:", "",
             "| split | dialogues | utterances |", "|---|---|---|"]
    lines += [f"| {split} | {sizes.get(f'{split}_dialogues', '?')} | {sizes.get(f'{split}_utterances', '?')} |"
              for split in ("train", "dev", "test")]
    return "\n".join(lines + [""])


def training(config: Mapping[str, Any], docs: Mapping[str, Mapping[str, Any]]) -> str:
    """How each model was trained and selected, the fusion's settings, the attention version and the prompt."""
    fusion, args = config["fusion"], config["training_args"]["fusion"]
    seeds = config.get("seeds")
    lines = ["## Training and selection", "",
             "Every model keeps the epoch with the best **dev** weighted F1; test is scored (first stage: at each "
             "new best dev epoch; fusion: every epoch) but never chooses an epoch or a seed"
             + (f"; of the seeds {', '.join(str(r['seed']) for r in seeds['seeds'])} the best dev one is kept."
                if seeds else "."), "",
             "| model | script | epochs | learning rate | selected epoch | dev weighted F1 | test accuracy | "
             "test weighted F1 |", "|---|---|---|---|---|---|---|---|"]
    for key, doc in docs.items():
        name = FIRST_STAGE.get(key, "fusion")
        rate = doc["args"].get("learning_rate", doc["args"].get("lr"))
        lines.append(f"| {name} | `{config['models'][key]['script']}` | {doc['args'].get('epochs')} | {rate} | "
                     f"{doc.get('selected_epoch')} | {_figure(doc.get('dev_weighted_f1'))} | "
                     f"{_figure(doc['test']['accuracy'])} | {_figure(doc['test']['weighted_f1'])} |")
    lines += ["", f"Fusion: variant {fusion.get('fusion')} over {'+'.join(fusion.get('modalities') or [])}, width "
              f"{fusion['hidden']}, {fusion.get('n_head')} heads, {fusion.get('n_speaker')} speaker rows, audio stream "
              f"`{fusion.get('audio_feature')}`, video stream `{fusion.get('video_feature')}`; batch "
              f"{args.get('batch_size')} dialogues, AdamW lr {args.get('lr')}, dropout {args.get('dropout')}, "
              f"alpha {args.get('alpha')}, beta {args.get('beta')}, feature loss {args.get('feature_loss')}.",
              f"Attention: {config['attention']}. Text prompt: `{config['prompt']}` (docs/METHOD.md §2).",
              "Every model's arguments are in `config.json` (`training_args`) and its metrics document.", ""]
    return "\n".join(lines)


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def usage(config: Mapping[str, Any]) -> str:
    ds, folder = config["dataset"], f"magtkd-{config['dataset'].lower()}"
    return "\n".join([
        "## How to use", "",
        "With the MAGTKD code (its `pretrained_model/` folders give the encoders' architectures, tokenizer and "
        "processors; this folder gives every weight):", "", "```bash",
        f"hf download <namespace>/{folder} --local-dir {folder}   # or this folder as it is",
        f"python {ds}/predict.py --model_dir {folder} --conversation my_conversation.csv --out predictions.csv",
        f"python {ds}/extract_first_stage_features.py --model_dir {folder}   # the first-stage feature pickles",
        f"python {ds}/multimodal_fusion.py --train False --model_dir {folder}   # test on those features",
        "```", "",
        "The conversation CSV has the dataset's prepared-CSV columns (the MAGTKD README, \"Predict your own "
        "conversation\"). Loading reads only the safetensors files and the JSON documents of this folder: no "
        "pickle, no code.", ""])


def limitations(config: Mapping[str, Any]) -> str:
    ds = config["dataset"]
    return "\n".join([
        "## Intended use", "",
        f"Research on emotion recognition in conversation: reproducing and comparing results on {ds}, and "
        f"labelling recorded conversations that resemble {ds}'s for analysis.", "",
        "## Limitations", "",
        f"- Trained on {ds} alone ({CORPORA.get(ds, 'one corpus')}): other languages, settings and recording "
        "conditions are outside what it has seen.",
        "- The labels are annotators' perception of expressed emotion, not what a speaker feels; do not use the "
        "predictions for decisions about people (hiring, health, security, surveillance).",
        f"- Speakers: the fusion model has {config['fusion'].get('n_speaker')} learned speaker rows; a speaker it "
        "has no row for gets the padding row (predict.py warns).",
        "- Licence: the weights derive from the dataset; set this card's `license` to terms compatible with the "
        f"{ds} release's licence before publishing.",
        "- The metrics documents are copied as written; their arguments name the folders the runs used.", ""])


def files(config: Mapping[str, Any]) -> str:
    lines = ["## Files", "", "| file | what |", "|---|---|", "| `config.json` | dataset, labels, sizes, the fusion's "
             "settings, attention, prompt, every model's training arguments, the files and their sizes |"]
    for key, entry in config["models"].items():
        lines.append(f"| `{entry['weights']}`, `{entry['record']}` | {FIRST_STAGE.get(key, 'fusion model')}: "
                     f"weights (safetensors) and metrics document (`{entry['script']}`) |")
    if config.get("seeds"):
        lines.append("| `multimodal_fusion_seeds.json` | the fusion's seeds summary |")
    return "\n".join(lines + [""])


CITATION = """## Citation

```bibtex
@inproceedings{li2025magtkd,
  title     = {Multi-modal Anchor Gated Transformer with Knowledge Distillation for Emotion Recognition in Conversation},
  author    = {Li, Jie and Ding, Shifei and Guo, Lili and Li, Xuan},
  booktitle = {Proceedings of the Thirty-Fourth International Joint Conference on Artificial Intelligence (IJCAI)},
  year      = {2025}
}
```
"""

