"""Multi-modal anchor gated transformer (docs/METHOD.md §5): training stage, checkpoints, masking."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from helpers import script
from IEMOCAP.config import IEMOCAP
from magtkd.artifacts import StageFiles, feature_path
from magtkd.fusion_data import dialogue_logits
from magtkd.fusion_data import DialogueSet, load_dialogues
from magtkd.checkpoints import FusionCheckpointError, load_fusion_checkpoint, settings_from_checkpoint
from magtkd.model import AnchorGatedTransformer
from magtkd.packing import Layout, dropout
from magtkd.synthetic.features import write_synthetic_features
from magtkd.utils import UserError
from MELD.config import MELD

WIDTH = 16
SIZES = {"train": 24, "dev": 10, "test": 10}
# Small model, quick schedule: the reference's lr 1e-4 / dropout 0.5 are tuned for width 768.
FAST = ["--epochs", "8", "--batch_size", "4", "--lr", "3e-3", "--dropout", "0.1", "--n_head", "2",
        "--per_batch_schedule", "--device", "cpu"]


# Each dataset's fusion defaults, as multimodal_fusion.py's flags state them (docs/METHOD.md §5).
FUSION_DEFAULTS = {
    "IEMOCAP": {"audio_feature": "audio_kd", "video_feature": "video", "alpha": 0.7, "beta": 0.8,
                "feature_loss": True, "n_speaker": 2},
    "MELD": {"audio_feature": "audio_kd", "video_feature": "video_kd", "alpha": 0.01, "beta": 0.08,
             "feature_loss": False, "n_speaker": 304},
}


def fusion_main(spec, argv):
    """``<DS>/multimodal_fusion.py`` with ``argv`` (always with explicit folders: its defaults are repo paths)."""
    return script(spec.name, "multimodal_fusion").main(argv)


def predict_dialogues(model, data, batch_size, packed=None):
    """The fusion's test predictions: the argmax of `engine.dialogue_logits`."""
    return dialogue_logits(model, data, batch_size, packed=packed).argmax(-1).tolist()


def saved_predictions(save_dir):
    """``multimodal_fusion_best.json``: the test labels and predictions at the selected epoch."""
    return json.loads(StageFiles.fusion(save_dir).predictions.read_text())


def run(spec, tmp_path, *extra):
    return fusion_main(spec, ["--feature_dir", str(tmp_path / "feature"),
                              "--save_dir", str(tmp_path / "save"), *FAST, *extra])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Width-16 models gain nothing from threads, and on a busy shared CPU extra threads spin for minutes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """One training run per recipe on synthetic pickles (shared by several tests)."""
    out = {}
    for spec in (IEMOCAP, MELD):
        root = tmp_path_factory.mktemp(spec.name)
        write_synthetic_features(root / "feature", spec, SIZES, width=WIDTH, seed=3)
        out[spec.name] = (root, run(spec, root))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("spec", [IEMOCAP, MELD], ids=lambda s: s.name)
def test_training_learns_and_writes_artifacts(trained, spec):
    root, result = trained[spec.name]
    curve = result["epochs"]
    assert len(curve) == 8
    assert curve[-1]["train_loss"] < 0.7 * curve[0]["train_loss"]
    assert result["dev"]["weighted_f1"] > 0.5  # chance is 1/6 or 1/7
    best_dev = max(c["dev"]["weighted_f1"] for c in curve)
    assert result["dev"]["weighted_f1"] == best_dev  # selection on DEV

    save = root / "save"
    assert sorted(p.name for p in save.iterdir()) == [
        "multimodal_fusion.state.pt", "multimodal_fusion_best.bin", "multimodal_fusion_best.json",
        "multimodal_fusion_confusion.png", "multimodal_fusion_curves.png", "multimodal_fusion_metrics.json"]
    preds = json.loads((save / "multimodal_fusion_best.json").read_text())
    assert set(preds) == {"labels", "preds"}
    n_test = sum(len(x) for x in load_dialogues(
        feature_path(root / "feature", "test"), "audio_kd", "video", torch.device("cpu")).labels)
    assert len(preds["labels"]) == len(preds["preds"]) == n_test
    assert preds["labels"] == [int(x) for d in load_dialogues(
        feature_path(root / "feature", "test"), "audio_kd", "video", torch.device("cpu")).labels for x in d]
    assert sum(p == y for p, y in zip(preds["preds"], preds["labels"])) / n_test == pytest.approx(
        result["test"]["accuracy"])  # the predictions are the selected epoch's

    report = json.loads((save / "multimodal_fusion_metrics.json").read_text())
    assert report == json.loads(json.dumps(result))
    assert report["selected_epoch"] == result["selected_epoch"]
    assert report["selection"] == "best dev weighted F1" and report["complete"] is True
    assert report["labels"] == list(spec.labels) and list(report["test"]["per_class"])[:len(spec.labels)] == list(spec.labels)
    assert len(report["test"]["confusion"]) == len(spec.labels)
    assert {"dev", "test", "train_loss"} <= set(report["epochs"][0])
    defaults = FUSION_DEFAULTS[spec.name]
    for flag in ("audio_feature", "video_feature", "alpha", "beta", "feature_loss"):
        assert report["args"][flag] == defaults[flag], flag
    assert report["sizes"]["n_speaker"] == defaults["n_speaker"] == spec.n_speaker
    state = torch.load(save / "multimodal_fusion_best.bin", weights_only=True)
    assert state["speaker_embeddings.weight"].shape == (defaults["n_speaker"] + 1, WIDTH)
    assert not any(k.startswith(("a_t.", "v_t.", "fc.")) for k in state)


@pytest.mark.slow
def test_packed_rows_train_the_same_run(trained, tmp_path):
    """``--packed True`` retraces the run on the padded grid (the authors' computation, which the
    default picks for batches this small): the same curve up to float summation order, the same
    selected epoch and test predictions."""
    root, padded = trained["IEMOCAP"]
    assert padded["args"]["packed"] is None
    packed = fusion_main(IEMOCAP, ["--feature_dir", str(root / "feature"), "--save_dir", str(tmp_path / "save"),
                                   *FAST, "--packed", "True"])
    assert [c["train_loss"] for c in padded["epochs"]] == pytest.approx(
        [c["train_loss"] for c in packed["epochs"]], rel=1e-4)
    assert [c["dev"] for c in padded["epochs"]] == [c["dev"] for c in packed["epochs"]]
    assert padded["selected_epoch"] == packed["selected_epoch"]
    assert saved_predictions(root / "save")["preds"] == saved_predictions(tmp_path / "save")["preds"]
    assert all(c["train_seconds"] > 0 for c in packed["epochs"])


@pytest.mark.slow
def test_eval_round_trip_reads_only_test_pickle(trained, tmp_path):
    root, result = trained["IEMOCAP"]
    # Copy only what --train False may read.
    (tmp_path / "feature").mkdir()
    (tmp_path / "save").mkdir()
    for src, dst in ((feature_path(root / "feature", "test"), feature_path(tmp_path / "feature", "test")),
                     (root / "save" / "multimodal_fusion_best.bin", tmp_path / "save" / "multimodal_fusion_best.bin")):
        dst.write_bytes(src.read_bytes())
    evaluated = fusion_main(IEMOCAP, ["--feature_dir", str(tmp_path / "feature"), "--save_dir",
                                      str(tmp_path / "save"), "--train", "False", "--n_head", "2",
                                      "--batch_size", "4", "--device", "cpu"])
    trained_preds = saved_predictions(root / "save")
    assert evaluated["preds"] == trained_preds["preds"]
    for key in ("accuracy", "weighted_f1"):
        assert evaluated[key] == pytest.approx(result["test"][key])
    assert evaluated["confusion"] == result["test"]["confusion"]
    written = json.loads((tmp_path / "save" / "multimodal_fusion_best.json").read_text())
    assert written == trained_preds


def test_separate_text_blocks_train_and_eval(tmp_path):
    write_synthetic_features(tmp_path / "feature", IEMOCAP, {"train": 6, "dev": 3, "test": 3}, width=WIDTH, seed=5)
    run(IEMOCAP, tmp_path, "--separate_text_blocks", "--epochs", "2")
    state = torch.load(tmp_path / "save" / "multimodal_fusion_best.bin", weights_only=True)
    assert "a_t_gate.fc.weight" in state and settings_from_checkpoint(state).separate_text_blocks
    # Evaluation infers the separate blocks from the checkpoint.
    evaluated = fusion_main(IEMOCAP, ["--feature_dir", str(tmp_path / "feature"), "--save_dir",
                                      str(tmp_path / "save"), "--train", "False", "--n_head", "2",
                                      "--batch_size", "4"])
    assert evaluated["preds"] == saved_predictions(tmp_path / "save")["preds"]


def test_hidden_dim_mismatch_names_both_numbers(tmp_path):
    write_synthetic_features(tmp_path / "feature", IEMOCAP, {"train": 3, "dev": 2, "test": 2}, width=WIDTH, seed=1)
    with pytest.raises(UserError, match=r"--hidden_dim 32 does not match the width 16"):
        run(IEMOCAP, tmp_path, "--hidden_dim", "32")


# --------------------------------------------------------------------------- reference checkpoints

H, C, N_SPK = 8, 7, 304
REFERENCE_BLOCKS = ("t_t", "a_t", "v_t", "a_a", "t_a", "v_a", "v_v", "t_v", "a_v")


def reference_state(h: int = H, c: int = C, n_speaker: int = N_SPK) -> dict[str, torch.Tensor]:
    """A state_dict with the reference's names and shapes, written from the docs/METHOD.md §5 list."""
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple] = {"speaker_embeddings.weight": (n_speaker + 1, h)}
    for b in REFERENCE_BLOCKS:
        shapes[f"{b}.pos_emb.pe"] = (1, 512, h)
        layer = f"{b}.transformer_inter.0"
        for proj in ("proj_q", "proj_k", "proj_v", "fc"):
            shapes[f"{layer}.self_attn.{proj}.weight"] = (h, h)
            shapes[f"{layer}.self_attn.{proj}.bias"] = (h,)
        for lin in ("w_1", "w_2"):
            shapes[f"{layer}.feed_forward.{lin}.weight"] = (h, h)
            shapes[f"{layer}.feed_forward.{lin}.bias"] = (h,)
        for norm in (f"{layer}.feed_forward.layer_norm", f"{layer}.layer_norm"):
            shapes[f"{norm}.weight"] = (h,)
            shapes[f"{norm}.bias"] = (h,)
        shapes[f"{b}_gate.fc.weight"] = (h, h)
        shapes[f"{b}_gate.fc.bias"] = (h,)
    for m in ("t", "a", "v"):
        shapes[f"features_reduce_{m}.weight"] = (h, 3 * h)
        shapes[f"features_reduce_{m}.bias"] = (h,)
        shapes[f"w_{m}.weight"] = (c, h)
        shapes[f"w_{m}.bias"] = (c,)
    shapes["fc.weight"] = (h, 3 * h)  # never used by the reference's forward
    shapes["fc.bias"] = (h,)
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def test_reference_checkpoint_loads(tmp_path, caplog):
    state = reference_state()
    path = tmp_path / "multimodal_fusion_best.bin"
    torch.save(state, path)
    settings = settings_from_checkpoint(state)
    assert (settings.n_speaker, settings.hidden, settings.n_classes, settings.separate_text_blocks) == \
        (N_SPK, H, C, False)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2)
    with caplog.at_level("INFO", logger="magtkd"):
        load_fusion_checkpoint(model, path)
    dropped = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert len(dropped) == 1 and "a_t" in dropped[0] and "fc" in dropped[0]
    own = model.state_dict()
    assert set(own) == {k for k in state if not k.startswith(("fc.", "a_t.", "v_t.", "a_t_gate.", "v_t_gate."))}
    for key, value in own.items():
        assert torch.equal(value, state[key]), key
    # With separate text blocks the reference's a_t / v_t entries are loaded, only fc is dropped.
    separate = AnchorGatedTransformer(H, C, N_SPK, n_head=2, separate_text_blocks=True)
    load_fusion_checkpoint(separate, path)
    assert torch.equal(separate.state_dict()["a_t_gate.fc.weight"], state["a_t_gate.fc.weight"])


def test_reference_checkpoint_same_predictions_through_the_stage(tmp_path):
    """A reference checkpoint evaluates through --train False like the model it was loaded into."""
    write_synthetic_features(tmp_path / "feature", MELD, {"train": 2, "dev": 2, "test": 4}, width=H, seed=2)
    state = reference_state()
    (tmp_path / "save").mkdir()
    torch.save(state, tmp_path / "save" / "multimodal_fusion_best.bin")
    result = fusion_main(MELD, ["--feature_dir", str(tmp_path / "feature"), "--save_dir",
                                str(tmp_path / "save"), "--train", "False", "--n_head", "2"])
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    test = load_dialogues(feature_path(tmp_path / "feature", "test"), "audio_kd", "video_kd", torch.device("cpu"))
    assert result["preds"] == predict_dialogues(model, test, batch_size=1)
    # ... and like the authors' computation: every layer on the padded grid (docs/METHOD.md §5, Speed)
    assert result["preds"] == predict_dialogues(model, test, batch_size=16, packed=False)
    assert torch.allclose(dialogue_logits(model, test, 16), dialogue_logits(model, test, 16, packed=False), atol=1e-5)


def test_wrong_shape_and_missing_keys_are_named(tmp_path):
    state = reference_state()
    state["w_a.weight"] = torch.zeros(C + 1, H)
    del state["v_v_gate.fc.bias"]
    path = tmp_path / "ref.bin"
    torch.save(state, path)
    with pytest.raises(FusionCheckpointError) as err:
        load_fusion_checkpoint(AnchorGatedTransformer(H, C, N_SPK, n_head=2), path)
    message = str(err.value)
    assert str(path) in message
    assert "w_a.weight: file (8, 8) vs model (7, 8)" in message
    assert "missing keys: v_v_gate.fc.bias" in message
    with pytest.raises(FusionCheckpointError, match=r"unexpected keys: a_t\..*--separate_text_blocks"):
        # Our own separate-block checkpoint into a sharing model: nothing is silently dropped.
        torch.save(AnchorGatedTransformer(H, C, N_SPK, n_head=2, separate_text_blocks=True).state_dict(), path)
        load_fusion_checkpoint(AnchorGatedTransformer(H, C, N_SPK, n_head=2), path)


def test_parameter_names_match_reference_list():
    reference = {k for k in reference_state() if not k.startswith(("fc.", "a_t.", "v_t.", "a_t_gate.", "v_t_gate."))}
    assert set(AnchorGatedTransformer(H, C, N_SPK, n_head=2).state_dict()) == reference
    full = set(reference_state()) - {"fc.weight", "fc.bias"}
    assert set(AnchorGatedTransformer(H, C, N_SPK, n_head=2, separate_text_blocks=True).state_dict()) == full


# --------------------------------------------------------------------------- padding and speakers


def _dialogues(lengths, n_speaker, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DialogueSet(
        path=None, vids=list(range(len(lengths))),
        text=[torch.randn(n, H, generator=g) for n in lengths],
        audio=[torch.randn(n, H, generator=g) for n in lengths],
        video=[torch.randn(n, H, generator=g) for n in lengths],
        speakers=[torch.randint(0, n_speaker, (n,), generator=g) for n in lengths],
        labels=[torch.randint(0, C, (n,), generator=g) for n in lengths],
    )


def _logits(model, data, indices, packed=True):
    """Per dialogue of ``indices``: its utterances' t_logits, and the batch."""
    batch = data.collate(indices, model.padding_speaker, packed)
    with torch.no_grad():
        rows = batch.rows(model(*batch.inputs).t_logits)
    return list(rows.split([len(data.labels[i]) for i in indices])), batch


@pytest.mark.parametrize("packed", [True, False])
def test_padding_does_not_change_real_utterances(packed):
    torch.manual_seed(0)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2).eval()
    data = _dialogues([3, 5, 2, 40, 17], N_SPK)
    alone, _ = _logits(model, data, [0, 1], packed)
    padded, batch = _logits(model, data, [0, 1, 2, 3, 4], packed)  # dialogue 3 pads the others to 40
    assert batch.mask.shape == (5, 40) and int(batch.mask.sum()) == 67 and len(batch) == 67
    for a, b in zip(alone, padded[:2]):
        assert torch.allclose(a, b, atol=1e-5)
    single, _ = _logits(model, data, [2], packed)
    assert torch.allclose(single[0], padded[2], atol=1e-5)


def test_packed_batch_holds_the_real_utterances_in_the_flattened_order():
    data = _dialogues([3, 1, 4], N_SPK)
    packed = data.collate([2, 0, 1], N_SPK, packed=True)
    padded = data.collate([2, 0, 1], N_SPK, packed=False)
    assert data.collate([2, 0, 1], N_SPK).index is None  # 3 x 4 x 16 values: too small to gain from packing
    big = _dialogues([64], N_SPK)
    big.text = big.audio = big.video = [torch.zeros(64, 1024)]
    assert big.collate([0], N_SPK).index is not None  # 64 x 1024 values: packed
    assert packed.text.shape == (8, H) and padded.text.shape == (3, 4, H)
    assert packed.index.tolist() == [0, 1, 2, 3, 4, 5, 6, 8] and packed.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    for name in ("text", "audio", "video", "speakers", "labels"):
        assert torch.equal(getattr(packed, name), padded.rows(getattr(padded, name)))
    assert torch.equal(packed.mask, padded.mask)


def test_packed_training_step_equals_the_padded_one():
    """The same seed gives the same dropout masks and outputs in both layouts (bit for bit on CPU),
    and gradients equal up to float summation order (docs/METHOD.md §5, Speed)."""
    torch.manual_seed(1)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2, dropout=0.5).train()
    data = _dialogues([3, 7, 1, 12, 5], N_SPK)
    results = {}
    for packed in (False, True):
        batch = data.collate([0, 1, 2, 3, 4], model.padding_speaker, packed)
        torch.manual_seed(5)
        rows = [batch.rows(o) for o in model(*batch.inputs)]
        model.zero_grad()
        (F.cross_entropy(rows[0], batch.rows(batch.labels)) + sum(r.pow(2).mean() for r in rows[1:])).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[packed] = rows, grads, torch.rand(3)
    for a, b in zip(results[False][0], results[True][0]):
        assert torch.equal(a, b)
    assert results[False][1].keys() == results[True][1].keys()
    for name, grad in results[False][1].items():
        assert torch.allclose(grad, results[True][1][name], rtol=1e-5, atol=1e-7), name
    assert torch.equal(results[False][2], results[True][2])  # the generator advanced alike


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("small", [True, False])
def test_dropout_draws_f_dropout_s_mask(p, small):
    x = torch.randn(4, 3, 5, 7) if small else torch.randn(64, 32, 40)
    torch.manual_seed(3)
    expected, after = F.dropout(x, p, True), torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, p, True), expected) and torch.equal(torch.rand(2), after)
    assert torch.equal(dropout(x, p, False), x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_packed_dropout_keeps_the_units_f_dropout_keeps(p):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    layout = Layout(mask, mask.flatten().nonzero().squeeze(1), None)
    x = torch.randn(3, 3, 16)
    torch.manual_seed(3)
    expected = F.dropout(x, p, True)[mask]
    torch.manual_seed(3)
    assert torch.equal(layout.dropout(x[mask], p, True), expected)


def fusion_objective(out, target, alpha=0.7, beta=0.8, feature_loss=True):
    """The stage's ``CE(W_t T') + alpha KD(A') + beta KD(V')`` (IEMOCAP's weights) over the given rows."""
    return script("IEMOCAP", "multimodal_fusion").objective(out, target, alpha=alpha, beta=beta,
                                                            feature_loss=feature_loss)


def _loss(model, batch, keep=None):
    """The objective over the batch's real utterances (``keep``: a (B, L) mask of those to count)."""
    out = model(*batch.inputs)
    rows = batch.rows if keep is None else (lambda x: x[keep])
    return fusion_objective(type(out)(*map(rows, out)), rows(batch.labels))


def test_loss_ignores_padding():
    torch.manual_seed(0)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2).eval()
    data = _dialogues([3, 5, 30], N_SPK)
    with torch.no_grad():
        l1 = _loss(model, data.collate([0, 1], model.padding_speaker))
        # Same two dialogues padded to 30 by a third one that is then masked out of the loss.
        b2 = data.collate([0, 1, 2], model.padding_speaker, packed=False)
        keep = b2.mask.clone()
        keep[2] = False
        l2 = _loss(model, b2, keep)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5)


def test_meld_padding_row_is_not_a_real_speaker():
    torch.manual_seed(0)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2).eval()
    assert model.padding_speaker == N_SPK and model.speaker_embeddings.num_embeddings == N_SPK + 1
    data = _dialogues([4, 9], N_SPK)
    data.speakers[0] = torch.tensor([2, 2, 5, 2])  # speaker 2 (Joey's row in the reference's numbering)
    before, batch = _logits(model, data, [0, 1], packed=False)
    assert batch.speakers[0, 4:].tolist() == [N_SPK] * 5  # padding uses the extra row
    with torch.no_grad():
        model.speaker_embeddings.weight[N_SPK] += 10.0  # the padding row must not matter
    after_pad, _ = _logits(model, data, [0, 1], packed=False)
    assert torch.allclose(before[0], after_pad[0], atol=1e-5)
    with torch.no_grad():
        model.speaker_embeddings.weight[2] += 10.0  # a real speaker's row must matter
    after_real, _ = _logits(model, data, [0, 1], packed=False)
    assert not torch.allclose(before[0], after_real[0], atol=1e-3)


def test_text_anchor_shares_t_t_by_default():
    model = AnchorGatedTransformer(H, C, 2, n_head=2)
    assert not hasattr(model, "a_t") and not hasattr(model, "v_t_gate")
    separate = AnchorGatedTransformer(H, C, 2, n_head=2, separate_text_blocks=True)
    assert isinstance(separate.a_t, type(separate.t_t))
    assert re.fullmatch(r"\(1, 512, 8\)", str(tuple(model.t_t.pos_emb.pe.shape)))


# --------------------------------------------------------------------------- initialisation, draw for draw

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
