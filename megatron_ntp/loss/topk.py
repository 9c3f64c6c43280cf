"""The top-k set K, found without sorting whole rows, the same at every tensor-parallel size.

Tie rule: tokens are ranked by (logit descending, global token id ascending). This is a total
order, so K (its first min(k, V) tokens) is unique and does not depend on the sharding.
K is described by a per-token threshold (kth_value, kth_index): token j is in K iff
    z_j > kth_value  or  (z_j == kth_value and j <= kth_index),
so membership can be recomputed elementwise anywhere without storing a [N, V] mask.

Selection on one shard (no full sort, no topk over the whole row). On CPU a compiled scan does
it (megatron_ntp/loss/cpu_first_k.py, same K); elsewhere (GPU) torch operations:
  1. block maxima: the row cut into blocks of B tokens, one max per block (one cheap pass);
  2. the k best blocks under the same total order on (block max, block id); they contain the
     shard's top k tokens: a token outside them is beaten by the best token of each of the k
     chosen blocks (greater value, or equal value and lower id since blocks are contiguous);
  3. the top k among those k * B candidates.
B ~ sqrt(V_local / k) balances the two selections (V_local / B blocks, k * B candidates).
Across shards, the global top k lies within the union of the shards' top k, which are
all-gathered (k values and ids per rank and token: O(k * TP) communication).
"""

import math

import torch

from megatron_ntp.loss import cpu_first_k


def block_size(vocab: int, k: int) -> int:
    """Power of two near sqrt(vocab / k), in [4, 64]: minimises vocab / B + k * B."""
    return int(min(64, max(4, 2 ** round(math.log2(math.sqrt(vocab / k))))))


def _first_k_exact(values: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] ascending positions of the first k entries, ties resolved by a running count."""
    kth_value = torch.topk(values, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = values > kth_value
    ties = values == kth_value
    ties_needed = k - above.sum(-1, keepdim=True)  # >= 1: the lowest-id ties complete K
    member = above | (ties & (ties.cumsum(-1) <= ties_needed))
    positions = member.nonzero()[:, 1]
    if positions.numel() != values.shape[0] * k:
        raise FloatingPointError("the shaped loss got NaN logits: the top-k set is undefined")
    return positions.view(values.shape[0], k)


def select_first_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of each row's first k entries under the total order.

    Args:
        values: [N, C] with ids ascending along each row (so position order is id order).
        k: 1 <= k <= C.
    Returns:
        [N, k] positions, ascending.
    On CPU: the compiled scan (cpu_first_k). Elsewhere torch.topk, which is exact except for
    which of several entries equal to the k-th value it keeps; only rows where it had to choose
    among such ties are redone with the exact tie rule.
    """
    if cpu_first_k.available_for(values):
        return cpu_first_k.first_k(values, k)[1]
    top_values, positions = torch.topk(values, k, dim=-1, sorted=False)
    kth_value = top_values.amin(-1, keepdim=True)
    ambiguous = (values == kth_value).sum(-1) > (top_values == kth_value).sum(-1)
    if ambiguous.any():
        rows = ambiguous.nonzero()[:, 0]
        positions[rows] = _first_k_exact(values[rows], k)
    return positions.sort(-1).values


def kth_threshold(values: torch.Tensor, ids: torch.Tensor, k: int):
    """Threshold (kth_value [N], kth_index [N]) of the first k entries under the total order.

    values [N, C] and ids [N, C] with ids ascending along each row; 1 <= k <= C.
    """
    if k == values.shape[-1]:  # every entry is in K (e.g. one shard's k candidates)
        top_values, top_ids = values, ids
    else:
        positions = select_first_k(values, k)
        top_values, top_ids = values.gather(-1, positions), ids.gather(-1, positions)
    kth_value = top_values.amin(-1)
    kth_index = torch.where(top_values == kth_value[:, None], top_ids, -1).amax(-1)
    return kth_value, kth_index


def is_member(values, ids, kth_value, kth_index):
    """Membership in K for entries (values, ids) given the [N] threshold."""
    kth_value, kth_index = kth_value[:, None], kth_index[:, None]
    return (values > kth_value) | ((values == kth_value) & (ids <= kth_index))


# Rows per selection chunk are chosen so the chunk's temporaries stay near this size: small
# enough to cost no memory next to the logits and to be reused by the allocator between chunks.
SELECTION_CHUNK_BYTES = 16 << 20


def shard_topk(logits: torch.Tensor, k: int):
    """The shard's own top min(k, V_local) tokens under the total order.

    Args:
        logits: [N, V_local] (float32 or float64).
        k: >= 1.
    Returns:
        values [N, k'] and local ids [N, k'] (ascending), k' = min(k, V_local).
    """
    if cpu_first_k.available_for(logits):  # one scan of the row, no blocks needed
        return cpu_first_k.first_k(logits, min(k, logits.shape[1]))
    vocab = logits.shape[1]
    # per row: block maxima, candidates (value, id, position) and masks over the candidates
    block = block_size(vocab, k)
    bytes_per_row = 8 * (vocab // block + 1) + 32 * min(vocab, k * block)
    rows = max(1, SELECTION_CHUNK_BYTES // bytes_per_row)
    if rows >= logits.shape[0]:
        return _shard_topk(logits, k, block)
    parts = [_shard_topk(chunk, k, block) for chunk in logits.split(rows)]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


def _shard_topk(logits: torch.Tensor, k: int, block: int):
    n, vocab = logits.shape
    k = min(k, vocab)
    if 2 * k * block >= vocab:  # small shard: select over the whole row
        positions = select_first_k(logits, k)
        return logits.gather(-1, positions), positions

    full = vocab // block
    block_max = logits[:, : full * block].view(n, full, block).amax(-1)  # [N, full]
    if full * block < vocab:  # a shorter last block
        block_max = torch.cat([block_max, logits[:, full * block :].amax(-1, keepdim=True)], -1)
    blocks = select_first_k(block_max, k)  # [N, k] ascending
    offsets = torch.arange(block, device=logits.device)
    candidate_ids = (blocks[:, :, None] * block + offsets).view(n, k * block)  # ascending
    in_range = candidate_ids < vocab  # the last block may be short
    candidates = logits.gather(-1, candidate_ids.clamp(max=vocab - 1))
    # Out-of-range slots get -inf and ids >= vocab: they rank after every real token.
    candidates = candidates.masked_fill(~in_range, float("-inf"))
    positions = select_first_k(candidates, k)
    return candidates.gather(-1, positions), candidate_ids.gather(-1, positions)
