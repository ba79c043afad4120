"""Results: the metrics of a split, the one metrics-document schema beside every checkpoint, and the
summary over seeds with the best dev seed kept under the usual names (docs/METHOD.md §0, §7).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from .artifacts import StageFiles, args_doc, copy_file, remove_stale_temps, write_json, write_text
from .model import FusionVariant
from .runtime import is_main
from .utils import UserError

log = logging.getLogger("magtkd")





def _sklearn_metrics():
    """``sklearn.metrics``, imported at the first score: with scipy and pandas it takes about 2 s, which
    ``--help``, a flag error or a refused input would otherwise wait for."""
    import sklearn.metrics

    return sklearn.metrics


def summary(labels: Sequence[int], preds: Sequence[int]) -> dict[str, float]:
    """Accuracy and weighted F1 as fractions in [0, 1]."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.size == 0:
        return {"accuracy": 0.0, "weighted_f1": 0.0}
    metrics = _sklearn_metrics()
    return {
        "accuracy": float(metrics.accuracy_score(labels, preds)),
        "weighted_f1": float(metrics.f1_score(labels, preds, average="weighted", zero_division=0)),
    }


def per_class(labels: Sequence[int], preds: Sequence[int], names: Sequence[str]) -> dict:
    """Per-class precision / recall / F1 / support (sklearn's dict report)."""
    return _sklearn_metrics().classification_report(
        labels, preds, labels=list(range(len(names))), target_names=list(names),
        output_dict=True, zero_division=0,
    )


def report_text(labels: Sequence[int], preds: Sequence[int], names: Sequence[str]) -> str:
    return _sklearn_metrics().classification_report(
        labels, preds, labels=list(range(len(names))), target_names=list(names),
        digits=4, zero_division=0,
    )


def confusion(labels: Sequence[int], preds: Sequence[int], n_classes: int) -> list[list[int]]:
    return _sklearn_metrics().confusion_matrix(labels, preds, labels=list(range(n_classes))).tolist()


def majority_weighted_f1(train_labels: Sequence[int], test_labels: Sequence[int]) -> float:
    """Weighted F1 of always predicting the most frequent training class."""
    majority = int(np.bincount(np.asarray(train_labels)).argmax())
    return summary(test_labels, [majority] * len(test_labels))["weighted_f1"]


def test_report(labels: np.ndarray, preds: np.ndarray, names: Sequence[str]) -> dict:
    out = summary(labels, preds)
    out["per_class"] = per_class(labels, preds, names)
    out["confusion"] = confusion(labels, preds, len(names))  # rows = gold, columns = predicted
    return out



# --------------------------------------------------------------------------- the metrics document


SELECTION = "best dev weighted F1"


AUTHORS_PROTOCOL = "authors' protocol: selected on test, not an estimate"


# The metrics document's ``selection`` per --selection (docs/METHOD.md §0, §5).
SELECTIONS = {"dev": SELECTION,
              "test": f"best test weighted F1 in % rounded to 2 decimals, the first of ties ({AUTHORS_PROTOCOL})"}


SELECTED_ON = {"dev": "dev", "test": f"test ({AUTHORS_PROTOCOL})"}  # the log's "new best ..."


TEST_EVERY_EPOCH = "every epoch, not used for selection"


TEST_SELECTS = "every epoch, selects the epoch"


TEST_AT_BEST = "at each new best dev epoch"


def authors_score(weighted_f1: float) -> float:
    """The authors' selection score: weighted F1 in % rounded to 2 decimals (their ``round(f1 * 100, 2)``)."""
    return round(weighted_f1 * 100, 2)


def authors_kept_row(epochs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The epoch row the authors' rule keeps (docs/METHOD.md §7): the first whose `authors_score` of the test
    weighted F1 is strictly greater than every earlier epoch's; None when test was never scored."""
    best = None
    for row in epochs:
        if "test" in row and (best is None or authors_score(row["test"]["weighted_f1"])
                              > authors_score(best["test"]["weighted_f1"])):
            best = row
    return best


def metrics_document(*, stage: str, script: str, dataset: str, labels: Sequence[str], width: int | None,
                     args: Mapping[str, Any], sizes: Mapping[str, Any], files: StageFiles, epochs: list[dict],
                     best: Mapping[str, Any], complete: bool, test_every_epoch: bool,
                     selection: str = "dev") -> dict[str, Any]:
    """The metrics JSON beside every checkpoint, one schema for all stages (docs/METHOD.md §0).

    ``epochs`` holds one row per trained epoch (``epoch``, ``train_loss``, ``dev``, ``test`` when it was
    scored, ``train_seconds``, ``eval_seconds``, ``samples_per_second``); ``best`` the selected epoch's
    ``epoch``, ``dev`` and full ``test`` report (`test_report`). ``sizes``: the model's sizes; the fusion's also
    hold ``variant`` (its ablation variant, docs/METHOD.md §5). The document is also the artifact set's
    completion record (``complete``). ``selection``: "dev", or "test" (the authors' protocol, labelled so).
    Where test is scored every epoch, ``test_selected_epoch`` / ``test_selected_weighted_f1`` are the epoch
    the authors' rule keeps and its test weighted F1 (`authors_kept_row`), whatever the selection.
    """
    scored = TEST_SELECTS if selection == "test" else TEST_EVERY_EPOCH if test_every_epoch else TEST_AT_BEST
    doc: dict[str, Any] = {
        "stage": stage, "script": script, "complete": complete, "dataset": dataset, "labels": list(labels),
        "width": width, "checkpoint": files.checkpoint.name, "args": args_doc(args), "sizes": dict(sizes),
        "selection": SELECTIONS[selection], "test_scored": scored,
        "selected_epoch": best.get("epoch", 0),
        "dev_weighted_f1": best["dev"]["weighted_f1"] if best.get("dev") else None,
        "dev": best.get("dev"), "test": best.get("test"),
    }
    if test_every_epoch or selection == "test":
        kept = authors_kept_row(epochs)
        doc["test_selected_epoch"] = kept["epoch"] if kept else None
        doc["test_selected_weighted_f1"] = kept["test"]["weighted_f1"] if kept else None
    doc["epochs"] = epochs
    return doc


def format_test_report(test: Mapping[str, Any], names: Sequence[str]) -> str:
    """A `test_report` as the lines the stages log: accuracy, weighted F1, then per class."""
    lines = [f"accuracy {test['accuracy']:.4f}  weighted F1 {test['weighted_f1']:.4f}"]
    per = test["per_class"]
    lines.append(f"{'class':>10} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name in names:
        c = per[name]
        lines.append(f"{name:>10} {c['precision']:9.4f} {c['recall']:9.4f} {c['f1-score']:9.4f} {int(c['support']):8d}")
    return "\n".join(lines)



# --------------------------------------------------------------------------- several seeds: one summary


SEED_SUMMARY_NOTE = ("Per seed, the epoch with the best dev weighted F1 is selected and test is scored at it. "
                     "Mean ± sample standard deviation (n - 1) over seeds.")


TEST_SELECTED_NOTE = ("test-selected weighted F1 = the test weighted F1 of the epoch the authors' rule keeps (the "
                      "first with the best test weighted F1 in % rounded to 2 decimals): the authors' protocol (the "
                      "epoch chosen on test), shown only to compare with papers like for like.")


TEST_SELECTION_NOTE = (f"Per seed, the epoch is selected on TEST, as the authors' code does ({AUTHORS_PROTOCOL}): "
                       "the first with the best test weighted F1 in % rounded to 2 decimals; its test figures "
                       "overstate what the model does on unseen data. Mean ± sample standard deviation (n - 1) "
                       "over seeds.")


def seeds_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"seeds": rows, "mean": ..., "std": ...}``: mean and sample standard deviation (n - 1; 0 for one
    seed) over the rows of every numeric key but ``seed`` itself; nested dicts (per-class F1) key by key."""

    def stats(values: list[Any]) -> tuple[Any, Any]:
        if isinstance(values[0], Mapping):
            pairs = {k: stats([v[k] for v in values]) for k in values[0]}
            return {k: m for k, (m, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}
        array = np.asarray(values, dtype=np.float64)
        return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0

    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for key, value in rows[0].items():
        if key == "seed" or isinstance(value, bool) or not isinstance(value, (int, float, Mapping)):
            continue
        mean[key], std[key] = stats([row[key] for row in rows])
    return {"seeds": [dict(row) for row in rows], "mean": mean, "std": std}


def seeds_markdown(title: str, summary_doc: Mapping[str, Any], label_names: Sequence[str],
                   selected_seed: int | None = None, kept_as: str | None = None) -> str:
    """The seeds summary as a markdown table: one row per seed, then mean ± std."""
    rows, mean, std = summary_doc["seeds"], summary_doc["mean"], summary_doc["std"]
    on_test = summary_doc.get("selection") == SELECTIONS["test"]
    keys = ["selected_epoch", "dev_weighted_f1", "test_accuracy", "test_weighted_f1"]
    head = ["seed", f"selected epoch ({'test' if on_test else 'dev'})", "dev wF1", "test accuracy", "test wF1"]
    if "test_selected_weighted_f1" in rows[0]:
        keys.append("test_selected_weighted_f1")
        head.append("test-selected wF1 (authors' protocol, comparison only)")
    head += [f"test F1 {name}" for name in label_names]

    def values(doc: Mapping[str, Any]) -> list[float]:
        return [doc[k] for k in keys] + [doc["test_per_class_f1"][name] for name in label_names]

    lines = [f"# {title}: {len(rows)} seeds", "", TEST_SELECTION_NOTE if on_test else SEED_SUMMARY_NOTE]
    if "test_selected_weighted_f1" in keys:
        lines.append(TEST_SELECTED_NOTE)
    if selected_seed is not None and kept_as:
        lines.append(f"The seed with the best dev weighted F1 ({selected_seed}) is also saved as `{kept_as}`.")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        epoch, *scores = values(row)
        lines.append(f"| {row['seed']} | {epoch} | " + " | ".join(f"{v:.4f}" for v in scores) + " |")
    (epoch_mean, *means), (epoch_std, *stds) = values(mean), values(std)
    lines.append(f"| **mean ± std** | {epoch_mean:.1f} ± {epoch_std:.1f} | "
                 + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(means, stds)) + " |")
    return "\n".join(lines) + "\n"


def seed_row(seed: int, doc: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """One seed's row of the seeds summary, from its metrics document."""
    if not doc.get("selected_epoch"):
        raise UserError(f"{doc['stage']} seed {seed}: no epoch was selected (--epochs {doc['args'].get('epochs')})")
    test = doc["test"]
    row = {"seed": seed, "selected_epoch": doc["selected_epoch"], "dev_weighted_f1": doc["dev_weighted_f1"],
           "test_accuracy": test["accuracy"], "test_weighted_f1": test["weighted_f1"],
           "test_per_class_f1": {n: test["per_class"][n]["f1-score"] for n in names}}
    if doc.get("test_selected_weighted_f1") is not None:
        row["test_selected_weighted_f1"] = doc["test_selected_weighted_f1"]
    return row


def finish_seeds(results: Mapping[int, dict], files: Mapping[int, StageFiles], usual: StageFiles,
                 names: Sequence[str]) -> dict[str, Any]:
    """After one `magtkd.engine.fit` per seed: the seeds summary (``<name>_seeds.json`` / ``.md``) and the
    best dev seed's files copied under the usual names (``usual``). A single seed's result is returned as it is.

    The best seed is the first with the highest dev weighted F1; its files are copied checkpoint last
    (`StageFiles.published`), so a pipeline that compares times sees the set once the rest is in place.
    A file of the seed that is missing (a plot that could not be drawn) is logged and skipped.
    Under torchrun every rank returns the same result and rank 0 alone touches the files (no collective here).
    """
    seeds = list(results)
    if len(seeds) == 1:
        return results[seeds[0]]
    rows = [seed_row(seed, results[seed], names) for seed in seeds]
    doc = seeds_summary(rows)
    best = max(rows, key=lambda r: r["dev_weighted_f1"])  # max keeps the first of equal scores
    title = results[best["seed"]]["stage"]
    if "variant" in results[best["seed"]]["sizes"]:  # the fusion's ablation variant (docs/METHOD.md §5)
        doc["variant"] = results[best["seed"]]["sizes"]["variant"]
        title = f"{title} ({FusionVariant.from_dict(doc['variant']).name})"
    if results[best["seed"]].get("selection") == SELECTIONS["test"]:  # labelled only then: the usual rows are dev's
        doc["selection"] = SELECTIONS["test"]
        title = f"{title}, {AUTHORS_PROTOCOL}"
    if results[best["seed"]].get("args", {}).get("paper_attention"):
        doc["paper_attention"] = True  # the May-2025 release's attention (docs/METHOD.md §5)
        title = f"{title}, May-2025 attention"
    doc["best_seed"] = best["seed"]  # the model kept under the usual names
    if is_main():
        _publish_best_seed(files[best["seed"]], usual, doc, names, best["seed"], title)
    return {**results[best["seed"]], "seeds": doc}


def _publish_best_seed(best: StageFiles, usual: StageFiles, doc: Mapping[str, Any], names: Sequence[str],
                       seed: int, title: str) -> None:
    """Rank 0's part of `finish_seeds`: the best seed's files under the usual names, then the summary."""
    remove_stale_temps(usual.checkpoint.parent, [usual.seeds_summary.name, usual.seeds_table.name,
                                                 *(p.name for p in usual.published())])
    for src, dst in zip(best.published(), usual.published()):
        if src.is_file():
            copy_file(src, dst)
        else:
            log.warning("%s: %s was not written, so %s is not updated", title, src, dst)
    write_json(usual.seeds_summary, doc)
    write_text(usual.seeds_table, seeds_markdown(title, doc, names, seed, usual.checkpoint.name))
    mean, std = doc["mean"], doc["std"]
    log.info("%s: %d seeds, best dev seed %d; test accuracy %.4f ± %.4f, weighted F1 %.4f ± %.4f%s", title,
             len(doc["seeds"]), seed, mean["test_accuracy"], std["test_accuracy"], mean["test_weighted_f1"],
             std["test_weighted_f1"],
             (f" (test-selected, authors' protocol: {mean['test_selected_weighted_f1']:.4f} ± "
              f"{std['test_selected_weighted_f1']:.4f})" if "test_selected_weighted_f1" in mean else ""))
