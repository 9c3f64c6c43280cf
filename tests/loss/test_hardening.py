"""Bad inputs and bad settings: refused with the reason, or given the masked-softmax answer."""

import pytest
import torch

from megatron_ntp.config import ConfigError, load_config, validate_config
from megatron_ntp.loss import (
    LossImpl,
    ShapedLossConfig,
    fused_linear_shaped_loss,
    reference_shaped_loss,
    vocab_parallel_shaped_loss,
)
from megatron_ntp.loss.vocab_parallel import NONFINITE_LOGITS
from tests.loss.cases import SETTINGS, nonfinite_cases

SELECTIONS = [LossImpl(selection="cpu_scan"), LossImpl(selection="keys", passes="eager")]


def test_beta_below_minus_one_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"beta must be >= -1, got -1.5.*diverges as p_x -> 1"):
        ShapedLossConfig(beta=-1.5)
    # at -1 the weight stays finite on a confident token (p_x ~ 1 - 2e-5)
    z = torch.tensor([[12.0, 0.0, 0.0, 0.0]], requires_grad=True)
    loss, _ = vocab_parallel_shaped_loss(z, torch.tensor([0]), ShapedLossConfig(beta=-1.0))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()


def _validate(*overrides):
    base = ["model.preset=tiny-dense", "data.seq_length=64", "train.steps=10",
            "train.lr_warmup_steps=2", "train.global_batch_tokens=512"]
    return validate_config(load_config(None, base + list(overrides)))


def test_config_and_schedule_refuse_beta_below_minus_one():
    with pytest.raises(ConfigError, match=r"loss.*beta must be >= -1"):
        _validate("loss.beta=-1.5")
    with pytest.raises(ConfigError, match=r"train.loss_schedule.beta.end=-1.2.*beta must be >= -1"):
        _validate("train.loss_schedule={beta: {start: 0, end: -1.2, end_step: 5}}")
    _validate("train.loss_schedule={beta: {start: 0, end: -1.0, end_step: 5}}")


@pytest.mark.parametrize("impl", SELECTIONS, ids=["cpu_scan", "keys"])
def test_minus_inf_logits_are_a_masked_softmax(impl):
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.5]])
    target = torch.tensor([0])
    z = logits.clone().requires_grad_()
    loss, stats = vocab_parallel_shaped_loss(z, target, ShapedLossConfig(topk=2), impl=impl)
    loss.sum().backward()
    z_ce = logits.clone().requires_grad_()
    ce = torch.nn.functional.cross_entropy(z_ce, target, reduction="none")
    ce.sum().backward()
    assert abs(loss.item() - 0.4644) < 1e-4
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(stats["ce"], ce)
    torch.testing.assert_close(z.grad, z_ce.grad)
    assert z.grad[0, 2] == 0 and torch.isfinite(stats["entropy"]).all()


@pytest.mark.parametrize("impl", SELECTIONS, ids=["cpu_scan", "keys"])
@pytest.mark.parametrize("name", ["beta_neg_both_lambdas", "k_at_least_vocab", "tail_suppression"])
def test_minus_inf_logits_with_shaped_settings_equal_the_reference(name, impl):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    logits[:, ::3] = float("-inf")  # a third of the vocabulary masked, some inside any K
    logits[3, 2:] = float("-inf")  # one finite entry (id 1): p = 1 there
    target = torch.tensor([1, 2, 3, 1])  # row 2: a masked target, ce = inf as in F.cross_entropy
    z, z_ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss, stats = vocab_parallel_shaped_loss(z, target, SETTINGS[name], impl=impl)
    ref, ref_stats = reference_shaped_loss(z_ref, target, SETTINGS[name])
    rows = [0, 1, 3]  # the finite ones
    loss[rows].sum().backward()
    ref[rows].sum().backward()
    torch.testing.assert_close(loss, ref)
    for key in stats:
        torch.testing.assert_close(stats[key], ref_stats[key])
    torch.testing.assert_close(z.grad, z_ref.grad)
    assert loss[2] == float("inf") and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("impl", SELECTIONS, ids=["cpu_scan", "keys"])
@pytest.mark.parametrize("case", nonfinite_cases(), ids=lambda case: case[0])
def test_nonfinite_logits_raise_the_clear_error(case, impl):
    _, logits, target = case
    for cfg in (ShapedLossConfig(), SETTINGS["beta_neg_both_lambdas"]):
        with pytest.raises(RuntimeError, match="NaN or \\+inf"):
            vocab_parallel_shaped_loss(logits.clone().requires_grad_(), target, cfg, impl=impl)
        hidden = torch.eye(4)[:2] * logits.nan_to_num(0.0, 0.0, 0.0)  # finite hidden states
        with pytest.raises(RuntimeError, match="NaN or \\+inf"):
            fused_linear_shaped_loss(logits, torch.eye(4), target, cfg, impl=impl)
        fused_linear_shaped_loss(hidden, torch.eye(4), target, cfg, impl=impl)
    assert "NaN or +inf" in NONFINITE_LOGITS
