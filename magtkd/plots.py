"""Plots as PNG files: a stage's curves and confusion matrix, and an ablation table's bars (docs/METHOD.md
§0, §5). matplotlib is imported only when a plot is drawn, with the Agg canvas (no display, no pyplot
state); a plot that cannot be drawn is logged and skipped, never a reason to fail a run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .artifacts import StageFiles, atomic_path
from .results import TEST_EVERY_EPOCH

log = logging.getLogger("magtkd")


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


def ablation_plot(path: Path, doc: Mapping[str, Any], line: tuple[float, str] | None = None) -> None:
    """``<table>.png``: test weighted F1 per variant, bar = mean, error bar = std, dots = the seeds; ``line``:
    a reference value and its label, drawn across (the paper's figure in the reproduction table)."""
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
        if line is not None:
            ax.axhline(line[0], color="tab:red", linestyle="--", label=f"{line[1]} {line[0]:.4f}")
            ax.legend(loc="lower right", fontsize="small")
        ax.set_xticks(x, labels=[r["key"] for r in rows], rotation=30, ha="right")
        ax.set(ylabel="test weighted F1", title=f"{doc['dataset']} ablation: {doc['table']} (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
        figure.subplots_adjust(left=0.1, right=0.98, bottom=0.28, top=0.9)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png")
    except Exception as err:  # noqa: BLE001 - a plot is a convenience, never a reason to lose a table
        log.warning("could not draw %s: %s: %s", path, type(err).__name__, err)
