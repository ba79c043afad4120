"""Comparing runs in an ablation table: mean ± std over seeds per variant, the paired bootstrap over test
dialogues against each variant's reference, and the table as .json, .md and .png (docs/METHOD.md §5,
Ablation tables); and the reproduction table: the two releases' attentions under both selections against
the paper's figures (docs/METHOD.md §5, "The reproduction table").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .artifacts import write_json, write_text
from .plots import ablation_plot
from .utils import UserError

log = logging.getLogger("magtkd")


BOOTSTRAP_RESAMPLES = 1000


BOOTSTRAP_SEED = 0


BOOTSTRAP_NOTE = (f"p: paired bootstrap over test dialogues ({BOOTSTRAP_RESAMPLES} resamples with replacement, "
                  f"numpy seed {BOOTSTRAP_SEED}) of the difference in weighted F1 to the reference, each side the "
                  "mean over its seeds' predictions; two-sided (docs/METHOD.md §5, Ablation tables).")


def weighted_f1_weighted(labels: np.ndarray, preds: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Weighted F1 (sklearn's ``average="weighted"``, zero_division 0) of the utterances counted ``weights``
    times; ``weights`` (R, N) gives R resamples at once. Returns (R,)."""
    cells = labels * n_classes + preds
    confusion = np.stack([np.bincount(cells, weights=w, minlength=n_classes * n_classes) for w in weights])
    confusion = confusion.reshape(len(weights), n_classes, n_classes)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    support, predicted = confusion.sum(axis=2), confusion.sum(axis=1)
    denominator = support + predicted  # 2 tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    total = support.sum(axis=1)
    return np.divide((support * f1).sum(axis=1), total, out=np.zeros_like(total), where=total > 0)


def paired_bootstrap(labels: Sequence[int], dialogues: Sequence[int], preds_a: Sequence[Sequence[int]],
                     preds_b: Sequence[Sequence[int]], n_classes: int, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict[str, float]:
    """Paired bootstrap over test dialogues of ``mean_seeds wF1(a) - mean_seeds wF1(b)``: each resample draws
    the dialogues with replacement (the same draw for both sides). Returns the observed difference and the
    two-sided p-value ``min(1, 2 min(P(d <= 0), P(d >= 0)))`` with the +1 correction."""
    labels, groups = np.asarray(labels), np.unique(np.asarray(dialogues), return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(groups.max() + 1, np.full(groups.max() + 1, 1.0 / (groups.max() + 1)), size=resamples)
    weights = counts[:, groups].astype(np.float64)
    ones = np.ones((1, len(labels)))

    def score(all_preds: Sequence[Sequence[int]], w: np.ndarray) -> np.ndarray:
        return np.mean([weighted_f1_weighted(labels, np.asarray(p), w, n_classes) for p in all_preds], axis=0)

    observed = float(score(preds_a, ones)[0] - score(preds_b, ones)[0])
    diffs = score(preds_a, weights) - score(preds_b, weights)
    low, high = (np.sum(diffs <= 0) + 1) / (resamples + 1), (np.sum(diffs >= 0) + 1) / (resamples + 1)
    return {"difference": observed, "p_value": float(min(1.0, 2 * min(low, high))), "resamples": resamples}


def ablation_document(table: str, dataset: str, variants: Sequence[Any], runs: Mapping[str, Mapping[str, Any]],
                      caption: str) -> dict[str, Any]:
    """``<table>.json``: per variant its seeds' rows, mean ± std (n - 1) of test accuracy / weighted F1 (and the
    test-selected weighted F1 where the stage scores test every epoch), the difference to its reference and
    the paired bootstrap p-value (`paired_bootstrap`)."""
    rows = []
    for variant in variants:
        run = runs[variant.key]
        seeds = [{k: v for k, v in row.items() if k not in ("labels", "preds")} for row in run["seeds"]]
        row: dict[str, Any] = {"key": variant.key, "name": variant.name, "argv": run["setting"]["argv"],
                               "seeds": seeds, "reference": variant.baseline}
        if "text_argv" in run["setting"]:  # the prompt table: the flags of its text model
            row["text_argv"] = run["setting"]["text_argv"]
        for metric in ("test_weighted_f1", "test_accuracy", "test_selected_weighted_f1"):
            values = [s[metric] for s in seeds if metric in s]
            if values:
                row[f"{metric}_mean"] = float(np.mean(values))
                row[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        if variant.baseline is not None:
            base = runs[variant.baseline]
            if base["labels"] != run["labels"] or base["seeds"][0]["labels"] != run["seeds"][0]["labels"]:
                raise UserError(f"ablation {table}: {variant.key} and {variant.baseline} were tested on different "
                                "utterances; re-run both with the same --feature_dir / --data_dir")
            test = paired_bootstrap(run["seeds"][0]["labels"], run["dialogues"], [s["preds"] for s in run["seeds"]],
                                    [s["preds"] for s in base["seeds"]], len(run["labels"]))
            row.update(difference_weighted_f1=test["difference"], p_value=test["p_value"])
        rows.append(row)
    return {"table": table, "dataset": dataset, "caption": caption, "significance": BOOTSTRAP_NOTE,
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "unit": "test dialogue",
                          "statistic": "difference in weighted F1, mean over each side's seeds"},
            "variants": rows}


def ablation_markdown(doc: Mapping[str, Any]) -> str:
    """The table as a paper prints it: mean ± std over seeds, the best mean in bold, Δ and p to the reference."""
    rows = doc["variants"]
    best = {m: max(r[f"{m}_mean"] for r in rows) for m in ("test_accuracy", "test_weighted_f1")}
    selected = any("test_selected_weighted_f1_mean" in r for r in rows)

    def cell(row: Mapping[str, Any], metric: str) -> str:
        text = f"{row[f'{metric}_mean']:.4f} ± {row[f'{metric}_std']:.4f}"
        return f"**{text}**" if metric in best and row[f"{metric}_mean"] == best[metric] else text

    head = ["variant", "seeds", "test accuracy", "test weighted F1", "Δ wF1 vs reference", "p"]
    head += ["test-selected wF1 (authors' protocol, comparison only)"] if selected else []
    lines = [f"# {doc['dataset']} ablation: {doc['table']}", "", doc["caption"],
             "Mean ± sample standard deviation (n - 1) over seeds, epoch selected on dev; best mean in bold. "
             + doc["significance"], "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        reference = "reference" if row["reference"] is None else \
            f"{row['difference_weighted_f1']:+.4f} (vs {row['reference']})"
        cells = [row["name"], str(len(row["seeds"])), cell(row, "test_accuracy"), cell(row, "test_weighted_f1"),
                 reference, "" if row["reference"] is None else f"{row['p_value']:.3f}"]
        if selected:
            cells.append(cell(row, "test_selected_weighted_f1") if "test_selected_weighted_f1_mean" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_ablation(folder: Path, table: str, dataset: str, variants: Sequence[Any],
                   runs: Mapping[str, Mapping[str, Any]], caption: str) -> dict[str, Any]:
    """``<folder>/<table>.json``, ``.md`` and ``.png`` of an ablation table (`ablation_document`)."""
    folder = Path(folder)
    doc = ablation_document(table, dataset, variants, runs, caption)
    write_json(folder / f"{table}.json", doc)
    write_text(folder / f"{table}.md", ablation_markdown(doc))
    ablation_plot(folder / f"{table}.png", doc)
    log.info("ablation %s: wrote %s (.json, .md, .png)\n%s", table, folder / table, ablation_markdown(doc))
    return doc


# --------------------------------------------------------------------------- the reproduction table


# The paper's test figures in % (IJCAI 2025), as quoted by later work: one run per dataset, the epoch kept on test.
PAPER = {"IEMOCAP": {"weighted_f1": 69.59, "accuracy": 69.38}, "MELD": {"weighted_f1": 65.32, "accuracy": 66.36}}


PAPER_SOURCE = ("Li, Ding, Guo and Li, IJCAI 2025 (as quoted by later work; their code keeps the epoch with the best "
                "test weighted F1, so these are test-selected figures of one run, seed 2024 by their default)")


REPRODUCTION_SEED = 2024  # the authors' default --seed: the single run behind their figures


SELECTION_CELLS = {"test": "authors' protocol: selected on test, not an estimate", "dev": "selected on dev"}


def _cell(run: Mapping[str, Any], selection: str) -> dict[str, Any]:
    """One (attention, selection) cell: each seed's kept epoch and its test scores, mean ± std (n - 1), in %."""
    prefix = "test_selected_" if selection == "test" else "test_"
    seeds = [{"seed": row["seed"], "epoch": row["test_selected_epoch" if selection == "test" else "selected_epoch"],
              "accuracy": 100 * row[f"{prefix}accuracy"], "weighted_f1": 100 * row[f"{prefix}weighted_f1"]}
             for row in run["seeds"]]
    cell: dict[str, Any] = {"selection": selection, "protocol": SELECTION_CELLS[selection], "seeds": seeds,
                            "seed_2024": next((s for s in seeds if s["seed"] == REPRODUCTION_SEED), None)}
    for metric in ("accuracy", "weighted_f1"):
        values = [s[metric] for s in seeds]
        cell[f"{metric}_mean"] = float(np.mean(values))
        cell[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return cell


def reproduction_document(dataset: str, variants: Sequence[Any], runs: Mapping[str, Mapping[str, Any]],
                          caption: str) -> dict[str, Any]:
    """``reproduction.json``: per release's attention (``variants``: the May-2025 one first, then the Nov-2025
    one it is tested against) the test-selected and the dev-selected cell, the paper's figures with their
    source, and the paired bootstrap of the two attentions on their dev-selected test predictions."""
    rows = [{"key": v.key, "name": v.name, "argv": runs[v.key]["setting"]["argv"],
             "cells": [_cell(runs[v.key], selection) for selection in ("test", "dev")]} for v in variants]
    paper, fixed = (runs[v.key] for v in variants)
    test = paired_bootstrap(paper["seeds"][0]["labels"], paper["dialogues"], [s["preds"] for s in paper["seeds"]],
                            [s["preds"] for s in fixed["seeds"]], len(paper["labels"]))
    return {"table": "reproduction", "dataset": dataset, "caption": caption, "paper": {**PAPER.get(dataset, {}),
            "source": PAPER_SOURCE}, "units": "% (test)", "attentions": rows,
            "paired_test": {"a": variants[0].key, "b": variants[1].key, "selection": "dev",
                            "difference_weighted_f1": 100 * test["difference"], "p_value": test["p_value"],
                            "resamples": test["resamples"], "unit": "test dialogue", "seed": BOOTSTRAP_SEED}}


def reproduction_markdown(doc: Mapping[str, Any]) -> str:
    """The reproduction table: one row per attention and selection, mean ± std over seeds and the seed-2024
    run, the paper's figures in the caption, the paired test of the two attentions below."""
    paper = doc["paper"]
    quoted = (f"The paper reports test weighted F1 {paper['weighted_f1']:.2f} / accuracy {paper['accuracy']:.2f} "
              f"({paper['source']})." if "weighted_f1" in paper else f"Paper: {paper['source']}.")
    head = ["attention (release)", "selection", "seeds", "test accuracy (%)", "test weighted F1 (%)",
            f"seed {REPRODUCTION_SEED}: accuracy / weighted F1 (epoch)"]
    lines = [f"# {doc['dataset']}: reproducing the paper", "", doc["caption"], quoted, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in doc["attentions"]:
        for cell in row["cells"]:
            single = cell["seed_2024"]
            alone = f"{single['accuracy']:.2f} / {single['weighted_f1']:.2f} ({single['epoch']})" if single else "-"
            lines.append("| " + " | ".join([
                row["name"], cell["protocol"], str(len(cell["seeds"])),
                f"{cell['accuracy_mean']:.2f} ± {cell['accuracy_std']:.2f}",
                f"{cell['weighted_f1_mean']:.2f} ± {cell['weighted_f1_std']:.2f}", alone]) + " |")
    test = doc["paired_test"]
    lines += ["", f"Paired bootstrap of the two attentions ({test['a']} - {test['b']}, dev-selected test predictions, "
                  f"each side the mean over its seeds; {test['resamples']} resamples of the test dialogues, numpy seed "
                  f"{test['seed']}; two-sided): difference in weighted F1 {test['difference_weighted_f1']:+.2f} "
                  f"points, p = {test['p_value']:.3f}."]
    return "\n".join(lines) + "\n"


def write_reproduction(folder: Path, dataset: str, variants: Sequence[Any], runs: Mapping[str, Mapping[str, Any]],
                       caption: str) -> dict[str, Any]:
    """``<folder>/reproduction.json``, ``.md`` and ``.png`` (`reproduction_document`)."""
    folder = Path(folder)
    doc = reproduction_document(dataset, variants, runs, caption)
    write_json(folder / "reproduction.json", doc)
    write_text(folder / "reproduction.md", reproduction_markdown(doc))
    bars = {"dataset": dataset, "table": "reproduction", "variants": [
        {"key": f"{row['key']} / {cell['selection']}", "test_weighted_f1_mean": cell["weighted_f1_mean"] / 100,
         "test_weighted_f1_std": cell["weighted_f1_std"] / 100,
         "seeds": [{"test_weighted_f1": s["weighted_f1"] / 100} for s in cell["seeds"]]}
        for row in doc["attentions"] for cell in row["cells"]]}
    line = doc["paper"].get("weighted_f1")
    ablation_plot(folder / "reproduction.png", bars, None if line is None else (line / 100, "paper"))
    log.info("reproduction table: wrote %s (.json, .md, .png)\n%s", folder / "reproduction", reproduction_markdown(doc))
    return doc
