"""Two of Megatron-LM's H100 settings, run on CPU ranks (gloo): gradients reduced in bf16
(parallel.grad_reduce_in_bf16) track the fp32 reduction, and the combined 1F1B schedule of the
EP all-to-all overlap (parallel.moe_a2a_overlap) gives the plain schedule's steps."""

import json

import pytest
import torch

from tests.compat.distributed import spawn

BASE = ["model.bf16=true", "data.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_tokens=256", "train.steps=2", "train.lr_warmup_steps=0"]


def synthetic_batches(seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, 8192, (2, 33), generator=generator)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 32),
               "position_ids": torch.arange(32).expand(2, 32)}


def _train(rank, world_size, init_method, overrides, a2a_overlap, result_path):
    """Two optimizer steps; rank 0 writes the steps' global sums and gradient norms, and the
    gradient buffer's dtype."""
    from megatron_ntp.config import load_config, validate_config
    from megatron_ntp.models import gpt
    from megatron_ntp.parallel import initialize_parallel_from_config
    from megatron_ntp.training import build, step

    config = validate_config(load_config(None, BASE + overrides, cuda_available=False),
                             world_size=world_size)
    if a2a_overlap:
        # parallel.moe_a2a_overlap is refused with local layers: its delayed weight gradients
        # are Transformer Engine's. The schedule itself runs here, given a CPU stand-in for
        # Tensor.record_stream (a CUDA caching-allocator call).
        gpt.expert_overlap_settings = lambda config: dict(overlap_moe_expert_parallel_comm=True)
        torch.Tensor.record_stream = lambda tensor, stream: None
    initialize_parallel_from_config(config, rank=rank, world_size=world_size,
                                    init_method=init_method)
    objects = build.build_training_objects(config)
    batches = synthetic_batches(seed=rank)
    microbatches = 256 // (2 * 32 * config.parallel.data)
    steps = []
    for _ in range(2):
        sums, grad_norm, _ = step.train_step(objects, [batches], microbatches, 2, 32)
        steps.append(sums.tolist() + [float(grad_norm)])
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"steps": steps,
                       "grad_dtype": str(objects.model[0].buffers[0].grad_dtype)}, f)


def train(tmp_path, name, overrides, a2a_overlap=False):
    path = tmp_path / f"{name}.json"
    spawn(_train, 2, overrides, a2a_overlap, str(path))
    return json.loads(path.read_text())


def test_bf16_gradient_reduction_tracks_fp32(tmp_path):
    """DP=2 with the distributed optimizer: the bf16 buffer is reduce-scattered in bf16; step 0
    (same weights, same batch) gives the fp32 reduction's gradient norm to 1e-5, step 1 its
    loss to 1e-4 (Adam's first update is about lr * sign(gradient), where bf16 rounding of the
    smallest gradients shows: 1.1e-5 measured)."""
    layout = ["model.preset=tiny-dense", "parallel.distributed_optimizer=true"]
    fp32 = train(tmp_path, "fp32", layout)
    bf16 = train(tmp_path, "bf16", layout + ["parallel.grad_reduce_in_bf16=true"])
    assert (fp32["grad_dtype"], bf16["grad_dtype"]) == ("torch.float32", "torch.bfloat16")
    assert bf16["steps"][0][:5] == fp32["steps"][0][:5]  # the forward is the same
    assert bf16["steps"][0][5] == pytest.approx(fp32["steps"][0][5], rel=1e-5)
    assert bf16["steps"][1][0] == pytest.approx(fp32["steps"][1][0], rel=1e-4)


def test_combined_1f1b_schedule_gives_the_plain_steps(tmp_path):
    """tiny-moe at EP=2 in bf16: megatron-core's combined 1F1B schedule (each micro-batch's
    forward beside the previous one's backward, the model's schedule plan built by the
    training step) gives the plain schedule's losses, statistics and gradient norms."""
    layout = ["model.preset=tiny-moe", "parallel.expert=2"]
    plain = train(tmp_path, "plain", layout)
    overlapped = train(tmp_path, "overlapped", layout, a2a_overlap=True)
    for got, want in zip(overlapped["steps"], plain["steps"], strict=True):
        assert got == pytest.approx(want, rel=1e-6)
