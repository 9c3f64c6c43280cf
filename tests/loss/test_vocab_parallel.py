"""Single-process behaviour of vocab_parallel_shaped_loss and the fused path."""

import pytest
import torch

from megatron_ntp.loss import (
    LossImpl,
    ShapedLossConfig,
    fused_linear_shaped_loss,
    reference_shaped_loss,
    vocab_parallel_shaped_loss,
)
from megatron_ntp.loss import passes
from megatron_ntp.loss import cpu_kernels
from megatron_ntp.loss.topk import block_topk, shard_topk
from tests.loss.cases import SETTINGS, HostSyncTrap, make_inputs, tied_bf16_logits


def test_gradcheck_float64_cross_entropy():
    """With the defaults the weights are constant, so the loss's own derivative is checkable."""
    cfg = ShapedLossConfig(topk=3)
    logits, target = make_inputs(12, seed=3, shape=(3,))
    z = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: vocab_parallel_shaped_loss(t, target, cfg)[0], (z,), eps=1e-6, atol=1e-7
    )
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(12, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    tgt = torch.tensor([0, 5, -100, 11, 7])
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_shaped_loss(h, w, tgt, cfg, chunk_tokens=2)[0],
        (hidden, weight), eps=1e-6, atol=1e-7,
    )


def _frozen_weight_surrogate(z0, target, cfg):
    """G(z) = -sum_a w_a(z0) log p_a(z), the weights taken from megatron_ntp/loss/README.md at z0 and frozen.

    By the policy-gradient identity the method's gradient at z0 is dG/dz at z0.
    """
    p0 = torch.softmax(z0, -1)
    order = torch.sort(z0, dim=-1, descending=True, stable=True).indices[..., : cfg.topk]
    in_k = torch.zeros_like(z0, dtype=torch.bool).scatter_(-1, order, True)
    w = torch.where(in_k, cfg.lambda_topk, cfg.lambda_tail).double() * p0
    px = p0.gather(-1, target[:, None])
    w.scatter_(-1, target[:, None], px ** (1 - (1 - px) ** cfg.beta))
    return lambda z: -(w * torch.log_softmax(z, -1)).sum()


@pytest.mark.parametrize("name", ["beta_neg_both_lambdas", "beta_pos_both_lambdas", "k1", "precision"])
def test_gradient_is_the_frozen_weight_derivative(name):
    """float64 central differences of G against the implementation's backward, element by element."""
    cfg = SETTINGS[name]
    logits, target = make_inputs(12, seed=3, shape=(3,))
    target[1] = 4  # every row counts here
    target[2] = 9
    z = logits.clone().requires_grad_()
    vocab_parallel_shaped_loss(z, target, cfg)[0].sum().backward()
    surrogate = _frozen_weight_surrogate(logits, target, cfg)
    numeric = torch.zeros_like(logits)
    eps = 1e-6
    for i in range(logits.numel()):
        step = torch.zeros_like(logits).view(-1)
        step[i] = eps
        step = step.view_as(logits)
        numeric.view(-1)[i] = (surrogate(logits + step) - surrogate(logits - step)) / (2 * eps)
    torch.testing.assert_close(z.grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["precision", "diversity", "beta_neg_both_lambdas"])
def test_saturated_logits_stay_finite(name):
    cfg = SETTINGS[name]
    logits = torch.zeros(4, 50)
    target = torch.tensor([3, 3, 7, 9])
    logits[0, 3] = 200.0  # p_target == 1 exactly in fp32
    logits[1, 3] = 1e30  # and with an enormous logit
    logits[2, 7] = -200.0  # p_target == 0 in fp32
    logits[3, 9] = -1e30
    z = logits.clone().requires_grad_()
    loss, stats = vocab_parallel_shaped_loss(z, target, cfg)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert loss[0] == 0 and torch.all(z.grad[0].abs() < 1e-30)  # w_x = 1, p = one-hot
    assert stats["ce"][0] == 0
    torch.testing.assert_close(z.grad[2, 7], torch.tensor(-1.0))  # p_x W - w_x with p_x = 0
    ref_z = logits[[0, 2]].clone().requires_grad_()
    ref_loss, _ = reference_shaped_loss(ref_z, target[[0, 2]], cfg)
    torch.testing.assert_close(loss[[0, 2]], ref_loss)


def test_ignored_targets_have_no_loss_gradient_or_stats():
    logits, _ = make_inputs(40, seed=5, dtype=torch.float32)
    target = torch.full(logits.shape[:-1], -100)
    target[0, 0] = 40
    z = logits.clone().requires_grad_()
    loss, stats = vocab_parallel_shaped_loss(z, target, SETTINGS["beta_neg_both_lambdas"])
    loss.sum().backward()
    assert torch.all(loss == 0) and torch.all(z.grad == 0)
    assert all(torch.all(v == 0) for v in stats.values())


def test_bf16_logits_give_bf16_gradient_and_fp32_loss():
    logits, target = tied_bf16_logits(96, seed=1)
    z = logits.clone().requires_grad_()
    loss, stats = vocab_parallel_shaped_loss(z, target, SETTINGS["tail_suppression"])
    loss.sum().backward()
    assert loss.dtype == torch.float32 and stats["ce"].dtype == torch.float32
    assert z.grad.dtype == torch.bfloat16
    assert torch.equal(z, logits)  # the input is left untouched


def test_overwrite_logits_writes_gradient_into_logits():
    logits, target = make_inputs(64, seed=6, dtype=torch.float32)
    cfg = SETTINGS["beta_neg_both_lambdas"]
    a = logits.clone().requires_grad_()
    loss_a, _ = vocab_parallel_shaped_loss(a, target, cfg)
    loss_a.sum().backward()
    assert torch.equal(a.detach(), logits)  # default: logits untouched

    b = logits.clone()
    b_leaf = b.requires_grad_()
    loss_b, _ = vocab_parallel_shaped_loss(b_leaf, target, cfg, overwrite_logits=True)
    torch.testing.assert_close(loss_a, loss_b)
    loss_b.sum().backward()
    torch.testing.assert_close(b_leaf.grad, a.grad)
    torch.testing.assert_close(b.detach(), a.grad)  # the buffer now holds the gradient


def test_backward_twice_only_without_overwrite():
    logits, target = make_inputs(20, seed=1, dtype=torch.float32)
    z = logits.clone().requires_grad_()
    loss, _ = vocab_parallel_shaped_loss(z, target, ShapedLossConfig())
    loss.sum().backward(retain_graph=True)
    loss.sum().backward()
    first = z.grad / 2
    z = logits.clone().requires_grad_()
    loss, _ = vocab_parallel_shaped_loss(z, target, ShapedLossConfig(), overwrite_logits=True)
    loss.sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, first)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.sum().backward()


def test_input_errors_are_clear():
    logits = torch.randn(2, 3, 10)
    with pytest.raises(TypeError, match="int64"):
        vocab_parallel_shaped_loss(logits, torch.zeros(2, 3, dtype=torch.int32), ShapedLossConfig())
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\)"):
        vocab_parallel_shaped_loss(logits, torch.zeros(2, 4, dtype=torch.long), ShapedLossConfig())
    with pytest.raises(TypeError, match="floating"):
        vocab_parallel_shaped_loss(logits.long(), torch.zeros(2, 3, dtype=torch.long), ShapedLossConfig())
    with pytest.raises(ValueError, match=r"\[V_local, H\] with H = 10"):
        fused_linear_shaped_loss(logits, torch.randn(5, 7), torch.zeros(2, 3, dtype=torch.long), ShapedLossConfig())


def test_eager_compiled_and_cpu_kernel_passes_agree():
    """The C++ kernels (at TP 1 they also form K's terms for stage 3) agree with the torch
    passes and stage 3's candidate algebra: noise, and a row of heavy ties across K's edge."""
    logits, target = make_inputs(3000, seed=8, dtype=torch.float32, shape=(6, 7))
    logits[0, 0] = torch.randint(-2, 2, (3000,), generator=torch.Generator().manual_seed(1))
    # K (k = 5) is the first five of the tied largest; the target is the sixth, just outside
    target[0, 0] = int((logits[0, 0] == 1).nonzero()[5])
    cfg = SETTINGS["beta_neg_both_lambdas"]
    results = []
    rows_5 = 5 * 3000 * passes.EAGER_BYTES_PER_ENTRY  # several row chunks of 5 rows
    for impl in (LossImpl(passes="compiled"), LossImpl(passes="eager", chunk_bytes=rows_5),
                 LossImpl(passes="cpu_kernel"), LossImpl(passes="cpu_kernel", chunk_bytes=rows_5)):
        z = logits.clone().requires_grad_()
        loss, stats = vocab_parallel_shaped_loss(z, target, cfg, impl=impl)
        loss.sum().backward()
        results.append((loss, z.grad, stats["entropy"], stats["topk_mass"]))
    for result in results[1:]:
        for got, want in zip(result, results[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("selection", ["cpu_scan", "keys"])
@pytest.mark.parametrize("vocab, k", [(5000, 1), (5000, 37), (4099, 20), (300, 100), (50, 80),
                                      (4096, 3), (4096, 40), (8192, 100)])
def test_shard_topk_is_the_first_k_under_the_tie_rule(vocab, k, selection):
    """Equal to a stable sort, without a host sync: noise, heavy ties, +-0, -inf, constant rows;
    over the whole row and over the k blocks whose maxima rank first (blocks of 1, 2, 4, 8 or
    64 entries here)."""
    impl = LossImpl(selection=selection, chunk_bytes=16 * vocab * 4)  # rows in chunks of 4
    gen = torch.Generator().manual_seed(vocab + k)
    noise = torch.randn(6, vocab, generator=gen)
    ties = torch.randint(-2, 2, (6, vocab), generator=gen).float()  # heavy ties
    ramp = torch.arange(vocab, dtype=torch.float32).expand(3, vocab)
    zeros = torch.zeros(4, vocab)
    signed_zeros = torch.where(torch.rand(4, vocab, generator=gen) < 0.5, zeros, -zeros)
    signed_zeros[:, ::7] = 1.0
    for logits in (noise, noise.double(), ties, ties.masked_fill(ties < 0, float("-inf")),
                   torch.cat([ramp, ramp.flip(-1)]), zeros, signed_zeros):
        block = min(vocab & -vocab, 64)  # a power of two dividing the vocabulary
        block_max = logits.view(logits.shape[0], -1, block).amax(-1)
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
        want = order[:, : min(k, vocab)].sort(-1).values
        for search in (lambda: shard_topk(logits, k, impl),  # the whole row
                       lambda: block_topk(logits, block_max, block, k, impl)):  # k blocks
            with HostSyncTrap():
                values, ids = search()
            assert torch.equal(ids, want)
            assert torch.equal(values, logits.gather(-1, want))


def test_cpu_scan_is_built_and_flags_nan_rows():
    # the scan is what makes the loss cheap on CPU: a failed build must not pass unnoticed
    logits = torch.randn(6, 3000)
    assert cpu_kernels.available_for(logits)
    logits[1, 1234] = float("nan")  # one NaN: row 1's block 154
    logits[2, 17] = -float("nan")  # negative NaN (what inf - inf gives on x86): a low order key
    logits[4, ::100] = float("nan")  # NaN in 30 blocks, more than k: the k-th block max is NaN
    bad = [False, True, True, False, True, False]
    block_max = logits.view(6, -1, 8).amax(-1)
    for values, positions, ok in (cpu_kernels.first_k(logits, 10),
                                  cpu_kernels.first_k_by_block_max(logits, block_max, 8, 10)):
        assert ok.tolist() == [not b for b in bad]
        assert values[bad].isnan().all() and not values[[not b for b in bad]].isnan().any()
        assert (positions[bad] == torch.arange(10)).all()  # valid for a gather


def test_all_gather_dtype_keeps_token_ids_exact():
    from megatron_ntp.loss.vocab_parallel import _pack_dtype

    assert _pack_dtype(torch.float32, 151936) == torch.float32
    assert _pack_dtype(torch.float32, 2**24) == torch.float32  # every id < 2**24 is exact
    assert float(torch.tensor(2**24 + 1, dtype=torch.float32)) != 2**24 + 1  # so this needs:
    assert _pack_dtype(torch.float32, 2**24 + 2) == torch.float64
    assert _pack_dtype(torch.float64, 1000) == torch.float64


@pytest.mark.parametrize("selection", ["cpu_scan", "keys"])
def test_row_chunks_equal_one_chunk(selection):
    logits, target = make_inputs(3000, seed=9, dtype=torch.float32, shape=(6, 7))
    cfg = SETTINGS["beta_neg_both_lambdas"]  # k = 5
    results = []
    for chunk_bytes in (1 << 30, 48 * 5 * 4):  # 1 chunk, or 4 rows per chunk in every stage
        impl = LossImpl(selection=selection, passes="eager", chunk_bytes=chunk_bytes)
        z = logits.clone().requires_grad_()
        loss, stats = vocab_parallel_shaped_loss(z, target, cfg, impl=impl)
        loss.sum().backward()
        results.append((loss, z.grad, stats["topk_mass"], stats["entropy"]))
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("overwrite", [False, True])
def test_strided_logits_equal_contiguous(overwrite):
    """A shard that is a strided view (rows wider than V_local) gives the contiguous answer."""
    logits, target = make_inputs(1024, seed=12, dtype=torch.float32, shape=(3, 4))
    cfg = SETTINGS["beta_neg_both_lambdas"]  # k = 5: 5 of the 8 blocks of 128 are searched
    results = []
    for make in (lambda: logits.clone(), lambda: torch.cat([logits, logits], -1)[..., :1024]):
        z = make().requires_grad_()
        assert z.is_contiguous() == (not results)
        loss, stats = vocab_parallel_shaped_loss(z, target, cfg, overwrite_logits=overwrite)
        (grad,) = torch.autograd.grad(loss.sum(), [z])
        results.append((loss, grad, stats["topk_mass"]))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
