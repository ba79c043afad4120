"""Reading checkpoints, ours and the authors' layouts: plain state_dicts loaded tensors-only, the
first-stage encoders' (with the record beside them checked), and the fusion model's, including the
one rebuild of a trained fusion model from its checkpoint and metrics document (docs/METHOD.md §0, §6, §7).
"""

from __future__ import annotations

import io
import logging
import pickletools
import re
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .artifacts import FUSION, StageFiles, below_hint, check_complete
from .fusion_settings import FusionRequest, FusionSettings, log_attention
from .model import CONCAT_MODALITIES, MODALITIES, AnchorGatedTransformer, FusionVariant
from .spec import DatasetSpec
from .utils import UserError, plain_text

log = logging.getLogger("magtkd")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing or does not fit the model it is loaded into."""


SAFETENSORS = ".safetensors"  # a model folder's checkpoints (magtkd.hub): the same state_dict, tensors only


def checkpoint_file(path: str | Path) -> Path:
    """``path`` (``<name>.bin``), or its ``<name>.safetensors`` twin where only that exists: a model folder
    written by ``python -m magtkd.hub export`` keeps the save folder's names (docs/METHOD.md §9)."""
    path = Path(path)
    twin = path.with_suffix(SAFETENSORS)
    return twin if not path.is_file() and twin.is_file() else path


def read_state_dict(path: str | Path, produced_by: str) -> dict[str, torch.Tensor]:
    """``torch.load`` (tensors only) a plain state_dict, or its safetensors twin (`checkpoint_file`); a missing or
    unreadable file names the stage that writes it.

    Checkpoints as people save them load too (docs/METHOD.md §6, "Checkpoints"): the weights under a training
    checkpoint's ``state_dict`` / ``model_state_dict`` / ``model`` entry, and keys that all carry the
    ``module.`` prefix of DistributedDataParallel / DataParallel (or ``_orig_mod.`` of torch.compile), each
    with a log line. A whole pickled model (``torch.save(model)``) is refused without unpickling it: that
    would run code from the file.
    """
    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: it is written by {produced_by}"
                              + below_hint(path.parent, path.name, "--save_dir"))
    try:
        if path.suffix == SAFETENSORS:
            from safetensors.torch import load_file  # reads tensors only: nothing in the file can run code

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a checkpoint, a pickled object, ...
        root, inner = pickled_class(path), re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if root is not None or inner is not None:
            what = (f"a whole pickled object of class {root} (saved with torch.save(model)), not a state_dict"
                    if root is not None else f"a pickled object of class {inner.group(1)}, not only tensors")
            recipe = (f"; where you trust the file and its class is importable: python -c \"import torch; m = "
                      f"torch.load('{path}', weights_only=False); torch.save(m.state_dict(), '{path}')\""
                      if root is not None else "")
            raise CheckpointError(f"{path} holds {what}; it is not unpickled, since that runs code from the file. "
                                  f"Save the model's weights as a plain state_dict (torch.save(model.state_dict(), "
                                  f"...)){recipe}") from None
        message = plain_text(str(exc).splitlines()[0] if str(exc) else "")
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {message[:200]}); it is truncated or "
            f"not a checkpoint: re-run {produced_by}"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a state_dict (got {type(state).__name__})")
    return _without_wrappers(state, path)


# Where training checkpoints keep the weights (torch tutorials, Lightning, timm, ...), and the key prefixes
# of wrapped modules: DistributedDataParallel / DataParallel, torch.compile.
WEIGHT_ENTRIES = ("state_dict", "model_state_dict", "model", "module", "net")
WRAPPER_PREFIXES = {"module.": "DistributedDataParallel / DataParallel", "_orig_mod.": "torch.compile"}


def _without_wrappers(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """The weights of ``state``: unpacked from a training checkpoint's entry, wrapper prefixes removed (logged)."""
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in WEIGHT_ENTRIES:
            inner = state.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                log.info("%s: the weights are its %r entry (a training checkpoint); the other entries (%s) are not "
                         "used", path, key, ", ".join(sorted(map(str, set(state) - {key}))) or "none")
                state = inner
                break
    for prefix, wrapper in WRAPPER_PREFIXES.items():
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            log.info("%s: every key starts with %r (saved from a %s model); the prefix is removed", path, prefix,
                     wrapper)
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def pickled_class(path: Path) -> str | None:
    """The class of the object a ``torch.save`` file pickles when it is not a plain dict (``torch.save(model)``);
    read from the pickle's opcodes without executing them. None for a dict, a non-pickle or an unreadable file."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                return None if name is None else _root_class(io.BytesIO(archive.read(name)))
        with open(path, "rb") as handle:  # the legacy format: magic number, protocol, system info, then the object
            for _ in range(3):
                for _op in pickletools.genops(handle):
                    pass
            return _root_class(handle)
    except Exception:  # noqa: BLE001 - any malformed file simply is not recognised as a pickled object
        return None


def _root_class(stream: io.IOBase) -> str | None:
    """``module.Name`` of the pickle's top object when the first thing it builds is a class instance."""
    strings: list[str] = []
    for opcode, arg, _pos in pickletools.genops(stream):
        if opcode.name in ("PROTO", "FRAME", "MARK"):
            continue
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(str(arg))
            continue
        if opcode.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            continue
        if opcode.name == "GLOBAL":
            found = str(arg).replace(" ", ".")
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            found = f"{strings[-2]}.{strings[-1]}"
        else:
            return None  # a dict, list or other plain value at the top
        return None if found in ("collections.OrderedDict", "builtins.dict") else found
    return None


def mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Missing / unexpected keys and shape mismatches of ``state`` against ``model`` ('' if it fits)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape)
    )

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")

    problems = [f"missing keys: {show(missing)}" if missing else "",
                f"unexpected keys: {show(unexpected)}" if unexpected else "",
                f"shape mismatches: {show(shapes)}" if shapes else ""]
    return "; ".join(p for p in problems if p)



# --------------------------------------------------------------------------- first-stage checkpoints


def check_checkpoint_record(path: Path, produced_by: str, dataset: str | None = None,
                            labels: Sequence[str] | None = None) -> None:
    """Refuse a checkpoint whose metrics JSON says its run did not finish or that it belongs to another
    ``dataset`` / label list (both sides named). Checkpoints without a JSON (the authors') are accepted."""
    path = Path(path)
    record = path.with_suffix(".json")
    doc = check_complete(record, f"checkpoint {path}", produced_by)
    if doc is None:
        return
    expected = dataset
    if expected and doc.get("dataset") not in (None, expected):
        raise CheckpointError(f"checkpoint {path} was trained on {doc['dataset']} ({record}) but this run "
                              f"needs a {expected} checkpoint written by {produced_by}")
    if labels is not None and doc.get("labels") is not None and list(doc["labels"]) != list(labels):
        raise CheckpointError(f"checkpoint {path} has labels {doc['labels']} ({record}); this run needs "
                              f"{list(labels)}: use the checkpoint {produced_by} writes for this dataset")


# The authors' first-stage modules (docs/METHOD.md §7): the pretrained encoder is ``text_model``
# (a RobertaModel WITH its pooler, which the representation never uses) or ``model``
# (data2vec / TimeSformer), the classifier ``W``; ours are ``backbone`` and ``classifier``
# (+ the text ``project``). Entries of theirs that our modules lack and nothing reads.
AUTHORS_BACKBONES = ("text_model.", "model.")


AUTHORS_UNUSED = (".pooler.", "embeddings.position_ids")


def from_authors_layout(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path
                        ) -> dict[str, torch.Tensor]:
    """A first-stage state_dict as the authors' code writes it, renamed onto ``model``'s names.

    ``text_model.*`` / ``model.*`` -> ``backbone.*``; the pooler (and a stored
    ``position_ids`` buffer) are dropped; each other top-level Linear (``W``, and
    the text projection whatever its name) goes to the one head Linear of ours
    with its weight's shape. Anything that fits nowhere keeps its name, so the
    strict check in `load_checkpoint` reports it. Our own checkpoints pass unchanged.
    """
    if any(k.startswith("backbone.") for k in state) or not any(k.startswith(AUTHORS_BACKBONES) for k in state):
        return dict(state)
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        prefix = next((p for p in AUTHORS_BACKBONES if key.startswith(p)), None)
        if prefix is None:
            module, _, leaf = key.rpartition(".")
            heads.setdefault(module, {})[leaf] = value
            continue
        ours = "backbone." + key[len(prefix):]
        if ours not in own and any(part in key for part in AUTHORS_UNUSED):
            dropped.append(key)
        else:
            mapped[ours] = value
    our_heads = {k.rpartition(".")[0] for k in own if not k.startswith("backbone.")}
    renamed = []
    for module, params in heads.items():
        weight = params.get("weight")
        fits = [h for h in our_heads if weight is not None and set(params) == {"weight", "bias"}
                and tuple(own[f"{h}.weight"].shape) == tuple(weight.shape)]
        if module and len(fits) == 1:
            our_heads.discard(fits[0])
            mapped.update({f"{fits[0]}.{leaf}": v for leaf, v in params.items()})
            renamed.append(f"{module} -> {fits[0]}")
        else:  # unknown to us: left under its own name for the error message
            mapped.update({f"{module}.{leaf}" if module else leaf: v for leaf, v in params.items()})
    log.info("%s: laid out as the authors' code writes it; backbone renamed, heads %s, %d unused entries "
             "dropped (%s)", path, ", ".join(renamed) or "none", len(dropped),
             ", ".join(sorted({k.split(".pooler.")[0] + ".pooler" if ".pooler." in k else k for k in dropped})))
    return mapped


def load_checkpoint(model: nn.Module, path: Path, produced_by: str, dataset: str | None = None,
                    labels: Sequence[str] | None = None) -> nn.Module:
    """Load a plain state_dict strictly (ours, or the authors' layout, `from_authors_layout`);
    errors name the file and the mismatched keys; a metrics JSON beside it must say complete and
    name ``dataset`` and ``labels`` (`check_checkpoint_record`)."""
    check_checkpoint_record(path, produced_by, dataset, labels)
    state = from_authors_layout(model, read_state_dict(path, produced_by), Path(path))
    problems = mismatch(model, state)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match the model ({problems}); "
            f"was it written by {produced_by} with the same pretrained folder?"
        )
    model.load_state_dict(state)
    return model



# --------------------------------------------------------------------------- fusion checkpoints


class FusionCheckpointError(CheckpointError):
    """A fusion checkpoint that is missing or does not fit the model."""


def check_fusion_record(files: StageFiles, dataset: str) -> dict[str, Any] | None:
    """The fusion's metrics JSON (its completion record) must say complete and name ``dataset``;
    a checkpoint without one (the authors') is accepted."""
    producer, checkpoint = f"{dataset}/{FUSION}.py", files.checkpoint
    doc = check_complete(files.metrics, f"the fusion checkpoint {checkpoint}", producer)
    if doc is not None and doc.get("dataset") not in (None, dataset):
        raise CheckpointError(
            f"fusion checkpoint {checkpoint} was trained on {doc['dataset']} features "
            f"({files.metrics}) but this is {producer}: pass the --save_dir of a {dataset} run"
        )
    return doc


_REFERENCE_ONLY = ("fc.",)  # the reference's top-level fc, never used in its forward
_UNUSED_WHEN_SHARING = ("a_t.", "v_t.", "a_t_gate.", "v_t_gate.")
_SELF_BLOCKS = {"T": "t_t.", "A": "a_a.", "V": "v_v."}  # an anchor model has X's self block iff it reads X


def variant_from_checkpoint(state: Mapping[str, torch.Tensor]) -> FusionVariant:
    """The variant (`magtkd.model.FusionVariant`) a fusion checkpoint was trained as.

    Read from the names: the concat baseline holds :data:`CONCAT_MODALITIES` (which streams it read);
    an anchor model holds the self block ``x_x`` of each modality X it reads; gates show as
    ``*_gate.fc.weight``, the speaker embedding as ``speaker_embeddings.weight``. The authors'
    checkpoints are ``anchor T+A+V`` with gates and speaker embedding.
    """
    if CONCAT_MODALITIES in state:
        flags = [bool(f) for f in state[CONCAT_MODALITIES].tolist()]
        modalities, fusion = [m for m, on in zip(MODALITIES, flags) if on], "concat"
    else:
        modalities = [m for m, prefix in _SELF_BLOCKS.items() if any(k.startswith(prefix) for k in state)]
        fusion = "anchor"
    if not modalities:
        raise FusionCheckpointError("checkpoint has none of the blocks t_t, a_a, v_v and no "
                                    f"{CONCAT_MODALITIES!r}: not a multimodal fusion checkpoint")
    return FusionVariant(tuple(modalities), fusion == "anchor" and any(k.endswith("_gate.fc.weight") for k in state),
                         "speaker_embeddings.weight" in state, fusion)


def settings_from_checkpoint(state: Mapping[str, torch.Tensor]) -> FusionSettings:
    """What a checkpoint's tensors fix: ``hidden``, ``n_classes``, ``n_speaker``, ``separate_text_blocks`` and
    the variant; ``n_head`` and the feature keys show in no shape and stay None (`trained_fusion` reads them
    from the metrics document).

    ``separate_text_blocks`` is True only for our checkpoints trained with separate text blocks
    (``a_t``/``v_t`` weights without the reference's ``fc``). ``n_speaker`` is None for a model without
    speaker embedding. ``n_classes`` (and ``hidden`` without a speaker table) come from the predicting head
    (``w_t``, else ``w_a``, ``w_v``; ``w_concat`` for the concat baseline).
    """
    variant = variant_from_checkpoint(state)
    head = "w_concat" if variant.fusion == "concat" else f"w_{variant.modalities[0].lower()}"
    for key in (("speaker_embeddings.weight",) if variant.speaker_embedding else ()) + (f"{head}.weight",):
        if key not in state:
            raise FusionCheckpointError(f"checkpoint has no {key!r}: not a multimodal fusion checkpoint")
    n_classes, hidden = state[f"{head}.weight"].shape
    n_speaker = None
    if variant.speaker_embedding:
        rows, hidden = state["speaker_embeddings.weight"].shape
        n_speaker = int(rows) - 1
    has_text_blocks = any(k.startswith(("a_t.", "v_t.")) for k in state)
    is_reference = any(k.startswith(_REFERENCE_ONLY) for k in state)
    return FusionSettings(hidden=int(hidden), n_classes=int(n_classes), n_speaker=n_speaker,
                          separate_text_blocks=bool(has_text_blocks and not is_reference), variant=variant,
                          n_head=None)


def trained_fusion(files: StageFiles, dataset: str, request: FusionRequest) -> FusionSettings:
    """The one rebuild of a trained fusion model's settings, for ``--train False``, predict.py and the
    ablation tables: the checkpoint's tensors (`settings_from_checkpoint`), then the flags its metrics
    document recorded (``n_head``, ``audio_feature``, ``video_feature``; a checkpoint without one, the
    authors', takes them from ``request`` or the defaults), checked against ``request``
    (`magtkd.fusion_settings.FusionRequest.against`: a contradicting flag is an error naming both)."""
    record = check_fusion_record(files, dataset)
    trained = settings_from_checkpoint(read_fusion_state(files.checkpoint))
    recorded = record.get("args") if record is not None and isinstance(record.get("args"), dict) else {}
    # A record written before --paper_attention / --padding_speaker existed describes the fixed attention and
    # our own padding row; without a record (the authors' checkpoints) the flags decide.
    trained = replace(trained, n_head=recorded.get("n_head"), audio_feature=recorded.get("audio_feature"),
                      video_feature=recorded.get("video_feature"),
                      paper_attention=bool(recorded.get("paper_attention")) if record is not None else None,
                      padding_speaker=recorded.get("padding_speaker", "own") if record is not None else None)
    source = f"checkpoint {files.checkpoint}" + (f" ({files.metrics.name})" if record is not None else "")
    settings = request.against(trained, source)
    log.info("fusion checkpoint %s: %s, %d heads, width %d, features %s/%s (%s)", files.checkpoint,
             settings.variant.name, settings.n_head, settings.hidden, settings.audio_feature, settings.video_feature,
             f"as recorded in {files.metrics.name}" if recorded else "no record: flags and defaults")
    log_attention(settings, "as recorded" if record is not None else "no record: the flags")
    return settings


def check_fusion_fits(settings: FusionSettings, checkpoint: Path, spec: DatasetSpec, n_classes: int,
                      speakers: int) -> None:
    """Refuse a fusion checkpoint trained for another dataset: its class count must be ``n_classes`` and its
    speaker embedding (when it has one) must have a row for each of ``speakers`` ids; both sides named."""
    problems = []
    if settings.n_classes != n_classes:
        problems.append(f"{settings.n_classes} classes, {spec.name} has {n_classes}"
                        + (f" ({', '.join(spec.labels)})" if n_classes == spec.num_classes else " (--clsNum)"))
    if settings.n_speaker is not None and settings.n_speaker < speakers:
        problems.append(f"{settings.n_speaker} speaker rows (+ padding), {spec.name} needs {speakers}")
    if problems:
        raise FusionCheckpointError(f"fusion checkpoint {checkpoint} was not trained for {spec.name}: it has "
                                    f"{'; '.join(problems)}")


def speakers_needed(spec: DatasetSpec, speaker2id: Mapping[str, int] | None) -> int:
    """Speaker rows a fusion model needs for ``spec`` (MELD: every id of ``speaker2id``)."""
    return max(speaker2id.values()) + 1 if spec.global_speaker_ids and speaker2id else spec.n_speaker


def read_fusion_state(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load`` a plain state_dict (tensors only) from ``path``."""
    try:
        return read_state_dict(path, "multimodal_fusion.py --train True")
    except CheckpointError as err:
        raise FusionCheckpointError(f"fusion {err}") from err


def load_trained_fusion(settings: FusionSettings, checkpoint: Path, dropout: float = 0.0) -> AnchorGatedTransformer:
    """The model ``settings`` describe, with the weights of ``checkpoint`` (`load_fusion_checkpoint`)."""
    return load_fusion_checkpoint(settings.build(dropout), checkpoint)


def load_fusion_checkpoint(model: AnchorGatedTransformer, path: str | Path) -> AnchorGatedTransformer:
    """Load our checkpoint or the reference's into ``model``; errors name the file and the keys.

    A checkpoint of another variant (:func:`variant_from_checkpoint`) is refused with
    an error naming both variants. The reference's never-used entries (``fc.*``, and
    ``a_t``/``v_t`` blocks and gates when the model shares the text block as the
    reference does) are dropped with one log line. Anything else missing, unexpected
    or of another shape is an error (docs/METHOD.md §6).
    """
    path = Path(path)
    state = read_fusion_state(path)
    try:
        found = variant_from_checkpoint(state)
    except FusionCheckpointError:
        found = None  # no fusion blocks at all: the key listing below names what is wrong
    if found is not None and found != model.variant:
        raise FusionCheckpointError(
            f"fusion checkpoint {path} is the variant {found.name} ({found.as_dict()}) but the model is the "
            f"variant {model.variant.name} ({model.variant.as_dict()}); build the model with "
            f"{', '.join(f'{k}={v!r}' for k, v in found.as_dict().items())} (settings_from_checkpoint reads them)")
    state = _drop_reference_extras(state, path, model.separate_text_blocks)
    problems = mismatch(model, state)
    if problems:
        hint = ""
        unexpected = set(state) - set(model.state_dict())
        if not model.separate_text_blocks and any(k.startswith(_UNUSED_WHEN_SHARING) for k in unexpected):
            hint = "; it holds a_t/v_t blocks without the reference's fc: was it trained with --separate_text_blocks?"
        raise FusionCheckpointError(f"fusion checkpoint {path} does not fit the model ({problems}){hint}")
    model.load_state_dict(state)
    return model


def _drop_reference_extras(state: dict[str, torch.Tensor], path: Path, separate: bool) -> dict[str, torch.Tensor]:
    """The authors' never-used entries (``fc.*``; ``a_t``/``v_t`` when the text block is shared), dropped."""
    is_reference = any(k.startswith(_REFERENCE_ONLY) for k in state)
    drop = _REFERENCE_ONLY + (() if separate else _UNUSED_WHEN_SHARING)
    dropped = sorted(k for k in state if is_reference and k.startswith(drop))
    if dropped:
        log.info("%s: reference checkpoint; dropping %d never-used entries (%s)", path, len(dropped),
                 ", ".join(sorted({k.split(".")[0] for k in dropped})))
        state = {k: v for k, v in state.items() if k not in set(dropped)}
    return state
