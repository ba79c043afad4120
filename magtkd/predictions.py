"""Every prediction as a row: what an evaluation gives per utterance (gold, predicted, class probabilities
and the utterance's ids; the fusion's anchors, gates, shares and attention too), the CSV and npz files
that hold them, and reading them back (docs/METHOD.md §0, "Predictions").

``<name>_predictions_{dev,test}.csv``: one row per utterance in the split's order, columns
`ID_COLUMNS`, ``gold``, ``predicted`` (label names), ``p_<label>`` per class, then the fusion's
`fusion_columns`; ``<name>_attention_{dev,test}.npz`` (fusion): the attention of every path.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .artifacts import StageFiles, atomic_path, write_text
from .spec import DatasetSpec
from .utils import UserError

log = logging.getLogger("magtkd")


ID_COLUMNS = ("dialogue_id", "utterance_id", "speaker", "utterance")


# The fusion's anchors (docs/METHOD.md §5) and the column of each one's own prediction.
ANCHOR_COLUMNS = {"T": "text_anchor", "A": "audio_anchor", "V": "video_anchor"}


def fusion_columns(paths: Sequence[str]) -> list[str]:
    """The fusion's columns after ``p_<label>``: each anchor's own prediction, then per path ``x_y``
    (`magtkd.model.PATHS`) its mean gate activation ``gate_x_y`` and its share of the anchor ``share_x_y``."""
    return [*ANCHOR_COLUMNS.values(), *(f"gate_{p}" for p in paths), *(f"share_{p}" for p in paths)]


@dataclass
class SplitOutputs:
    """What evaluating one split gives, row i = the split's utterance i (dataset order).

    ``columns``: extra per-utterance columns (the fusion's `fusion_columns`): anchors' class ids (-1 where
    the model has no such anchor), gate means and shares (NaN where the model has no such path).
    ``arrays``: what the ``.npz`` beside the CSV holds (the fusion's attention); empty: no ``.npz``.
    """

    labels: np.ndarray  # (N,) gold class ids
    preds: np.ndarray  # (N,) argmax of the logits
    probs: np.ndarray  # (N, C) softmax of the logits
    ids: Mapping[str, Sequence[Any]]  # `ID_COLUMNS` -> N values
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)


def utterance_ids(utterances: Sequence[Any]) -> dict[str, list[Any]]:
    """`ID_COLUMNS` of `magtkd.dataset.Utterance` rows: the CSV's ids, its raw ``Speaker`` and the text."""
    return {"dialogue_id": [u.dialogue_id for u in utterances], "utterance_id": [u.utterance_id for u in utterances],
            "speaker": [u.speaker for u in utterances], "utterance": [u.text for u in utterances]}


def pickle_ids(spec: DatasetSpec, data_dir: Path, split: str, vids: Sequence[int],
               utterance_ids_: Sequence[Sequence[int]], speakers: Sequence[Sequence[int]],
               labels: Sequence[Sequence[int]]) -> dict[str, list[Any]]:
    """`ID_COLUMNS` of a feature pickle's utterances (its order): the ids from ``vids``/``dia2utt``, and the
    speaker names and texts from the split's CSV in ``data_dir`` when it holds the same utterances with the
    same labels. Otherwise (downloaded features without the CSVs, another CSV) the speaker is the pickle's
    speaker id and the text is empty, and the log says why."""
    rows = [(int(v), int(u), int(s), int(y)) for v, us, ss, ys in zip(vids, utterance_ids_, speakers, labels)
            for u, s, y in zip(us, ss, ys)]
    ids: dict[str, list[Any]] = {"dialogue_id": [r[0] for r in rows], "utterance_id": [r[1] for r in rows],
                                 "speaker": [str(r[2]) for r in rows], "utterance": [""] * len(rows)}
    from .dataset import load_split  # pandas: only when predictions are written

    try:
        by_key = {(u.dialogue_id, u.utterance_id): u for u in load_split(spec, data_dir, split)}
    except UserError as err:
        log.info("%s %s predictions: no speaker names or texts (%s); the CSV holds the pickle's speaker ids",
                 spec.name, split, err)
        return ids
    unmatched = next((r for r in rows if r[:2] not in by_key or by_key[r[:2]].label != r[3]), None)
    if unmatched is not None:
        log.warning("%s %s predictions: dialogue %d utterance %d of the features is not in %s with the same "
                    "label; the CSV holds the pickle's speaker ids and no texts (pass the --data_dir of these "
                    "features)", spec.name, split, unmatched[0], unmatched[1], data_dir)
        return ids
    return utterance_ids([by_key[r[:2]] for r in rows])


def _cell(value: Any, kind: str, names: Sequence[str]) -> str:
    """A CSV cell: a class id as its label name ('' for -1), a float with 6 decimals ('' for NaN)."""
    if kind == "label":
        return names[int(value)] if int(value) >= 0 else ""
    if kind == "float":
        return "" if math.isnan(float(value)) else f"{float(value):.6f}"
    return str(value)


def prediction_csv(out: SplitOutputs, names: Sequence[str]) -> str:
    """The CSV text of ``out``: `ID_COLUMNS`, ``gold``, ``predicted``, ``p_<label>``, then ``out.columns``."""
    extra = list(out.columns)
    kinds = ["label" if name in ANCHOR_COLUMNS.values() else "float" for name in extra]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*ID_COLUMNS, "gold", "predicted", *(f"p_{name}" for name in names), *extra])
    for i in range(len(out.labels)):
        writer.writerow([*(out.ids[c][i] for c in ID_COLUMNS), _cell(out.labels[i], "label", names),
                         _cell(out.preds[i], "label", names), *(f"{p:.6f}" for p in out.probs[i]),
                         *(_cell(out.columns[c][i], k, names) for c, k in zip(extra, kinds))])
    return buffer.getvalue()


def write_split_outputs(files: StageFiles, outputs: Mapping[str, SplitOutputs], names: Sequence[str],
                        in_progress: bool = False) -> list[Path]:
    """``<name>_predictions_<split>.csv`` (and the fusion's ``<name>_attention_<split>.npz``) of each split,
    each written atomically; ``in_progress``: under the in-progress names a training run publishes at its end
    (`StageFiles.in_progress`). Returns the paths written."""
    written = []
    for split, out in outputs.items():
        path = files.predictions_csv(split)
        path = files.in_progress(path) if in_progress else path
        write_text(path, prediction_csv(out, names))
        written.append(path)
        if out.arrays:
            npz = files.attention_npz(split)
            npz = files.in_progress(npz) if in_progress else npz
            with atomic_path(npz) as tmp, open(tmp, "wb") as handle:
                np.savez_compressed(handle, **out.arrays)
            written.append(npz)
    return written


def read_predictions(path: str | Path) -> Any:
    """A predictions CSV as a pandas DataFrame (ids as ints, texts as strings, empty cells as NaN only in the
    numeric columns); a missing file names the stage that writes it."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: it is written by the stage of that name (train it, or run it with "
                        "--train False)")
    frame = pd.read_csv(path, dtype={c: str for c in ("speaker", "utterance", "gold", "predicted",
                                                       *ANCHOR_COLUMNS.values())}, keep_default_na=False)
    for column in frame.columns:
        if column.startswith(("p_", "gate_", "share_")) and frame[column].dtype == object:  # has empty cells
            frame[column] = pd.to_numeric(frame[column].map(lambda cell: cell or np.nan))
    return frame
