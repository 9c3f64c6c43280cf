"""The two elementwise passes over a [N, V_local] logits shard, fused by torch.compile.

Pass 1 (forward) reads the logits once and returns two per-token sums relative to the shard's
row max; pass 2 reads them once more and writes the gradient p_j * W - w_j (the target entry
is patched afterwards). Written in plain
torch: torch.compile fuses each pass into one loop (C++/OpenMP on CPU, Triton on GPU), so no
[N, V] temporary is ever materialised. Set MEGATRON_NTP_COMPILE=0 to run them eagerly
(row-chunked so temporaries stay small) where a compiler is unavailable or for debugging.
"""

import functools
import os

import torch

_EAGER_CHUNK_ELEMENTS = 1 << 22


def _membership(logits, kth_value, kth_local_index):
    # [N, V_local] bool: token in K (see megatron_ntp/loss/topk.py for the rule)
    ids = torch.arange(logits.shape[-1], device=logits.device)
    kth_value = kth_value[:, None]
    return (logits > kth_value) | ((logits == kth_value) & (ids[None, :] <= kth_local_index[:, None]))


def _exp_sums(logits, shard_max):
    """[N, 2]: sum e and sum e * (z - m), with e = exp(z - m) and m the shard's row max."""
    shifted = logits - shard_max[:, None]
    e = torch.exp(shifted)
    return torch.stack([e.sum(-1), (e * shifted).sum(-1)], dim=-1)


def _gradient(logits, log_normalizer, tail_coef, topk_coef, kth_value, kth_local_index):
    """[N, V_local]: p_j * (W - lambda(j)); the target entries are patched by the caller."""
    p = torch.exp(logits - log_normalizer[:, None])
    member = _membership(logits, kth_value, kth_local_index)
    return p * torch.where(member, topk_coef[:, None], tail_coef[:, None])


def _gradient_inplace(logits, *coefs):
    logits.copy_(_gradient(logits, *coefs))


def _compile_enabled() -> bool:
    return os.environ.get("MEGATRON_NTP_COMPILE", "1") != "0"


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _run(fn, logits, *args):
    """Run a pass compiled, or eagerly over row chunks of about _EAGER_CHUNK_ELEMENTS."""
    if _compile_enabled():
        return _compiled(fn)(logits, *args)
    rows = max(1, _EAGER_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    outputs = [
        fn(logits[start : start + rows], *(a[start : start + rows] for a in args))
        for start in range(0, logits.shape[0], rows)
    ]
    return None if outputs[0] is None else torch.cat(outputs)


def exp_sums(logits, shard_max):
    return _run(_exp_sums, logits, shard_max)


def gradient(logits, terms, kth_value, kth_local_index, inplace: bool):
    """Pass 2 with the coefficients of `terms` (a TokenTerms); into `logits` when inplace."""
    coefs = (terms.log_normalizer, terms.tail_coef, terms.topk_coef, kth_value, kth_local_index)
    if inplace:
        _run(_gradient_inplace, logits, *coefs)
        return logits
    return _run(_gradient, logits, *coefs)
