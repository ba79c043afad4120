"""Results: metrics, the one metrics-document schema of every training stage, the seeds
summary (mean ± std, the best dev seed kept under the usual names) and the plots
(docs/METHOD.md §0, "Metrics documents").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from .artifacts import StageFiles, args_doc, atomic_path, copy_file, remove_stale_temps, write_json, write_text
from .model import variant_name
from .utils import UserError, is_main

log = logging.getLogger("magtkd")


# --------------------------------------------------------------------------- metrics

# --------------------------------------------------------------------------- metrics

def summary(labels: Sequence[int], preds: Sequence[int]) -> dict[str, float]:
    """Accuracy and weighted F1 as fractions in [0, 1]."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.size == 0:
        return {"accuracy": 0.0, "weighted_f1": 0.0}
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "weighted_f1": float(f1_score(labels, preds, average="weighted", zero_division=0)),
    }


def per_class(labels: Sequence[int], preds: Sequence[int], names: Sequence[str]) -> dict:
    """Per-class precision / recall / F1 / support (sklearn's dict report)."""
    return classification_report(
        labels, preds, labels=list(range(len(names))), target_names=list(names),
        output_dict=True, zero_division=0,
    )


def report_text(labels: Sequence[int], preds: Sequence[int], names: Sequence[str]) -> str:
    return classification_report(
        labels, preds, labels=list(range(len(names))), target_names=list(names),
        digits=4, zero_division=0,
    )


def confusion(labels: Sequence[int], preds: Sequence[int], n_classes: int) -> list[list[int]]:
    return confusion_matrix(labels, preds, labels=list(range(n_classes))).tolist()


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
TEST_EVERY_EPOCH = "every epoch, not used for selection"
TEST_AT_BEST = "at each new best dev epoch"


def metrics_document(*, stage: str, script: str, dataset: str, labels: Sequence[str], width: int | None,
                     args: Mapping[str, Any], sizes: Mapping[str, Any], files: StageFiles, epochs: list[dict],
                     best: Mapping[str, Any], complete: bool, test_every_epoch: bool) -> dict[str, Any]:
    """The metrics JSON beside every checkpoint, one schema for all stages (docs/METHOD.md §0).

    ``epochs`` holds one row per trained epoch (``epoch``, ``train_loss``, ``dev``, ``test`` when it was
    scored, ``train_seconds``, ``eval_seconds``, ``samples_per_second``); ``best`` the selected epoch's
    ``epoch``, ``dev`` and full ``test`` report (`test_report`). ``sizes``: the model's sizes; the fusion's also
    hold ``variant`` (its ablation variant, docs/METHOD.md §5). The document is also the artifact set's
    completion record (``complete``).
    """
    doc: dict[str, Any] = {
        "stage": stage, "script": script, "complete": complete, "dataset": dataset, "labels": list(labels),
        "width": width, "checkpoint": files.checkpoint.name, "args": args_doc(args), "sizes": dict(sizes),
        "selection": SELECTION, "test_scored": TEST_EVERY_EPOCH if test_every_epoch else TEST_AT_BEST,
        "selected_epoch": best.get("epoch", 0),
        "dev_weighted_f1": best["dev"]["weighted_f1"] if best.get("dev") else None,
        "dev": best.get("dev"), "test": best.get("test"),
    }
    if test_every_epoch:
        scored = [row["test"]["weighted_f1"] for row in epochs if "test" in row]
        doc["test_selected_weighted_f1"] = max(scored) if scored else None
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

# --------------------------------------------------------------------------- several seeds: one summary

SEED_SUMMARY_NOTE = ("Per seed, the epoch with the best dev weighted F1 is selected and test is scored at it. "
                     "Mean ± sample standard deviation (n - 1) over seeds.")
TEST_SELECTED_NOTE = ("test-selected weighted F1 = the best test weighted F1 over all epochs: the authors' "
                      "protocol (the epoch chosen on test), shown only to compare with papers like for like.")


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
    keys = ["selected_epoch", "dev_weighted_f1", "test_accuracy", "test_weighted_f1"]
    head = ["seed", "selected epoch (dev)", "dev wF1", "test accuracy", "test wF1"]
    if "test_selected_weighted_f1" in rows[0]:
        keys.append("test_selected_weighted_f1")
        head.append("test-selected wF1 (authors' protocol, comparison only)")
    head += [f"test F1 {name}" for name in label_names]

    def values(doc: Mapping[str, Any]) -> list[float]:
        return [doc[k] for k in keys] + [doc["test_per_class_f1"][name] for name in label_names]

    lines = [f"# {title}: {len(rows)} seeds", "", SEED_SUMMARY_NOTE]
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
        title = f"{title} ({variant_name(doc['variant'])})"
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


# --------------------------------------------------------------------------- TensorBoard (--tensorboard DIR)

class Watch:
    """``--tensorboard DIR``: a SummaryWriter on rank 0 under ``DIR/<checkpoint stem>`` (one folder per
    stage and seed). Per update: ``train/loss``, ``train/learning_rate``, ``train/grad_norm`` (before
    clipping) and, with a scaler, ``train/grad_scale``; per epoch: ``epoch/train_loss``, ``dev/*``,
    ``test/*`` and ``epoch/samples_per_second``. The step is the scheduler's update count, which a
    resumed run continues. Device scalars are buffered and read in one transfer when `magtkd.engine.run_updates` reads the loss (every 10 updates).
    """

    def __init__(self, folder: Path, name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(folder) / name))
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        self.pending.append((step, loss, grad_norm, lr))

    def flush(self, scaler: torch.amp.GradScaler | None) -> None:
        if not self.pending:
            return
        values = torch.stack([torch.stack([loss.double(), norm.double().to(loss.device)])
                              for _, loss, norm, _ in self.pending]).tolist()
        for (step, _, _, lr), (loss, norm) in zip(self.pending, values):
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/grad_norm", norm, step)
            self.writer.add_scalar("train/learning_rate", lr, step)
        if scaler is not None and scaler.is_enabled():
            self.writer.add_scalar("train/grad_scale", scaler.get_scale(), self.pending[-1][0])
        self.pending = []

    def epoch(self, row: Mapping[str, Any], step: int) -> None:
        epoch = int(row["epoch"])
        self.writer.add_scalar("epoch/train_loss", row["train_loss"], epoch)
        self.writer.add_scalar("epoch/samples_per_second", row["samples_per_second"], epoch)
        self.writer.add_scalar("epoch/update", step, epoch)
        for split in ("dev", "test"):
            for key in ("accuracy", "weighted_f1"):
                if split in row:
                    self.writer.add_scalar(f"{split}/{key}", row[split][key], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- plots

def write_plots(files: StageFiles, title: str, doc: Mapping[str, Any], names: Sequence[str]) -> None:
    """``files.curves`` (train loss; dev and test weighted F1 per epoch; the selected epoch marked) and
    ``files.confusion`` (row-normalised test confusion matrix at the selected epoch) of a metrics document.

    Drawn with the Agg canvas (no display, no pyplot state). A plot that cannot be drawn is logged and
    skipped: it never fails a training run.
    """
    rows = doc["epochs"]
    epochs, train_loss = [r["epoch"] for r in rows], [r["train_loss"] for r in rows]
    dev_f1 = [r["dev"]["weighted_f1"] for r in rows]
    test_f1 = [r["test"]["weighted_f1"] if "test" in r else None for r in rows]
    test_label = "test (not used for selection)" if doc["test_scored"] == TEST_EVERY_EPOCH else \
        "test (scored at each new best dev)"
    selected_epoch, matrix = doc["selected_epoch"], doc["test"]["confusion"]
    for path in (files.curves, files.confusion):
        kind = "curves" if path == files.curves else "confusion"
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            # Fixed margins: a layout engine would double the drawing time (a run draws many plots)
            figure = Figure(figsize=(10, 4) if kind == "curves" else (6, 5.4), dpi=100)
            FigureCanvasAgg(figure)
            if kind == "curves":
                _draw_curves(figure, title, epochs, train_loss, dev_f1, test_f1, selected_epoch, test_label)
            else:
                _draw_confusion(figure, title, selected_epoch, matrix, names)
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format="png")
        except Exception as err:  # noqa: BLE001 - a plot is a convenience, never a reason to lose a run
            log.warning("could not draw %s: %s: %s", path, type(err).__name__, err)


def _draw_curves(figure: Any, title: str, epochs: Sequence[int], train_loss: Sequence[float],
                 dev_f1: Sequence[float], test_f1: Sequence[float | None], selected_epoch: int,
                 test_label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    loss_ax, f1_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, train_loss, marker="o", markersize=3, color="tab:gray")
    loss_ax.set(title="train loss", xlabel="epoch", ylabel="mean batch loss")
    f1_ax.plot(epochs, dev_f1, marker="o", markersize=3, label="dev (selects the epoch)", color="tab:blue")
    measured = [(e, f) for e, f in zip(epochs, test_f1) if f is not None]
    if measured:
        f1_ax.plot(*zip(*measured), marker="s", markersize=4, label=test_label, color="tab:orange",
                   linestyle="-" if len(measured) == len(epochs) else "none")
    f1_ax.set(title="weighted F1", xlabel="epoch", ylabel="weighted F1")
    for ax in (loss_ax, f1_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axvline(selected_epoch, color="tab:green", linestyle="--", label=f"selected epoch {selected_epoch}")
        ax.grid(alpha=0.3)
    f1_ax.legend(loc="best", fontsize="small")
    figure.suptitle(title)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.85, wspace=0.22)


def _draw_confusion(figure: Any, title: str, selected_epoch: int, matrix: Sequence[Sequence[int]],
                    label_names: Sequence[str]) -> None:
    counts = np.asarray(matrix, dtype=np.float64)
    support = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    ax = figure.subplots()
    image = ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
    figure.colorbar(image, ax=ax, label="fraction of the gold class")
    ticks = range(len(label_names))
    ax.set_xticks(ticks, labels=list(label_names), rotation=45, ha="right")
    ax.set_yticks(ticks, labels=list(label_names))
    ax.set(xlabel="predicted", ylabel="gold", title=f"{title}\ntest, epoch {selected_epoch} (row-normalised)")
    for i in range(rates.shape[0]):
        for j in range(rates.shape[1]):
            ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize="small",
                    color="white" if rates[i, j] > 0.6 else "black")
    figure.subplots_adjust(left=0.14, right=0.97, bottom=0.16, top=0.88)


# --------------------------------------------------------------------------- ablation tables

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


def ablation_plot(path: Path, doc: Mapping[str, Any]) -> None:
    """``<table>.png``: test weighted F1 per variant, bar = mean, error bar = std, dots = the seeds."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = doc["variants"]
        figure = Figure(figsize=(max(5.0, 1.1 * len(rows) + 1.5), 4.2), dpi=100)
        FigureCanvasAgg(figure)
        ax = figure.subplots()
        x = np.arange(len(rows))
        ax.bar(x, [r["test_weighted_f1_mean"] for r in rows], yerr=[r["test_weighted_f1_std"] for r in rows],
               capsize=4, color="tab:blue", alpha=0.7)
        for i, r in enumerate(rows):
            ax.plot([i] * len(r["seeds"]), [s["test_weighted_f1"] for s in r["seeds"]], "o", color="black",
                    markersize=3)
        ax.set_xticks(x, labels=[r["key"] for r in rows], rotation=30, ha="right")
        ax.set(ylabel="test weighted F1", title=f"{doc['dataset']} ablation: {doc['table']} (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
        figure.subplots_adjust(left=0.1, right=0.98, bottom=0.28, top=0.9)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png")
    except Exception as err:  # noqa: BLE001 - a plot is a convenience, never a reason to lose a table
        log.warning("could not draw %s: %s: %s", path, type(err).__name__, err)


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


def watch_line(device: torch.device, epoch_seconds: Sequence[float], remaining: int) -> str:
    """The end of an epoch's log line: the stage's ETA (remaining epochs x mean epoch time of this run)
    and, on CUDA, the epoch's peak memory."""
    line = f" | ETA {remaining * sum(epoch_seconds) / len(epoch_seconds) / 60:.1f} min" if remaining else ""
    if device.type == "cuda":
        line += f" | peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return line
