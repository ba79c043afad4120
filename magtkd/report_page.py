"""The report's page (`magtkd.report`): one static HTML file that opens offline. Figures are drawn with
matplotlib's Agg canvas and inlined as base64 PNG; tables, conversations and the gate bars are plain HTML
and CSS. The page has no script and loads nothing (docs/METHOD.md §0, "Report").
"""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 78em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.right { background: #e3f4e3; } td.wrong { background: #fbe3e3; }
p.note { color: #555; font-size: .9em; } figure { margin: .8em 0; } figcaption { color: #555; font-size: .9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.bars { display: inline-block; white-space: nowrap; }
.bar { display: inline-block; height: .8em; margin-right: 1px; vertical-align: middle; }
.bar.T { background: #1f77b4; } .bar.A { background: #ff7f0e; } .bar.V { background: #2ca02c; }
.legend span { display: inline-block; width: .8em; height: .8em; margin: 0 .2em 0 .8em; vertical-align: middle; }
"""


def text(value: Any) -> str:
    """``value`` as escaped HTML text (quotes kept: only attributes need them escaped, `attribute`)."""
    return escape(str(value), quote=False)


def attribute(value: Any) -> str:
    """``value`` escaped for a double-quoted attribute."""
    return escape(str(value), quote=True)


def number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def mean_std(mean: float, std: float | None, n: int) -> str:
    """``0.6013 ± 0.0464`` over several seeds; the value alone for one."""
    return f"{mean:.4f} ± {std:.4f}" if n > 1 and std is not None else f"{mean:.4f}"


def table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table; a cell is a value (escaped text), or ``(html, css class)`` for a prepared cell."""
    out = ["<table>", "<tr>" + "".join(f"<th>{text(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = [(f'<td class="{cell[1]}">{cell[0]}</td>' if cell[1] else f"<td>{cell[0]}</td>")
                 if isinstance(cell, tuple) else f"<td>{text(cell)}</td>" for cell in row]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def num(value: str) -> tuple[str, str]:
    """A right-aligned figure cell of `table`."""
    return text(value), "num"


def mark(value: str, right: bool | None) -> tuple[str, str]:
    """A label cell of `table`, green when it is the gold label, red when not (None: no colour)."""
    return text(value), "" if right is None else ("right" if right else "wrong")


def paragraph(html: str, note: bool = False) -> str:
    return f'<p class="note">{html}</p>' if note else f"<p>{html}</p>"


def bars(shares: Mapping[str, float], tooltip: str, width: float = 6.0) -> str:
    """Small inline bars, one per modality (``T``, ``A``, ``V``), their widths the shares (in em)."""
    parts = [f'<span class="bar {m}" style="width:{max(value, 0.0) * width:.2f}em"></span>'
             for m, value in shares.items() if not np.isnan(value)]
    return f'<span class="bars" title="{attribute(tooltip)}">' + "".join(parts) + "</span>"


def legend(items: Mapping[str, str]) -> str:
    return '<p class="legend">' + "".join(f'<span class="bar {k}"></span>{text(v)}' for k, v in items.items()) + "</p>"


def new_figure(width: float, height: float) -> Any:
    """A matplotlib figure on the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def image(figure: Any, alt: str, caption: str = "") -> str:
    """``figure`` as an inline PNG (a data URI) in a ``<figure>`` with its caption."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{attribute(alt)}">'
            + (f"<figcaption>{text(caption)}</figcaption>" if caption else "") + "</figure>")


def confusion_figure(matrices: Mapping[str, Sequence[Sequence[int]]], names: Sequence[str]) -> Any:
    """Row-normalised test confusion matrices side by side (rows = gold), one panel per model."""
    columns = min(3, len(matrices))
    rows = -(-len(matrices) // columns)
    figure = new_figure(4.2 * columns, 3.9 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    ticks = range(len(names))
    for ax, (title, matrix) in zip(axes, matrices.items()):
        counts = np.asarray(matrix, dtype=np.float64)
        support = counts.sum(axis=1, keepdims=True)
        rates = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
        ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
        ax.set_xticks(ticks, labels=list(names), rotation=45, ha="right", fontsize="small")
        ax.set_yticks(ticks, labels=list(names), fontsize="small")
        ax.set(title=title, xlabel="predicted", ylabel="gold")
        for i in range(rates.shape[0]):
            for j in range(rates.shape[1]):
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize="x-small",
                        color="white" if rates[i, j] > 0.6 else "black")
    for ax in axes[len(matrices):]:
        ax.set_axis_off()
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.93, wspace=0.45, hspace=0.55)
    return figure


def per_class_figure(f1: Mapping[str, Sequence[float]], names: Sequence[str]) -> Any:
    """Grouped bars: test F1 per class, one bar per model."""
    figure = new_figure(max(7.0, 1.3 * len(names)), 4.0)
    ax = figure.subplots()
    x, width = np.arange(len(names)), 0.8 / max(len(f1), 1)
    for k, (title, values) in enumerate(f1.items()):
        ax.bar(x + (k - (len(f1) - 1) / 2) * width, values, width, label=title)
    ax.set_xticks(x, labels=list(names))
    ax.set(ylabel="test F1", ylim=(0, 1))
    ax.legend(fontsize="small", ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # off the bars
    ax.grid(axis="y", alpha=0.3)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.82)
    return figure


def shares_figure(shares: Mapping[str, np.ndarray], anchors: Mapping[str, Sequence[str]]) -> Any:
    """Box plots of each path's share of its anchor over the test utterances, one panel per anchor."""
    figure = new_figure(4.0 * len(anchors), 3.4)
    axes = np.atleast_1d(figure.subplots(1, len(anchors)))
    for ax, (anchor, paths) in zip(axes, anchors.items()):
        ax.boxplot([shares[p][~np.isnan(shares[p])] for p in paths], tick_labels=[p.split(" ")[0] for p in paths])
        ax.set(title=f"anchor {anchor}", ylabel="share of the anchor", ylim=(0, 1))
        ax.grid(axis="y", alpha=0.3)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.88, wspace=0.3)
    return figure


def scatter_figure(points: np.ndarray, labels: Sequence[int], right: Sequence[bool], names: Sequence[str]) -> Any:
    """A 2-D embedding coloured by gold label; wrongly predicted utterances drawn as crosses."""
    figure = new_figure(7.0, 5.6)
    ax = figure.subplots()
    labels, right = np.asarray(labels), np.asarray(right, dtype=bool)
    for k, name in enumerate(names):
        for ok, marker in ((True, "o"), (False, "x")):
            chosen = (labels == k) & (right == ok)
            if chosen.any():
                ax.scatter(points[chosen, 0], points[chosen, 1], s=14, marker=marker, color=f"C{k}",
                           label=name if ok or not ((labels == k) & right).any() else None)
    ax.legend(fontsize="small", markerscale=1.5, title="gold (o right, x wrong)")
    ax.set(xticks=[], yticks=[])
    figure.subplots_adjust(left=0.03, right=0.97, bottom=0.03, top=0.97)
    return figure


def page(title: str, intro: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document: the title, ``intro``, a table of contents, then the ``(anchor, title, html)``
    sections."""
    toc = "".join(f'<li><a href="#{anchor}">{text(name)}</a></li>' for anchor, name, _ in sections)
    body = "\n".join(f'<section id="{anchor}">\n<h2>{text(name)}</h2>\n{html}\n</section>'
                     for anchor, name, html in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{text(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{text(title)}</h1>\n"
            f"{intro}\n<ul>{toc}</ul>\n{body}\n</body>\n</html>\n")
