"""The two passes over a [N, V_local] logits shard, fused by torch.compile.

- The exp-sums pass (stage 1) reads the logits once: it cuts each row into blocks of B
  entries, takes each block's max and its sums relative to that max, and rescales the block sums
  to the row max (online-softmax rescaling at block granularity), so the row max and the sums
  come from ONE read of the logits (`exp_sums`). It is the only pass when no gradient is wanted
  (validation, eval).
- The gradient pass (stage 4) reads the logits once more and writes p_j * c in one loop, c the
  per-token coefficient of the tail (`gradient`); the k' shard candidates of K and the target
  entry are then written by scatters (the C++ loop writes them while the row is in cache), so
  no [N, V] membership test or mask is ever formed. In the unfused loss it runs in backward with the
  incoming per-token gradient folded into c: one pass where there used to be two.

Written in plain torch: torch.compile fuses each pass into one loop (Triton on GPU, C++/OpenMP
on CPU), so no [N, V] temporary is materialised; the block size B is a constant of the compiled
code (not a dynamic size), which keeps the CPU loops vectorised. On CPU, float32 logits take
the same passes as hand-written C++ loops instead (LossImpl.passes "cpu_kernel", csrc/passes.cpp
via megatron_ntp/loss/cpu_kernels.py): torch.compile's CPU loops are bound by Sleef's expf;
those use a cheaper polynomial of the same accuracy, and sum each row at its exact max.
LossImpl(passes="eager") runs the torch functions eagerly over row chunks
(LossImpl.chunk_bytes) where a compiler is unavailable or for debugging.

-inf logits (masked vocabulary entries) have e = 0 and add nothing, as in a masked softmax
(0 * log 0 is taken as 0, never 0 * -inf = NaN).
"""

import functools

import torch

from megatron_ntp.loss import cpu_kernels
from megatron_ntp.loss.impl import LossImpl, choose

EAGER_BYTES_PER_ENTRY = 16  # the eager passes hold about four fp32 [rows, V_local] temporaries
MAX_BLOCK = 128  # entries per block of the exp-sums pass (measured: 64-256 alike on CPU)
MIN_BLOCK = 16  # below this, blocks cost more than they save: one block per row
# the exp-sums pass's temporaries per block: its three outputs and their rescaling (fp32)
EXP_SUMS_BYTES_PER_BLOCK = 32
EXP_SUMS_BYTES_PER_SELECT_BLOCK = 4  # the select maxima (fp32)


def block_size(vocab_local: int) -> int:
    """B: the largest power of two <= MAX_BLOCK dividing V_local (megatron-core pads the
    vocabulary to a multiple of 128 * TP, so B = 128 for real models); if it is below
    MIN_BLOCK, the whole row (one block per row)."""
    block = MAX_BLOCK
    while vocab_local % block:
        block //= 2
    return block if block >= MIN_BLOCK else vocab_local


def rescale_partial_sums(maxima: torch.Tensor, sums: torch.Tensor, sums_logit: torch.Tensor):
    """Combine partial sums over the last dimension P: [..., P] each -> m, S, T, [...] each.

    Part i holds its max m_i, s_i = sum exp(z - m_i) and t_i = sum exp(z - m_i) (z - m_i) over
    its entries; rescaled to the overall max m: S = sum_i r_i s_i and
    T = sum_i r_i (t_i + (m_i - m) s_i), r_i = exp(m_i - m). A part that is -inf everywhere adds
    nothing; NaN in any part makes m NaN (the caller refuses such rows). Used for the blocks of a
    row (stage 1) and for the shards of the tensor-parallel ranks (stage 3).
    """
    logit_max = maxima.amax(-1)
    live = maxima > float("-inf")
    offset = torch.where(live, maxima - logit_max[..., None], 0.0)  # log r_i
    rescale = torch.exp(offset)
    return (logit_max, (rescale * sums).sum(-1),
            (rescale * (sums_logit + offset * sums)).sum(-1))


def _block_sums(logits, block: int, select_block: int):
    """[N, V_local] -> the max of each select block [N, V_local / select_block], and per block
    sum e and sum e * (z - max) [N, V_local / block] each (select_block divides block)."""
    rows = logits.shape[0]
    select_max = logits.reshape(-1, block // select_block, select_block).amax(-1)
    block_max = select_max.amax(-1)  # [N * V_local / block]
    shifted = (logits.reshape(-1, block)
               - torch.where(block_max > float("-inf"), block_max, 0.0)[:, None])
    e = torch.exp(shifted)
    return (select_max.view(rows, -1), block_max.view(rows, -1), e.sum(-1).view(rows, -1),
            torch.where(e > 0, e * shifted, 0.0).sum(-1).view(rows, -1))


def _gradient(logits, log_normalizer, coef):
    """[N, V_local]: p_j * coef, p_j = exp(z_j - log_normalizer); coef [N]."""
    return torch.exp(logits - log_normalizer[:, None]) * coef[:, None]


def _gradient_inplace(logits, log_normalizer, coef):
    logits.copy_(_gradient(logits, log_normalizer, coef))


@functools.cache
def _compiled(fn, **constants):
    # the block sizes are constants of the compiled loop; only the number of rows is dynamic
    return torch.compile(functools.partial(fn, **constants), dynamic=True)


def passes_for(logits: torch.Tensor, impl: LossImpl) -> str:
    """The implementation of the passes over `logits` under impl: "cpu_kernel", "compiled" or
    "eager"."""
    return choose(impl, "passes", "cpu_kernel", cpu_kernels.passes_available_for,
                  "compiled", logits, needs="contiguous CPU float32 logits")


def _run(fn, impl: LossImpl, logits, *args, **constants):
    """Run a pass compiled, or eagerly over row chunks of impl.chunk_bytes."""
    if passes_for(logits, impl) == "compiled":
        return _compiled(fn, **constants)(logits, *args)
    rows = impl.rows_per_chunk(EAGER_BYTES_PER_ENTRY * logits.shape[-1], logits.device)
    outputs = [
        fn(logits[start : start + rows], *(a[start : start + rows] for a in args), **constants)
        for start in range(0, logits.shape[0], rows)
    ]
    if outputs[0] is None:
        return None
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)


def exp_sums(logits, block: int, select_block: int, impl: LossImpl):
    """Stage 1's one read of the shard: (select maxima [N, V_local / select_block], m [N],
    sums [N, 2]): the max of each block of select_block entries (for the top-k search; it
    divides `block`), m the row max, sums S = sum exp(z - m) and T = sum exp(z - m) (z - m).
    A shard that is -inf everywhere gets m = -inf and sums 0; NaN or +inf logits make m or S
    NaN, which stage 3 refuses."""
    if passes_for(logits, impl) == "cpu_kernel":  # (with k = 0: no top-k search)
        return cpu_kernels.shard_stage(logits, select_block, 0)[:3]
    select_max, block_max, block_sum, block_sum_logit = _run(
        _block_sums, impl, logits, block=block, select_block=select_block)
    logit_max, sum_exp, sum_exp_logit = rescale_partial_sums(block_max, block_sum,
                                                             block_sum_logit)
    return select_max, logit_max, torch.stack([sum_exp, sum_exp_logit], dim=-1)


def _write_entries(grad, log_normalizer, candidates, target):
    """gradient's candidate and target entries, by scatters (the torch passes)."""
    columns, values, coefs = candidates
    if columns.shape[-1] > 0:
        probs = torch.exp(values.to(grad.dtype) - log_normalizer[:, None])
        grad.scatter_(-1, columns, (probs * coefs).to(grad.dtype))
    column, value = target
    here = column >= 0
    safe = torch.where(here, column, 0)[:, None]  # rows without one rewrite their column 0
    grad.scatter_(-1, safe, torch.where(here[:, None], value[:, None].to(grad.dtype),
                                        grad.gather(-1, safe)))


def gradient(logits, log_normalizer, coef, inplace: bool, impl: LossImpl, candidates, target):
    """Stage 4's pass: p_j * coef[row] for every entry, into `logits` when inplace; then the
    entries of candidates = (columns [N, c] int64, logit values [N, c], coefs [N, c]) get
    p_j * their own coef, and target = (column [N] int64, -1 for none; value [N]) writes the
    value at the column (after the candidates, where one is both)."""
    if passes_for(logits, impl) == "cpu_kernel":  # the entries while each row is in cache
        out = logits if inplace else torch.empty_like(logits)
        return cpu_kernels.gradient(logits, log_normalizer, coef, out, candidates, target)
    if inplace:
        _run(_gradient_inplace, impl, logits, log_normalizer, coef)
        grad = logits
    else:
        grad = _run(_gradient, impl, logits, log_normalizer, coef)
    _write_entries(grad, log_normalizer, candidates, target)
    return grad
