"""The loss on the GPU: equal to the fp32 reference (unfused and fused), and tensor-parallel
invariant on bf16 logits full of ties when 2+ GPUs are present."""

import pytest
import torch

from megatron_ntp.loss import (
    ShapedLossConfig,
    fused_linear_shaped_loss,
    reference_shaped_loss,
    vocab_parallel_shaped_loss,
)
from tests.distributed import free_port

pytestmark = pytest.mark.gpu
CFG = ShapedLossConfig(beta=-0.25, topk=16, lambda_topk=0.05, lambda_tail=-0.1)
TOKENS, BATCH, HIDDEN, VOCAB = 512, 2, 256, 8192


def _inputs(dtype=torch.float32):
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(TOKENS, BATCH, HIDDEN, device="cuda", generator=generator, dtype=dtype)
    weight = torch.randn(VOCAB, HIDDEN, device="cuda", generator=generator, dtype=dtype) * 0.05
    target = torch.randint(0, VOCAB, (TOKENS, BATCH), device="cuda", generator=generator)
    target[:7] = -100  # ignored positions
    return hidden, weight, target


@pytest.mark.quick
def test_unfused_and_fused_loss_equal_the_reference():
    hidden, weight, target = _inputs()
    logits = (hidden @ weight.t()).detach().requires_grad_()
    expected, _ = reference_shaped_loss(logits, target, CFG)
    expected.sum().backward()
    reference_grad = logits.grad.clone()

    unfused_logits = logits.detach().clone().requires_grad_()
    unfused, _ = vocab_parallel_shaped_loss(unfused_logits, target, CFG)
    unfused.sum().backward()
    torch.testing.assert_close(unfused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfused_logits.grad, reference_grad, rtol=1e-4, atol=1e-6)

    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    fused, _ = fused_linear_shaped_loss(h, w, target, CFG)
    fused.sum().backward()
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    assert w.grad.device == weight.device and h.grad.device == hidden.device
    torch.testing.assert_close(w.grad, reference_grad.flatten(0, 1).t() @ hidden.flatten(0, 1),
                               rtol=1e-3, atol=1e-4)


def _nccl_worker(rank, world_size, port):
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size,
                            device_id=torch.device("cuda", rank))
    try:
        _tp_invariance(rank, world_size, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _tp_invariance(rank, world_size, group):
    generator = torch.Generator(device="cuda").manual_seed(0)
    # bf16 logits on a coarse grid: many exact ties at the top-k boundary
    logits = (torch.randint(-8, 8, (TOKENS, VOCAB), device="cuda", generator=generator) / 4
              ).to(torch.bfloat16)
    target = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=generator)
    expected, _ = reference_shaped_loss(logits, target, CFG)
    shard = logits.chunk(world_size, dim=-1)[rank].contiguous()
    got, _ = vocab_parallel_shaped_loss(shard, target, CFG, group)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.quick
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ GPUs")
def test_tensor_parallel_invariant_on_bf16_ties():
    import torch.multiprocessing as mp

    world = 2 if torch.cuda.device_count() < 4 else 4
    mp.spawn(_nccl_worker, args=(world, free_port()), nprocs=world, join=True)
