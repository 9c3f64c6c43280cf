"""Output-layer matmul fused with the shaped loss, chunked over tokens.

The full [N, V_local] logits never exist: each chunk of tokens gets its logits, its loss and
stats (megatron_ntp/loss/vocab_parallel.py, stages 1-3), and the chunk's logits are dropped.
Two ways to get the gradients, each chunk's gradient p * W - w formed in place (stage 4) and
turned into the hidden-state gradient and the output weight's gradient (matmuls in the input
dtype, the weight gradient summed over chunks in fp32). Tokens per chunk follow from a memory
budget (LossImpl.fused_chunk_bytes: by default 64 MiB on CPU, 512 MiB on GPUs):

- fused_linear_shaped_loss: per-token loss, any per-token upstream gradient. Only per-token
  scalars and the k' candidates are kept; backward recomputes each chunk's logits (one more
  matmul). The model uses it when its forward gets no loss mask.
- fused_linear_shaped_loss_sum: the per-token weights (e.g. the loss mask) are known at
  forward time and the loss is their weighted sum, so the gradients are formed during the
  forward, chunk by chunk, and backward only scales them (Liger's fused linear cross-entropy
  pattern): no recompute, three matmuls instead of four. The model uses it in training (the
  training step passes the loss mask; megatron_ntp/models/shaped_gpt.py).
"""

import functools

import torch
import torch.distributed as dist
from torch.profiler import record_function

from megatron_ntp.loss.config import ShapedLossConfig
from megatron_ntp.loss.impl import LossImpl, resolve
from megatron_ntp.loss.vocab_parallel import (
    ShardForward,
    check_inputs,
    compute_dtype_for,
    wants_gradient,
)

STAT_NAMES = ("loss", "ce", "entropy", "topk_mass")
# torch.profiler labels of the matmuls (the stages' labels: vocab_parallel.STAGE_LABELS)
MATMUL_LABELS = ("shaped_loss.logits_matmul", "shaped_loss.gradient_matmuls")


def _logits(tokens, weight, out):
    """[c, H] x [V_local, H] -> out [c, V_local] (the compute dtype), one buffer reused by every
    chunk: on CPU a fresh 64 MiB allocation is returned to the system when freed and pays its
    page faults again at every chunk (~5% of the matmul's time at ~110-token chunks, measured)."""
    with record_function(MATMUL_LABELS[0]):
        if tokens.dtype == out.dtype:  # out= takes no part in autograd: detached operands
            return torch.mm(tokens.detach(), weight.detach().t(), out=out)
        return out.copy_(tokens @ weight.t())


def bytes_per_token(vocab_local: int, dtype: torch.dtype) -> int:
    """A chunk's memory per token: its logits in the compute dtype and, for bf16/fp16 inputs,
    their copy in the input dtype (the logits matmul's output, then the gradient the other two
    matmuls read)."""
    compute = compute_dtype_for(dtype)
    return vocab_local * (compute.itemsize + (0 if dtype == compute else dtype.itemsize))


def _chunks(tokens, weight, chunk_tokens, impl: LossImpl):
    """[(start, end)] token ranges: chunk_tokens each, else as many as impl's budget allows."""
    num_tokens = tokens.shape[0]
    step = chunk_tokens or impl.fused_tokens_per_chunk(
        bytes_per_token(weight.shape[0], tokens.dtype), tokens.device)
    return [(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def _apex_weight_gradient():
    """Apex's fused_weight_gradient_mlp_cuda, the module megatron-core's linear layers use for
    their weight gradient under gradient-accumulation fusion (tensor_parallel/layers.py), or
    None where Apex is not installed (CPU machines)."""
    try:
        import fused_weight_gradient_mlp_cuda
    except ImportError:
        return None
    return fused_weight_gradient_mlp_cuda


def _torch_release() -> tuple[int, int]:
    """(major, minor) of the running torch; a pre-release such as NGC's 2.10.0a0 counts as 2.10."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


@functools.cache
def weight_gradient_gemm(device_type: str) -> str:
    """How the fused head sums a chunk's bf16/fp16 weight gradient into its fp32 accumulator on
    `device_type`, in order of preference on a GPU (never an fp32 GEMM of bf16 data there):

    - "apex": megatron-core's GEMM under gradient-accumulation fusion, Apex's
      wgrad_gemm_accum_fp32 (bf16 operands, fp32 accumulation into the fp32 buffer);
    - "addmm": torch.addmm(..., out_dtype=float32, out=accumulator) (cuBLAS, the same products).
      torch 2.8 and 2.9 have the CUDA kernel but require `self` in the operands' dtype
      (pytorch issue 154086, relaxed in 2.10), so only torch >= 2.10;
    - "bf16": a bf16 GEMM per chunk (fp32 accumulation inside cuBLAS, the chunk's product rounded
      to bf16 once) added into the fp32 accumulator;
    - "fp32": on the CPU: the same bf16 operands multiplied in fp32 (no faster mixed GEMM there).
    """
    if device_type != "cuda":
        return "fp32"
    if _apex_weight_gradient() is not None:
        return "apex"
    if _torch_release() >= (2, 10) and torch._C._dispatch_has_kernel_for_dispatch_key(
            "aten::addmm.dtype_out", "CUDA"):
        return "addmm"
    return "bf16"


def add_weight_gradient(accumulator, grad, tokens, grad_logits):
    """accumulator [V_local, H] += grad^T @ tokens, summed in the accumulator's dtype (fp32).

    grad [c, V_local] and tokens [c, H] (contiguous) are in the input dtype: the products are
    those of megatron-core's weight-gradient GEMM (bf16 operands, fp32 accumulation and output,
    as with its gradient-accumulation fusion). grad_logits: the chunk's [c, V_local] buffer in the
    accumulator's dtype, free to overwrite (used on the CPU).
    """
    if grad.dtype == accumulator.dtype:
        accumulator.addmm_(grad.t(), tokens)
        return
    gemm = weight_gradient_gemm(accumulator.device.type)
    if gemm == "apex":  # (input [c, H], d_output [c, V_local], d_weight [V_local, H] fp32)
        _apex_weight_gradient().wgrad_gemm_accum_fp32(tokens, grad, accumulator)
    elif gemm == "addmm":
        torch.addmm(accumulator, grad.t(), tokens, out_dtype=accumulator.dtype, out=accumulator)
    elif gemm == "bf16":
        accumulator.add_(grad.t() @ tokens)  # a [V_local, H] product in the input dtype
    else:
        accumulator.addmm_(grad_logits.copy_(grad).t(), tokens.to(accumulator.dtype))


def holds_main_grad(weight) -> bool:
    """megatron-core's DDP keeps this weight's gradient in weight.main_grad (its fp32 buffer with
    grad_reduce_in_fp32) and marks it with grad_added_to_main_grad."""
    return hasattr(weight, "main_grad") and hasattr(weight, "grad_added_to_main_grad")


def weight_gradient_result(weight, summed):
    """What backward returns for the output weight, given its summed gradient [V_local, H] in the
    accumulator's dtype. Where DDP holds a main_grad, the sum is added there directly (rounded
    once, to main_grad's dtype, not to bf16 first), and a placeholder gradient is returned as
    megatron-core's linear layers do under gradient-accumulation fusion: grad_added_to_main_grad
    tells DDP's hook not to add it, and it is zeros where the weight is shared with the embedding
    on this stage (zero_out_wgrad: the hook then adds the embedding's gradient plus these zeros)."""
    if not holds_main_grad(weight):
        return summed.to(weight.dtype)
    weight.main_grad.add_(summed)
    weight.grad_added_to_main_grad = True
    placeholder = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return placeholder(weight.main_grad.shape, dtype=weight.dtype, device=weight.device)


def _logits_buffer(chunks, tokens, weight):
    """[largest chunk, V_local] in the compute dtype: every chunk's logits, one after another."""
    rows = max(end - start for start, end in chunks)
    return torch.empty(rows, weight.shape[0], dtype=compute_dtype_for(tokens.dtype),
                       device=tokens.device)


class _Gradients:
    """Hidden-state [N, H] and weight [V_local, H] gradients, accumulated chunk by chunk."""

    def __init__(self, tokens, weight, need_hidden: bool, need_weight: bool):
        self.tokens, self.weight = tokens, weight
        self.hidden = torch.empty_like(tokens) if need_hidden else None
        # fp32 (or float64) accumulator on the weight's device
        self.weight_grad = (torch.zeros(weight.shape, dtype=compute_dtype_for(tokens.dtype),
                                        device=weight.device) if need_weight else None)

    def add_chunk(self, start, end, shard: ShardForward, logits, scale):
        """logits [c, V_local] (overwritten) and scale [c]: d loss / d loss_token."""
        grad_logits = shard.gradient(logits, scale, inplace=True)  # stage 4: [c, V_local]
        with record_function(MATMUL_LABELS[1]):
            self._matmuls(start, end, grad_logits)

    def _matmuls(self, start, end, grad_logits):
        grad = grad_logits.to(self.weight.dtype)  # [c, V_local], a copy only for bf16/fp16
        if self.hidden is not None:
            self.hidden[start:end] = grad @ self.weight
        if self.weight_grad is not None:
            add_weight_gradient(self.weight_grad, grad, self.tokens[start:end], grad_logits)

    def finish(self, hidden_shape, tp_group):
        """(hidden gradient or None, weight gradient or None): the hidden gradient in the input
        dtype, the weight's in the accumulator's (weight_gradient_result converts it)."""
        grad_hidden = grad_weight = None
        if self.hidden is not None:
            if tp_group is not None and dist.get_world_size(tp_group) > 1:
                # each rank holds d loss / d hidden through its vocabulary shard only
                dist.all_reduce(self.hidden, group=tp_group)
            grad_hidden = self.hidden.view(hidden_shape)
        return grad_hidden, self.weight_grad


def _forward_chunks(tokens, weight, target, cfg, tp_group, chunk_tokens, impl, on_chunk):
    """Stages 1-3 per chunk; on_chunk(start, end, shard, logits) may use the chunk's logits.
    Returns the chunks and the per-token outputs (STAT_NAMES) as [N] tensors."""
    chunks = _chunks(tokens, weight, chunk_tokens, impl)
    buffer = _logits_buffer(chunks, tokens, weight)
    shards = []
    for start, end in chunks:
        logits = _logits(tokens[start:end], weight, buffer[: end - start])  # [c, V_local]
        shards.append(ShardForward(logits, target[start:end], cfg, tp_group, impl))
        on_chunk(start, end, shards[-1], logits)
        del logits
    outputs = [torch.cat([getattr(s.terms, name) for s in shards]) for name in STAT_NAMES]
    return chunks, shards, outputs


class _FusedLinearShapedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, cfg, tp_group, chunk_tokens, impl):
        tokens = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
        ctx.chunks, ctx.shards, outputs = _forward_chunks(
            tokens, weight, target.reshape(-1), cfg, tp_group, chunk_tokens, impl,
            on_chunk=lambda *unused: None)
        ctx.save_for_backward(hidden, weight)
        ctx.tp_group = tp_group
        outputs = [value.view(target.shape) for value in outputs]
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        hidden, weight = ctx.saved_tensors
        tokens = hidden.reshape(-1, hidden.shape[-1])
        grad_loss = grad_loss.reshape(-1)
        grads = _Gradients(tokens, weight, *ctx.needs_input_grad[:2])
        buffer = _logits_buffer(ctx.chunks, tokens, weight)
        for (start, end), shard in zip(ctx.chunks, ctx.shards):
            logits = _logits(tokens[start:end], weight, buffer[: end - start])  # recomputed
            grads.add_chunk(start, end, shard, logits, grad_loss[start:end])
            del logits
        grad_hidden, grad_weight = grads.finish(hidden.shape, ctx.tp_group)
        if grad_weight is not None:
            grad_weight = weight_gradient_result(weight, grad_weight)
        return grad_hidden, grad_weight, None, None, None, None, None


class _FusedLinearShapedLossSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, token_weights, target, cfg, tp_group, chunk_tokens, impl,
                need_grad):
        tokens = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
        scale = token_weights.reshape(-1)
        grads = _Gradients(tokens, weight, need_grad and ctx.needs_input_grad[0],
                           need_grad and ctx.needs_input_grad[1])
        _, _, outputs = _forward_chunks(
            tokens, weight, target.reshape(-1), cfg, tp_group, chunk_tokens, impl,
            on_chunk=lambda start, end, shard, logits: need_grad and grads.add_chunk(
                start, end, shard, logits, scale[start:end]))
        ctx.grads = grads.finish(hidden.shape, tp_group) if need_grad else None
        if need_grad and ctx.grads[1] is not None and not holds_main_grad(weight):
            # held in the input dtype until backward, as autograd would return it
            ctx.grads = (ctx.grads[0], ctx.grads[1].to(weight.dtype))
        ctx.save_for_backward(weight)
        total = (outputs[0] * scale.to(outputs[0].dtype)).sum()
        outputs = [value.view(target.shape) for value in outputs]
        ctx.mark_non_differentiable(*outputs)
        return total, *outputs

    @staticmethod
    def backward(ctx, grad_total, *unused_grads):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_shaped_loss_sum scales its kept gradients in place: "
                               "a second backward through the same graph is not supported")
        # in place: a scaled copy would hold a second [V_local, H] weight gradient
        grad_hidden, grad_weight = (None if g is None else g.mul_(grad_total.to(g.dtype))
                                    for g in ctx.grads)
        ctx.grads = None
        if grad_weight is not None:
            (weight,) = ctx.saved_tensors
            grad_weight = weight_gradient_result(weight, grad_weight)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _check_fused_inputs(hidden, weight, target, chunk_tokens):
    check_inputs(hidden, target, what="hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V_local, H] with H = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


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
        chunk_tokens: tokens per chunk; default: as many as impl.fused_chunk_bytes allows.
        impl: how to compute it (megatron_ntp.loss.LossImpl); None: the defaults.
    Returns:
        loss [...] and stats, identical to vocab_parallel_shaped_loss(hidden @ weight.T, ...).
    Collectives: per chunk those of vocab_parallel_shaped_loss's forward; backward one
    all-reduce(SUM) of the [N, H] hidden-state gradient over tp_group.
    """
    _check_fused_inputs(hidden, weight, target, chunk_tokens)
    loss, ce, entropy, topk_mass = _FusedLinearShapedLoss.apply(
        hidden, weight, target, cfg, tp_group, chunk_tokens, resolve(impl)
    )
    return loss, {"ce": ce, "entropy": entropy, "topk_mass": topk_mass}


def fused_linear_shaped_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    token_weights: torch.Tensor,
    cfg: ShapedLossConfig,
    tp_group=None,
    *,
    chunk_tokens: int | None = None,
    impl: LossImpl | None = None,
):
    """sum(token_weights * loss) of logits = hidden @ weight.T, gradients formed in the forward.

    Args as for fused_linear_shaped_loss, plus token_weights: [...] like target (e.g. the
    loss mask), known at forward time. The gradients of hidden and weight are computed during
    this call (when autograd wants them) and kept; backward scales them in place by the
    incoming scalar (so a second backward through the graph is refused).
    Returns:
        total: [] the weighted sum (differentiable); loss: [...] per token (detached); stats.
    Collectives: per chunk those of vocab_parallel_shaped_loss's forward, then one
    all-reduce(SUM) of the [N, H] hidden-state gradient over tp_group, all in this call.
    """
    _check_fused_inputs(hidden, weight, target, chunk_tokens)
    if token_weights.shape != target.shape:
        raise ValueError(f"token_weights shape {tuple(token_weights.shape)} must equal target "
                         f"shape {tuple(target.shape)}")
    total, loss, ce, entropy, topk_mass = _FusedLinearShapedLossSum.apply(
        hidden, weight, token_weights, target, cfg, tp_group, chunk_tokens, resolve(impl),
        wants_gradient(hidden, weight),
    )
    return total, loss, {"ce": ce, "entropy": entropy, "topk_mass": topk_mass}
