"""The fusion's data: feature pickles as per-dialogue tensors, their batches (packed or padded), the
engine's view of them (`DialogueBatches`), the logits of every utterance, and the two ways the stage
uses them: training data with its settings, and the evaluation-only run (``--train False``)
(docs/METHOD.md §4, §5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from . import runtime
from .artifacts import StageFiles, check_complete, feature_path, features_record, write_json
from .checkpoints import CheckpointError, check_fusion_fits, load_trained_fusion, trained_fusion
from .engine import FitConfig, check_finite_logits, evaluate_checkpoint
from .fusion_settings import FusionRequest, FusionSettings, log_attention
from .model import PATHS
from .pickles import check_features_record, load_features
from .predictions import ANCHOR_COLUMNS, SplitOutputs, pickle_ids
from .runtime import GlobalBatch
from .spec import LABEL_PAD, SPLITS, DatasetSpec
from .utils import FeatureFileError


PACK_MIN_VALUES = 65536  # a batch's grid (dialogues x longest x width) from which packing pays on CPU


@dataclass
class DialogueBatch:
    """Whole dialogues for the fusion model. Packed (``index`` set): the real utterances' rows,
    dialogue after dialogue (docs/METHOD.md §5, "Speed"); padded: (B, L, ...) grids, the authors' layout."""

    text: torch.Tensor | None  # (N, H) packed, (B, L, H) padded; None: a modality the model does not read
    audio: torch.Tensor | None
    video: torch.Tensor | None
    speakers: torch.Tensor  # (N,) packed, (B, L) padded with padding = n_speaker
    labels: torch.Tensor  # (N,) packed, (B, L) padded with padding = LABEL_PAD
    mask: torch.Tensor  # (B, L) bool, True for real utterances
    index: torch.Tensor | None = None  # (N,) flat position of each row in the B x L grid
    positions: torch.Tensor | None = None  # (N,) position of each row in its dialogue

    @property
    def inputs(self) -> tuple[torch.Tensor | None, ...]:
        """The fusion model's arguments: ``model(*batch.inputs)``."""
        return self.text, self.audio, self.video, self.speakers, self.mask, self.index, self.positions

    def rows(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """The real utterances of an input or output of this batch, (N, ...), in the flattened order
        (None stays None: an output an ablation variant does not have)."""
        return x if x is None or self.index is not None else x[self.mask]

    def __len__(self) -> int:
        """Real utterances in the batch (what the loss averages over)."""
        return len(self.index) if self.index is not None else int(self.mask.sum())


@dataclass
class DialogueSet:
    """One split of a feature pickle as per-dialogue tensors on the device, in the pickle's order."""

    path: Path
    vids: list
    text: list[torch.Tensor] | None  # (L, H) each; None: not read (--modalities without T)
    audio: list[torch.Tensor] | None
    video: list[torch.Tensor] | None
    speakers: list[torch.Tensor]  # (L,) long
    labels: list[torch.Tensor]  # (L,) long
    utterance_ids: list[list[int]] | None = None  # the pickle's dia2utt, per dialogue
    ids: Mapping[str, Sequence[Any]] | None = None  # `magtkd.predictions.ID_COLUMNS` of the flattened utterances

    def __len__(self) -> int:
        return len(self.vids)

    @property
    def n_utterances(self) -> int:
        return sum(len(x) for x in self.labels)

    @property
    def width(self) -> int:
        return int(next(s for s in (self.text, self.audio, self.video) if s is not None)[0].shape[1])

    def flat_labels(self) -> list[int]:
        return torch.cat(self.labels).tolist() if self.labels else []

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[list[int]]:
        """Dialogue indices in batches: pickle order, or a seeded shuffle for training."""
        n = len(self)
        order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]

    def collate(self, indices: Sequence[int], pad_speaker: int, packed: bool | None = None) -> DialogueBatch:
        """Dialogues ``indices`` as one batch (tensors stay on the data's device): packed rows, or
        padded to the longest (``packed=False``, the authors' layout; ``pad_speaker`` fills speakers).
        ``None`` packs a batch whose grid holds at least ``PACK_MIN_VALUES`` values: below that,
        the few extra calls of packing cost more than the padding (tiny test models)."""
        lengths = [len(self.labels[i]) for i in indices]
        longest, device = max(lengths), self.labels[0].device
        if packed is None:
            packed = len(indices) * longest * self.width >= PACK_MIN_VALUES
        # Built on the host from the known lengths: no device round trip in the step.
        mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).to(device)
        streams = (self.text, self.audio, self.video)
        if not packed:
            # Padded sequence-first and seen batch-first, as the authors' collate_fn and model do: the same memory
            # layout gives the same kernels, hence their gradients bit for bit, and their dropout masks
            # (docs/METHOD.md §5, "The authors' run, draw for draw").
            text, audio, video = (None if stream is None else pad_sequence([stream[i] for i in indices]).transpose(0, 1)
                                  for stream in streams)
            return DialogueBatch(
                text=text, audio=audio, video=video,
                speakers=pad_sequence([self.speakers[i] for i in indices], batch_first=True,
                                      padding_value=pad_speaker),
                labels=pad_sequence([self.labels[i] for i in indices], batch_first=True, padding_value=LABEL_PAD),
                mask=mask,
            )
        index = torch.cat([torch.arange(n) + row * longest for row, n in enumerate(lengths)])
        positions = torch.cat([torch.arange(n) for n in lengths])
        text, audio, video = (None if stream is None else torch.cat([stream[i] for i in indices]) for stream in streams)
        return DialogueBatch(
            text=text, audio=audio, video=video, speakers=torch.cat([self.speakers[i] for i in indices]),
            labels=torch.cat([self.labels[i] for i in indices]), mask=mask, index=index.to(device),
            positions=positions.to(device),
        )

    def check_ids(self, what: str, limit: int, hint: str) -> None:
        """Every speaker/label id must lie in [0, limit); the error names the file and the dialogue."""
        values = self.speakers if what == "speakers" else self.labels
        for vid, ids in zip(self.vids, values):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
                raise FeatureFileError(
                    f"{self.path}: dialogue {vid} has {what} ids {sorted(set(ids.tolist()))}, "
                    f"expected 0..{limit - 1} ({hint})"
                )


def _stack(vectors: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(vectors).astype(np.float32, copy=False)).to(device)


def load_dialogues(path: Path, audio_key: str, video_key: str, device: torch.device,
                   modalities: Sequence[str] = ("T", "A", "V"), reader: DatasetSpec | None = None,
                   script: str = "") -> DialogueSet:
    """Load a feature pickle (restricted unpickler) for the fusion; the streams read must share one width.

    Only the streams of ``modalities`` (T = ``text``, A = ``audio_key``, V = ``video_key``) are required,
    validated and read; the others stay None (docs/METHOD.md §5, "Ablation variants"). ``reader``: the
    dataset of the ``script`` that reads the pickle; the features' record (`features_record`) must name
    the same dataset and labels, and the pickle's width.
    """
    record = check_complete(features_record(path.parent), f"the feature pickles in {path.parent}",
                            "extract_first_stage_features.py")
    if record is not None and reader is not None:
        check_features_record(record, path, reader, script)
    keys = {m: key for m, key in zip("TAV", ("text", audio_key, video_key)) if m in modalities}
    feats = load_features(path, keys=tuple(dict.fromkeys(keys.values())))
    if not feats["vids"]:
        raise FeatureFileError(f"{path}: 'vids' is empty; the split has no dialogues")
    first = feats["vids"][0]
    widths = {k: int(feats[k][first][0].shape[0]) for k in keys.values()}
    if len(set(widths.values())) != 1:
        raise FeatureFileError(f"{path}: the fusion streams need one width, got {widths}")
    width = record.get("width") if record is not None else None
    if width is not None and int(width) != next(iter(widths.values())):
        raise FeatureFileError(f"{path} has width {next(iter(widths.values()))} but {features_record(path.parent)} says "
                               f"{width}: the pickle is not the one extract_first_stage_features.py wrote there")
    vids = list(feats["vids"])
    streams = {m: [_stack(feats[key][v], device) for v in vids] if m in keys else None
               for m, key in zip("TAV", ("text", audio_key, video_key))}
    return DialogueSet(
        path=path, vids=vids, text=streams["T"], audio=streams["A"], video=streams["V"],
        speakers=[torch.tensor([int(s) for s in feats["speakers"][v]], dtype=torch.long, device=device) for v in vids],
        labels=[torch.tensor([int(y) for y in feats["labels"][v]], dtype=torch.long, device=device) for v in vids],
        utterance_ids=[[int(u) for u in feats["dia2utt"][v]] for v in vids],
    )


def loader_draw() -> int:
    """One int64 from the global torch generator, the draw a ``torch.utils.data.DataLoader`` makes when its
    iterator is created (its workers' base seed) and a ``RandomSampler`` without a generator at its first
    batch (the seed of its private shuffle generator); torch 2.11, docs/METHOD.md §5."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


def batch_layout(model: nn.Module, packed: bool | None) -> bool | None:
    """The layout a batch for ``model`` takes: the padded grid for the May-2025 release's attention, which
    attends to padded keys; else ``packed`` (`DialogueSet.collate`)."""
    return False if getattr(model, "paper_attention", False) else packed


def with_ids(data: DialogueSet, spec: DatasetSpec, data_dir: Path, split: str) -> DialogueSet:
    """``data`` with its utterances' ids, speaker names and texts (`magtkd.predictions.pickle_ids`: from the
    split's CSV in ``data_dir`` when it holds the same utterances), for the predictions CSV."""
    data.ids = pickle_ids(spec, data_dir, split, data.vids, data.utterance_ids,
                          [s.tolist() for s in data.speakers], [y.tolist() for y in data.labels])
    return data


class DialogueBatches:
    """Fusion data (`magtkd.engine.Batches`): the splits as `DialogueSet` (whole dialogues, on the device);
    ``objective(output, target)`` takes the model's outputs and the labels as rows of the real utterances.

    Training consumes the global random generator as the authors' DataLoaders do (docs/METHOD.md §5, "The
    authors' run, draw for draw"): per epoch the training loader's iterator draw, then the shuffle's seed
    (a permutation on a generator seeded with it), then the dropout masks of the updates; then one draw for
    each of the dev and test loaders' iterators. Batches are the authors' padded grid by default (``packed``
    True packs every batch, None where it pays: the same outputs, gradients up to the order of float sums;
    docs/METHOD.md §5, "Speed"). One process only (under torchrun, rank 0 alone: `runtime.one_process`).
    """

    def __init__(self, data: Mapping[str, DialogueSet], batch_size: int, packed: bool | None = False) -> None:
        runtime.one_process("the fusion stage")
        self.data, self.batch_size, self.packed = data, batch_size, packed
        self.training = False  # set by `prepare`: a training run makes the authors' loader draws
        self.objective: Callable[..., torch.Tensor] | None = None
        self.runner: nn.Module | None = None

    @property
    def n_train(self) -> int:
        return len(self.data["train"])

    def updates_per_epoch(self, grad_accum: int) -> int:
        return math.ceil(math.ceil(len(self.data["train"]) / self.batch_size) / grad_accum)

    def global_batch(self, grad_accum: int) -> GlobalBatch:
        return GlobalBatch(self.batch_size, 1, grad_accum)

    def generators(self) -> list[torch.Generator]:
        return []  # every draw comes from the global generator, which the training state saves

    def prepare(self, model: nn.Module, objective: Callable[..., torch.Tensor], seed: int) -> None:
        """``seed`` seeded the global generator before the model was built (`magtkd.runtime.set_seed`)."""
        self.runner, self.objective, self.training = model, objective, True

    def micro_batches(self, epoch: int) -> Iterator[DialogueBatch]:
        train = self.data["train"]
        loader_draw()  # the training loader's iterator
        shuffle = torch.Generator().manual_seed(loader_draw())  # its RandomSampler, at the first batch
        packed = batch_layout(self.runner, self.packed)
        return (train.collate(idx, self.runner.padding_speaker, packed)
                for idx in train.batches(self.batch_size, shuffle))

    def loss(self, batch: DialogueBatch, config: Any = None) -> torch.Tensor:
        out = self.runner(*batch.inputs)
        return self.objective(type(out)(*map(batch.rows, out)), batch.rows(batch.labels))

    def evaluate(self, model: nn.Module, split: str, config: Any = None) -> SplitOutputs:
        """Every utterance of ``split`` (pickle order): gold, prediction, probabilities, each anchor's own
        prediction, and the inspection (gates, shares, attention; docs/METHOD.md §5, "Inspection")."""
        data = self.data[split]
        if self.training:
            loader_draw()  # the dev / test loader's iterator (unshuffled, it draws nothing else)
        return split_outputs(model, data, dialogue_outputs(model, data, self.batch_size, packed=self.packed,
                                                           inspect=True))


@dataclass
class DialogueOutputs:
    """The fusion model's outputs for every real utterance of a `DialogueSet`, flattened in pickle order."""

    logits: torch.Tensor  # (N, classes): the prediction, ``t_logits``
    anchors: dict[str, torch.Tensor]  # "T"/"A"/"V" -> (N, classes): each anchor's own logits (the model's)
    features: torch.Tensor | None = None  # (N, hidden): the predicting anchor's features (``t_feat``)
    gates: dict[str, torch.Tensor] | None = None  # path -> (N,); with ``inspect``
    shares: dict[str, torch.Tensor] | None = None  # path -> (N,)
    attention: dict[str, np.ndarray] | None = None  # path -> (N, longest dialogue): keys beyond a dialogue NaN


@torch.no_grad()
def dialogue_outputs(model: nn.Module, data: Any, batch_size: int, show_progress: bool = False,
                     packed: bool | None = False, inspect: bool = False) -> DialogueOutputs:
    """The model (in eval mode) over every dialogue of a `DialogueSet`: its logits, each anchor's logits and
    features, and with ``inspect`` the gates, shares and attention (`magtkd.model.Inspection`). ``packed``
    False computes on the padded grid, as the authors' code did (same values); True packs every batch,
    ``None`` the batches where it pays (`DialogueSet.collate`; the May-2025 attention is always padded,
    `batch_layout`). Non-finite logits are an error naming the dialogues."""
    model.eval()
    parts: dict[str, list] = {}
    batches = data.batches(batch_size)
    if show_progress:
        batches = runtime.progress(batches, total=math.ceil(len(data) / batch_size), desc="dialogues")
    longest = max((len(y) for y in data.labels), default=0)
    packed = batch_layout(model, packed)
    for idx in batches:
        batch = data.collate(idx, model.padding_speaker, packed)
        out, probe = model(*batch.inputs, inspect=True) if inspect else (model(*batch.inputs), None)
        rows = {f"anchor_{m}": batch.rows(x) for m, x in anchor_logits(model, out).items()}
        rows.update(logits=batch.rows(out.t_logits), features=batch.rows(out.t_feat))
        if probe is not None:
            rows.update({f"gate_{p}": batch.rows(g) for p, g in probe.gates.items()})
            rows.update({f"share_{p}": batch.rows(v) for p, v in probe.shares.items()})
            rows.update({f"attention_{p}": _key_rows(batch, a, longest) for p, a in probe.attention.items()})
        for name, value in rows.items():
            parts.setdefault(name, []).append(value.float())
    # One copy to the host per output and pass, not one per batch (docs/METHOD.md §6, "No waiting for the host")
    joined = {name: torch.cat(chunks).cpu() for name, chunks in parts.items()}
    logits = joined.get("logits", torch.zeros(0, model.n_classes))
    _check_finite(logits, data)

    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in joined.items() if k.startswith(prefix)}

    return DialogueOutputs(logits, prefixed("anchor_"), joined.get("features"),
                           *((prefixed("gate_"), prefixed("share_"),
                              {k: v.numpy() for k, v in prefixed("attention_").items()}) if inspect else ()))


def anchor_logits(model: nn.Module, out: Any) -> dict[str, torch.Tensor]:
    """Each anchor's own logits by modality (``"T"``, ``"A"``, ``"V"``): the predicting anchor's are
    ``t_logits`` (`magtkd.model.AnchorGatedTransformer.predictor`), the others ``a_logits``/``v_logits``;
    the concat baseline has no anchors."""
    found = {"A": out.a_logits, "V": out.v_logits}
    if model.predictor in ("T", "A", "V"):
        found[model.predictor] = out.t_logits
    return {m: found[m] for m in ("T", "A", "V") if found.get(m) is not None}


def _key_rows(batch: DialogueBatch, attention: torch.Tensor, longest: int) -> torch.Tensor:
    """(N, longest): each real utterance's attention over the keys of its dialogue (NaN beyond it)."""
    keys = batch.mask[:, None, :].expand_as(attention)
    rows = torch.where(keys, attention, torch.full_like(attention, float("nan")))[batch.mask]
    return F.pad(rows, (0, longest - rows.shape[1]), value=float("nan"))


def _check_finite(logits: torch.Tensor, data: Any) -> None:
    finite = torch.isfinite(logits).all(-1)
    if not bool(finite.all()):
        # A NaN input row spreads through attention to its whole dialogue: name the dialogues.
        dialogue = torch.repeat_interleave(torch.arange(len(data)), torch.tensor([len(y) for y in data.labels]))
        bad = sorted(set(data.vids[i] for i in dialogue[~finite].tolist()))
        check_finite_logits(finite.all(), "fusion", "dialogue", f" for dialogue(s) {bad[:5]} of {data.path}")


def dialogue_logits(model: nn.Module, data: Any, batch_size: int, show_progress: bool = False,
                    packed: bool | None = False) -> torch.Tensor:
    """(N, classes) text-anchor logits ``t_logits`` of every real utterance of a `DialogueSet`, flattened
    in the pickle's dialogue order (`dialogue_outputs`). Their argmax is the prediction; their softmax
    the class probabilities."""
    return dialogue_outputs(model, data, batch_size, show_progress, packed).logits


def split_outputs(model: nn.Module, data: DialogueSet, out: DialogueOutputs) -> SplitOutputs:
    """A split's `SplitOutputs`: the fusion's rows with its `magtkd.predictions.fusion_columns` (every path
    and anchor, NaN / -1 where the model's variant has none) and its attention arrays for the npz."""
    n = len(out.logits)
    columns: dict[str, np.ndarray] = {
        name: (out.anchors[m].argmax(-1).numpy() if m in out.anchors else np.full(n, -1))
        for m, name in ANCHOR_COLUMNS.items()}
    for kind, values in (("gate", out.gates or {}), ("share", out.shares or {})):
        columns.update({f"{kind}_{p}": values[p].numpy() if p in values else np.full(n, np.nan) for p in PATHS})
    ids = data.ids or {"dialogue_id": [v for v, y in zip(data.vids, data.labels) for _ in range(len(y))],
                       "utterance_id": [u for us in (data.utterance_ids or [range(len(y)) for y in data.labels])
                                        for u in us],
                       "speaker": [str(s) for s in torch.cat(data.speakers).tolist()], "utterance": [""] * n}
    arrays = {"dialogue_id": np.asarray(ids["dialogue_id"]), "utterance_id": np.asarray(ids["utterance_id"]),
              **{f"attention_{p}": a.astype(np.float32) for p, a in (out.attention or {}).items()}}
    return SplitOutputs(np.asarray(data.flat_labels(), dtype=np.int64), out.logits.argmax(-1).numpy(),
                        torch.softmax(out.logits.double(), dim=-1).numpy(), ids, columns, arrays)


def fusion_label_names(spec: DatasetSpec, n_classes: int) -> list[str]:
    """The dataset's label names, or ``0..n-1`` for a model with another class count (``--clsNum``)."""
    return list(spec.labels) if n_classes == spec.num_classes else [str(i) for i in range(n_classes)]


def fusion_training_data(spec: DatasetSpec, feature_dir: Path, request: FusionRequest, n_classes: int,
                         device: torch.device, data_dir: Path | None = None
                         ) -> tuple[dict[str, DialogueSet], FusionSettings, dict[str, Any]]:
    """The three feature pickles as per-dialogue tensors on the device, the settings of the model they
    train (`FusionRequest.for_training`: one width, ``--hidden_dim``/``--n_head``, the variant, the
    feature keys), and the sizes recorded in the metrics document; speaker and label ids checked. Dev and
    test carry their utterances' ids, with speaker names and texts from the CSVs in ``data_dir`` (`with_ids`).

    Speakers: ``spec.n_speaker`` rows (MELD: or the largest global id + 1 in the pickles, whichever is
    larger), or ``--n_speaker``.
    """
    variant, (audio_key, video_key) = request.variant(), request.features
    data = {split: load_dialogues(feature_path(feature_dir, split), audio_key, video_key, device,
                                  variant.modalities, spec, f"{spec.name}/multimodal_fusion.py")
            for split in SPLITS}
    n_speaker = spec.n_speaker
    if spec.global_speaker_ids:
        n_speaker = max(n_speaker, 1 + max(int(s.max()) for split in SPLITS for s in data[split].speakers))
    settings = request.for_training(data["train"].width, n_classes, n_speaker, str(data["train"].path))
    for split in ("dev", "test"):
        if data[split].width != settings.hidden:
            raise FeatureFileError(f"{data[split].path} has width {data[split].width}, {data['train'].path} has "
                                   f"{settings.hidden}")
    for split in SPLITS:
        data[split].check_ids("speakers", settings.n_speaker, f"n_speaker {settings.n_speaker}; see --n_speaker")
        data[split].check_ids("labels", n_classes, f"{n_classes} classes; see --clsNum")
    if data_dir is not None:
        for split in ("dev", "test"):
            with_ids(data[split], spec, data_dir, split)
    sizes = {"hidden": settings.hidden, "n_speaker": settings.n_speaker, "n_classes": n_classes,
             **{f"{s}_dialogues": len(data[s]) for s in SPLITS},
             **{f"{s}_utterances": data[s].n_utterances for s in SPLITS},
             # The ablation variant (docs/METHOD.md §5): read back by --train False, predict.py and the tables
             "variant": variant.as_dict(), "paper_attention": settings.paper_attention}
    log_attention(settings, "the flags")
    return data, settings, sizes


@dataclass(frozen=True)
class Evaluation:
    """``multimodal_fusion.py --train False``: where the trained model and the test features are, and how
    to run it (the model itself is rebuilt from its checkpoint and record, `magtkd.checkpoints.trained_fusion`)."""

    save_dir: Path
    feature_dir: Path
    data_dir: Path  # the CSVs the predictions CSV takes speaker names and texts from (`with_ids`)
    n_classes: int  # --clsNum
    batch_size: int
    packed: bool | None
    seed: int
    flags: Mapping[str, Any]  # the run's flags, logged and recorded
    models: Path | None = None  # where the trained model is read (a model folder, --model_dir); None: save_dir


def evaluate_fusion(spec: DatasetSpec, run: Evaluation, request: FusionRequest, device: torch.device
                    ) -> dict[str, Any]:
    """``multimodal_fusion.py --train False``: only the test pickle (the streams of the checkpoint's variant)
    and the checkpoint are read; the model is the one its checkpoint and metrics document describe
    (`magtkd.checkpoints.trained_fusion`; a flag that contradicts them is an error), from ``run.models`` when
    given (a model folder). Writes into the save folder the test labels and predictions
    (``multimodal_fusion_best.json``) and every test prediction as a row
    (``multimodal_fusion_predictions_test.csv``, ``multimodal_fusion_attention_test.npz``)."""
    stage, script = f"{spec.name} multimodal_fusion (evaluation)", f"{spec.name}/multimodal_fusion.py"
    runtime.one_process(stage)
    files, out = StageFiles.fusion(run.models or run.save_dir), StageFiles.fusion(run.save_dir)
    settings = trained_fusion(files, spec.name, request)
    check_fusion_fits(settings, files.checkpoint, spec, run.n_classes, 0)
    test = load_dialogues(feature_path(run.feature_dir, "test"), settings.audio_feature, settings.video_feature,
                          device, settings.variant.modalities, spec, script)
    if settings.hidden != test.width:
        raise CheckpointError(f"checkpoint {files.checkpoint} has width {settings.hidden} but the features in "
                              f"{test.path} have width {test.width}")
    if settings.n_speaker is not None:
        test.check_ids("speakers", settings.n_speaker, f"the checkpoint {files.checkpoint} has {settings.n_speaker} "
                                                       "speakers")
    test.check_ids("labels", settings.n_classes, f"the checkpoint {files.checkpoint} has {settings.n_classes} classes")
    runtime.log_start(stage, run.flags, device, {
        "hidden": settings.hidden, "n_speaker": settings.n_speaker, "n_classes": settings.n_classes,
        "n_head": settings.n_head, "separate_text_blocks": settings.separate_text_blocks,
        "test_dialogues": len(test), "test_utterances": test.n_utterances, "variant": settings.variant.as_dict()})
    fusion = load_trained_fusion(settings, files.checkpoint).to(device)
    with_ids(test, spec, run.data_dir, "test")
    names = fusion_label_names(spec, settings.n_classes)
    # The outputs go to the save folder (`out`), never into a model folder read with --model_dir
    config = FitConfig(stage=stage, script=script, dataset=spec.name, labels=names, files=out, epochs=1,
                       seed=run.seed, args=run.flags)
    result = evaluate_checkpoint(fusion, DialogueBatches({"test": test}, run.batch_size, run.packed), config,
                                 checkpoint_loaded=True)
    write_json(out.predictions, {"labels": result["labels"], "preds": result["preds"]})
    return {**result, "stage": stage, "variant": settings.variant.as_dict(),
            "paths": {**result["paths"], "predictions": str(out.predictions)}}
