"""The stage scripts' objectives, imported from the scripts themselves (docs/METHOD.md §2, §3, §5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import script
from magtkd import losses, model


class Fixed(torch.nn.Module):
    """An encoder whose ``encode`` returns given (representation, logits)."""

    def __init__(self, rep: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.rep, self.logits, self.grad_enabled = rep, logits, []

    def encode(self, batch):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.rep, self.logits


def _batch(n: int = 6, classes: int = 4, width: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, requires_grad=True)  # noqa: E731
    labels = torch.randint(0, classes, (n,), generator=g)
    return make(n, width), make(n, classes), make(n, width), make(n, classes), {"labels": labels}


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("logit_weight, feature_weight, tau", [(1.0, 0.0, 2.0), (0.1, 1.0, 2.0), (0.5, 0.3, 4.0)])
def test_kd_objective_is_ce_plus_the_weighted_terms(dataset, logit_weight, feature_weight, tau):
    s_rep, s_logits, t_rep, t_logits, batch = _batch()
    objective = script(dataset, "KD").objective
    teacher = Fixed(t_rep, t_logits)
    loss = objective(Fixed(s_rep, s_logits), batch, teacher=teacher, logit_weight=logit_weight,
                     feature_weight=feature_weight, tau=tau)
    expected = (F.cross_entropy(s_logits, batch["labels"])
                + logit_weight * losses.logit_kd_loss(s_logits, t_logits, tau=tau)
                + feature_weight * losses.feature_kd_loss(s_rep, t_rep))
    assert torch.allclose(loss, expected)
    assert teacher.grad_enabled == [False]  # the teacher runs without autograd (frozen)


@pytest.mark.parametrize("name", ["text", "audio", "video"])
def test_first_stage_objective_is_the_cross_entropy(name):
    _, logits, _, _, batch = _batch(seed=3)
    objective = script("MELD", name).objective
    assert torch.equal(objective(Fixed(None, logits), batch), F.cross_entropy(logits.float(), batch["labels"]))


def test_fusion_objective_weights_the_anchor_terms():
    n, classes, width = 7, 6, 8
    g = torch.Generator().manual_seed(1)
    out = model.FusionOutput(*(torch.randn(n, classes if i < 3 else width, generator=g) for i in range(6)))
    target = torch.randint(0, classes, (n,), generator=g)
    fusion = script("IEMOCAP", "multimodal_fusion")
    full = fusion.objective(out, target, alpha=0.7, beta=0.8, feature_loss=True)

    def kd(logits, feat):
        return (F.cross_entropy(logits, target) + losses.logit_kd_loss(logits, out.t_logits)
                + losses.feature_kd_loss(feat, out.t_feat))

    expected = F.cross_entropy(out.t_logits, target) + 0.7 * kd(out.a_logits, out.a_feat) + 0.8 * kd(out.v_logits,
                                                                                                      out.v_feat)
    assert torch.allclose(full, expected)
    without = fusion.objective(out, target, alpha=0.0, beta=0.0, feature_loss=True)
    assert torch.allclose(without, F.cross_entropy(out.t_logits, target))
