"""The second-stage model: the multi-modal anchor gated transformer and its ablation variants
(docs/METHOD.md §5).

Audio and video anchors gather the other streams through self/cross-attention blocks and gates;
the text anchor attends to the fused audio and video streams and predicts. It reads first-stage
feature vectors only, so this module needs nothing but torch (no media or Hugging Face library):
evaluating downloaded features loads no more than this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from .fusion_blocks import Gate, TransformerBlock
from .packing import Layout


AUTHORS_PADDING_ROW = 2  # the speaker row the authors' code pads with on both datasets (docs/METHOD.md §7)


# Blocks by anchor: (name, key/value stream, query stream). docs/METHOD.md §5, "Forward".
AUDIO_ANCHOR = ("a_a", "t_a", "v_a")


VIDEO_ANCHOR = ("v_v", "t_v", "a_v")


TEXT_ANCHOR = ("t_t", "a_t", "v_t")


class FusionOutput(NamedTuple):
    """The model's outputs in the batch's layout: rows (N, ...) when packed, else (batch, length, ...).

    ``t_logits`` / ``t_feat`` always hold the PREDICTING anchor (:attr:`AnchorGatedTransformer.predictor`):
    the text anchor T' when the model has T, else the audio anchor A' (A+V, A), else V' (V alone), or the
    concat baseline's output. ``a_*`` / ``v_*`` hold the other anchors, the ones distilled towards the
    prediction; they are None when the modality is absent, or when its anchor is the predicting one (it is
    then in ``t_*``, and an objective that sums over the non-None fields counts it once).
    docs/METHOD.md §5, "Ablation variants".
    """
    t_logits: torch.Tensor  # the prediction (N, classes)
    a_logits: torch.Tensor | None
    v_logits: torch.Tensor | None
    t_feat: torch.Tensor  # T' (N, hidden), or the predicting anchor's features
    a_feat: torch.Tensor | None  # A'
    v_feat: torch.Tensor | None  # V'


# The nine paths ``x_y`` (stream x -> anchor y) in the order the forward computes them (docs/METHOD.md §5).
PATHS = AUDIO_ANCHOR + VIDEO_ANCHOR + TEXT_ANCHOR


@dataclass
class Inspection:
    """What the fusion did with each utterance (``forward(..., inspect=True)``; docs/METHOD.md §5,
    "Inspection"), keyed by path (`PATHS`; the concat baseline's attention by ``"concat"``). ``gates`` and
    ``shares`` are in the outputs' layout: (N,) rows when packed, (batch, length) when padded.

    - ``gates``: the mean over the hidden units of the path's gate activation ``sigmoid(ReLU(W x + b))``
      (in [1/2, 1); absent without gates);
    - ``shares``: the path's share of its anchor's reduction `path_shares` (1 for a single path);
    - ``attention``: (batch, query, key) attention probabilities on the grid, averaged over the heads.
    """
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    shares: dict[str, torch.Tensor] = field(default_factory=dict)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)


MODALITIES = ("T", "A", "V")  # the streams, in the order of forward's arguments


FUSIONS = ("anchor", "concat")


# The nine blocks in the authors' order of construction (docs/METHOD.md §5, Initialisation).
BUILD_ORDER = TEXT_ANCHOR + AUDIO_ANCHOR + VIDEO_ANCHOR


# The authors' registration order of the top-level modules (their constructor's; `clip_order`).
AUTHORS_MODULE_ORDER = ("speaker_embeddings", *BUILD_ORDER, *(f"{name}_gate" for name in BUILD_ORDER),
                        "features_reduce_t", "features_reduce_a", "features_reduce_v", "fc", "w_t", "w_a", "w_v")


CONCAT_MODALITIES = "concat_modalities"  # buffer of the concat baseline: which of T, A, V it reads


def _canonical_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    """``modalities`` (e.g. ``("T", "A")``, ``"TA"``, any case) as a tuple in T, A, V order; errors name them."""
    given = [str(m).upper() for m in modalities]
    unknown = sorted(set(given) - set(MODALITIES))
    if unknown or not given or len(set(given)) != len(given):
        raise ValueError(f"modalities must be a non-empty subset of T, A, V without repeats, got {list(modalities)!r}")
    return tuple(m for m in MODALITIES if m in given)


@dataclass(frozen=True)
class FusionVariant:
    """Which model `AnchorGatedTransformer` is (docs/METHOD.md §5, "Ablation variants"), in canonical form:
    ``modalities`` in T, A, V order, and ``gates`` False for the concat baseline, which has none. The
    defaults are the paper's model. ``as_dict()`` is the recorded form (metrics document, seeds summary)
    and the model's keyword arguments: ``AnchorGatedTransformer(..., **variant.as_dict())``."""

    modalities: tuple[str, ...] = MODALITIES
    gates: bool = True
    speaker_embedding: bool = True
    fusion: str = "anchor"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", _canonical_modalities(self.modalities))
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        object.__setattr__(self, "gates", bool(self.gates) and self.fusion == "anchor")
        object.__setattr__(self, "speaker_embedding", bool(self.speaker_embedding))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FusionVariant":
        return cls(**{key: values[key] for key in ("modalities", "gates", "speaker_embedding", "fusion")})

    def as_dict(self) -> dict[str, Any]:
        """``{"modalities": ["T", "A", "V"], "gates": True, "speaker_embedding": True, "fusion": "anchor"}``."""
        return {"modalities": list(self.modalities), "gates": self.gates,
                "speaker_embedding": self.speaker_embedding, "fusion": self.fusion}

    @property
    def name(self) -> str:
        """A short readable name, e.g. ``anchor T+A+V, gates, speaker embedding`` (used in errors and titles)."""
        parts = [f"{self.fusion} {'+'.join(self.modalities)}"]
        if self.fusion == "anchor":
            parts.append("gates" if self.gates else "no gates")
        parts.append("speaker embedding" if self.speaker_embedding else "no speaker embedding")
        return ", ".join(parts)


def _check_arguments(variant: FusionVariant, n_speaker: int | None, separate_text_blocks: bool,
                     padding_row: int | None) -> None:
    """`AnchorGatedTransformer`'s arguments that cannot build a model, refused naming them."""
    if variant.speaker_embedding and n_speaker is None:
        raise ValueError("n_speaker is needed for the speaker embedding (speaker_embedding=True)")
    if variant.fusion == "concat" and separate_text_blocks:
        raise ValueError("separate_text_blocks applies to the anchor fusion only, not to fusion='concat'")
    if padding_row is not None and (n_speaker is None or not 0 <= padding_row <= n_speaker):
        raise ValueError(f"padding_row {padding_row} is not a row of the speaker table (0..{n_speaker})")


class AnchorGatedTransformer(nn.Module):
    """The second-stage model: audio, video and text anchors over utterance features (docs/METHOD.md §5).

    The keyword arguments select an ablation variant (docs/METHOD.md §5, "Ablation variants"); their
    defaults are the paper's model, parameter for parameter and draw for draw:

    - ``modalities``: the streams the model reads, any non-empty subset of ``T``, ``A``, ``V``. The model
      keeps exactly the full model's blocks, gates, reductions and heads whose streams are all present
      (T+A: ``a_a t_a`` -> A', ``t_t`` (+ ``a_t``) -> T'; a single modality X: its self block ``x_x``, gate
      and head ``w_x``, no reduction). The text anchor predicts when T is present, else the audio anchor
      (A+V, A), else the video anchor (V); the prediction is always ``FusionOutput.t_logits``. The inputs
      of absent modalities are never read (pass anything, e.g. None).
    - ``gates``: False replaces every gate by the identity, ``g(x) = x`` (no ``*_gate`` parameters): each
      block's output enters the concatenation before ``R_x`` (or the head) unscaled.
    - ``speaker_embedding``: False adds no speaker embedding (``E(X) = X + PE``, no ``speaker_embeddings``);
      ``speakers`` is then not read and ``n_speaker`` may be None.
    - ``fusion``: ``"concat"`` is the baseline without anchors: the present streams concatenated per
      utterance, ``concat_reduce = Linear(kH, H)``, one self block ``concat`` (positions + speaker
      embedding as the text stream's), the head ``w_concat``; no gates (its variant reports
      ``gates: False`` whatever ``gates`` says).

    ``paper_attention`` computes the attention of the authors' May-2025 release (`paper_attention_weights`,
    padded grid only) and ``padding_row`` pads speakers with another row than ``n_speaker`` (the authors' 2,
    `AUTHORS_PADDING_ROW`); neither changes a parameter or a draw (docs/METHOD.md §5, §7).
    """

    def __init__(self, hidden: int, n_classes: int, n_speaker: int | None, n_head: int = 8, dropout: float = 0.5,
                 separate_text_blocks: bool = False, *, modalities: Sequence[str] = MODALITIES, gates: bool = True,
                 speaker_embedding: bool = True, fusion: str = "anchor", paper_attention: bool = False,
                 padding_row: int | None = None) -> None:
        super().__init__()
        variant = FusionVariant(modalities, gates, speaker_embedding, fusion)
        _check_arguments(variant, n_speaker, separate_text_blocks, padding_row)
        self.hidden, self.n_classes, self.n_speaker = hidden, n_classes, n_speaker
        self.separate_text_blocks, self.paper_attention = separate_text_blocks, paper_attention
        # The row padded positions take (and that gets no gradient): our own row n_speaker, or the authors'
        # id 2 (AUTHORS_PADDING_ROW), a real speaker on MELD (docs/METHOD.md §5, §7).
        self._padding_row = n_speaker if padding_row is None else padding_row
        self.modalities, self.fusion = variant.modalities, variant.fusion
        self.gates, self.speaker_embedding = variant.gates, variant.speaker_embedding
        present = {m.lower() for m in self.modalities}
        self._present = present
        # The predicting anchor: text if present, else audio, else video (docs/METHOD.md §5, Ablation variants).
        self._predictor = next(m for m in "tav" if m in present)
        if fusion == "concat":
            self._build_concat(n_head, dropout)
            return

        # Modules are BUILT in the authors' constructor order, so that right after
        # torch.manual_seed(seed) they make the same random draws and get the same
        # initial weights (docs/METHOD.md §5, Initialisation): speaker table (default
        # normal, then normal(0, 0.1)), the nine blocks t_t a_t v_t a_a t_a v_a v_v t_v
        # a_v, the nine gates in that order, features_reduce_t/a/v, the top-level fc
        # (never used by the forward), w_t/a/v. Blocks the model does not use are drawn
        # and discarded. They are then REGISTERED in our order (unchanged state_dict).
        # Row n_speaker is the padding row (the authors used id 2, a real speaker on
        # MELD); the table has the authors' shape (n_speaker + 1 rows), so the draws agree.
        # A variant makes the same draws in the same order, leaving out the modules it has not.
        if self.speaker_embedding:
            speaker_embeddings = nn.Embedding(n_speaker + 1, hidden, padding_idx=self._padding_row)
            nn.init.normal_(speaker_embeddings.weight, mean=0.0, std=0.1)
        names = [name for name in BUILD_ORDER if name[0] in present and name[2] in present]
        blocks = {name: TransformerBlock(hidden, n_head, dropout, paper_attention=paper_attention) for name in names}
        gate_modules = {name: Gate(hidden) for name in names} if self.gates else {}
        # Each anchor concatenates one path per present modality; a single path is not reduced.
        paths = len(present)
        reduce = {m: nn.Linear(paths * hidden, hidden) for m in "tav" if m in present and paths > 1}
        if paths == 3:
            nn.Linear(3 * hidden, hidden)  # the authors' unused top-level fc: drawn, discarded
        heads = {modality: nn.Linear(hidden, n_classes) for modality in "tav" if modality in present}

        if self.speaker_embedding:
            self.speaker_embeddings = speaker_embeddings
        registered = AUDIO_ANCHOR + VIDEO_ANCHOR + (TEXT_ANCHOR if separate_text_blocks else TEXT_ANCHOR[:1])
        for name in registered:
            if name in blocks:
                self.add_module(name, blocks[name])
                if self.gates:
                    self.add_module(f"{name}_gate", gate_modules[name])
        for modality in reduce:
            self.add_module(f"features_reduce_{modality}", reduce[modality])
        for modality in heads:
            self.add_module(f"w_{modality}", heads[modality])

    def _build_concat(self, n_head: int, dropout: float) -> None:
        """The concat baseline's modules, built in the anchor model's order (speaker table, block, reduction,
        head); the buffer :data:`CONCAT_MODALITIES` records which streams it reads, for its checkpoints."""
        hidden = self.hidden
        if self.speaker_embedding:
            speaker_embeddings = nn.Embedding(self.n_speaker + 1, hidden, padding_idx=self._padding_row)
            nn.init.normal_(speaker_embeddings.weight, mean=0.0, std=0.1)
            self.speaker_embeddings = speaker_embeddings
        self.concat = TransformerBlock(hidden, n_head, dropout, paper_attention=self.paper_attention)
        self.concat_reduce = nn.Linear(len(self.modalities) * hidden, hidden)
        self.w_concat = nn.Linear(hidden, self.n_classes)
        self.register_buffer(CONCAT_MODALITIES, torch.tensor([m in self.modalities for m in MODALITIES]))

    def clip_order(self) -> list[nn.Parameter]:
        """The parameters in the order the authors' model registers them (speaker table, the nine blocks and
        their gates in `BUILD_ORDER`, reductions, heads), which is the order in which gradient clipping sums
        the squared norms: the clipped update is theirs to the last bit (docs/METHOD.md §5)."""
        rank = {name: i for i, name in enumerate(AUTHORS_MODULE_ORDER)}
        named = sorted(self.named_parameters(), key=lambda item: rank.get(item[0].split(".")[0], len(rank)))
        return [parameter for _, parameter in named]

    @property
    def padding_speaker(self) -> int:
        """The speaker id of padded positions: the padding row (0 without a speaker table)."""
        return self._padding_row if self._padding_row is not None else 0

    @property
    def predictor(self) -> str:
        """Whose logits are ``t_logits``: ``"T"``, ``"A"`` or ``"V"`` (the predicting anchor), or ``"concat"``."""
        return "concat" if self.fusion == "concat" else self._predictor.upper()

    @property
    def variant(self) -> FusionVariant:
        """The model's variant; ``variant.as_dict()`` gives the constructor's keyword arguments."""
        return FusionVariant(self.modalities, self.gates, self.speaker_embedding, self.fusion)

    def _path(self, name: str, x: torch.Tensor, y: torch.Tensor, layout: Layout, spk: torch.Tensor | None,
              cross: bool, x_raw: bool = True, probe: Inspection | None = None) -> torch.Tensor:
        path = name  # inspection keys by the path (a_t, v_t), also when the text anchor shares t_t
        # Reference behaviour: all text-anchor paths use the t_t block and gate.
        if name in TEXT_ANCHOR and not self.separate_text_blocks:
            name = "t_t"
        if probe is None:
            out = getattr(self, name)(x, y, layout, spk, cross=cross, x_raw=x_raw)
            return getattr(self, f"{name}_gate")(out) if self.gates else out  # gates=False: g(x) = x
        out, weights = getattr(self, name)(x, y, layout, spk, cross=cross, x_raw=x_raw, need_weights=True)
        probe.attention[path] = weights.mean(1)  # over the heads: (batch, query, key)
        if not self.gates:
            return out
        activation = getattr(self, f"{name}_gate").activation(out)
        probe.gates[path] = activation.mean(-1)
        return activation * out

    def _anchor(self, modality: str, names: Sequence[str], sources: Mapping[str, torch.Tensor],
                query: torch.Tensor, layout: Layout, spk: torch.Tensor | None,
                probe: Inspection | None = None) -> torch.Tensor:
        """One anchor: the paths ``names`` whose key/value stream is present, concatenated and reduced."""
        names = [name for name in names if name[0] in self._present]
        # The text anchor's keys A', V' are fused streams, the others input streams (`TransformerBlock`, x_raw).
        paths = [self._path(name, sources[name[0]], query, layout, spk, cross=name[0] != modality,
                            x_raw=modality != "t" or name[0] == "t", probe=probe)
                 for name in names]
        if len(paths) == 1:
            if probe is not None:
                probe.shares[names[0]] = paths[0].new_ones(paths[0].shape[:-1])
            return paths[0]
        reduce = getattr(self, f"features_reduce_{modality}")
        if probe is not None:
            probe.shares.update(path_shares(reduce, names, paths))
        return reduce(torch.cat(paths, dim=-1))

    def forward(self, text: torch.Tensor | None, audio: torch.Tensor | None, video: torch.Tensor | None,
                speakers: torch.Tensor | None, mask: torch.Tensor, index: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, inspect: bool = False
                ) -> FusionOutput | tuple[FusionOutput, Inspection]:
        """``mask`` (batch, length) True = real utterance. With ``index``/``positions`` (see
        :class:`Layout`) the streams are packed rows (N, hidden) and ``speakers`` (N,), and so are the
        outputs; without, they are padded (batch, length, hidden) / (batch, length), padded speakers
        = :attr:`padding_speaker`. The streams of absent modalities (and ``speakers`` without speaker
        embedding) are never read. ``inspect`` (evaluation only): also return an :class:`Inspection`
        of the gates, the anchors' shares and the attention; the outputs are the same, bit for bit."""
        if inspect and self.training:
            raise ValueError("inspect=True is for evaluation: call model.eval() first")
        probe = Inspection() if inspect else None
        layout = Layout(mask, index, positions)
        spk = self.speaker_embeddings(speakers) if self.speaker_embedding else None
        raw = {modality: stream for modality, stream in zip("tav", (text, audio, video)) if modality in self._present}
        if self.fusion == "concat":
            fused = self.concat_reduce(torch.cat([raw[m] for m in "tav" if m in raw], dim=-1))
            feat = self.concat(fused, fused, layout, spk, cross=False, need_weights=inspect)
            if probe is not None:
                feat, weights = feat
                probe.attention["concat"] = weights.mean(1)
            output = FusionOutput(self.w_concat(feat), None, None, feat, None, None)
            return output if probe is None else (output, probe)

        feats = {}
        if "a" in raw:
            feats["a"] = self._anchor("a", AUDIO_ANCHOR, raw, raw["a"], layout, spk, probe)
        if "v" in raw:
            feats["v"] = self._anchor("v", VIDEO_ANCHOR, raw, raw["v"], layout, spk, probe)
        if "t" in raw:
            # The text anchor attends to the fused A' and V', not to the raw streams.
            feats["t"] = self._anchor("t", TEXT_ANCHOR, {"t": raw["t"], **feats}, raw["t"], layout, spk, probe)
        logits = {m: getattr(self, f"w_{m}")(feats[m]) for m in "tav" if m in feats}
        pred = self._predictor

        def other(modality: str, values: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
            return values[modality] if modality in values and modality != pred else None

        output = FusionOutput(logits[pred], other("a", logits), other("v", logits),
                              feats[pred], other("a", feats), other("v", feats))
        return output if probe is None else (output, probe)


def path_shares(reduce: nn.Linear, names: Sequence[str], paths: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each path's share of an anchor's reduction ``R_y([p_1; ...; p_k]) = sum_j W_j p_j + b``, per utterance:
    ``|W_j p_j| / sum_i |W_i p_i|`` (Euclidean norms; ``W_j`` the columns of ``R_y`` that read path ``j``).
    docs/METHOD.md §5, "Inspection"."""
    hidden = paths[0].shape[-1]
    norms = [torch.linalg.vector_norm(path @ reduce.weight[:, j * hidden:(j + 1) * hidden].T, dim=-1)
             for j, path in enumerate(paths)]
    total = torch.stack(norms).sum(0).clamp_min(torch.finfo(norms[0].dtype).tiny)
    return {name: norm / total for name, norm in zip(names, norms)}
