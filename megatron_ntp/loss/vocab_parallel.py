"""The shaped loss over a vocabulary sharded across tensor-parallel ranks.

Rank r of the tensor-parallel group holds logits for the contiguous global ids
[r * V_local, (r + 1) * V_local) (megatron-core's convention). The stages, numbered alike in
megatron_ntp/loss/fused.py and megatron_ntp/loss/README.md:

  1. shard stage, on each rank, in row chunks: ONE read of the shard for the max and the exp
     sums (megatron_ntp/loss/passes.py, block maxima rescaled online): m_r,
     S_r = sum exp(z - m_r), T_r = sum exp(z - m_r) * (z - m_r); the shard's own top
     k' = min(k, V_local) candidates, searched only in the k blocks whose maxima rank first
     (megatron_ntp/loss/topk.py); the target logit if the target is in the shard;
  2. ONE all-gather of [N, 4 + 2k'] values per rank: (m_r, S_r, T_r, z_x, k' logits, k' ids),
     in the compute dtype (float64 only when float32 cannot hold every token id exactly), in
     place: stage 1 writes its rank's slot of the [TP, N, 4 + 2k'] result (on CPU, where
     gloo's all-gather copies through a temporary, an all-reduce of the zeroed other slots);
  3. on every rank alike, from the gathered values: rows with NaN/+inf logits are refused (the
     same decision on every rank, after the one collective); the global max m, S and T
     rescaled to m, the global K threshold from the k * TP candidates (K lies within them) and
     the K sums from the candidates alone (at TP 1 on CPU stage 1's kernel forms both), then
     the per-token algebra (megatron_ntp/loss/token_terms.py): loss, stats, W;
  4. the gradient: one pass writes p_j * (W - lambda_tail) * g over the shard (g the incoming
     per-token gradient), then the k' shard candidates (inside K: p_j * (W - lambda_topk) * g)
     and the target (p_x W - w_x) * g are written (scatters; on CPU the C++ pass writes them
     while each row is in cache). (Testing membership of K per entry inside the pass instead
     measured 1.8x slower on CPU: the compiled loop loses its vectorisation.) The unfused loss
     runs it in backward, reading the logits it kept (no gradient pass at all without a wanted
     gradient); the fused head runs it per chunk.
Backward: no collective. Communication per token: 4 + 2 * k' values per rank, never O(V).
No host synchronisation anywhere on a GPU (CPU tensors raise on NaN at once, where syncing
costs nothing).
"""

import torch
import torch.distributed as dist
from torch.profiler import record_function

from megatron_ntp.loss import cpu_kernels, passes
from megatron_ntp.loss.config import ShapedLossConfig
from megatron_ntp.loss.impl import LossImpl, resolve
from megatron_ntp.loss.token_terms import combine_token_sums
from megatron_ntp.loss.topk import (block_topk, block_topk_bytes_per_row, is_member,
                                   kth_threshold, select_block_size, selection_for)

# torch.profiler labels of the stages (benchmarks/loss_bench.py reads them); free when no
# profiler runs
STAGE_LABELS = ("shaped_loss.stage1_shard", "shaped_loss.stage2_all_gather",
                "shaped_loss.stage3_combine", "shaped_loss.stage4_gradient")

STAGE3_BYTES_PER_CANDIDATE = 96  # stage 3's temporaries per row and gathered candidate

NONFINITE_LOGITS = ("the shaped loss got logits that are NaN or +inf (or -inf over a whole "
                    "row): the next-token distribution is undefined")


def _group_rank_size(tp_group):
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _exchange(gathered: torch.Tensor, rank: int, tp_group, world: int) -> None:
    """Every rank's [N, C] slot of gathered [world, N, C] from the rank that wrote it, in place.
    CPU tensors go through gloo, whose all-gather copies through a flat temporary as large as
    the output (ProcessGroupGloo::allgather) while its all-reduce works in place."""
    if world == 1:
        return
    if gathered.device.type == "cpu":
        _sum_with_other_slots_zeroed(gathered, rank, tp_group)
    else:
        _all_gather_in_place(gathered, rank, tp_group)


def _all_gather_in_place(gathered: torch.Tensor, rank: int, tp_group) -> None:
    """An all-gather with no input buffer of its own: the input is this rank's slot of the
    output (NCCL's in-place form, as FSDP2 gathers its parameters)."""
    flat = gathered.view(-1, gathered.shape[-1])
    gather_single = getattr(dist, "all_gather_single", None)  # torch >= 2.13
    if gather_single is None:
        dist.all_gather_into_tensor(flat, gathered[rank], group=tp_group)
    else:
        gather_single(flat, gathered[rank], group=tp_group)


def _sum_with_other_slots_zeroed(gathered: torch.Tensor, rank: int, tp_group) -> None:
    """The gather as an in-place all-reduce(SUM), each rank's other slots zeroed first: x + 0
    is exact for every value (-inf, NaN and token ids included; -0 comes back as +0, equal)."""
    gathered[:rank].zero_()
    gathered[rank + 1 :].zero_()
    dist.all_reduce(gathered, group=tp_group)


def _pack_dtype(compute_dtype: torch.dtype, vocab: int) -> torch.dtype:
    """The all-gather's dtype: the compute dtype when it holds every token id exactly (float32:
    ids <= 2**24, e.g. Qwen3's 151,936), else float64 (ids < 2**53)."""
    return compute_dtype if compute_dtype == torch.float64 or vocab <= 2**24 else torch.float64


def refuse_nonfinite_rows(bad: torch.Tensor) -> None:
    """Raise if any token's logits are NaN/+inf. `bad` [N] is computed from all-gathered values,
    so it is identical on every rank: every rank raises alike and none waits in a collective.

    torch._assert_async: on CPU it raises RuntimeError(NONFINITE_LOGITS) at once; on a GPU it is
    a device-side assertion carrying the message, queued on the stream without a host sync,
    that fails every rank at its next synchronisation (the CUDA context is then unusable,
    which is what NaN logits call for: the run has to stop).
    """
    torch._assert_async(~bad.any(), NONFINITE_LOGITS)


def _topk_stage(gathered: torch.Tensor, logit_max: torch.Tensor, k_local: int, k: int,
                all_in_topk: bool, impl: LossImpl):
    """K's threshold and sums for some rows from their all-gathered candidates (stage 3).

    gathered: [world, n, 4 + 2 k_local] (this rank's all-gather, some rows); logit_max: [n];
    all_in_topk: K is every candidate (ShardForward.candidates_all_in_topk).
    Returns kth_value [n], kth_index [n] (global id), sum over K of exp(z - m) and of
    exp(z - m) (z - m), [n] each.
    """
    world, n = gathered.shape[:2]
    # rank-major order of the candidates is ascending global id order
    candidates = gathered[..., 4 : 4 + k_local].permute(1, 0, 2).reshape(n, world * k_local)
    candidates = candidates.to(logit_max.dtype)
    candidate_ids = gathered[..., 4 + k_local :].permute(1, 0, 2).reshape(n, world * k_local).long()
    kth_value, kth_index = kth_threshold(candidates, candidate_ids, k, impl)
    # K lies within the candidates, so its sums need no pass over the shard
    shifted = candidates - logit_max[:, None]
    exp_topk = torch.exp(shifted)
    if not all_in_topk:
        exp_topk = exp_topk * is_member(candidates, candidate_ids, kth_value, kth_index)
    exp_logit_topk = torch.where(exp_topk > 0, exp_topk * shifted, 0.0)  # -inf members add 0
    return kth_value, kth_index, exp_topk.sum(-1), exp_logit_topk.sum(-1)


def _row_chunks(rows: int, bytes_per_row: int, impl: LossImpl, device) -> list[slice]:
    step = impl.rows_per_chunk(bytes_per_row, device)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _global_sums(gathered: torch.Tensor, dtype: torch.dtype):
    """Stage 3's max and exp-sums: [world, N, 4+] gathered -> m, S, T, z_x, each [N]."""
    max_r, sum_r, sum_logit_r, target_logit_r = gathered[..., :4].to(dtype).permute(2, 1, 0)
    logit_max, sum_exp, sum_exp_logit = passes.rescale_partial_sums(max_r, sum_r, sum_logit_r)
    target_logit = target_logit_r.sum(-1)  # only the owning rank contributes
    refuse_nonfinite_rows(~torch.isfinite(logit_max) | ~torch.isfinite(sum_exp))
    return logit_max, sum_exp, sum_exp_logit, target_logit


class ShardForward:
    """Forward stages 1-3 on one logits shard; also used chunk by chunk by the fused path.

    Attributes after construction (N = tokens):
        terms: TokenTerms of [N] tensors (global over the vocabulary).
        kth_value, kth_index: [N] threshold of K (global ids).
        candidates: [N, 2k'] this shard's top k' logits, then their global ids (in the
            all-gather's dtype: a view of stage 1's buffer), for the gradient's candidate
            entries.
        k_local: k' = min(k, V_local), the candidates per shard.
        candidates_all_in_topk: whether K is every rank's every candidate (k >= TP * k', e.g.
            at TP 1), so no membership test is needed.
        target_local: [N] target id local to this shard; target_here: [N] bool, target in shard.
    """

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, cfg: ShapedLossConfig,
                 tp_group, impl: LossImpl | None = None):
        # logits: [N, V_local] float32/float64; target: [N] int64 global ids
        self.impl = impl = resolve(impl)
        rank, world = _group_rank_size(tp_group)
        vocab_local = logits.shape[-1]
        vocab_start = rank * vocab_local
        valid = (target >= 0) & (target < vocab_local * world)
        self.target_local = target - vocab_start
        self.target_here = valid & (self.target_local >= 0) & (self.target_local < vocab_local)
        self.vocab_start = vocab_start

        with record_function(STAGE_LABELS[0]):
            # stage 1 views rows as blocks: a strided shard is copied (the caller's is not)
            gathered = self._shard_stage(logits.contiguous(), cfg, rank, world)
        self.k_local = k_local = (gathered.shape[-1] - 4) // 2
        self.candidates_all_in_topk = cfg.topk >= world * k_local  # K: every candidate
        with record_function(STAGE_LABELS[1]):
            _exchange(gathered, rank, tp_group, world)  # [world, N, 4 + 2k'], every slot
        with record_function(STAGE_LABELS[2]):
            self.terms = self._combine_stage(gathered, logits.dtype, target, valid, cfg,
                                             k_local, world, vocab_start)
        # backward needs this rank's candidates only: a copy, so the other ranks' are freed
        own = gathered[rank, :, 4:]
        self.candidates = own if world == 1 else own.clone()

    def _combine_stage(self, gathered, dtype, target, valid, cfg, k_local, world, vocab_start):
        """Stage 3 on the gathered [world, N, 4 + 2k'] values: TokenTerms of [N] tensors."""
        impl = self.impl
        logit_max, sum_exp, sum_exp_logit, target_logit = _global_sums(gathered, dtype)
        if k_local > 0 and self._single_shard_topk is not None:
            # one shard (TP 1) on CPU: K is its k' candidates, whose terms stage 1 formed
            topk_terms, kth_index = self._single_shard_topk
            kth_value, sum_exp_topk, sum_exp_logit_topk = topk_terms.to(dtype).unbind(-1)
        elif k_local > 0:
            k = min(cfg.topk, world * k_local)
            # in row chunks: the [rows, k x TP] temporaries stay small next to the logits (~96
            # bytes per candidate: ids, selection, exps, sums; benchmarks/README.md has (c)'s
            # peak at TP 2)
            chunks = [_topk_stage(gathered[:, rows], logit_max[rows], k_local, k,
                                  self.candidates_all_in_topk, impl)
                      for rows in _row_chunks(target.shape[0], STAGE3_BYTES_PER_CANDIDATE * world
                                              * k_local, impl, target.device)]
            kth_value, kth_index, sum_exp_topk, sum_exp_logit_topk = (
                torch.cat(parts) for parts in zip(*chunks))
        else:
            kth_value = torch.full_like(logit_max, float("inf"))
            kth_index = torch.full_like(target, -1)
            sum_exp_topk = sum_exp_logit_topk = torch.zeros_like(logit_max)

        self.kth_value, self.kth_index = kth_value, kth_index
        sums = torch.stack(
            [sum_exp, sum_exp_logit, sum_exp_topk, sum_exp_logit_topk, target_logit], dim=-1
        )
        target_in_topk = is_member(target_logit[:, None], target[:, None], kth_value, kth_index)[:, 0]
        return combine_token_sums(cfg, logit_max, sums, target_in_topk, valid)

    def _shard_stage(self, logits, cfg, rank, world) -> torch.Tensor:
        """Stage 1 into this rank's slot of the exchange buffer [world, N, 4 + 2k'] (returned):
        m_r, S_r, T_r, z_x or 0, k' candidate logits, k' global ids; each row chunk (whose
        block sums fit the budget) written straight into it. On CPU (one kernel) with one
        shard, also K's terms for stage 3 (self._single_shard_topk)."""
        vocab_local, vocab_start = logits.shape[-1], self.vocab_start
        block = passes.block_size(vocab_local)
        k = min(cfg.topk, vocab_local)
        select_block = select_block_size(vocab_local, block, k)
        gathered = logits.new_empty(world, logits.shape[0], 4 + 2 * k,
                                    dtype=_pack_dtype(logits.dtype, vocab_local * world))
        packed = gathered[rank]  # [N, 4 + 2k']
        safe_local = torch.where(self.target_here, self.target_local, 0)[:, None]
        packed[:, 3] = torch.where(self.target_here, logits.gather(-1, safe_local)[:, 0], 0.0)
        # on CPU one kernel: each row's sums and top-k search while the row is in cache
        kernel = (passes.passes_for(logits, self.impl) == "cpu_kernel"
                  and (k == 0 or selection_for(logits, self.impl) == "cpu_scan"))
        self._single_shard_topk = None
        if kernel and world == 1 and k > 0:  # [N, 3] (kth value, S_K, T_K) and [N] kth index
            self._single_shard_topk = (logits.new_empty(logits.shape[0], 3),
                                       self.target_local.new_empty(logits.shape[0]))
        bytes_per_row = (passes.EXP_SUMS_BYTES_PER_BLOCK * (vocab_local // block)
                         + passes.EXP_SUMS_BYTES_PER_SELECT_BLOCK * (vocab_local // select_block)
                         + block_topk_bytes_per_row(logits, select_block, k, self.impl))
        for rows in _row_chunks(logits.shape[0], bytes_per_row, self.impl, logits.device):
            self._shard_rows(logits[rows], k, block, select_block, vocab_start, packed[rows],
                             kernel, rows)
        return gathered

    def _shard_rows(self, logits, k, block, select_block, vocab_start, out, kernel, rows):
        """Stage 1 on some rows, into out [n, 4 + 2k] (all but column 3, the target logit)."""
        if kernel:
            _, shard_max, shard_sums, values, local_ids, topk_terms, topk_last = (
                cpu_kernels.shard_stage(logits, select_block, k))
            if self._single_shard_topk is not None:
                self._single_shard_topk[0][rows] = topk_terms
                self._single_shard_topk[1][rows] = topk_last  # global ids: vocab_start is 0
        else:
            select_max, shard_max, shard_sums = passes.exp_sums(logits, block, select_block,
                                                                self.impl)
            if k > 0:
                values, local_ids = block_topk(logits, select_max, select_block, k, self.impl)
        out[:, 0] = shard_max
        out[:, 1:3] = shard_sums
        if k > 0:  # else K is empty: no candidates travel
            out[:, 4 : 4 + k] = values
            out[:, 4 + k :] = local_ids + vocab_start

    def gradient(self, logits: torch.Tensor, scale: torch.Tensor | None = None,
                 inplace: bool = False) -> torch.Tensor:
        """Stage 4: [N, V_local] d loss / d logits of this shard, times scale [N] (the incoming
        per-token gradient) if given; written into `logits` if inplace."""
        with record_function(STAGE_LABELS[3]):
            return self._gradient(logits, scale, inplace)

    def _gradient(self, logits, scale, inplace):
        terms = self.terms

        def scaled(value):  # [N] or [N, c] per-token values times the incoming gradient
            if scale is None:
                return value
            factor = scale.to(value.dtype)
            return value * (factor if value.dim() == 1 else factor[:, None])

        # every entry as if it were in the tail: p_j (W - lambda_tail); then the shard's k'
        # candidates (every member of K in this shard is among them) and the target entry
        k = self.k_local
        values = self.candidates[:, :k].to(logits.dtype)
        ids = self.candidates[:, k:].long()
        topk_coef, tail_coef = scaled(terms.topk_coef), scaled(terms.tail_coef)  # [N] each
        if self.candidates_all_in_topk:
            coefs = topk_coef[:, None].expand(-1, k)
        else:  # one [N, k'] coefficient tensor (scaling [N] first, not after)
            member = is_member(values, ids, self.kth_value, self.kth_index)
            coefs = torch.where(member, topk_coef[:, None], tail_coef[:, None])
            del member
        columns = ids.sub_(self.vocab_start)  # in place: one [N, k'] int64 temporary fewer
        target_column = torch.where(self.target_here, self.target_local, -1)
        return passes.gradient(logits, terms.log_normalizer, tail_coef, inplace,
                               self.impl, candidates=(columns, values, coefs),
                               target=(target_column, scaled(terms.target_grad)))


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16/fp32 logits are computed in fp32; float64 in float64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(logits: torch.Tensor, target: torch.Tensor, what: str = "logits"):
    if not logits.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {logits.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 token ids, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal {what} shape without its last "
            f"dimension, {tuple(logits.shape[:-1])}"
        )


def wants_gradient(*inputs: torch.Tensor) -> bool:
    """Whether autograd will ask for a gradient of any input (not under no_grad/inference)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in inputs)


class _VocabParallelShapedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, cfg, tp_group, overwrite_logits, impl):
        shard = logits.detach().reshape(-1, logits.shape[-1]).to(compute_dtype_for(logits.dtype))
        ctx.fwd = ShardForward(shard, target.reshape(-1), cfg, tp_group, impl)
        # Stage 4 runs in backward, from the logits: a converted copy is kept as is (it is ours),
        # the caller's tensor through save_for_backward (autograd checks it is not modified).
        owned = shard.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()
        ctx.owned_shard = shard if owned else None
        ctx.save_for_backward(None if owned else logits)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        ctx.overwrite, ctx.grad_consumed = overwrite_logits, False
        terms = ctx.fwd.terms
        outputs = [t.view(target.shape) for t in (terms.loss, terms.ce, terms.entropy, terms.topk_mass)]
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        if ctx.grad_consumed:
            raise RuntimeError(
                "vocab_parallel_shaped_loss(overwrite_logits=True) writes its gradient into the "
                "logits in backward: a second backward through the same graph is not supported"
            )
        shard = ctx.owned_shard
        if shard is None:
            shard = ctx.saved_tensors[0].detach().reshape(-1, ctx.logits_shape[-1])
        ctx.grad_consumed = ctx.overwrite
        grad = ctx.fwd.gradient(shard, grad_loss.reshape(-1), inplace=ctx.overwrite)
        return grad.view(ctx.logits_shape).to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_shaped_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    cfg: ShapedLossConfig,
    tp_group=None,
    *,
    overwrite_logits: bool = False,
    impl: LossImpl | None = None,
):
    """Per-token shaped loss on a vocabulary-parallel logits shard.

    Args:
        logits: [..., V_local], this rank's contiguous vocabulary shard (rank r holds global ids
            [r * V_local, (r + 1) * V_local)); the whole vocabulary when tp_group is None.
            bf16/fp16 are computed in fp32, float64 in float64. -inf entries are masked out
            (probability 0); NaN or +inf raise NONFINITE_LOGITS on every rank.
        target: [...] int64 global token ids; ids outside [0, V) (e.g. -100) are ignored:
            loss 0, gradient 0, stats 0.
        cfg: the knobs (ShapedLossConfig).
        tp_group: the tensor-parallel process group, or None.
        overwrite_logits: megatron-core's memory behaviour: backward writes the gradient into
            the logits' storage (float32/float64 logits; lower precision is always upcast into
            a fresh buffer, which is reused), so the loss holds no [N, V_local] buffer besides
            the logits. The logits are kept as they are until backward; the caller must not
            read them afterwards, and a second backward through the graph is refused. Default
            False: logits untouched, backward allocates its result (double backward and
            gradcheck work). Without a wanted gradient (no_grad) nothing is kept or written.
        impl: how to compute it (megatron_ntp.loss.LossImpl); None: the defaults.
    Returns:
        loss: [...] surrogate loss (float32, or float64), whose backward is p * W - w times the
            incoming per-token gradient (one pass over the logits, in backward).
        stats: {"ce", "entropy", "topk_mass"} as [...] tensors from the same reductions.
    Collectives (tp_group of size > 1): forward one all-gather of [N, 4 + 2 * min(k, V_local)]
    values per rank; backward none.
    """
    check_inputs(logits, target)
    loss, ce, entropy, topk_mass = _VocabParallelShapedLoss.apply(
        logits, target, cfg, tp_group, overwrite_logits, resolve(impl)
    )
    return loss, {"ce": ce, "entropy": entropy, "topk_mass": topk_mass}
