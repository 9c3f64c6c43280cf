"""The fused head's chunk sizes (a memory budget per device, LossImpl.fused_chunk_bytes) and its
weight-gradient products (input-dtype operands, fp32 sums; the GPU's mixed-dtype addmm checked
against torch's own rules on the meta device)."""

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


def test_gpu_mixed_dtype_addmm_branch_is_a_call_torch_accepts(monkeypatch):
    """The CUDA branch (bf16 operands, out_dtype fp32, in place) taken with the capability faked,
    on meta tensors: torch's own shape and dtype rules for addmm.dtype_out check the call."""
    assert not fused._has_mixed_dtype_addmm("cpu")
    assert not fused._has_mixed_dtype_addmm("meta")
    calls = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(fused, "_has_mixed_dtype_addmm", lambda device_type: True)
    monkeypatch.setattr(torch, "addmm", spy)
    accumulator = torch.empty(50, 12, device="meta")
    grad = torch.empty(7, 50, dtype=torch.bfloat16, device="meta")
    tokens = torch.empty(7, 12, dtype=torch.bfloat16, device="meta")
    fused.add_weight_gradient(accumulator, grad, tokens, torch.empty(7, 50, device="meta"))
    assert len(calls) == 1 and calls[0]["out_dtype"] == torch.float32
    assert calls[0]["out"] is accumulator
    # torch's meta rules see mistakes: a gradient not transposed, a bf16 out_dtype into fp32
    with pytest.raises(RuntimeError, match="reduction dim"):
        real_addmm(accumulator, grad, tokens, out_dtype=torch.float32, out=accumulator)
    with pytest.raises(RuntimeError, match="dtype"):
        real_addmm(accumulator, grad.t(), tokens, out_dtype=torch.bfloat16, out=accumulator)
