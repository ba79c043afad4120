"""Distillation losses (SPEC section 3), shared by the KD stage and the fusion stage.

- ``logit_kd_loss``: correlation-based logit distillation. Student and teacher
  class distributions are compared by Pearson correlation across classes for
  each sample ("inter") and across the batch for each class ("intra").
- ``feature_kd_loss``: relational feature distillation. The student must
  reproduce the teacher's sample-to-sample similarity structure.

Nothing is detached here: gradients flow into every input the caller did not
detach (in the fusion stage the teacher side is deliberately trained too,
SPEC section 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PEARSON_EPS = 1e-8


def pearson(x: torch.Tensor, y: torch.Tensor, dim: int = -1, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Pearson correlation along ``dim``: cosine of mean-centred vectors, ``eps`` added to the denominator."""
    x = x - x.mean(dim=dim, keepdim=True)
    y = y - y.mean(dim=dim, keepdim=True)
    return (x * y).sum(dim=dim) / (x.norm(dim=dim) * y.norm(dim=dim) + eps)


def logit_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 2.0,
    beta: float = 1.0, gamma: float = 1.0,
) -> torch.Tensor:
    """``tau^2 * (beta * inter + gamma * intra)`` for logits of shape (batch, classes) (SPEC section 3).

    ``inter = 1 - mean_i pearson(p_s[i, :], p_t[i, :])`` and
    ``intra = 1 - mean_j pearson(p_s[:, j], p_t[:, j])`` with ``p = softmax(z / tau)``.
    With a batch of one the intra term is constant 1 (a single value has no
    spread to correlate); it then contributes no gradient.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"logit_kd_loss expects two (batch, classes) tensors of the same shape, got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )
    p_s = torch.softmax(student_logits / tau, dim=1)
    p_t = torch.softmax(teacher_logits / tau, dim=1)
    inter = 1.0 - pearson(p_s, p_t, dim=1).mean()
    intra = 1.0 - pearson(p_s, p_t, dim=0).mean()
    return tau**2 * (beta * inter + gamma * intra)


def feature_kd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Relational feature loss ``KL(P || Q)``, batch-mean, temperature 1 (SPEC section 3).

    After L2 normalisation, ``P = softmax(h_t h_t^T)`` and ``log Q = log_softmax(h_t h_s^T)``,
    both row-wise over the batch.
    """
    if student_feat.dim() != 2 or teacher_feat.dim() != 2 or student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(
            f"feature_kd_loss expects (batch, width) tensors with the same batch size, got "
            f"student {tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)}"
        )
    if student_feat.shape[1] != teacher_feat.shape[1]:
        raise ValueError(
            f"feature_kd_loss: student width {student_feat.shape[1]} != teacher width "
            f"{teacher_feat.shape[1]} (h_t h_s^T needs equal widths)"
        )
    h_s = F.normalize(student_feat, dim=1)
    h_t = F.normalize(teacher_feat, dim=1)
    p = torch.softmax(h_t @ h_t.t(), dim=1)
    log_q = torch.log_softmax(h_t @ h_s.t(), dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


class LogitKDLoss(nn.Module):
    """Module form of :func:`logit_kd_loss`."""

    def __init__(self, tau: float = 2.0, beta: float = 1.0, gamma: float = 1.0) -> None:
        super().__init__()
        self.tau, self.beta, self.gamma = tau, beta, gamma

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return logit_kd_loss(student_logits, teacher_logits, self.tau, self.beta, self.gamma)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, beta={self.beta}, gamma={self.gamma}"


class FeatureKDLoss(nn.Module):
    """Module form of :func:`feature_kd_loss`."""

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        return feature_kd_loss(student_feat, teacher_feat)


class StudentObjective(nn.Module):
    """``ce_weight * CE + logit_weight * L_logit + feature_weight * L_feat``.

    SPEC section 3: IEMOCAP ``CE + L_logit`` (weights 1, 1, 0); MELD
    ``CE + 0.1 L_logit + L_feat`` (1, 0.1, 1). The fusion anchors use (1, 1, 0 or 1)
    (SPEC section 5). A term whose weight is 0 is not computed, and its inputs
    may then be omitted.
    """

    def __init__(
        self, ce_weight: float = 1.0, logit_weight: float = 1.0, feature_weight: float = 0.0,
        tau: float = 2.0, beta: float = 1.0, gamma: float = 1.0,
    ) -> None:
        super().__init__()
        self.ce_weight, self.logit_weight, self.feature_weight = ce_weight, logit_weight, feature_weight
        self.logit_kd = LogitKDLoss(tau, beta, gamma)
        self.feature_kd = FeatureKDLoss()

    def forward(
        self, student_logits: torch.Tensor, labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None, student_feat: torch.Tensor | None = None,
        teacher_feat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(total, {"ce": ..., "logit": ..., "feature": ...})``; parts are unweighted."""
        zero = student_logits.new_zeros(())
        parts = {"ce": zero, "logit": zero, "feature": zero}
        total = zero
        if self.ce_weight:
            parts["ce"] = F.cross_entropy(student_logits, labels)
            total = total + self.ce_weight * parts["ce"]
        if self.logit_weight:
            if teacher_logits is None:
                raise ValueError("StudentObjective: logit_weight > 0 needs teacher_logits")
            parts["logit"] = self.logit_kd(student_logits, teacher_logits)
            total = total + self.logit_weight * parts["logit"]
        if self.feature_weight:
            if student_feat is None or teacher_feat is None:
                raise ValueError("StudentObjective: feature_weight > 0 needs student_feat and teacher_feat")
            parts["feature"] = self.feature_kd(student_feat, teacher_feat)
            total = total + self.feature_weight * parts["feature"]
        return total, parts

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, logit_weight={self.logit_weight}, feature_weight={self.feature_weight}"
