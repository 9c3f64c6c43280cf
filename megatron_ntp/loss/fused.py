"""Output-layer matmul fused with the shaped loss, chunked over tokens.

The full [N, V_local] logits never exist: each chunk of tokens gets its logits, its loss and
stats (megatron_ntp/loss/vocab_parallel.py, stages 1-3), and the chunk's logits are dropped.
Only per-token scalars are kept. Backward recomputes each chunk's logits (one more matmul),
forms the gradient p * W - w in place (stage 4), scales it by the incoming per-token gradient and turns
it into the gradients of the hidden states and of the output weight (fp32 accumulation).
Recomputing, instead of forming the weight gradient in the forward, keeps the per-token
semantics of the unfused path: the caller may mask and weight tokens as it likes.
"""

import torch
import torch.distributed as dist

from megatron_ntp.loss.config import ShapedLossConfig
from megatron_ntp.loss.impl import LossImpl, resolve
from megatron_ntp.loss.vocab_parallel import ShardForward, check_inputs, compute_dtype_for

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32


def _chunks(num_tokens: int, vocab_local: int, chunk_tokens):
    step = chunk_tokens or max(1, DEFAULT_CHUNK_ELEMENTS // vocab_local)
    return [(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


class _FusedLinearShapedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, cfg, tp_group, chunk_tokens, impl):
        tokens = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
        flat_target = target.reshape(-1)
        compute_dtype = compute_dtype_for(hidden.dtype)
        chunks = _chunks(tokens.shape[0], weight.shape[0], chunk_tokens)
        shards = []
        for start, end in chunks:
            logits = (tokens[start:end] @ weight.t()).to(compute_dtype)  # [c, V_local]
            shards.append(ShardForward(logits, flat_target[start:end], cfg, tp_group, impl))
            del logits
        ctx.save_for_backward(hidden, weight)
        ctx.shards, ctx.chunks, ctx.tp_group = shards, chunks, tp_group
        outputs = [
            torch.cat([getattr(s.terms, name) for s in shards]).view(target.shape)
            for name in ("loss", "ce", "entropy", "topk_mass")
        ]
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        hidden, weight = ctx.saved_tensors
        tokens = hidden.reshape(-1, hidden.shape[-1])
        grad_loss = grad_loss.reshape(-1)
        compute_dtype = compute_dtype_for(hidden.dtype)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_tokens = torch.empty_like(tokens) if need_hidden else None
        # fp32 (or float64) accumulator for the weight gradient over the chunks
        grad_weight = (torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device)
                       if need_weight else None)
        for (start, end), shard in zip(ctx.chunks, ctx.shards):
            logits = (tokens[start:end] @ weight.t()).to(compute_dtype)
            grad_logits = shard.gradient(logits, inplace=True)  # stage 4: [c, V_local]
            grad_logits.mul_(grad_loss[start:end, None].to(compute_dtype))
            if need_hidden:
                grad_tokens[start:end] = grad_logits.to(weight.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), tokens[start:end].to(compute_dtype))
            del logits, grad_logits
        if need_hidden and ctx.tp_group is not None and dist.get_world_size(ctx.tp_group) > 1:
            # each rank holds d loss / d hidden through its vocabulary shard only
            dist.all_reduce(grad_tokens, group=ctx.tp_group)
        grad_hidden = grad_tokens.view(hidden.shape) if need_hidden else None
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_linear_shaped_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    cfg: ShapedLossConfig,
    tp_group=None,
    *,
    chunk_tokens: int | None = None,
    impl: LossImpl | None = None,
):
    """Shaped loss of logits = hidden @ weight.T, without materialising the logits.

    Args:
        hidden: [..., H] final hidden states, the same on every tensor-parallel rank (gather
            a sequence-parallel input first, as megatron-core's output layer does).
        weight: [V_local, H] this rank's shard of the output layer (megatron-core's
            ColumnParallelLinear weight): rank r holds global ids [r * V_local, (r + 1) * V_local).
        target: [...] int64 global token ids; ids outside [0, V) are ignored.
        cfg, tp_group: as for vocab_parallel_shaped_loss.
        chunk_tokens: tokens per chunk; default: chunks of about 16M logits.
        impl: how to compute it (megatron_ntp.loss.LossImpl); None: the defaults.
    Returns:
        loss [...] and stats, identical to vocab_parallel_shaped_loss(hidden @ weight.T, ...).
    Collectives: per chunk those of vocab_parallel_shaped_loss's forward; backward one
    all-reduce(SUM) of the [N, H] hidden-state gradient over tp_group.
    """
    check_inputs(hidden, target, what="hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V_local, H] with H = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    loss, ce, entropy, topk_mass = _FusedLinearShapedLoss.apply(
        hidden, weight, target, cfg, tp_group, chunk_tokens, resolve(impl)
    )
    return loss, {"ce": ce, "entropy": entropy, "topk_mass": topk_mass}
