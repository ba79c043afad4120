"""The fusion model's settings, normalised once (docs/METHOD.md §5): what its flags ask for
(`FusionRequest`), what a model is or was trained as (`FusionSettings`: sizes, heads, variant and the
feature keys it reads), and the one rule that reconciles the two.

Training turns a request into settings with the features' width (`FusionRequest.for_training`).
Evaluation (``multimodal_fusion.py --train False``, ``predict.py``, the ablation tables) reads a trained
model's settings from its checkpoint and metrics document (`magtkd.checkpoints.trained_fusion`) and
lets the request fill only what they do not say: a flag that contradicts them is an error naming both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

from .model import AUTHORS_PADDING_ROW, AnchorGatedTransformer, FusionVariant
from .utils import UserError

log = logging.getLogger("magtkd")

DEFAULT_N_HEAD = 8  # the authors' heads; --n_head when a model's record does not say
VARIANT_FLAGS = ("modalities", "gates", "speaker_embedding", "fusion")
PADDING_SPEAKERS = ("own", "authors")  # --padding_speaker: row n_speaker, or the authors' row 2


def attention_name(paper_attention: bool) -> str:
    """The attention in words, for logs and records (docs/METHOD.md §5, §7)."""
    return ("the May-2025 release's (real keys filled with -1e9, ReLU, softmax: the published figures)"
            if paper_attention else "the fixed one of the Nov-2025 release (padded keys masked)")


def log_attention(settings: "FusionSettings", source: str) -> None:
    """Log which attention and padding row a fusion model computes (``source``: where that was decided) and
    the flag that chooses the other attention."""
    log.info("fusion attention: %s, %s (--paper_attention %s; --paper_attention %s for the other); padded "
             "with %s", attention_name(bool(settings.paper_attention)), source, bool(settings.paper_attention),
             not settings.paper_attention, "the authors' speaker row 2" if settings.padding_speaker == "authors"
             else "its own speaker row")


@dataclass(frozen=True)
class FusionSettings:
    """Everything that rebuilds a fusion model. ``n_head`` and the feature keys show in no tensor: a
    checkpoint without a metrics document (the authors') leaves them None until a request fills them."""

    hidden: int
    n_classes: int
    n_speaker: int | None  # speaker-embedding rows without padding; None: no speaker embedding
    separate_text_blocks: bool
    variant: FusionVariant
    n_head: int | None = DEFAULT_N_HEAD
    audio_feature: str | None = None  # the feature key feeding the audio stream A
    video_feature: str | None = None
    paper_attention: bool | None = False  # the May-2025 release's attention (docs/METHOD.md §5); None: unknown
    padding_speaker: str | None = "own"  # `PADDING_SPEAKERS`; None: unknown

    @property
    def padding_row(self) -> int:
        """The speaker row of padded positions: ours (``n_speaker``) or the authors' (docs/METHOD.md §7)."""
        return AUTHORS_PADDING_ROW if self.padding_speaker == "authors" else int(self.n_speaker or 0)

    def build(self, dropout: float) -> AnchorGatedTransformer:
        """The model (fresh weights, drawn in the authors' order)."""
        return AnchorGatedTransformer(self.hidden, self.n_classes, self.n_speaker, self.n_head, dropout,
                                      self.separate_text_blocks, **self.variant.as_dict(),
                                      paper_attention=bool(self.paper_attention),
                                      padding_row=self.padding_row if self.n_speaker is not None else None)

    def flags(self) -> dict[str, Any]:
        """The settings as the flags that give them, for the metrics document's ``args``."""
        return {**self.variant.as_dict(), "n_head": self.n_head, "audio_feature": self.audio_feature,
                "video_feature": self.video_feature, "separate_text_blocks": self.separate_text_blocks,
                "paper_attention": self.paper_attention, "padding_speaker": self.padding_speaker}


def fusion_width(hidden_dim: int | None, n_head: int, width: int, source: str) -> int:
    """The features' width, checked against ``--hidden_dim`` and ``--n_head``; errors name ``source``."""
    if hidden_dim is not None and hidden_dim != width:
        raise UserError(f"--hidden_dim {hidden_dim} does not match the width {width} of {source}")
    if width % n_head:
        raise UserError(f"--n_head {n_head} does not divide the feature width {width} ({source})")
    return width


@dataclass(frozen=True)
class FusionRequest:
    """The fusion flags as given; None: not given (training takes the paper's model and the dataset's
    defaults, evaluation what the model was trained with). ``default_features``: the dataset's (audio,
    video) feature keys, for training and for a trained model whose record does not name them."""

    default_features: tuple[str, str]
    modalities: Sequence[str] | None = None
    gates: bool | None = None
    speaker_embedding: bool | None = None
    fusion: str | None = None
    separate_text_blocks: bool | None = None
    n_head: int | None = None
    audio_feature: str | None = None
    video_feature: str | None = None
    hidden_dim: int | None = None
    n_speaker: int | None = None
    paper_attention: bool | None = None
    padding_speaker: str | None = None
    packed: bool | None = None  # --packed: the layout, which the May-2025 attention restricts

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], default_features: tuple[str, str]) -> "FusionRequest":
        """The request a script's parsed flags (``vars(args)``) make; flags a script does not have are None."""
        names = [f.name for f in fields(cls) if f.name != "default_features"]
        return cls(default_features, **{name: flags.get(name) for name in names})

    @property
    def features(self) -> tuple[str, str]:
        """The (audio, video) feature keys to read when training."""
        return (self.audio_feature or self.default_features[0], self.video_feature or self.default_features[1])

    def variant(self) -> FusionVariant:
        """The variant to train: the flags given over the paper's model."""
        given = self._given_variant()
        variant = FusionVariant(**given)
        if variant.fusion == "concat" and self.separate_text_blocks:
            raise UserError("--separate_text_blocks applies to the anchor fusion only, not to --fusion concat")
        if variant.fusion == "concat" and given.get("gates"):
            log.info("--fusion concat has no gates: --gates True does not apply")
        return variant

    def _given_variant(self) -> dict[str, Any]:
        given = {key: getattr(self, key) for key in VARIANT_FLAGS if getattr(self, key) is not None}
        if "modalities" in given:
            modalities = [str(m).upper() for m in given["modalities"]]
            if len(set(modalities)) != len(modalities):
                raise UserError(f"--modalities {' '.join(modalities)}: a modality is listed twice")
            given["modalities"] = tuple(m for m in "TAV" if m in modalities)
        return given

    def for_training(self, width: int, n_classes: int, n_speaker: int, source: str) -> FusionSettings:
        """The settings of a model trained on features of ``width`` (read from ``source``): ``n_speaker``
        rows unless ``--n_speaker`` says otherwise."""
        n_head = self.n_head or DEFAULT_N_HEAD
        return self._checked(FusionSettings(
            hidden=fusion_width(self.hidden_dim, n_head, width, source), n_classes=n_classes,
            n_speaker=self.n_speaker if self.n_speaker is not None else n_speaker,
            separate_text_blocks=bool(self.separate_text_blocks), variant=self.variant(), n_head=n_head,
            audio_feature=self.features[0], video_feature=self.features[1],
            paper_attention=bool(self.paper_attention), padding_speaker=self.padding_speaker or "own"))

    def _checked(self, settings: FusionSettings) -> FusionSettings:
        """``settings``, refused where the flags cannot build or run them: the May-2025 attention attends to
        padded keys, which a packed batch does not have; the authors' padding row 2 must exist."""
        if settings.paper_attention and self.packed:
            raise UserError("--packed True computes no padded keys, and the May-2025 attention (--paper_attention "
                            "True) attends to them: leave --packed out (the padded grid)")
        if settings.padding_speaker == "authors" and settings.n_speaker is not None \
                and settings.n_speaker < AUTHORS_PADDING_ROW:
            raise UserError(f"--padding_speaker authors pads with speaker row {AUTHORS_PADDING_ROW}, but the model has "
                            f"{settings.n_speaker} speaker rows (+ padding)")
        return settings

    def against(self, trained: FusionSettings, source: str) -> FusionSettings:
        """``trained`` (read from ``source``, a checkpoint and its record) completed by this request: what
        the record does not say comes from the flags, then the defaults; a given flag that contradicts what
        ``source`` says is a UserError naming both."""
        differ = self._contradictions(trained, source)
        if differ:
            raise UserError("; ".join(differ) + " (leave the flag out to use what the model was trained with)")
        settled = replace(trained, n_head=trained.n_head or self.n_head or DEFAULT_N_HEAD,
                          audio_feature=trained.audio_feature or self.audio_feature or self.default_features[0],
                          video_feature=trained.video_feature or self.video_feature or self.default_features[1],
                          paper_attention=_first_known(trained.paper_attention, self.paper_attention, False),
                          # A checkpoint without a record is the authors': it was trained padding with their row
                          padding_speaker=_first_known(trained.padding_speaker, self.padding_speaker, "authors"))
        fusion_width(self.hidden_dim, settled.n_head, settled.hidden, source)
        return self._checked(settled)

    def _contradictions(self, trained: FusionSettings, source: str) -> list[str]:
        known = trained.variant.as_dict()
        checks = [(key, list(value) if key == "modalities" else value, known[key])
                  for key, value in self._given_variant().items()
                  if not (key == "gates" and trained.variant.fusion == "concat")]  # concat has no gates
        checks += [(key, getattr(self, key), getattr(trained, key))
                   for key in ("n_head", "audio_feature", "video_feature", "separate_text_blocks", "n_speaker",
                               "paper_attention", "padding_speaker")]
        return [f"--{key} {_flag_text(asked)} but {source} was trained with --{key} {_flag_text(value)}"
                for key, asked, value in checks if asked is not None and value is not None and asked != value]


def _first_known(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _flag_text(value: Any) -> str:
    return " ".join(value) if isinstance(value, (list, tuple)) else str(value)
