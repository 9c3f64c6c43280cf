"""The reference against the formulas of megatron_ntp/loss/README.md written out independently, element by element."""

import pytest
import torch

from megatron_ntp.loss import ShapedLossConfig, reference_shaped_loss
from megatron_ntp.loss.reference import topk_membership
from megatron_ntp.loss.token_terms import log_target_weight
from tests.loss.cases import SETTINGS, make_inputs


def _spec_loss_and_grad(z, x, cfg):
    """One token, float64, directly from megatron_ntp/loss/README.md, "The method" (no code in common)."""
    p = torch.softmax(z, -1)
    order = sorted(range(len(z)), key=lambda j: (-z[j].item(), j))  # value desc, id asc
    topk = set(order[: min(cfg.topk, len(z))])
    w = torch.empty_like(p)
    for a in range(len(z)):
        if a == x:
            w[a] = p[x] ** (1 - (1 - p[x]) ** cfg.beta)
        else:
            w[a] = (cfg.lambda_topk if a in topk else cfg.lambda_tail) * p[a]
    loss = -(w * torch.log(p)).sum()
    grad = p * w.sum() - w
    return loss, grad


@pytest.mark.parametrize("name", list(SETTINGS))
def test_reference_equals_spec(name):
    cfg = SETTINGS[name]
    logits, target = make_inputs(150, seed=1, shape=(4,))
    z = logits.clone().requires_grad_()
    loss, stats = reference_shaped_loss(z, target, cfg)
    loss.sum().backward()
    for i in range(4):
        if not 0 <= target[i] < 150:
            assert loss[i] == 0 and torch.all(z.grad[i] == 0)
            assert all(stats[k][i] == 0 for k in stats)
            continue
        want_loss, want_grad = _spec_loss_and_grad(logits[i], target[i].item(), cfg)
        torch.testing.assert_close(loss[i], want_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(z.grad[i], want_grad, rtol=1e-12, atol=1e-12)
        p = torch.softmax(logits[i], -1)
        torch.testing.assert_close(stats["ce"][i], -torch.log(p[target[i]]))
        torch.testing.assert_close(stats["entropy"][i], -(p * p.log()).sum())


def test_cross_entropy_setting_is_torch_cross_entropy():
    logits, target = make_inputs(300, seed=2, dtype=torch.float32)
    z1, z2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss, _ = reference_shaped_loss(z1, target, ShapedLossConfig(topk=10))
    ce = torch.nn.functional.cross_entropy(
        z2.view(-1, 300), target.view(-1).masked_fill(target.view(-1) >= 300, -100),
        reduction="none", ignore_index=-100,
    )
    loss.sum().backward()
    ce.sum().backward()
    torch.testing.assert_close(loss.view(-1), ce)
    torch.testing.assert_close(z1.grad, z2.grad)


def test_topk_tie_rule_prefers_lower_ids():
    z = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0]])
    assert topk_membership(z, 3).nonzero()[:, 1].tolist() == [1, 2, 3]
    assert topk_membership(z, 4).nonzero()[:, 1].tolist() == [1, 2, 3, 4]
    assert topk_membership(z, 100).all()
    assert not topk_membership(z, 0).any()


@pytest.mark.parametrize("beta, low, high", [(-0.25, 1.0, 1.15), (0.5, 0.8, 1.0)])
def test_target_weight_range(beta, low, high):
    """loss README: w_x in [1, ~1.15] for beta = -0.25 and in [~0.8, 1] for beta = 0.5."""
    log_p = torch.log(torch.linspace(1e-9, 1.0, 100001, dtype=torch.float64))
    w = log_target_weight(log_p, beta).exp()
    assert w.min() >= low - 1e-3 and w.max() <= high + 1e-3
    assert (w.min() - low).abs() < 0.02 or (w.max() - high).abs() < 0.02
    p = log_p.exp()[1:-1]
    torch.testing.assert_close(w[1:-1], p ** (1 - (1 - p) ** beta))


@pytest.mark.parametrize("beta", [-0.25, 0.0, 0.5])
def test_target_weight_saturated(beta):
    log_p = torch.tensor([0.0, -1e-30, -1e4, -torch.inf], dtype=torch.float32)
    w = log_target_weight(log_p, beta).exp()
    assert torch.isfinite(w[:3]).all()
    assert w[0] == 1.0
