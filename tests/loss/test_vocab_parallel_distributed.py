"""The vocab-parallel loss on 1, 2 and 4 gloo ranks against the full-vocabulary reference."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from megatron_ntp.loss import (
    ShapedLossConfig,
    fused_linear_shaped_loss,
    fused_linear_shaped_loss_sum,
    reference_shaped_loss,
    vocab_parallel_shaped_loss,
)
from megatron_ntp.loss import vocab_parallel
from megatron_ntp.loss.vocab_parallel import NONFINITE_LOGITS
from tests.distributed import run_distributed
from tests.loss.cases import SETTINGS, make_inputs, nonfinite_cases, tied_bf16_logits

# V = 1000 exercises the blocked shard selection for small k (V_local 1000/500/250, whose last
# block is short); V = 28000 exercises it for k = 100 (V_local 7000 at 4 ranks).
VOCABS = {1000: list(SETTINGS), 28000: ["tail_suppression", "head_preservation", "k1"]}


def _shard(tensor, rank, world):
    return tensor.chunk(world, dim=-1)[rank].contiguous()


def _compare(failures, name, got, want, atol, rtol=0.0):
    if not torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol):
        err = (got.double() - want.double()).abs().max().item()
        failures.append(f"{name}: max abs error {err:.3g}")


def _check_against_reference(failures, name, logits, target, cfg, group, rank, world, atol, rtol=0.0):
    shard = _shard(logits, rank, world).requires_grad_()
    loss, stats = vocab_parallel_shaped_loss(shard, target, cfg, tp_group=group)
    upstream = torch.linspace(0.5, 1.5, target.numel(), dtype=loss.dtype).view(target.shape)
    (loss * upstream).sum().backward()

    full = logits.detach().clone().requires_grad_()
    ref_loss, ref_stats = reference_shaped_loss(full, target, cfg)
    (ref_loss * upstream).sum().backward()

    _compare(failures, f"{name} loss", loss, ref_loss, atol, rtol)
    _compare(failures, f"{name} grad", shard.grad, _shard(full.grad, rank, world), atol, rtol)
    for key in ("ce", "entropy", "topk_mass"):
        _compare(failures, f"{name} {key}", stats[key], ref_stats[key], atol, rtol)
    if shard.grad.dtype != logits.dtype:
        failures.append(f"{name}: grad dtype {shard.grad.dtype} != logits dtype {logits.dtype}")


def _record_collectives(log):
    """Wrap all_gather/all_reduce to log (name, elements, dtype) of every call."""
    names = ("all_gather", "all_gather_single", "all_gather_into_tensor", "all_reduce")
    originals = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def gather(parts, tensor, *a, **k):
        log.append(("all_gather", sum(p.numel() for p in parts), tensor.dtype))
        return originals["all_gather"](parts, tensor, *a, **k)

    def gather_into(name):
        def call(output, tensor, *a, **k):
            log.append(("all_gather", output.numel(), tensor.dtype))
            return originals[name](output, tensor, *a, **k)
        return call

    def reduce(tensor, *a, **k):
        log.append(("all_reduce", tensor.numel(), tensor.dtype))
        return originals["all_reduce"](tensor, *a, **k)

    dist.all_gather, dist.all_reduce = gather, reduce
    for name in ("all_gather_single", "all_gather_into_tensor"):
        if name in originals:
            setattr(dist, name, gather_into(name))
    return originals


def _gpu_exchange(gathered, rank, tp_group, world):
    """vocab_parallel._exchange's GPU branch (the in-place all-gather), run on gloo tensors."""
    if world > 1:
        vocab_parallel._all_gather_in_place(gathered, rank, tp_group)


def _check_communication(failures, group, rank, world):
    """Per token and rank: 4 values + k (value, id) pairs, in one float32 exchange (float32
    holds these ids exactly); nothing in backward; never O(V). CPU tensors exchange by one
    in-place all-reduce of the [TP, N, 4 + 2k] buffer (other slots zero); the GPU branch, an
    in-place all-gather, runs here on gloo too and gives the same loss and gradient bit for
    bit, also through all_gather_into_tensor (torch < 2.13 has no dist.all_gather_single)."""
    vocab = 28000
    logits, target = make_inputs(vocab, seed=7, dtype=torch.float32)
    reference = {}
    for name, k, gpu_branch, old_torch in (
            ("tail_suppression", 100, False, False), ("precision", 0, False, False),
            ("tail_suppression", 100, True, False), ("tail_suppression", 100, True, True)):
        shard = _shard(logits, rank, world).requires_grad_()
        log = []
        originals = _record_collectives(log)
        cpu_exchange = vocab_parallel._exchange
        if gpu_branch:
            vocab_parallel._exchange = _gpu_exchange
        if old_torch and "all_gather_single" in originals:
            del dist.all_gather_single  # as torch < 2.13 (the oldest-stack lane's 2.9) has none
        try:
            loss, _ = vocab_parallel_shaped_loss(shard, target, SETTINGS[name], group)
            forward_log = list(log)
            loss.sum().backward()
        finally:
            vocab_parallel._exchange = cpu_exchange
            for collective, original in originals.items():
                setattr(dist, collective, original)
        label = f"{name} (GPU branch{', torch < 2.13' if old_torch else ''})" if gpu_branch else name
        if gpu_branch:
            _compare(failures, f"{label} loss", loss, reference[name][0], atol=0.0)
            _compare(failures, f"{label} gradient", shard.grad, reference[name][1], atol=0.0)
        else:
            reference[name] = (loss.detach(), shard.grad)
        size = target.numel() * (4 + 2 * k) * world
        expected = [] if world == 1 else [
            ("all_gather" if gpu_branch else "all_reduce", size, torch.float32)]
        if forward_log != expected:
            failures.append(f"{label}: forward collectives {forward_log}, expected {expected}")
        if log != forward_log:
            failures.append(f"{label}: backward ran collectives: {log[len(forward_log):]}")


def _check_megatron_cross_entropy(failures, group, rank, world):
    """The cross-entropy setting equals megatron-core's vocab_parallel_cross_entropy."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, target = make_inputs(1000, seed=11, dtype=torch.float32)
    target = target.clamp(0, 999)  # megatron-core has no ignore index
    ours = _shard(logits, rank, world).requires_grad_()
    theirs = _shard(logits, rank, world).requires_grad_()
    loss, _ = vocab_parallel_shaped_loss(ours, target, ShapedLossConfig(), tp_group=group)
    # megatron-core overwrites its input in place: hand it a clone
    mcore_loss = vocab_parallel_cross_entropy(theirs.clone(), target, tp_group=group)
    upstream = torch.rand(target.shape, generator=torch.Generator().manual_seed(3))
    (loss * upstream).sum().backward()
    (mcore_loss * upstream).sum().backward()
    _compare(failures, "megatron CE loss", loss, mcore_loss, atol=1e-5, rtol=1e-6)
    _compare(failures, "megatron CE grad", ours.grad, theirs.grad, atol=1e-6)


def _check_fused(failures, group, rank, world):
    """Fused output layer + loss equals the unfused path on the full weight."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 4, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(400, 16, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 400, (3, 4), generator=gen)
    target[0, 1] = -100
    upstream = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    for name in ("beta_neg_both_lambdas", "head_preservation", "cross_entropy"):
        cfg = SETTINGS[name]
        h = hidden.clone().requires_grad_()
        w = _shard(weight.t(), rank, world).t().contiguous().requires_grad_()
        loss, stats = fused_linear_shaped_loss(h, w, target, cfg, group, chunk_tokens=5)
        (loss * upstream).sum().backward()
        h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref_loss, ref_stats = reference_shaped_loss(h_ref @ w_ref.t(), target, cfg)
        (ref_loss * upstream).sum().backward()
        _compare(failures, f"fused {name} loss", loss, ref_loss, 1e-12)
        _compare(failures, f"fused {name} grad hidden", h.grad, h_ref.grad, 1e-12)
        w_ref_shard = _shard(w_ref.grad.t(), rank, world).t()
        _compare(failures, f"fused {name} grad weight", w.grad, w_ref_shard, 1e-12)
        for key in stats:
            _compare(failures, f"fused {name} {key}", stats[key], ref_stats[key], 1e-12)
        # gradients formed in the forward, per-token weights known there (upstream)
        h_sum, w_sum = hidden.clone().requires_grad_(), w.detach().clone().requires_grad_()
        total, loss_sum, stats_sum = fused_linear_shaped_loss_sum(
            h_sum, w_sum, target, upstream, cfg, group, chunk_tokens=5)
        total.backward()
        _compare(failures, f"fused sum {name} total", total, (ref_loss * upstream).sum(), 1e-12)
        _compare(failures, f"fused sum {name} loss", loss_sum, ref_loss, 1e-12)
        _compare(failures, f"fused sum {name} grad hidden", h_sum.grad, h_ref.grad, 1e-12)
        _compare(failures, f"fused sum {name} grad weight", w_sum.grad, w_ref_shard, 1e-12)
        for key in stats:
            _compare(failures, f"fused sum {name} {key}", stats_sum[key], ref_stats[key], 1e-12)


def _check_nonfinite_and_masked(failures, group, rank, world):
    """NaN/+inf on one rank's shard: every rank raises the same error after the one all-gather
    (none is left waiting: the barrier after the checks completes). A shard that is -inf
    everywhere (a masked part of the vocabulary) adds nothing."""
    for name, logits, target in nonfinite_cases():  # in one rank's shard only, at TP 2
        try:
            vocab_parallel_shaped_loss(_shard(logits, rank, world), target, SETTINGS["k1"], group)
            failures.append(f"{name} logits: no error on rank {rank}")
        except RuntimeError as err:
            if str(err) != NONFINITE_LOGITS:
                failures.append(f"{name} logits: unexpected error {err}")
    logits, target = make_inputs(1000, seed=13)
    logits[..., : 1000 // max(world, 2)] = float("-inf")  # rank 0's shard at TP >= 2
    target.clamp_(min=500)
    _check_against_reference(failures, "masked shard", logits, target,
                             SETTINGS["beta_neg_both_lambdas"], group, rank, world, atol=1e-10)


def _all_checks(rank, world):
    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=300))
    failures = []
    for vocab, names in VOCABS.items():
        for seed, name in enumerate(names):
            logits, target = make_inputs(vocab, seed)
            _check_against_reference(
                failures, f"V={vocab} {name}", logits, target, SETTINGS[name], group, rank, world,
                atol=1e-10,
            )
    # bf16 logits full of ties: K, loss and gradient as in the reference at every TP size
    tie_cfg = ShapedLossConfig(beta=-0.25, topk=7, lambda_topk=0.5, lambda_tail=-0.5)
    for seed, vocab in enumerate((64, 4000)):
        logits, target = tied_bf16_logits(vocab, seed)
        _check_against_reference(
            failures, f"bf16 ties V={vocab}", logits, target, tie_cfg, group, rank, world,
            atol=1e-6, rtol=1e-6,
        )
    _check_communication(failures, group, rank, world)
    _check_nonfinite_and_masked(failures, group, rank, world)
    _check_fused(failures, group, rank, world)
    if world <= 2:
        _check_megatron_cross_entropy(failures, group, rank, world)
    assert not failures, f"rank {rank} of {world}:\n" + "\n".join(failures)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_vocab_parallel_matches_reference(world_size):
    run_distributed(world_size, _all_checks)
