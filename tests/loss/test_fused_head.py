"""The fused head's chunk sizes (a memory budget per device, LossImpl.fused_chunk_bytes) and its
weight-gradient products (input-dtype operands, fp32 sums; the GPU's mixed-dtype addmm checked
against torch's own rules on the meta device)."""

import sys

import pytest
import torch

from megatron_ntp.loss import LossImpl, ShapedLossConfig, fused_linear_shaped_loss_sum
from megatron_ntp.loss import fused

QWEN3_VOCAB = 151_936


def test_tokens_per_chunk_follow_the_budget_and_the_device():
    # fp32 inputs: 4 bytes a logit; bf16 inputs: the fp32 logits and their bf16 copy, 6 bytes
    assert fused.bytes_per_token(QWEN3_VOCAB, torch.float32) == QWEN3_VOCAB * 4
    assert fused.bytes_per_token(QWEN3_VOCAB, torch.bfloat16) == QWEN3_VOCAB * 6
    assert fused.bytes_per_token(100, torch.float64) == 800
    impl = LossImpl()
    assert impl.fused_tokens_per_chunk(QWEN3_VOCAB * 4, "cpu") == 110  # 64 MiB
    assert impl.fused_tokens_per_chunk(QWEN3_VOCAB * 6, "cuda") == 588  # 512 MiB
    assert impl.fused_tokens_per_chunk(QWEN3_VOCAB * 6, torch.device("cuda", 3)) == 588
    assert LossImpl(fused_chunk_bytes=1).fused_tokens_per_chunk(QWEN3_VOCAB * 4, "cpu") == 1
    assert LossImpl(fused_chunk_bytes=1 << 30).fused_tokens_per_chunk(1 << 20, "cpu") == 1024


@pytest.mark.parametrize("dtype, tokens_per_chunk", [(torch.float32, 10), (torch.bfloat16, 6)])
def test_chunks_and_results_under_a_budget(monkeypatch, dtype, tokens_per_chunk):
    """A budget of 40,960 bytes at V = 1024: 10 fp32 tokens, 6 bf16 ones (6 bytes a logit); the
    loss, the stats and both gradients equal one chunk's."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 8, 16, generator=gen).to(dtype)
    weight = (torch.randn(1024, 16, generator=gen) / 4).to(dtype)
    target = torch.randint(0, 1024, (4, 8), generator=gen)
    mask = (torch.rand(4, 8, generator=gen) > 0.2).float()
    cfg = ShapedLossConfig(beta=-0.25, topk=8, lambda_tail=-0.1)
    rows, logits = [], fused._logits
    monkeypatch.setattr(fused, "_logits", lambda t, w, out: rows.append(len(t)) or logits(t, w, out))

    results = {}
    for name, impl in (("budget", LossImpl(fused_chunk_bytes=40_960)),
                       ("one chunk", LossImpl(fused_chunk_bytes=1 << 30))):
        rows.clear()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        total, loss, stats = fused_linear_shaped_loss_sum(h, w, target, mask, cfg, impl=impl)
        total.backward()
        results[name] = (total, loss, stats["entropy"], h.grad, w.grad, list(rows))
    full, rest = divmod(32, tokens_per_chunk)
    assert results["budget"][-1] == [tokens_per_chunk] * full + [rest]
    assert results["one chunk"][-1] == [32]
    tolerance = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    for got, want in zip(results["budget"][:-1], results["one chunk"][:-1]):
        torch.testing.assert_close(got, want, **tolerance)


def test_weight_gradient_sums_the_input_dtype_products_in_fp32():
    """bf16 gradient and tokens: the fp32 accumulator gains their exact products (as
    megatron-core's weight-gradient GEMM forms them), whatever the fp32 buffer held."""
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(7, 50, generator=gen).to(torch.bfloat16)  # [c, V_local]
    tokens = torch.randn(7, 12, generator=gen).to(torch.bfloat16)  # [c, H]
    start = torch.randn(50, 12, generator=gen)
    accumulator = start.clone()
    buffer = torch.randn(7, 50, generator=gen)  # the chunk's fp32 logits, overwritten
    fused.add_weight_gradient(accumulator, grad, tokens, buffer)
    want = start.double() + grad.double().t() @ tokens.double()
    torch.testing.assert_close(accumulator.double(), want, rtol=1e-6, atol=1e-6)
    # fp32 operands: accumulated as they are (no copy through the buffer)
    grad32, tokens32 = torch.randn(7, 50, generator=gen), torch.randn(7, 12, generator=gen)
    accumulator = start.clone()
    fused.add_weight_gradient(accumulator, grad32, tokens32, None)
    torch.testing.assert_close(accumulator, start + grad32.t() @ tokens32)


def test_gpu_weight_gradient_gemm_is_chosen_from_what_this_torch_accepts(monkeypatch):
    """The decision on the real torch: torch 2.8/2.9 register the CUDA addmm.dtype_out kernel but
    reject an fp32 `self` with bf16 operands (pytorch issue 154086), so there the fused head must
    not call it (the oldest-stack lane runs this on PyPI's torch 2.9 CUDA build)."""
    assert fused.weight_gradient_gemm("cpu") == "fp32"
    if fused._torch_release() < (2, 10):
        assert fused.weight_gradient_gemm("cuda") in ("apex", "bf16")
    has_kernel = monkeypatch.setattr  # the rules, with the CUDA kernel and the version faked
    has_kernel(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda *args: True)
    for release, expected in (((2, 9), "bf16"), ((2, 10), "addmm"), ((3, 0), "addmm")):
        fused.weight_gradient_gemm.cache_clear()
        monkeypatch.setattr(fused, "_torch_release", lambda: release)
        assert fused.weight_gradient_gemm("cuda") == expected, release
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", _FakeApex())
    fused.weight_gradient_gemm.cache_clear()
    assert fused.weight_gradient_gemm("cuda") == "apex"
    fused.weight_gradient_gemm.cache_clear()


class _FakeApex:
    """Apex's wgrad_gemm_accum_fp32 as its C++ source states it: (input [c, H], d_output
    [c, V], d_weight [V, H] fp32), all contiguous, d_weight += d_output^T @ input."""

    def wgrad_gemm_accum_fp32(self, input, d_output, d_weight):
        assert input.dtype == d_output.dtype == torch.bfloat16 and d_weight.dtype == torch.float32
        assert input.is_contiguous() and d_output.is_contiguous() and d_weight.is_contiguous()
        assert (input.shape[0], input.shape[1], d_output.shape[1]) == \
            (d_output.shape[0], d_weight.shape[1], d_weight.shape[0])
        d_weight += (d_output.double().t() @ input.double()).float()


def _bf16_chunk(seed):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(7, 50, generator=gen).to(torch.bfloat16)  # [c, V_local]
    tokens = torch.randn(7, 12, generator=gen).to(torch.bfloat16)  # [c, H]
    return grad, tokens, torch.randn(50, 12, generator=gen)


def test_each_gpu_weight_gradient_gemm_adds_the_bf16_products(monkeypatch):
    """The GPU branches' arithmetic, run on CPU tensors: Apex's call (its argument order) and
    the bf16 GEMM (bf16 product, no fp32 copy of the operands) add grad^T @ tokens."""
    grad, tokens, start = _bf16_chunk(3)
    exact = start.double() + grad.double().t() @ tokens.double()
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", _FakeApex())
    for gemm in ("apex", "bf16"):
        monkeypatch.setattr(fused, "weight_gradient_gemm", lambda device_type: gemm)
        accumulator = start.clone()
        fused.add_weight_gradient(accumulator, grad, tokens, None)
        tolerance = {"rtol": 1e-6, "atol": 1e-6} if gemm == "apex" else {"rtol": 0, "atol": 0}
        want = exact.float() if gemm == "apex" else start + (grad.t() @ tokens).float()
        torch.testing.assert_close(accumulator, want, **tolerance)
        torch.testing.assert_close(accumulator.double(), exact, rtol=2e-2, atol=2e-2)


def test_gpu_mixed_dtype_addmm_branch_is_a_call_torch_accepts(monkeypatch):
    """The "addmm" branch (bf16 operands, out_dtype fp32, in place), on meta tensors: torch's
    own shape and dtype rules for addmm.dtype_out check the call."""
    calls = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(fused, "weight_gradient_gemm", lambda device_type: "addmm")
    monkeypatch.setattr(torch, "addmm", spy)
    accumulator = torch.empty(50, 12, device="meta")
    grad = torch.empty(7, 50, dtype=torch.bfloat16, device="meta")
    tokens = torch.empty(7, 12, dtype=torch.bfloat16, device="meta")
    if not hasattr(torch.ops.aten.addmm, "dtype_out"):
        pytest.skip(f"torch {torch.__version__} has no addmm.dtype_out (the branch is not taken)")
    try:
        fused.add_weight_gradient(accumulator, grad, tokens, torch.empty(7, 50, device="meta"))
    except TypeError as err:  # torch 2.9's meta path: the branch is never chosen there
        assert fused._torch_release() < (2, 10), err
        return
    assert len(calls) == 1 and calls[0]["out_dtype"] == torch.float32
    assert calls[0]["out"] is accumulator
    # torch's meta rules see mistakes: a gradient not transposed, a bf16 out_dtype into fp32
    with pytest.raises(RuntimeError, match="reduction dim"):
        real_addmm(accumulator, grad, tokens, out_dtype=torch.float32, out=accumulator)
    with pytest.raises(RuntimeError, match="dtype"):
        real_addmm(accumulator, grad.t(), tokens, out_dtype=torch.bfloat16, out=accumulator)


def _bf16_head(seed, tied):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 40, 16, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(256, 16, generator=gen) / 4).to(torch.bfloat16).requires_grad_()
    weight.main_grad = torch.full((256, 16), 0.5)  # as megatron-core's DDP attaches them
    weight.grad_added_to_main_grad = False
    if tied:
        weight.zero_out_wgrad = True
    target = torch.randint(0, 256, (3, 40), generator=gen)
    return hidden, weight, target


def _fused_backward(hidden, weight, target, summed):
    cfg = ShapedLossConfig(beta=-0.25, topk=8, lambda_tail=-0.1)
    impl = LossImpl(fused_chunk_bytes=4096)  # several chunks
    if summed:
        total, _, _ = fused_linear_shaped_loss_sum(hidden, weight, target, torch.ones(3, 40),
                                                   cfg, impl=impl)
        (total * 0.25).backward()
    else:
        loss, _ = fused.fused_linear_shaped_loss(hidden, weight, target, cfg, impl=impl)
        (loss.float().sum() * 0.25).backward()


@pytest.mark.parametrize("summed", [True, False])
def test_weight_gradient_goes_to_an_fp32_main_grad_without_bf16_rounding(monkeypatch, summed):
    """Where DDP holds an fp32 main_grad, the fused head adds its fp32 sum there (as
    megatron-core's linear layers do under gradient-accumulation fusion) instead of returning a
    bf16 gradient for DDP's hook to add: main_grad gains the fp32 sum itself."""
    sums = []
    finish = fused._Gradients.finish
    def spy(*args):
        result = finish(*args)
        sums.append(result[1].clone())
        return result

    monkeypatch.setattr(fused._Gradients, "finish", spy)
    hidden, weight, target = _bf16_head(4, tied=False)
    del weight.main_grad, weight.grad_added_to_main_grad
    _fused_backward(hidden, weight, target, summed)  # without DDP: a bf16 gradient
    # the fp32 sum over the chunks; the summed form scales it by the upstream 0.25 in backward
    fp32_sum = sums[0] * (0.25 if summed else 1.0)
    assert sums[0].dtype == torch.float32
    torch.testing.assert_close(weight.grad, fp32_sum.to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(weight.grad.float(), fp32_sum)  # that rounding is what is avoided
    for tied in (False, True):
        hidden, weight, target = _bf16_head(4, tied)
        _fused_backward(hidden, weight, target, summed)
        torch.testing.assert_close(weight.main_grad, 0.5 + fp32_sum, rtol=0, atol=0)
        assert weight.grad_added_to_main_grad  # DDP's hook does not add .grad again ...
        assert weight.grad.dtype == torch.bfloat16 and weight.grad.shape == weight.shape
        if tied:  # ... unless zero_out_wgrad: then .grad is the embedding's gradient + zeros
            assert torch.count_nonzero(weight.grad) == 0
