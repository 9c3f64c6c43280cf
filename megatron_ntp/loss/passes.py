"""The elementwise passes over a [N, V_local] logits shard, fused by torch.compile.

The exp-sums pass (stage 1) reads the logits once and returns two per-token sums relative to
the shard's row max; the gradient pass (stage 4) reads them once more and writes the gradient
p_j * W - w_j (the target entry is written afterwards by a scatter). Written in plain torch:
torch.compile fuses each pass into one loop (C++/OpenMP on CPU, Triton on GPU), so no [N, V]
temporary is ever materialised. LossImpl(passes="eager") runs them eagerly over row chunks
(LossImpl.chunk_bytes) where a compiler is unavailable or for debugging.

-inf logits (masked vocabulary entries) have e = 0 and add nothing, as in a masked softmax
(0 * log 0 is taken as 0, never 0 * -inf = NaN).
"""

import functools

import torch

from megatron_ntp.loss.impl import LossImpl

EAGER_BYTES_PER_ENTRY = 16  # the eager passes hold about four fp32 [rows, V_local] temporaries


def _membership(logits, kth_value, kth_local_index):
    # [N, V_local] bool: token in K (see megatron_ntp/loss/topk.py for the rule)
    ids = torch.arange(logits.shape[-1], device=logits.device)
    kth_value = kth_value[:, None]
    return (logits > kth_value) | ((logits == kth_value) & (ids[None, :] <= kth_local_index[:, None]))


def _exp_sums(logits, shard_max):
    """[N, 2]: sum e and sum e * (z - m), with e = exp(z - m) and m the shard's row max.

    A shard that is -inf everywhere (m = -inf) gets sums 0; NaN or +inf logits make the first
    sum NaN, which stage 3 refuses.
    """
    shifted = logits - torch.where(shard_max > float("-inf"), shard_max, 0.0)[:, None]
    e = torch.exp(shifted)
    return torch.stack([e.sum(-1), torch.where(e > 0, e * shifted, 0.0).sum(-1)], dim=-1)


def _gradient(logits, log_normalizer, tail_coef, topk_coef, kth_value, kth_local_index):
    """[N, V_local]: p_j * (W - lambda(j)); the target entries are written by the caller."""
    p = torch.exp(logits - log_normalizer[:, None])
    member = _membership(logits, kth_value, kth_local_index)
    return p * torch.where(member, topk_coef[:, None], tail_coef[:, None])


def _gradient_inplace(logits, *coefs):
    logits.copy_(_gradient(logits, *coefs))


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _run(fn, impl: LossImpl, logits, *args):
    """Run a pass compiled, or eagerly over row chunks of impl.chunk_bytes."""
    if impl.passes != "eager":
        return _compiled(fn)(logits, *args)
    rows = impl.rows_per_chunk(EAGER_BYTES_PER_ENTRY * logits.shape[-1])
    outputs = [
        fn(logits[start : start + rows], *(a[start : start + rows] for a in args))
        for start in range(0, logits.shape[0], rows)
    ]
    return None if outputs[0] is None else torch.cat(outputs)


def exp_sums(logits, shard_max, impl: LossImpl):
    return _run(_exp_sums, impl, logits, shard_max)


def gradient(logits, terms, kth_value, kth_local_index, inplace: bool, impl: LossImpl):
    """The gradient pass with the coefficients of `terms` (a TokenTerms); into `logits` when
    inplace."""
    coefs = (terms.log_normalizer, terms.tail_coef, terms.topk_coef, kth_value, kth_local_index)
    if inplace:
        _run(_gradient_inplace, impl, logits, *coefs)
        return logits
    return _run(_gradient, impl, logits, *coefs)
