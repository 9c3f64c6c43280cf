"""The GPU code paths, checked on CPU: no tensor without an explicit device (meta default
device), no host synchronisation (a trap), no gradient pass without a wanted gradient."""

import pytest
import torch

from megatron_ntp.loss import (
    LossImpl,
    fused_linear_shaped_loss,
    fused_linear_shaped_loss_sum,
    vocab_parallel_shaped_loss,
)
from megatron_ntp.loss import passes
from tests.loss.cases import SETTINGS, HostSyncTrap, make_inputs

VOCAB = 1024


def test_trap_catches_syncs():
    x = torch.ones(3)
    for sync in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x.nonzero(),
                 lambda: x.tolist(), lambda: x.cpu(), lambda: x.numpy(), lambda: float(x[0])):
        with HostSyncTrap(), pytest.raises(AssertionError, match="host sync"):
            sync()


def _inputs():
    """CPU inputs of _run_both_paths: logits, target, hidden states, output weight. V = 1024:
    blocks of 128, so k = 5 searches 5 of the 8 blocks (k = 100: the whole row)."""
    logits, target = make_inputs(VOCAB, seed=3, dtype=torch.float32, shape=(3, 5))
    gen = torch.Generator().manual_seed(1)
    return logits, target, torch.randn(3, 5, 8, generator=gen), torch.randn(VOCAB, 8, generator=gen)


def _backward(loss, outputs=4):
    """The loss Function's own backward, called directly in this thread (the autograd engine
    would run it outside a device context or trap set here)."""
    return loss.grad_fn.apply(torch.ones_like(loss), *[None] * (outputs - 1))


def _run_both_paths(impl, cfg, inputs):
    """Unfused and fused forward, then each backward: (loss, grad) tensors."""
    logits, target, hidden, weight = inputs
    z = logits.clone().requires_grad_()
    loss, _ = vocab_parallel_shaped_loss(z, target, cfg, impl=impl)
    grad_logits = _backward(loss)[0]
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused, _ = fused_linear_shaped_loss(hidden, weight, target, cfg, chunk_tokens=4, impl=impl)
    grad_hidden, grad_weight = _backward(fused)[:2]
    # gradients formed in the forward: the forward runs the gradient pass and the matmuls
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    total, _, _ = fused_linear_shaped_loss_sum(hidden, weight, target, torch.ones_like(fused),
                                               cfg, chunk_tokens=4, impl=impl)
    grad_hidden_sum, grad_weight_sum = _backward(total, outputs=5)[:2]
    return (loss, grad_logits, fused, grad_hidden, grad_weight, total, grad_hidden_sum,
            grad_weight_sum)


@pytest.mark.parametrize("name", ["beta_neg_both_lambdas", "tail_suppression", "cross_entropy"])
def test_gpu_path_has_no_host_sync(name):
    """The keys selection (the GPU path) with eager and compiled passes, forward and backward."""
    inputs = _inputs()
    want = _run_both_paths(LossImpl(selection="cpu_scan"), SETTINGS[name], inputs)
    for passes_impl in ("eager", "compiled"):
        impl = LossImpl(selection="keys", passes=passes_impl, chunk_bytes=16 * VOCAB * 4)
        with HostSyncTrap():
            got = _run_both_paths(impl, SETTINGS[name], inputs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_every_tensor_has_an_explicit_device():
    """With torch's default device set to meta, a tensor created without a device lands on meta
    and the CPU computation fails: forward and each backward of both paths."""
    inputs = _inputs()
    for impl in (LossImpl(), LossImpl(selection="keys", passes="eager")):
        want = _run_both_paths(impl, SETTINGS["beta_neg_both_lambdas"], inputs)
        torch.set_default_device("meta")
        try:
            got = _run_both_paths(impl, SETTINGS["beta_neg_both_lambdas"], inputs)
        finally:
            torch.set_default_device(None)
        for g, w in zip(got, want):
            assert g.device.type == "cpu"
            torch.testing.assert_close(g, w)


def test_no_gradient_pass_without_a_wanted_gradient(monkeypatch):
    """Validation and eval (no_grad) and logits that need no gradient skip the gradient pass,
    and overwrite_logits leaves such logits untouched."""
    logits, target = make_inputs(300, seed=4, dtype=torch.float32)
    cfg = SETTINGS["beta_neg_both_lambdas"]
    want, _ = vocab_parallel_shaped_loss(logits, target, cfg)

    def forbidden(*args, **kwargs):
        raise AssertionError("the gradient pass ran")

    monkeypatch.setattr(passes, "gradient", forbidden)
    z = logits.clone().requires_grad_()
    with torch.no_grad():
        loss, _ = vocab_parallel_shaped_loss(z, target, cfg, overwrite_logits=True)
    plain = logits.clone()
    loss_plain, _ = vocab_parallel_shaped_loss(plain, target, cfg, overwrite_logits=True)
    assert torch.equal(loss, want) and torch.equal(loss_plain, want)
    assert torch.equal(z.detach(), logits) and torch.equal(plain, logits)
