"""Comparing runs in an ablation table: mean ± std over seeds per variant, the paired bootstrap over test
dialogues against each variant's reference, and the table as .json, .md and .png (docs/METHOD.md §5,
Ablation tables).
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
