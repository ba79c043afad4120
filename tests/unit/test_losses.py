"""Distillation losses (docs/METHOD.md §3) against independent plain-numpy computations.

How the stage scripts weight them is checked where they are used: the KD objective by
tests/scripts/test_KD_script.py (term by term, and a KD run's loss at every step), the fusion objective
(both datasets' weights) by tests/scripts/test_multimodal_fusion_script.py.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from magtkd.losses import feature_kd_loss, logit_kd_loss, pearson, relational_batch


# Hand-made inputs: 4 samples x 3 classes, 4 samples x 5 features.
Z_S = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.5, -0.5, 1.5]])

Z_T = np.array([[1.0, 1.0, -2.0], [0.0, 1.0, 0.0], [-2.0, 2.0, 1.0], [1.0, 0.0, 0.5]])

H_S = np.array([[1.0, 0.0, 2.0, -1.0, 0.5], [0.3, 1.2, -0.7, 0.0, 2.0],
                [-1.5, 0.4, 0.4, 1.0, 0.0], [2.0, 2.0, 0.0, -0.5, -1.0]])

H_T = np.array([[0.5, 0.5, 1.0, -1.0, 0.0], [0.0, 1.0, -1.0, 0.5, 1.5],
                [-1.0, 0.0, 1.0, 1.0, 0.5], [1.0, 1.5, 0.5, 0.0, -1.0]])


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson of each row pair, written out element by element."""
    out = []
    for a, b in zip(x, y):
        a, b = a - a.mean(), b - b.mean()
        out.append(float((a * b).sum()) / (np.sqrt((a * a).sum()) * np.sqrt((b * b).sum()) + 1e-8))
    return np.array(out)


def np_logit_kd(zs, zt, tau=2.0, beta=1.0, gamma=1.0) -> float:
    ps, pt = np_softmax(zs / tau), np_softmax(zt / tau)
    inter = 1 - np_pearson_rows(ps, pt).mean()
    intra = 1 - np_pearson_rows(ps.T, pt.T).mean()
    return tau**2 * (beta * inter + gamma * intra)


def np_feature_kd(hs, ht) -> float:
    hs = hs / np.linalg.norm(hs, axis=1, keepdims=True)
    ht = ht / np.linalg.norm(ht, axis=1, keepdims=True)
    p = np_softmax(ht @ ht.T)
    q = np_softmax(ht @ hs.T)
    return float((p * (np.log(p) - np.log(q))).sum() / len(hs))


def t(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def test_pearson_matches_numpy_and_has_eps_in_denominator():
    assert torch.allclose(pearson(t(Z_S), t(Z_T), dim=1), t(np_pearson_rows(Z_S, Z_T)))
    # A constant vector has zero spread: 0 / (0 + eps) = 0, not NaN.
    assert pearson(t(np.ones((1, 3))), t(Z_T[:1]), dim=1).item() == 0.0


@pytest.mark.parametrize("tau,beta,gamma", [(2.0, 1.0, 1.0), (1.0, 0.5, 2.0), (4.0, 1.0, 0.0)])
def test_logit_kd_matches_numpy(tau, beta, gamma):
    ours = logit_kd_loss(t(Z_S), t(Z_T), tau, beta, gamma).item()
    assert ours == pytest.approx(np_logit_kd(Z_S, Z_T, tau, beta, gamma), rel=1e-9, abs=1e-12)


def test_logit_kd_default_is_tau2_beta1_gamma1():
    assert logit_kd_loss(t(Z_S), t(Z_T)).item() == pytest.approx(np_logit_kd(Z_S, Z_T, 2.0, 1.0, 1.0))


def test_logit_kd_zero_for_identical_and_positive_for_permuted():
    # Not exactly 0: the 1e-8 in the denominator leaves ~eps / variance of the probabilities.
    assert logit_kd_loss(t(Z_S), t(Z_S)).item() == pytest.approx(0.0, abs=1e-4)
    permuted = Z_S[[2, 0, 3, 1]]
    assert logit_kd_loss(t(Z_S), t(permuted)).item() > 0.5


def test_feature_kd_matches_numpy_and_is_zero_for_identical():
    assert feature_kd_loss(t(H_S), t(H_T)).item() == pytest.approx(np_feature_kd(H_S, H_T), rel=1e-9)
    assert feature_kd_loss(t(H_T), t(H_T)).item() == pytest.approx(0.0, abs=1e-12)
    # Scale-invariant: the features are L2-normalised first.
    assert feature_kd_loss(t(3 * H_T), t(H_T)).item() == pytest.approx(0.0, abs=1e-12)


def test_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        logit_kd_loss(t(Z_S), t(Z_T[:, :2]))
    with pytest.raises(ValueError, match="width 5 != teacher width 3"):
        feature_kd_loss(t(H_S), t(H_T[:, :3]))


def test_gradients_flow_to_undetached_inputs_only():
    zs, zt, hs, ht = t(Z_S, True), t(Z_T, True), t(H_S, True), t(H_T, True)
    (logit_kd_loss(zs, zt) + feature_kd_loss(hs, ht)).backward()
    for x in (zs, zt, hs, ht):
        assert x.grad is not None and x.grad.abs().sum() > 0
    zs2, zt2 = t(Z_S, True), t(Z_T, True)
    logit_kd_loss(zs2, zt2.detach()).backward()
    assert zs2.grad.abs().sum() > 0 and zt2.grad is None


def test_losses_compute_in_fp32_whatever_the_autocast_around_them():
    """Under autocast the Gram matrices of the feature loss would be low-precision products (the fp16 of KD on
    CUDA; bf16 is CPU autocast's); the losses disable it, and take fp16/bf16 inputs as fp32 values."""
    g = torch.Generator().manual_seed(0)
    h_s, h_t, z_s, z_t = (torch.randn(8, 64, generator=g) for _ in range(4))
    exact = (feature_kd_loss(h_s, h_t), logit_kd_loss(z_s, z_t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (h_t @ h_t.t()).dtype == torch.bfloat16  # what autocast does to a plain product here
        under = (feature_kd_loss(h_s, h_t), logit_kd_loss(z_s, z_t))
    assert all(torch.equal(a, b) and b.dtype == torch.float32 for a, b in zip(exact, under))
    half = feature_kd_loss(h_s.half(), h_t.half())
    assert half.dtype == torch.float32 and torch.equal(half, feature_kd_loss(h_s.half().float(), h_t.half().float()))


@pytest.mark.parametrize("per_process, processes, grad_accum, warning", [
    (4, 1, 1, None),
    (2, 2, 1, None),
    (1, 4, 1, None),
    (4, 2, 1, "relate 8 samples where the authors' related 4"),
    (2, 1, 2, "relate 2 samples where the authors' related 4"),
    (1, 1, 4, "relate ONE sample: the intra-class term is the constant 1 without gradient and the feature loss is 0"),
])
def test_relational_batch_is_one_micro_batch_of_every_process(caplog, per_process, processes, grad_accum, warning):
    caplog.set_level(logging.INFO, logger="magtkd")
    assert relational_batch(per_process, processes, grad_accum) == per_process * processes
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (warnings == []) if warning is None else (len(warnings) == 1 and warning in warnings[0])
    assert f"relate {per_process * processes} samples: {per_process} per process x {processes} processes" \
        in caplog.text
