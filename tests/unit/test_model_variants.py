"""Ablation variants of the fusion model (docs/METHOD.md §5, "Ablation variants"): the default is
today's model bit for bit; every modality subset, gates off, no speaker embedding and the concat
baseline build, train and round-trip through their checkpoints in both layouts."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from magtkd.checkpoints import (FusionCheckpointError, load_fusion_checkpoint, read_fusion_state,
                                settings_from_checkpoint, variant_from_checkpoint)
from magtkd.fusion_blocks import Gate, TransformerBlock
from magtkd.model import AnchorGatedTransformer, AUDIO_ANCHOR, FusionOutput, TEXT_ANCHOR, VIDEO_ANCHOR
from magtkd.packing import Layout

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost (conftest.py)

H, C, N_SPK, N_HEAD = 16, 5, 3, 2

LENGTHS = [3, 5, 1, 4]

SUBSETS = [tuple(s) for r in (1, 2, 3) for s in itertools.combinations("TAV", r)]


class FrozenAnchorGatedTransformer(nn.Module):
    """A copy of AnchorGatedTransformer as it was before the variants (its building blocks are shared)."""

    def __init__(self, hidden, n_classes, n_speaker, n_head=8, dropout=0.5, separate_text_blocks=False):
        super().__init__()
        self.hidden, self.n_classes, self.n_speaker = hidden, n_classes, n_speaker
        self.separate_text_blocks = separate_text_blocks
        speaker_embeddings = nn.Embedding(n_speaker + 1, hidden, padding_idx=n_speaker)
        nn.init.normal_(speaker_embeddings.weight, mean=0.0, std=0.1)
        blocks = {name: TransformerBlock(hidden, n_head, dropout) for name in TEXT_ANCHOR + AUDIO_ANCHOR + VIDEO_ANCHOR}
        gates = {name: Gate(hidden) for name in TEXT_ANCHOR + AUDIO_ANCHOR + VIDEO_ANCHOR}
        reduce = {modality: nn.Linear(3 * hidden, hidden) for modality in ("t", "a", "v")}
        nn.Linear(3 * hidden, hidden)
        heads = {modality: nn.Linear(hidden, n_classes) for modality in ("t", "a", "v")}
        self.speaker_embeddings = speaker_embeddings
        names = AUDIO_ANCHOR + VIDEO_ANCHOR + (TEXT_ANCHOR if separate_text_blocks else TEXT_ANCHOR[:1])
        for name in names:
            self.add_module(name, blocks[name])
            self.add_module(f"{name}_gate", gates[name])
        for modality in ("t", "a", "v"):
            self.add_module(f"features_reduce_{modality}", reduce[modality])
        for modality in ("t", "a", "v"):
            self.add_module(f"w_{modality}", heads[modality])

    def _path(self, name, x, y, layout, spk, cross, x_raw=True):
        if name in TEXT_ANCHOR and not self.separate_text_blocks:
            name = "t_t"
        block, gate = getattr(self, name), getattr(self, f"{name}_gate")
        return gate(block(x, y, layout, spk, cross=cross, x_raw=x_raw))

    def forward(self, text, audio, video, speakers, mask, index=None, positions=None):
        layout = Layout(mask, index, positions)
        spk = self.speaker_embeddings(speakers)
        a_a = self._path("a_a", audio, audio, layout, spk, cross=False)
        t_a = self._path("t_a", text, audio, layout, spk, cross=True)
        v_a = self._path("v_a", video, audio, layout, spk, cross=True)
        a_feat = self.features_reduce_a(torch.cat([a_a, t_a, v_a], dim=-1))
        v_v = self._path("v_v", video, video, layout, spk, cross=False)
        t_v = self._path("t_v", text, video, layout, spk, cross=True)
        a_v = self._path("a_v", audio, video, layout, spk, cross=True)
        v_feat = self.features_reduce_v(torch.cat([v_v, t_v, a_v], dim=-1))
        t_t = self._path("t_t", text, text, layout, spk, cross=False)
        # A' and V' are fused streams: their dropout masks are drawn batch-first (docs/METHOD.md §5, the
        # authors' run draw for draw; the input streams' sequence-first draws are the shared blocks' own)
        a_t = self._path("a_t", a_feat, text, layout, spk, cross=True, x_raw=False)
        v_t = self._path("v_t", v_feat, text, layout, spk, cross=True, x_raw=False)
        t_feat = self.features_reduce_t(torch.cat([t_t, a_t, v_t], dim=-1))
        return FusionOutput(self.w_t(t_feat), self.w_a(a_feat), self.w_v(v_feat), t_feat, a_feat, v_feat)


def batches(lengths=LENGTHS, seed=0, n_speaker=N_SPK):
    """The same random dialogues in both layouts: ``{"padded": kwargs, "packed": kwargs}`` for ``model(**kwargs)``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    streams = {name: torch.randn(*mask.shape, H, generator=g) * mask[..., None] for name in ("text", "audio", "video")}
    speakers = torch.randint(0, n_speaker, mask.shape, generator=g).masked_fill(~mask, n_speaker)
    padded = {**streams, "speakers": speakers, "mask": mask}
    packed = {**{k: v[mask] for k, v in streams.items()}, "speakers": speakers[mask], "mask": mask,
              "index": mask.flatten().nonzero().squeeze(1), "positions": torch.cat([torch.arange(n) for n in lengths])}
    return {"padded": padded, "packed": packed}


def rows(out: torch.Tensor | None, kwargs) -> torch.Tensor | None:
    """The real utterances' rows of an output, whichever the layout."""
    if out is None or "index" in kwargs:
        return out
    return out[kwargs["mask"]]


def run(model, kwargs, seed=5):
    torch.manual_seed(seed)  # the dropout draws
    return model(**kwargs)


def same(a: FusionOutput, b: FusionOutput) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


def build(seed=2024, **kwargs) -> AnchorGatedTransformer:
    torch.manual_seed(seed)
    return AnchorGatedTransformer(H, C, kwargs.pop("n_speaker", N_SPK), N_HEAD, 0.1, kwargs.pop("separate", False),
                                  **kwargs)


def top_level(model: nn.Module) -> set[str]:
    return {k.split(".")[0] for k in model.state_dict()}


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_default_is_the_model_before_the_variants(separate, layout):
    """Same parameter names in the same order, same initial weights, the generator left in the same
    place, and the same outputs and gradients of a training step (dropout on) at the same seed."""
    torch.manual_seed(11)
    frozen = FrozenAnchorGatedTransformer(H, C, N_SPK, N_HEAD, 0.1, separate)
    after_frozen = torch.rand(4)
    torch.manual_seed(11)
    ours = AnchorGatedTransformer(H, C, N_SPK, N_HEAD, 0.1, separate)
    assert torch.equal(after_frozen, torch.rand(4))
    assert list(ours.state_dict()) == list(frozen.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), frozen.state_dict().values()):
        assert torch.equal(a, b), name
    assert ours.variant.as_dict() == {"modalities": ["T", "A", "V"], "gates": True, "speaker_embedding": True,
                            "fusion": "anchor"} and ours.predictor == "T"
    kwargs = batches()[layout]
    for mode in (True, False):
        ours.train(mode), frozen.train(mode)
        a, b = run(ours, kwargs), run(frozen, kwargs)
        assert same(a, b)
    ours.train(), frozen.train()
    run(ours, kwargs).t_logits.square().sum().backward()
    run(frozen, kwargs).t_logits.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), frozen.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name


EXPECTED = {  # top-level modules of each subset (with gates and speaker embedding)
    ("T",): {"t_t", "t_t_gate", "w_t"},
    ("A",): {"a_a", "a_a_gate", "w_a"},
    ("V",): {"v_v", "v_v_gate", "w_v"},
    ("T", "A"): {"a_a", "t_a", "t_t", "a_a_gate", "t_a_gate", "t_t_gate", "features_reduce_t", "features_reduce_a",
                 "w_t", "w_a"},
    ("T", "V"): {"v_v", "t_v", "t_t", "v_v_gate", "t_v_gate", "t_t_gate", "features_reduce_t", "features_reduce_v",
                 "w_t", "w_v"},
    ("A", "V"): {"a_a", "v_a", "v_v", "a_v", "a_a_gate", "v_a_gate", "v_v_gate", "a_v_gate", "features_reduce_a",
                 "features_reduce_v", "w_a", "w_v"},
    ("T", "A", "V"): {"a_a", "t_a", "v_a", "v_v", "t_v", "a_v", "t_t", *(f"{b}_gate" for b in
                      ("a_a", "t_a", "v_a", "v_v", "t_v", "a_v", "t_t")), "features_reduce_t", "features_reduce_a",
                      "features_reduce_v", "w_t", "w_a", "w_v"},
}

PREDICTOR = {("T",): "T", ("A",): "A", ("V",): "V", ("T", "A"): "T", ("T", "V"): "T", ("A", "V"): "A",
             ("T", "A", "V"): "T"}

NAMES = {"T": "text", "A": "audio", "V": "video"}


def absent(kwargs, modalities, value):
    """``kwargs`` with the streams of the modalities not in ``modalities`` replaced by ``value(like)``."""
    return {k: (value(v) if k in [NAMES[m] for m in "TAV" if m not in modalities] else v) for k, v in kwargs.items()}


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("modalities", SUBSETS, ids="".join)
def test_modality_subset(modalities, layout):
    model = build(modalities=modalities).train()
    assert top_level(model) == EXPECTED[modalities] | {"speaker_embeddings"}
    assert model.variant.modalities == tuple(modalities) and model.predictor == PREDICTOR[modalities]
    if len(modalities) > 1:
        assert model.state_dict()[f"features_reduce_{modalities[0].lower()}.weight"].shape == (H, len(modalities) * H)
    kwargs = batches()[layout]
    out = run(model, kwargs)
    n = int(kwargs["mask"].sum())
    assert rows(out.t_logits, kwargs).shape == (n, C) and rows(out.t_feat, kwargs).shape == (n, H)
    # a_* / v_*: the anchors distilled towards the prediction; None when absent or predicting.
    for m, logits, feat in (("A", out.a_logits, out.a_feat), ("V", out.v_logits, out.v_feat)):
        distilled = m in modalities and m != model.predictor
        assert (logits is not None) == distilled and (feat is not None) == distilled, m
        if distilled:
            assert rows(logits, kwargs).shape == (n, C)
    head = getattr(model, f"w_{model.predictor.lower()}")
    assert torch.equal(out.t_logits, head(out.t_feat))
    # forward + backward: every parameter but the first layer's unused query layer norm gets a gradient
    loss = sum(rows(x, kwargs).square().mean() for x in out if x is not None)
    loss.backward()
    for name, p in model.named_parameters():
        if ".transformer_inter.0.layer_norm." not in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Absent modalities are never read: NaN, noise or None there change nothing, dropout draws included.
    for value in (lambda x: torch.full_like(x, float("nan")), lambda x: torch.randn_like(x) * 1e3, lambda x: None):
        assert same(run(model, absent(kwargs, modalities, value)), out)
    with torch.no_grad():
        model.eval()
        other = "padded" if layout == "packed" else "packed"
        a, b = model(**kwargs), model(**batches()[other])
        assert torch.allclose(rows(a.t_logits, kwargs), rows(b.t_logits, batches()[other]), atol=1e-5)


def test_without_text_the_audio_anchor_predicts_and_video_is_distilled():
    model = build(modalities="AV").eval()
    kwargs = batches()["packed"]
    out = model(**kwargs)
    assert out.a_logits is None and out.a_feat is None
    assert torch.equal(out.t_logits, model.w_a(out.t_feat)) and torch.equal(out.v_logits, model.w_v(out.v_feat))


def test_modalities_are_checked():
    for bad in ([], ["X"], ["T", "T"], "TAVX"):
        with pytest.raises(ValueError, match="modalities"):
            build(modalities=bad)
    with pytest.raises(ValueError, match="fusion"):
        build(fusion="sum")
    assert build(modalities=["v", "t"]).variant.modalities == ("T", "V")


@pytest.mark.parametrize("modalities", [("T", "A", "V"), ("T",), ("A", "V")], ids="".join)
def test_without_gates(modalities):
    model = build(modalities=modalities, gates=False)
    assert top_level(model) == {n for n in EXPECTED[modalities] if not n.endswith("_gate")} | {"speaker_embeddings"}
    assert model.variant.gates is False
    for layout, kwargs in batches().items():
        run(model.train(), kwargs).t_logits.sum().backward()
    # g(x) = x: a single modality is its self block and its head, nothing in between.
    if modalities == ("T",):
        kwargs = batches()["padded"]
        model.eval()
        with torch.no_grad():
            out = model(**kwargs)
            spk = model.speaker_embeddings(kwargs["speakers"])
            direct = model.t_t(kwargs["text"], kwargs["text"], Layout(kwargs["mask"]), spk, cross=False)
        assert torch.equal(out.t_feat, direct) and torch.equal(out.t_logits, model.w_t(direct))


def test_gates_off_keeps_the_blocks_draws():
    """The blocks are drawn before the gates: gates=False starts from the default model's blocks."""
    default, ungated = build(), build(gates=False)
    for name, value in ungated.state_dict().items():
        if not name.startswith(("features_reduce", "w_")):
            assert torch.equal(value, default.state_dict()[name]), name


@pytest.mark.parametrize("modalities", [("T", "A", "V"), ("V",)], ids="".join)
def test_without_speaker_embedding(modalities):
    model = build(modalities=modalities, speaker_embedding=False, n_speaker=None)
    assert "speaker_embeddings" not in top_level(model) and not hasattr(model, "speaker_embeddings")
    assert model.variant.speaker_embedding is False and model.padding_speaker == 0
    for layout, kwargs in batches().items():
        out = run(model.train(), kwargs)
        # speakers are not read: other ids, or none at all, change nothing
        assert same(run(model, {**kwargs, "speakers": None}), out)
        out.t_logits.sum().backward()
    with pytest.raises(ValueError, match="n_speaker"):
        build(n_speaker=None)


@pytest.mark.parametrize("speaker_embedding", [True, False])
@pytest.mark.parametrize("modalities", [("T", "A", "V"), ("T", "A"), ("V",)], ids="".join)
def test_concat_baseline(modalities, speaker_embedding):
    model = build(modalities=modalities, fusion="concat", speaker_embedding=speaker_embedding)
    expected = {"concat", "concat_reduce", "w_concat", "concat_modalities"}
    assert top_level(model) == expected | ({"speaker_embeddings"} if speaker_embedding else set())
    assert model.concat_reduce.in_features == len(modalities) * H and model.predictor == "concat"
    assert model.variant.as_dict() == {"modalities": list(modalities), "gates": False, "speaker_embedding": speaker_embedding,
                             "fusion": "concat"}
    outputs = {}
    for layout, kwargs in batches().items():
        out = run(model.train(), kwargs)
        assert out.a_logits is None and out.v_logits is None and out.a_feat is None and out.v_feat is None
        assert torch.equal(out.t_logits, model.w_concat(out.t_feat))
        assert same(run(model, absent(kwargs, modalities, lambda x: torch.full_like(x, float("nan")))), out)
        out.t_logits.sum().backward()
        with torch.no_grad():
            outputs[layout] = rows(model.eval()(**kwargs).t_logits, kwargs)
    assert torch.allclose(outputs["packed"], outputs["padded"], atol=1e-5)
    with pytest.raises(ValueError, match="separate_text_blocks"):
        build(fusion="concat", separate=True)


VARIANTS = [
    {}, {"separate": True}, *({"modalities": s} for s in SUBSETS[:-1]), {"modalities": "TV", "separate": True},
    {"gates": False}, {"modalities": "A", "gates": False}, {"speaker_embedding": False, "n_speaker": None},
    {"modalities": "TA", "speaker_embedding": False, "gates": False, "n_speaker": None},
    {"fusion": "concat"}, {"fusion": "concat", "modalities": "AV", "speaker_embedding": False, "n_speaker": None},
]


def variant_id(kwargs) -> str:
    return "-".join(f"{k}={''.join(v) if isinstance(v, (tuple, str)) else v}" for k, v in kwargs.items()) or "default"


@pytest.mark.parametrize("kwargs", VARIANTS, ids=variant_id)
def test_checkpoint_round_trip(kwargs, tmp_path):
    trained = build(seed=1, **dict(kwargs)).eval()
    path = tmp_path / "multimodal_fusion_best.bin"
    torch.save(trained.state_dict(), path)
    settings = settings_from_checkpoint(read_fusion_state(path))
    assert settings.variant == trained.variant == variant_from_checkpoint(trained.state_dict())
    assert (settings.hidden, settings.n_classes, settings.n_speaker) == (H, C, trained.n_speaker)
    assert settings.separate_text_blocks == bool(kwargs.get("separate") and trained.modalities[0] == "T"
                                                 and len(trained.modalities) > 1)
    assert settings.n_head is None  # no shape shows the heads: they come from the metrics document
    rebuilt = dataclasses.replace(settings, n_head=N_HEAD).build(0.0)
    load_fusion_checkpoint(rebuilt, path).eval()
    for batch in batches(seed=3).values():
        with torch.no_grad():
            assert same(rebuilt(**batch), trained(**batch))


def test_authors_layout_is_the_default_variant():
    """The authors' checkpoint layout (a_t/v_t blocks and the top-level fc): the default variant, sizes unchanged."""
    state = dict(build(separate=True).state_dict())
    state.update({"fc.weight": torch.zeros(H, 3 * H), "fc.bias": torch.zeros(H)})
    settings = settings_from_checkpoint(state)
    assert (settings.n_speaker, settings.hidden, settings.n_classes, settings.separate_text_blocks) == \
        (N_SPK, H, C, False)
    assert variant_from_checkpoint(state) == build().variant


def test_checkpoint_of_another_variant_names_both(tmp_path):
    path = tmp_path / "text_only.bin"
    torch.save(build(modalities="T").state_dict(), path)
    with pytest.raises(FusionCheckpointError) as err:
        load_fusion_checkpoint(build(), path)
    message = str(err.value)
    assert str(path) in message and "anchor T, gates" in message and "anchor T+A+V, gates" in message
    assert "modalities=['T']" in message  # what to build instead
    for saved, into in (({"fusion": "concat", "modalities": "TA"}, {"fusion": "concat", "modalities": "TV"}),
                        ({"gates": False}, {}), ({}, {"speaker_embedding": False, "n_speaker": None}),
                        ({"fusion": "concat"}, {})):
        torch.save(build(**saved).state_dict(), path)
        with pytest.raises(FusionCheckpointError, match="is the variant .* but the model is the variant"):
            load_fusion_checkpoint(build(**into), path)


def test_not_a_fusion_checkpoint():
    with pytest.raises(FusionCheckpointError, match="not a multimodal fusion checkpoint"):
        settings_from_checkpoint({"encoder.weight": torch.zeros(2, 2)})
    state = dict(build(modalities="A").state_dict())
    del state["w_a.weight"]
    with pytest.raises(FusionCheckpointError, match="no 'w_a.weight'"):
        settings_from_checkpoint(state)
