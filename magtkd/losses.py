"""The distillation losses: the correlation-based logit loss and the relational feature loss
(docs/METHOD.md §3), computed in fp32 whatever the autocast around them, and the batch their relational
terms relate. The stage scripts' ``objective`` functions weight them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("magtkd")

PEARSON_EPS = 1e-8
AUTHORS_RELATIONAL_BATCH = 4  # the authors' KD batch: the samples their relational terms relate


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 values as fp32 (fp32 and fp64 as they are)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def relational_batch(per_process: int, processes: int, grad_accum: int) -> int:
    """The samples the relational KD terms relate, logged (docs/METHOD.md §3, "The relational batch"):
    one micro-batch of every process, ``per_process x processes``; the ``grad_accum`` micro-batches of an
    update are related each on its own. Warns where it is not the authors' 4, and says what is lost at 1:
    the intra-class term is then constant (no gradient) and the feature loss 0."""
    size = per_process * processes
    log.info("KD: the relational terms (intra-class Pearson, feature loss) relate %d samples: %d per process x "
             "%d processes%s", size, per_process, processes,
             f", each of the {grad_accum} accumulated micro-batches on its own" if grad_accum > 1 else "")
    if size == 1:
        log.warning("KD: the relational terms relate ONE sample: the intra-class term is the constant 1 without "
                    "gradient and the feature loss is 0, so KD reduces to CE + the inter-class term; use "
                    "--batch_size %d (with --grad_accum for memory) or more processes for the authors' %d",
                    AUTHORS_RELATIONAL_BATCH, AUTHORS_RELATIONAL_BATCH)
    elif size != AUTHORS_RELATIONAL_BATCH:
        log.warning("KD: the relational terms relate %d samples where the authors' related %d (their batch): "
                    "--batch_size x processes sets it, --grad_accum does not", size, AUTHORS_RELATIONAL_BATCH)
    return size


FEATURE_TEMPERATURE = 1.0  # the relational loss's temperature (the authors' default)


def pearson(x: torch.Tensor, y: torch.Tensor, dim: int = -1, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Pearson correlation along ``dim``: cosine of mean-centred vectors, ``eps`` added to the denominator."""
    x = x - x.mean(dim=dim, keepdim=True)
    y = y - y.mean(dim=dim, keepdim=True)
    return (x * y).sum(dim=dim) / (x.norm(dim=dim) * y.norm(dim=dim) + eps)


def logit_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 2.0,
    beta: float = 1.0, gamma: float = 1.0,
) -> torch.Tensor:
    """``tau^2 * (beta * inter + gamma * intra)`` for logits of shape (batch, classes) (docs/METHOD.md §3).

    ``inter = 1 - mean_i pearson(p_s[i, :], p_t[i, :])`` and
    ``intra = 1 - mean_j pearson(p_s[:, j], p_t[:, j])`` with ``p = softmax(z / tau)``.
    With a batch of one the intra term is constant 1 (a single value has no
    spread to correlate); it then contributes no gradient. Computed in fp32 with autocast disabled.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"logit_kd_loss expects two (batch, classes) tensors of the same shape, got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )
    # Built op for op as the authors' loss (columns as rows of the transposes), so that autograd sums the
    # gradient contributions in their order: the fusion's updates are theirs bit for bit (docs/METHOD.md §5).
    # In fp32 with autocast off: under fp16 autocast the products would run in fp16 (docs/METHOD.md §3).
    with torch.autocast(student_logits.device.type, enabled=False):
        p_s = torch.softmax(_fp32(student_logits) / tau, dim=1)
        p_t = torch.softmax(_fp32(teacher_logits) / tau, dim=1)
        inter = tau**2 * (1.0 - pearson(p_s, p_t, dim=1).mean())
        intra = tau**2 * (1.0 - pearson(p_s.t(), p_t.t(), dim=1).mean())
        return beta * inter + gamma * intra


def feature_kd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Relational feature loss ``KL(P || Q)``, batch-mean, temperature 1 (docs/METHOD.md §3).

    After L2 normalisation, ``P = softmax(h_t h_t^T)`` and ``log Q = log_softmax(h_t h_s^T)``,
    both row-wise over the batch. The Gram matrices are fp32 products: autocast is disabled here, where
    its matmul policy would compute them in fp16 under fp16 KD (docs/METHOD.md §3).
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
    # In the authors' order of operations (see logit_kd_loss), temperature 1 included; fp32, autocast off.
    with torch.autocast(student_feat.device.type, enabled=False):
        h_t = F.normalize(_fp32(teacher_feat), dim=1)
        h_s = F.normalize(_fp32(student_feat), dim=1)
        target = h_t @ h_t.t()
        relation = h_t @ h_s.t()
        log_q = torch.log_softmax(relation / FEATURE_TEMPERATURE, dim=1)
        p = torch.softmax(target / FEATURE_TEMPERATURE, dim=1)
        return F.kl_div(log_q, p, reduction="batchmean")
