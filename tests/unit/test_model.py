"""The multi-modal anchor gated transformer (`magtkd.model`; docs/METHOD.md §5): the reference's
parameters, padding and speakers, and the initialisation draw for draw."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import C, H, N_SPK, dialogue_t_logits, random_dialogues, reference_state
from magtkd.model import AnchorGatedTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost (conftest.py)


def test_parameter_names_match_reference_list():
    reference = {k for k in reference_state() if not k.startswith(("fc.", "a_t.", "v_t.", "a_t_gate.", "v_t_gate."))}
    assert set(AnchorGatedTransformer(H, C, N_SPK, n_head=2).state_dict()) == reference
    full = set(reference_state()) - {"fc.weight", "fc.bias"}
    assert set(AnchorGatedTransformer(H, C, N_SPK, n_head=2, separate_text_blocks=True).state_dict()) == full


@pytest.mark.parametrize("packed", [True, False])
def test_padding_does_not_change_real_utterances(packed):
    torch.manual_seed(0)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2).eval()
    data = random_dialogues([3, 5, 2, 40, 17], N_SPK)
    alone, _ = dialogue_t_logits(model, data, [0, 1], packed)
    padded, batch = dialogue_t_logits(model, data, [0, 1, 2, 3, 4], packed)  # dialogue 3 pads the others to 40
    assert batch.mask.shape == (5, 40) and int(batch.mask.sum()) == 67 and len(batch) == 67
    for a, b in zip(alone, padded[:2]):
        assert torch.allclose(a, b, atol=1e-5)
    single, _ = dialogue_t_logits(model, data, [2], packed)
    assert torch.allclose(single[0], padded[2], atol=1e-5)


def test_meld_padding_row_is_not_a_real_speaker():
    torch.manual_seed(0)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2).eval()
    assert model.padding_speaker == N_SPK and model.speaker_embeddings.num_embeddings == N_SPK + 1
    data = random_dialogues([4, 9], N_SPK)
    data.speakers[0] = torch.tensor([2, 2, 5, 2])  # speaker 2 (Joey's row in the reference's numbering)
    before, batch = dialogue_t_logits(model, data, [0, 1], packed=False)
    assert batch.speakers[0, 4:].tolist() == [N_SPK] * 5  # padding uses the extra row
    with torch.no_grad():
        model.speaker_embeddings.weight[N_SPK] += 10.0  # the padding row must not matter
    after_pad, _ = dialogue_t_logits(model, data, [0, 1], packed=False)
    assert torch.allclose(before[0], after_pad[0], atol=1e-5)
    with torch.no_grad():
        model.speaker_embeddings.weight[2] += 10.0  # a real speaker's row must matter
    after_real, _ = dialogue_t_logits(model, data, [0, 1], packed=False)
    assert not torch.allclose(before[0], after_real[0], atol=1e-3)


def test_text_anchor_shares_t_t_by_default():
    model = AnchorGatedTransformer(H, C, 2, n_head=2)
    assert not hasattr(model, "a_t") and not hasattr(model, "v_t_gate")
    separate = AnchorGatedTransformer(H, C, 2, n_head=2, separate_text_blocks=True)
    assert isinstance(separate.a_t, type(separate.t_t))
    assert re.fullmatch(r"\(1, 512, 8\)", str(tuple(model.t_t.pos_emb.pe.shape)))


SQRT5 = 2.23607  # kaiming_uniform_(a=sqrt(5)): PyTorch's default Linear initialisation


def authors_init_calls(hidden: int, n_speaker: int, n_classes: int) -> list[tuple[str, tuple, str, tuple]]:
    """The authors' constructor's initialiser calls, in order, in our own words (docs/METHOD.md §5):
    ``(parameter, shape, initialiser, arguments)``.

    The speaker table (nn.Embedding's default normal, then normal(0, 0.1)); nine blocks t_t a_t v_t a_a t_a
    v_a v_v t_v a_v, each: q/k/v Linears (default init), xavier on the three weights, zero biases, the
    output projection fc (default init), the feed-forward's w_1 and w_2 (default) and layer norms; nine
    gates in the same order; features_reduce_t/a/v; the unused top-level fc; w_t/a/v.
    """
    calls: list[tuple[str, tuple, str, tuple]] = []

    def linear(name: str, fan_out: int, fan_in: int) -> None:
        calls.append((f"{name}.weight", (fan_out, fan_in), "kaiming_uniform_", (SQRT5,)))
        bound = 1 / fan_in ** 0.5
        calls.append((f"{name}.bias", (fan_out,), "uniform_", (-bound, bound)))

    def norm(name: str) -> None:
        calls.append((f"{name}.weight", (hidden,), "ones_", ()))
        calls.append((f"{name}.bias", (hidden,), "zeros_", ()))

    calls.append(("speaker_embeddings.weight", (n_speaker + 1, hidden), "normal_", ()))
    calls.append(("speaker_embeddings.weight", (n_speaker + 1, hidden), "normal_", (0.0, 0.1)))
    order = ("t_t", "a_t", "v_t", "a_a", "t_a", "v_a", "v_v", "t_v", "a_v")
    for block in order:
        layer = f"{block}.transformer_inter.0"
        for proj in ("proj_q", "proj_k", "proj_v"):
            linear(f"{layer}.self_attn.{proj}", hidden, hidden)
        for proj in ("proj_q", "proj_k", "proj_v"):
            calls.append((f"{layer}.self_attn.{proj}.weight", (hidden, hidden), "xavier_uniform_", ()))
        for proj in ("proj_q", "proj_k", "proj_v"):
            calls.append((f"{layer}.self_attn.{proj}.bias", (hidden,), "constant_", (0.0,)))
        linear(f"{layer}.self_attn.fc", hidden, hidden)
        linear(f"{layer}.feed_forward.w_1", hidden, hidden)
        linear(f"{layer}.feed_forward.w_2", hidden, hidden)
        norm(f"{layer}.feed_forward.layer_norm")
        norm(f"{layer}.layer_norm")
    for block in order:
        linear(f"{block}_gate.fc", hidden, hidden)
    for modality in "tav":
        linear(f"features_reduce_{modality}", hidden, 3 * hidden)
    linear("fc", hidden, 3 * hidden)
    for modality in "tav":
        linear(f"w_{modality}", n_classes, hidden)
    return calls


def replay(calls, seed: int) -> dict[str, torch.Tensor]:
    """Run the calls on fresh tensors right after ``torch.manual_seed(seed)``; the values they end with."""
    torch.manual_seed(seed)
    values: dict[str, torch.Tensor] = {}
    for name, shape, init, args in calls:
        t = values.setdefault(name, torch.empty(shape))
        if init == "kaiming_uniform_":
            torch.nn.init.kaiming_uniform_(t, a=5 ** 0.5)
        elif init == "uniform_":
            fan_in = values[name.rsplit(".", 1)[0] + ".weight"].shape[1]
            assert abs(args[1] - 1 / fan_in ** 0.5) < 1e-6
            torch.nn.init.uniform_(t, -1 / fan_in ** 0.5, 1 / fan_in ** 0.5)
        elif init == "normal_":
            torch.nn.init.normal_(t, *args)
        else:
            getattr(torch.nn.init, init)(t, *args)
    return values


@pytest.mark.parametrize("n_speaker, n_classes, separate", [(2, 6, False), (304, 7, False), (2, 6, True)])
def test_initial_weights_are_the_authors_draw_for_draw(n_speaker, n_classes, separate):
    hidden = 16
    expected = replay(authors_init_calls(hidden, n_speaker, n_classes), seed=2024)
    torch.manual_seed(2024)
    ours = AnchorGatedTransformer(hidden, n_classes, n_speaker, n_head=2, separate_text_blocks=separate)
    params = dict(ours.named_parameters())
    unused = ("fc.", "a_t.", "v_t.", "a_t_gate.", "v_t_gate.") if not separate else ("fc.",)
    assert set(params) == {k for k in expected if not k.startswith(unused)}
    for name, value in params.items():
        assert torch.equal(value.detach(), expected[name]), name
    # The random generator is where the authors' constructor leaves it: the next draw agrees too.
    after_ours = torch.rand(3)
    replay(authors_init_calls(hidden, n_speaker, n_classes), seed=2024)
    assert torch.equal(after_ours, torch.rand(3))


def test_initialiser_order_matches_the_recorded_list():
    """Our written-out order against the recorded list of the authors' constructor (when present)."""
    from helpers import REPO

    listing = REPO.parent / "shared" / "reference" / "fusion-init-order.md"
    if not listing.is_file():
        pytest.skip(f"{listing} not present")
    text = listing.read_text(encoding="utf-8")
    meld = text.split("## MELD", 1)[1].split("```")[1]
    pattern = re.compile(r"^\s*(\d+) (\S+) \[([\d, ]+)\] (\w+)\((.*?)\)")
    recorded = []
    for line in meld.splitlines():
        match = pattern.match(line)
        if match:
            shape = tuple(int(x) for x in match.group(3).split(","))
            args = tuple(float(a.split("=")[-1]) for a in match.group(5).split(",") if a.strip())
            recorded.append((match.group(2), shape, match.group(4), args))
    ours = authors_init_calls(768, 304, 7)
    assert len(recorded) == len(ours) == 232
    for (name, shape, init, args), mine in zip(recorded, ours):
        assert (name, shape, init) == mine[:3]
        if init == "normal_" and args:
            assert args == mine[3]
        else:
            assert len(args) == len(mine[3]) and all(abs(a - b) < 1e-5 for a, b in zip(args, mine[3])), name
    # Full size, from the recorded list itself: our model starts from the same weights.
    expected = replay(recorded, seed=7)
    torch.manual_seed(7)
    model = AnchorGatedTransformer(768, 7, 304, n_head=8)
    for name, value in model.named_parameters():
        assert torch.equal(value.detach(), expected[name]), name


# --------------------------------------------------------------------------- inspection (docs/METHOD.md §5)

VARIANTS = [{}, {"separate_text_blocks": True}, {"modalities": ("T", "A")}, {"modalities": ("A", "V")},
            {"gates": False}, {"fusion": "concat"}]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) or "paper")
def test_inspection_leaves_outputs_and_losses_bit_identical(variant, packed):
    from IEMOCAP.multimodal_fusion import objective

    torch.manual_seed(0)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2, **variant).eval()
    data = random_dialogues([3, 5, 2, 7], N_SPK)
    batch = data.collate([0, 1, 2, 3], model.padding_speaker, packed)
    with torch.no_grad():
        plain = model(*batch.inputs)
        inspected, probe = model(*batch.inputs, inspect=True)
    assert type(plain) is type(inspected)
    for a, b in zip(plain, inspected):
        assert (a is None and b is None) or torch.equal(a, b)

    def loss(out):
        return objective(type(out)(*map(batch.rows, out)), batch.rows(batch.labels), alpha=0.7, beta=0.8,
                         feature_loss=True)

    assert torch.equal(loss(plain), loss(inspected))
    # What was inspected: an attention map per path (rows over real keys sum to 1), gates in [1/2, 1) and
    # each anchor's shares summing to 1, in the outputs' layout
    n = int(batch.mask.sum())
    for attention in probe.attention.values():
        assert attention.shape == (4, 7, 7)
        real = attention[batch.mask]
        assert torch.allclose(real.sum(-1), torch.ones(n)) and bool((real[:, ~batch.mask.any(0)] == 0).all())
    for gate in probe.gates.values():
        real = batch.rows(gate)
        assert real.shape == (n,) and bool(((real >= 0.5) & (real < 1)).all())
    if variant.get("fusion") == "concat":
        assert set(probe.attention) == {"concat"} and not probe.gates and not probe.shares
        return
    assert set(probe.shares) == set(probe.attention) and (set(probe.gates) == set(probe.shares)) == model.gates
    anchors = {}
    for path, share in probe.shares.items():
        anchors.setdefault(path[2], []).append(batch.rows(share))
    for shares in anchors.values():
        assert torch.allclose(torch.stack(shares).sum(0), torch.ones(n))


def test_inspection_is_for_evaluation_only():
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2)  # training mode
    data = random_dialogues([3], N_SPK)
    batch = data.collate([0], model.padding_speaker, False)
    with pytest.raises(ValueError, match="inspect=True is for evaluation"):
        model(*batch.inputs, inspect=True)


def test_a_path_share_is_its_part_of_the_anchor_reduction():
    from magtkd.model import path_shares

    reduce = torch.nn.Linear(2 * 2, 2, bias=False)
    with torch.no_grad():
        reduce.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))  # reads path 1 only
    first, second = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 1.0]])
    shares = path_shares(reduce, ["t_t", "a_t"], [first, second])
    assert shares["t_t"].tolist() == [1.0] and shares["a_t"].tolist() == [0.0]
    with torch.no_grad():
        reduce.weight.copy_(torch.eye(2).repeat(1, 2))  # both paths through the identity: |p_1| = 5, |p_2| = sqrt 2
    shares = path_shares(reduce, ["t_t", "a_t"], [first, second])
    assert shares["t_t"].item() == pytest.approx(5 / (5 + 2 ** 0.5))
