"""The top-k set K, the same at every tensor-parallel size, selected without a host sync.

Tie rule: tokens are ranked by (logit descending, global token id ascending). This is a total
order, so K (its first min(k, V) tokens) is unique and does not depend on the sharding.
K is described by a per-token threshold (kth_value, kth_index): token j is in K iff
    z_j > kth_value  or  (z_j == kth_value and j <= kth_index),
so membership can be recomputed elementwise anywhere without storing a [N, V] mask.

Two selections give the same K (LossImpl.selection):
  - "keys" (GPUs; any device): each float32 entry becomes one int64 key
        key = order(z) * 2**32 + (2**32 - 1 - id),
    order(z) an int32 that orders like the float value (+0 and -0 equal), so keys order like
    (value descending, id ascending) and ONE torch.topk over the keys is exact, ties included:
    no repair, no data-dependent shape, no host sync. float64 (tests, gradcheck) does not fit
    beside an id in 64 bits and takes a stable sort instead, equally exact and sync-free.
    Rows are taken in chunks whose keys fit LossImpl.chunk_bytes.
  - "cpu_scan" (CPU): the compiled scan of megatron_ntp/loss/cpu_kernels.py (csrc/first_k.cpp).
Within a shard, the top k lies within the k blocks of B consecutive entries whose maxima rank
first (ranking blocks by (max descending, block index ascending) is ranking them by their best
entry: a token outside those blocks has k better tokens, the blocks' best); stage 1 provides
the block maxima (B from `select_block_size`), so only about k * B entries are searched
(`block_topk`), not the row. The CPU scan takes the k-th largest block max as a lower bound of
the k-th value and scans every block whose max reaches it (the same blocks, ties included).
Across shards, the global top k lies within the union of the shards' top k, which are
all-gathered (k values and ids per rank and token: O(k * TP) communication).
"""

import torch

from megatron_ntp.loss import cpu_kernels
from megatron_ntp.loss.impl import LossImpl, choose

ID_BITS = 32  # token ids < 2**32 sit in the low half of a key
ID_MASK = (1 << ID_BITS) - 1
SELECT_BLOCKS_PER_K = 8  # select_block_size: blocks per row per member of K, at least
MIN_SELECT_BLOCK = 16


def order_preserving_int(values: torch.Tensor) -> torch.Tensor:
    """float32 [...] -> int64 [...] in [-2**31, 2**31), ordered like the values (-0 == +0)."""
    bits = (values + 0.0).view(torch.int32).long()  # + 0.0 turns -0 into +0
    # negative floats: larger magnitude has larger bits, so flip all but the sign bit
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def ranking_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (value descending, id ascending): the larger key ranks first."""
    return (order_preserving_int(values) << ID_BITS) | (ID_MASK - ids)


def selection_for(values: torch.Tensor, impl: LossImpl) -> str:
    """The selection that serves `values` under impl: "cpu_scan" or "keys"."""
    return choose(impl, "selection", "cpu_scan", cpu_kernels.available_for, "keys",
                  values, needs="CPU float32/float64 values")


def _first_k_keys(values: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] positions of each row's first k entries, ascending; position order is id order."""
    if values.dtype == torch.float32:
        positions = torch.arange(values.shape[-1], device=values.device)
        top = torch.topk(ranking_keys(values, positions), k, dim=-1, sorted=False).indices
    else:  # a stable sort keeps equal values in position order: the tie rule
        top = torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]
    return top.sort(-1).values


def select_first_k(values: torch.Tensor, k: int, impl: LossImpl) -> torch.Tensor:
    """Positions [N, k] (ascending) of each row's first k entries under the total order.

    values: [N, C] with ids ascending along each row (so position order is id order); 1 <= k <= C.
    A row holding NaN gets some k positions (the caller refuses such rows after the all-gather).
    """
    if selection_for(values, impl) == "cpu_scan":  # a NaN row gets positions 0..k-1
        return cpu_kernels.first_k(values, k)[1]
    rows = impl.rows_per_chunk(16 * values.shape[-1], values.device)  # int64 keys + topk's workspace
    return torch.cat([_first_k_keys(chunk, k) for chunk in values.split(rows)])


def kth_threshold(values: torch.Tensor, ids: torch.Tensor, k: int, impl: LossImpl):
    """Threshold (kth_value [N], kth_index [N]) of the first k entries under the total order.

    values [N, C] and ids [N, C] with ids ascending along each row; 1 <= k <= C.
    """
    if k == values.shape[-1]:  # every entry is in K (e.g. one shard's k candidates)
        top_values, top_ids = values, ids
    else:
        positions = select_first_k(values, k, impl)
        top_values, top_ids = values.gather(-1, positions), ids.gather(-1, positions)
    kth_value = top_values.amin(-1)
    kth_index = torch.where(top_values == kth_value[:, None], top_ids, -1).amax(-1)
    return kth_value, kth_index


def is_member(values, ids, kth_value, kth_index):
    """Membership in K for entries (values, ids) given the [N] threshold."""
    kth_value, kth_index = kth_value[:, None], kth_index[:, None]
    return (values > kth_value) | ((values == kth_value) & (ids <= kth_index))


def shard_topk(logits: torch.Tensor, k: int, impl: LossImpl):
    """The shard's own top min(k, V_local) tokens under the total order.

    Args:
        logits: [N, V_local] (float32 or float64).
        k: >= 1.
    Returns:
        values [N, k'] and local ids [N, k'] (ascending), k' = min(k, V_local). A row with NaN
        gets NaN values, so that stage 3 refuses it on every rank after the all-gather.
    """
    k = min(k, logits.shape[1])
    if selection_for(logits, impl) == "cpu_scan":  # a NaN row gets NaN values
        return cpu_kernels.first_k(logits, k)[:2]
    positions = select_first_k(logits, k, impl)
    return logits.gather(-1, positions), positions


def select_block_size(vocab_local: int, block: int, k: int) -> int:
    """The blocks whose maxima stage 1 provides for the search (a power of two dividing
    `block`): the largest one that still gives SELECT_BLOCKS_PER_K * k blocks per row, but at
    least MIN_SELECT_BLOCK entries (a 64-byte cache line of fp32). Smaller blocks mean fewer
    entries to search (k blocks of them) and more maxima to select among; measured fastest on
    CPU at k = 100: 128 at V_local = 151,936, 64 at 75,968 and 16 at 8192. k = 0: `block` (no
    search)."""
    select = block
    while (k > 0 and select > MIN_SELECT_BLOCK and select % 2 == 0
           and vocab_local // select < SELECT_BLOCKS_PER_K * k):
        select //= 2
    return select


def block_topk_bytes_per_row(logits: torch.Tensor, block: int, k: int, impl: LossImpl) -> int:
    """Temporaries of block_topk per row: none beyond [k] outputs for the CPU scan (it reads
    the blocks where they lie); the keys selection gathers the k blocks (values, int64 keys
    and ids: 20 bytes per entry)."""
    if k == 0 or selection_for(logits, impl) == "cpu_scan":
        return 0
    return 20 * k * block


def block_topk(logits: torch.Tensor, block_max: torch.Tensor, block: int, k: int,
               impl: LossImpl):
    """shard_topk searching only the k blocks with the first maxima (module docstring).

    logits: [N, V_local]; block_max: [N, V_local / block], the max of each block of `block`
    consecutive entries (NaN where the block holds one). Returns values [N, k'] and local ids
    [N, k'] (ascending), k' = min(k, V_local), equal to shard_topk(logits, k, impl).
    """
    k = min(k, logits.shape[-1])
    if selection_for(logits, impl) == "cpu_scan":  # scans the blocks where they lie
        return cpu_kernels.first_k_by_block_max(logits, block_max, block, k)[:2]
    num_blocks = block_max.shape[-1]
    if k >= num_blocks:  # every block: the whole row
        return shard_topk(logits, k, impl)
    blocks = select_first_k(block_max, k, impl)  # [N, k] ascending block indices
    rows = logits.shape[0]
    index = blocks[:, :, None].expand(rows, k, block)  # a view: no [N, k * B] index is stored
    candidates = logits.view(rows, -1, block).gather(1, index).view(rows, k * block)
    values, positions = shard_topk(candidates, k, impl)  # [N, k], ascending: ids ascending
    return values, blocks.gather(-1, positions // block) * block + positions % block
