"""A case-study page of a trained result: ``<DS>/report.py``, or ``python -m magtkd.report <DS> --data_dir D
--save_dir S --feature_dir F --out report.html`` (docs/METHOD.md §0, "Report").

One static HTML file that opens offline (`magtkd.report_page`): the headline figures over seeds with the
selection protocol, per-class F1 and confusion matrices of the fusion beside each first-stage model, the
utterances the fusion fixes and breaks relative to the text model, what the gates and anchors do, the
worst test dialogues as conversations, and a t-SNE of the fused representations. It reads what the stages
wrote into ``--save_dir`` (metrics documents, seeds summaries, the test predictions CSVs of
`magtkd.predictions`) and runs the kept fusion model once over ``--feature_dir``'s test pickle for the
t-SNE; only the fusion's results are required, a missing piece leaves its section saying what to run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import report_page as html
from .artifacts import FUSION, StageFiles, feature_path, read_record, write_text
from .checkpoints import load_trained_fusion, trained_fusion
from .fusion_data import dialogue_outputs, load_dialogues
from .fusion_settings import FusionRequest
from .model import AUDIO_ANCHOR, TEXT_ANCHOR, VIDEO_ANCHOR
from .predictions import read_predictions
from .results import SEED_SUMMARY_NOTE, TEST_SELECTED_NOTE, test_report
from .spec import DatasetSpec
from .utils import UserError

log = logging.getLogger("magtkd")


# The models a page shows, by checkpoint name (`StageFiles`), the fusion first.
MODELS = ((FUSION, "fusion"), ("text", "text"), ("audio", "audio"), ("text_KD_audio", "audio, distilled"),
          ("video", "video"), ("text_KD_video", "video, distilled"))


ANCHORS = {"A'": AUDIO_ANCHOR, "V'": VIDEO_ANCHOR, "T'": TEXT_ANCHOR}  # docs/METHOD.md §5, "Forward"


KEYS = ["dialogue_id", "utterance_id"]


def path_label(path: str) -> str:
    """``a_t`` -> ``A' → T'``: the source stream (the text anchor reads the fused A', V') and the anchor."""
    source, anchor = path[0].upper(), path[2].upper()
    return f"{source}{chr(39) if anchor == 'T' and source != 'T' else ''} → {anchor}'"


@dataclass(frozen=True)
class Report:
    """One page: the folders it reads, the file it writes, and how much it shows."""

    data_dir: Path
    save_dir: Path
    feature_dir: Path
    out: Path | None  # default <save_dir>/report.html
    dialogues: int  # worst dialogues shown as conversations
    examples: int  # fixed / broken utterances listed
    batch_size: int  # dialogues per batch of the fusion model
    flags: Mapping[str, Any]

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "Report":
        """report.py's parsed flags (``vars(args)``)."""
        return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name != "flags"}, flags=dict(flags))

    @property
    def page(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.save_dir) / "report.html"


@dataclass
class Result:
    """One model's results as its stage wrote them into the save folder."""

    name: str
    title: str
    files: StageFiles
    doc: dict | None  # the metrics document (complete), None for an evaluation-only set
    seeds: dict | None  # the seeds summary, when several seeds ran
    test: Any  # the test predictions CSV (pandas DataFrame), None when absent

    def scores(self, names: Sequence[str]) -> dict[str, Any]:
        """Test accuracy, weighted F1, per-class report and confusion of the kept model: recomputed from its
        predictions CSV, else its metrics document's."""
        if self.test is not None:
            index = {name: i for i, name in enumerate(names)}
            return test_report(self.test["gold"].map(index).to_numpy(), self.test["predicted"].map(index).to_numpy(),
                               names)
        return self.doc["test"]


def gather(spec: DatasetSpec, save_dir: Path) -> list[Result]:
    """The models of `MODELS` that have a complete metrics document or a test predictions CSV in ``save_dir``;
    results of another dataset (their document's ``dataset``, or labels outside ``spec``'s) are refused."""
    found = []
    for name, title in MODELS:
        files = StageFiles.fusion(save_dir) if name == FUSION else StageFiles.first_stage(save_dir, name)
        doc, csv = read_record(files.metrics), files.predictions_csv("test")
        doc = doc if doc is not None and doc.get("complete") is True and doc.get("test") else None
        if doc is None and not csv.is_file():
            continue
        test = read_predictions(csv) if csv.is_file() else None
        labels = set(test["gold"]) | set(test["predicted"]) if test is not None else set()
        if (doc is not None and doc.get("dataset", spec.name) != spec.name) or not labels <= set(spec.labels):
            raise UserError(f"{files.metrics if doc is not None else csv} holds {doc['dataset'] if doc else 'other'} "
                            f"results (labels {sorted(labels) or doc['labels']}), not {spec.name}'s: run "
                            f"{doc['dataset'] if doc else 'the other dataset'}'s report, or point --save_dir at "
                            f"{spec.name}'s results")
        found.append(Result(name, title, files, doc, read_record(files.seeds_summary), test))
    if not found or found[0].name != FUSION:
        raise UserError(f"{save_dir} holds no fusion results ({StageFiles.fusion(save_dir).metrics.name} or "
                        f"{StageFiles.fusion(save_dir).predictions_csv('test').name}): run multimodal_fusion.py, "
                        "or multimodal_fusion.py --train False on a checkpoint, with this --save_dir")
    return found


def write_report(spec: DatasetSpec, run: Report, request: FusionRequest, device: torch.device) -> dict[str, Any]:
    """Write the page ``run.page`` (atomically) and return what it shows."""
    started = time.perf_counter()
    results, names = gather(spec, Path(run.save_dir)), list(spec.labels)
    fusion = results[0]
    texts = utterance_texts(spec, run.data_dir, results)
    sections = [headline(spec, results), per_class(results, names), fixes(results, run.examples, texts),
                contributions(fusion, names)]
    shown, conversations = worst_dialogues(spec, results, run.dialogues, texts)
    sections += [conversations, embedding(spec, run, request, device, fusion, names)]
    intro = html.paragraph(
        f"{html.text(spec.name)}, results in <code>{html.text(run.save_dir)}</code>, features in "
        f"<code>{html.text(run.feature_dir)}</code>; written {time.strftime('%Y-%m-%d %H:%M')} by "
        f"<code>python -m magtkd.report {html.text(spec.name)}</code>. Test split throughout.", note=True)
    page = html.page(f"MAGTKD on {spec.name}: a look inside the result", intro, sections)
    write_text(run.page, page)
    log.info("%s report: wrote %s (%.0f kB, %d models, %d conversations) in %.1f s", spec.name, run.page,
             len(page.encode()) / 1e3, len(results), len(shown), time.perf_counter() - started)
    return {"out": str(run.page), "sections": [title for _, title, _ in sections],
            "models": [r.name for r in results], "dialogues": shown}


# --------------------------------------------------------------------------- headline, classes


def figures(result: Result, names: Sequence[str]) -> dict[str, str]:
    """A model's test figures for the headline: mean ± std over its seeds, or its one run."""
    seeds = result.seeds["seeds"] if result.seeds else None
    if seeds:
        mean, std = result.seeds["mean"], result.seeds["std"]
        return {"seeds": f"{len(seeds)} ({' '.join(str(s['seed']) for s in seeds)}; kept {result.seeds['best_seed']})",
                **{key: html.mean_std(mean[k], std[k], len(seeds)) if k in mean else "–" for key, k in (
                    ("accuracy", "test_accuracy"), ("weighted_f1", "test_weighted_f1"),
                    ("test_selected", "test_selected_weighted_f1"))},
                "epochs": " ".join(str(s["selected_epoch"]) for s in seeds)}
    scores, doc = result.scores(names), result.doc or {}
    return {"seeds": f"1 ({doc['args'].get('seed')})" if doc else "evaluation only (--train False)",
            "accuracy": html.number(scores["accuracy"]), "weighted_f1": html.number(scores["weighted_f1"]),
            "test_selected": html.number(doc.get("test_selected_weighted_f1")),
            "epochs": str(doc.get("selected_epoch", "–"))}


def headline(spec: DatasetSpec, results: Sequence[Result]) -> tuple[str, str, str]:
    """Test accuracy and weighted F1 per model: mean ± std over seeds, and the selection protocol."""
    names, fusion = list(spec.labels), results[0]
    table = {r.title: figures(r, names) for r in results}
    rows = [[title, r.files.checkpoint.name, f["seeds"], *map(html.num, (f["accuracy"], f["weighted_f1"],
                                                                       f["test_selected"])), f["epochs"]]
            for (title, f), r in zip(table.items(), results)]
    top, kept = table[fusion.title], fusion.scores(names)
    parts = [
        html.paragraph(f"<b>Fusion, {html.text(spec.name)} test:</b> weighted F1 <b>{html.text(top['weighted_f1'])}"
                       f"</b>, accuracy <b>{html.text(top['accuracy'])}</b>; seeds {html.text(top['seeds'])}. The "
                       f"kept model (<code>{html.text(fusion.files.checkpoint.name)}</code>, which the sections "
                       f"below show): weighted F1 {kept['weighted_f1']:.4f}, accuracy {kept['accuracy']:.4f}."),
        html.table(["model", "checkpoint", "seeds", "test accuracy", "test weighted F1",
                    "test-selected wF1 (comparison only)", "selected epoch(s)"], rows),
        html.paragraph(f"Selection protocol: {html.text(SEED_SUMMARY_NOTE)} With several seeds the kept model is "
                       f"the seed with the best dev weighted F1. {html.text(TEST_SELECTED_NOTE)}", note=True)]
    return "headline", "Headline figures", "\n".join(parts)


def per_class(results: Sequence[Result], names: Sequence[str]) -> tuple[str, str, str]:
    """Per-class test F1 and the confusion matrices of the kept models, the fusion first."""
    scores = {r.title: r.scores(names) for r in results}
    f1 = {title: [s["per_class"][n]["f1-score"] for n in names] for title, s in scores.items()}
    support = [int(next(iter(scores.values()))["per_class"][n]["support"]) for n in names]
    rows = [[name, html.num(str(support[i])), *(html.num(f"{f1[t][i]:.4f}") for t in f1)] for i, name in
            enumerate(names)]
    rows.append(["weighted F1", html.num(str(sum(support))),
                 *(html.num(f"{s['weighted_f1']:.4f}") for s in scores.values())])
    parts = [html.table(["class", "support", *f1], rows),
             html.image(html.per_class_figure(f1, names), "per-class F1 bars", "Test F1 per class and model."),
             html.image(html.confusion_figure({t: s["confusion"] for t, s in scores.items()}, names),
                        "confusion matrices", "Test confusion matrices (rows = gold; counts, colour = row share).")]
    return "classes", "Per-class F1 and confusion matrices", "\n".join(parts)


# --------------------------------------------------------------------------- utterances


def utterance_texts(spec: DatasetSpec, data_dir: Path, results: Sequence[Result]) -> dict[tuple[int, int], tuple]:
    """(dialogue_id, utterance_id) -> (speaker, text) of the test utterances: from the predictions CSVs that
    hold texts, else from the test CSV in ``data_dir``; the speaker as the dataset tells speakers apart."""
    for result in results:
        if result.test is not None and (result.test["utterance"] != "").any():
            frame = result.test
            return {(int(d), int(u)): (spec.speaker_of(s), t) for d, u, s, t in
                    zip(frame["dialogue_id"], frame["utterance_id"], frame["speaker"], frame["utterance"])}
    from .dataset import load_split

    try:
        return {(u.dialogue_id, u.utterance_id): (u.speaker_key, u.text) for u in load_split(spec, data_dir, "test")}
    except UserError as err:
        log.warning("report: no utterance texts (%s)", err)
        return {}


def joined(results: Sequence[Result]) -> Any:
    """The fusion's test rows with each first-stage model's prediction as a column named by the model."""
    frame = results[0].test.copy()
    for result in results[1:]:
        if result.test is not None:
            other = result.test[KEYS + ["predicted"]].rename(columns={"predicted": result.name})
            frame = frame.merge(other, on=KEYS, how="left")
    return frame


def fixes(results: Sequence[Result], examples: int, texts: Mapping) -> tuple[str, str, str]:
    """The utterances the fusion gets right and the text model wrong (fixed), and the reverse (broken)."""
    title = "What the fusion fixes and breaks relative to the text model"
    text_model = next((r for r in results if r.name == "text" and r.test is not None), None)
    if results[0].test is None or text_model is None:
        return "fixes", title, html.paragraph("Needs the test predictions CSVs of the fusion and of text.py "
                                              "(<code>text_predictions_test.csv</code>): train or evaluate them.")
    frame = joined(results)
    fused, text = frame["predicted"] == frame["gold"], frame["text"] == frame["gold"]
    kinds = {"fixed (text wrong, fusion right)": ~text & fused, "broken (text right, fusion wrong)": text & ~fused,
             "both right": text & fused, "both wrong": ~text & ~fused}
    counts = [[kind, html.num(str(int(chosen.sum()))), html.num(f"{chosen.mean():.1%}")]
              for kind, chosen in kinds.items()]
    parts = [html.table(["utterances", "count", "share"], counts),
             html.paragraph(f"Net: {int(kinds[next(iter(kinds))].sum()) - int(list(kinds.values())[1].sum()):+d} "
                            f"utterances of {len(frame)}.")]
    for kind in list(kinds)[:2]:
        rows = [[str(r.dialogue_id), str(r.utterance_id), *texts.get((int(r.dialogue_id), int(r.utterance_id)),
                                                                     (r.speaker, r.utterance)),
                 r.gold, html.mark(r.text, r.text == r.gold), html.mark(r.predicted, r.predicted == r.gold),
                 html.num(f"{getattr(r, f'p_{r.predicted}'):.2f}")]
                for r in frame[kinds[kind]].head(examples).itertuples()]
        parts += [f"<h3>{html.text(kind)}: the first {len(rows)}</h3>",
                  html.table(["dialogue", "utterance", "speaker", "text", "gold", "text model", "fusion",
                              "p(fusion)"], rows)]
    return "fixes", title, "\n".join(parts)


def contributions(fusion: Result, names: Sequence[str]) -> tuple[str, str, str]:
    """Mean gate activation and share of each path over the test utterances, overall and per gold class."""
    title = "What the gates and anchors do"
    frame = fusion.test
    paths = [p for anchor in ANCHORS.values() for p in anchor]
    if frame is None or not any(f"share_{p}" in frame and frame[f"share_{p}"].notna().any() for p in paths):
        return "gates", title, html.paragraph("The fusion's test predictions CSV has no gate or share columns "
                                              "(an anchor model evaluated with this version writes them).")
    rows = []
    for anchor, anchor_paths in ANCHORS.items():
        for p in anchor_paths:
            gate, share = frame.get(f"gate_{p}"), frame[f"share_{p}"]
            if share.notna().any():
                rows.append([anchor, path_label(p), *(html.num(html.mean_std(
                    float(v.mean()), float(v.std()), 2) if v is not None and v.notna().any() else "–")
                    for v in (gate, share))])
    by_class = frame.groupby("gold")[[f"share_{p}" for p in TEXT_ANCHOR]].mean()
    class_rows = [[name, *(html.num(html.number(by_class.loc[name, f"share_{p}"])) for p in TEXT_ANCHOR)]
                  for name in names if name in by_class.index]
    shares = {p: frame[f"share_{p}"].to_numpy(dtype=float) for p in paths}
    anchors = {a: [p for p in ps if not np.isnan(shares[p]).all()] for a, ps in ANCHORS.items()}
    parts = [html.paragraph(
        "Per test utterance: a path's <b>gate</b> is the mean over the hidden units of its gate's activation "
        "sigmoid(ReLU(Wx + b)) (1/2: the gate halves the path, 1: lets it through); its <b>share</b> is its part "
        "of the anchor's reduction R([paths]) (docs/METHOD.md §5, \"Inspection\"). Mean ± std over utterances: "
        "the std is how much the modalities' contributions vary from utterance to utterance."),
        html.table(["anchor", "path", "gate activation", "share of the anchor"], rows),
        "<h3>The text anchor's shares by gold class</h3>",
        html.table(["gold", *map(path_label, TEXT_ANCHOR)], class_rows),
        html.image(html.shares_figure({path_label(p): v for p, v in shares.items()},
                                      {a: [path_label(p) for p in ps] for a, ps in anchors.items() if ps}),
                   "shares box plots", "Each path's share of its anchor over the test utterances.")]
    return "gates", title, "\n".join(parts)


def worst_dialogues(spec: DatasetSpec, results: Sequence[Result], n: int, texts: Mapping
                    ) -> tuple[list[int], tuple[str, str, str]]:
    """The ``n`` test dialogues the fusion gets most wrong (lowest accuracy, then the longest) as
    conversations: speaker, text, gold, each model's prediction, the fused one, the text anchor's shares."""
    title = f"The {n} worst test dialogues of the fusion"
    if results[0].test is None:
        return [], ("conversations", title, html.paragraph("Needs the fusion's test predictions CSV."))
    frame = joined(results)
    frame["right"] = frame["predicted"] == frame["gold"]
    grouped = frame.groupby("dialogue_id", sort=False)["right"].agg(["mean", "size"])
    worst = grouped.sort_values(["mean", "size"], ascending=[True, False], kind="stable").head(n)
    models = [r for r in results[1:] if r.name in frame]
    parts = [html.legend({"T": "T → T'", "A": "A' → T'", "V": "V' → T'"}) + html.paragraph(
        "Bars: the text anchor's shares (what the prediction is made of) for each utterance; hover for the "
        "gate activations. Green: the gold label; red: another.", note=True)]
    for dialogue, row in worst.iterrows():
        rows = [conversation_row(r, models, texts) for r in frame[frame["dialogue_id"] == dialogue].itertuples()]
        parts += [f"<h3>Dialogue {html.text(dialogue)}: {int(round(row['mean'] * row['size']))} of "
                  f"{int(row['size'])} right</h3>",
                  html.table(["#", "speaker", "text", "gold", *(r.title for r in models), "fusion", "T / A' / V'"],
                             rows)]
    return [int(d) for d in worst.index], ("conversations", title, "\n".join(parts))


def conversation_row(r: Any, models: Sequence[Result], texts: Mapping) -> list[Any]:
    """One utterance of a conversation table."""
    speaker, words = texts.get((int(r.dialogue_id), int(r.utterance_id)), (r.speaker, r.utterance))
    shares = {m: float(getattr(r, f"share_{p}", np.nan)) for m, p in zip("TAV", TEXT_ANCHOR)}
    gates = ", ".join(f"{p}: {html.number(getattr(r, f'gate_{p}', np.nan), 2)}" for p in TEXT_ANCHOR)
    predicted = [getattr(r, m.name) if isinstance(getattr(r, m.name), str) else "–" for m in models]
    return [str(r.utterance_id), speaker, words, r.gold, *(html.mark(p, p == r.gold) for p in predicted),
            html.mark(r.predicted, r.predicted == r.gold), (html.bars(shares, f"gates {gates}"), "")]


# --------------------------------------------------------------------------- the fused representations


def embedding(spec: DatasetSpec, run: Report, request: FusionRequest, device: torch.device, fusion: Result,
              names: Sequence[str]) -> tuple[str, str, str]:
    """A t-SNE (scikit-learn) of the kept fusion model's fused representations of the test utterances."""
    title = "t-SNE of the fused representations"
    try:
        features, labels, preds = fused_representations(spec, run, request, device)
    except UserError as err:
        return "tsne", title, html.paragraph(f"Not drawn: {html.text(err)}")
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(features)
    agree = fusion.test is None or [names[i] for i in preds] == fusion.test["predicted"].tolist()
    parts = [html.image(html.scatter_figure(points, labels, preds == labels, names), "t-SNE of the fused "
                        "representations", f"The predicting anchor's features (T') of the {len(features)} test "
                        f"utterances, t-SNE (perplexity {perplexity:.0f}, PCA start, seed 0), coloured by gold label; "
                        "crosses: predicted wrongly.")]
    if not agree:
        parts.append(html.paragraph("Note: the checkpoint's predictions differ from the fusion's predictions CSV "
                                    "(a checkpoint written after the CSV?).", note=True))
    return "tsne", title, "\n".join(parts)


def fused_representations(spec: DatasetSpec, run: Report, request: FusionRequest, device: torch.device
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, hidden) fused representations of the kept fusion model on the test pickle, gold labels, predictions."""
    files = StageFiles.fusion(run.save_dir)
    settings = trained_fusion(files, spec.name, request)
    test = load_dialogues(feature_path(run.feature_dir, "test"), settings.audio_feature, settings.video_feature,
                          device, settings.variant.modalities, spec, f"{spec.name}/report.py")
    model = load_trained_fusion(settings, files.checkpoint).to(device)
    out = dialogue_outputs(model, test, run.batch_size)
    return out.features.numpy(), np.asarray(test.flat_labels()), out.logits.argmax(-1).numpy()


def run_dataset(argv: Sequence[str]) -> None:
    """``python -m magtkd.report IEMOCAP [flags]``: the dataset's own ``<DS>/report.py``, in place of this
    process (the library never imports a dataset folder)."""
    repo, datasets = Path(__file__).resolve().parents[1], ("IEMOCAP", "MELD")
    if not argv or argv[0] not in datasets:
        raise UserError(f"usage: python -m magtkd.report {{{','.join(datasets)}}} [--data_dir D] [--save_dir S] "
                        "[--feature_dir F] [--out report.html]; the flags are python <DS>/report.py --help's")
    os.execv(sys.executable, [sys.executable, str(repo / argv[0] / "report.py"), *argv[1:]])


if __name__ == "__main__":
    from .utils import run

    run(run_dataset)
