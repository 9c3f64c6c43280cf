"""Per-token statistics of the next-token distribution, and calibration tables.

Everything is computed on vocabulary-parallel logit shards ([N, V_local] on each rank of the
tensor-parallel group, rank r holding global ids [r * V_local, (r + 1) * V_local)), through the
loss package's own forward stages (megatron_ntp.loss.vocab_parallel.ShardForward: shard max,
rescaled exp-sums, the distributed top-k and one all-gather per call), so the numbers are the
same reductions the training loss logs:

    ce         -log p(target)                      (perplexity = exp(mean ce))
    entropy    -sum_a p_a log p_a
    topk_mass  sum of p over the k largest logits (ties: lower token id first), tail = 1 - that
    p_max, argmax  from the same stages with k = 1

Calibration (both tables are sums, so micro-batches and ranks add up exactly):

- `top1`: the reliability diagram of the model's top-1 prediction. Each scored position goes
  to the bin of its confidence p_max (equal-width bins over [0, 1]); per bin: `count`
  positions, `predicted` = mean p_max, `observed` = fraction of them whose target is the
  argmax. ECE = sum over bins of count / N * |predicted - observed|.
- `vocab`: calibration of p over the whole vocabulary ("predicted vs observed frequency of
  p_target"). Every (position, vocabulary entry) pair goes to the bin of its probability p_a
  (fixed edges VOCAB_BIN_EDGES, dense near 0 where almost all pairs fall); per bin: `count`
  pairs, `predicted` = mean p_a, `targets` = number of pairs that are the target (so the
  `targets` column is the histogram of p_target), `observed` = targets / count. A calibrated
  model has observed = predicted in every bin. The pairs include the padding rows of the
  output layer (they are part of the softmax the model was trained with). This needs one extra
  pass over the logits shard and an all-reduce of 2 * bins numbers over the TP group.
"""

import math

import torch
import torch.distributed as dist

from megatron_ntp.loss.config import ShapedLossConfig
from megatron_ntp.loss.vocab_parallel import ShardForward

VOCAB_BIN_EDGES = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                   0.8, 0.9, 1.0)
SCALARS = ("tokens", "ce", "entropy", "topk_mass", "p_target", "p_max", "top1_correct")
_HISTOGRAM_CHUNK_ELEMENTS = 1 << 22


class EvalSums:
    """Additive sums of the statistics: scalars, the top-1 table and the vocabulary table."""

    def __init__(self, top1_bins: int = 10, device="cpu"):
        self.top1_bins = top1_bins
        self.vocab_bins = len(VOCAB_BIN_EDGES) - 1
        self.flat = torch.zeros(len(SCALARS) + 3 * top1_bins + 3 * self.vocab_bins,
                                dtype=torch.float64, device=device)

    # views into one flat tensor, so one all-reduce carries everything
    @property
    def scalars(self):
        return self.flat[: len(SCALARS)]

    def _table(self, offset, bins):
        start = len(SCALARS) + offset
        return self.flat[start : start + 3 * bins].view(3, bins)

    @property
    def top1(self):  # rows: count, sum p_max, correct
        return self._table(0, self.top1_bins)

    @property
    def vocab(self):  # rows: count, sum p, targets
        return self._table(3 * self.top1_bins, self.vocab_bins)

    def all_reduce(self, group) -> None:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(self.flat, group=group)

    def to_dict(self) -> dict:
        s = {name: self.scalars[i].item() for i, name in enumerate(SCALARS)}
        n = max(s["tokens"], 1.0)
        out = {"tokens": int(s["tokens"])}
        out["ce"] = s["ce"] / n
        out["ppl"] = math.exp(out["ce"]) if s["tokens"] else float("nan")
        out["entropy"] = s["entropy"] / n
        out["topk_mass"] = s["topk_mass"] / n
        out["tail_mass"] = 1.0 - out["topk_mass"]
        out["p_target_mean"] = s["p_target"] / n
        out["p_max_mean"] = s["p_max"] / n
        out["top1_accuracy"] = s["top1_correct"] / n
        count, conf, correct = self.top1.tolist()
        edges = [i / self.top1_bins for i in range(self.top1_bins + 1)]
        top1_rows, ece = [], 0.0
        for b in range(self.top1_bins):
            predicted = conf[b] / count[b] if count[b] else None
            observed = correct[b] / count[b] if count[b] else None
            if count[b]:
                ece += count[b] / n * abs(predicted - observed)
            top1_rows.append({"lo": edges[b], "hi": edges[b + 1], "count": int(count[b]),
                              "predicted": predicted, "observed": observed})
        count, mass, targets = self.vocab.tolist()
        vocab_rows = [{"lo": VOCAB_BIN_EDGES[b], "hi": VOCAB_BIN_EDGES[b + 1],
                       "count": int(count[b]), "targets": int(targets[b]),
                       "predicted": mass[b] / count[b] if count[b] else None,
                       "observed": targets[b] / count[b] if count[b] else None}
                      for b in range(self.vocab_bins)]
        out["calibration"] = {
            "top1": {"definition": "positions binned by top-1 probability p_max; predicted = "
                                   "mean p_max, observed = fraction whose target is the argmax",
                     "ece": ece, "bins": top1_rows},
            "vocab": {"definition": "(position, vocabulary id) pairs binned by p; predicted = "
                                    "mean p, observed = fraction of the pairs that are the "
                                    "target; targets = histogram of p_target",
                      "bins": vocab_rows},
        }
        return out


def _bin_index(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin of each value for bins [e_i, e_i+1) (the last one closed at 1)."""
    return torch.bucketize(values, edges[1:-1], right=True)


@torch.no_grad()
def accumulate_token_statistics(sums: EvalSums, logits: torch.Tensor, target: torch.Tensor,
                                topk: int, tp_group=None) -> None:
    """Add the statistics of the scored positions to `sums`.

    Args:
        logits: [N, V_local] this rank's vocabulary shard (any float dtype; computed in fp32).
        target: [N] int64 global ids; positions with an id outside [0, V) are not scored.
        topk: k of the top-k mass (>= 1).
        tp_group: the tensor-parallel group (None: the whole vocabulary is here).
    Collectives (TP > 1): the all-gathers of the loss stages (two calls when topk > 1, one
    when topk == 1) and one all-reduce of the vocabulary table over tp_group. Every TP rank
    ends with the same sums.
    """
    logits = logits.float() if logits.dtype != torch.float64 else logits
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    vocab_start = rank * logits.shape[-1]
    top1 = ShardForward(logits, target, ShapedLossConfig(topk=1), tp_group)
    top_k = top1 if topk == 1 else ShardForward(logits, target, ShapedLossConfig(topk=topk),
                                                tp_group)
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    valid = (target >= 0) & (target < logits.shape[-1] * world)
    keep = valid.to(torch.float64)
    terms = top_k.terms
    ce = terms.ce.double()
    p_target = torch.exp(-ce) * keep
    p_max = top1.terms.topk_mass.double()
    argmax = top1.kth_index  # global id of the top token
    correct = (argmax == target) & valid
    scalars = torch.stack([keep.sum(), ce.sum(), terms.entropy.double().sum(),
                           terms.topk_mass.double().sum(), p_target.sum(), (p_max * keep).sum(),
                           correct.double().sum()])
    sums.scalars.add_(scalars.to(sums.flat.device))

    device = logits.device
    edges = torch.linspace(0.0, 1.0, sums.top1_bins + 1, dtype=torch.float64, device=device)
    bins = _bin_index(p_max, edges)[valid]
    top1_table = torch.stack([
        torch.bincount(bins, minlength=sums.top1_bins).double(),
        torch.bincount(bins, weights=p_max[valid], minlength=sums.top1_bins),
        torch.bincount(bins, weights=correct[valid].double(), minlength=sums.top1_bins)])
    sums.top1.add_(top1_table.to(sums.flat.device))

    # vocabulary table: a pass over the shard with p = exp(z - log_normalizer)
    vocab_edges = torch.tensor(VOCAB_BIN_EDGES, dtype=torch.float64, device=device)
    nbins = len(VOCAB_BIN_EDGES) - 1
    table = torch.zeros(3, nbins, dtype=torch.float64, device=device)
    rows = logits[valid]
    log_normalizer = terms.log_normalizer[valid]
    # the target pairs, each counted by the shard that holds its id, from the same p values
    target_local = target[valid] - vocab_start
    here = (target_local >= 0) & (target_local < logits.shape[-1])
    safe_local = torch.where(here, target_local, 0)
    step = max(1, _HISTOGRAM_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    for start in range(0, rows.shape[0], step):
        end = min(start + step, rows.shape[0])
        p = torch.exp(rows[start:end] - log_normalizer[start:end, None])  # [c, V_local]
        flat = p.double().flatten()
        b = _bin_index(flat, vocab_edges)
        table[0] += torch.bincount(b, minlength=nbins).double()
        table[1] += torch.bincount(b, weights=flat, minlength=nbins)
        p_pair = p.gather(-1, safe_local[start:end, None])[:, 0].double()
        pair_bins = _bin_index(p_pair[here[start:end]], vocab_edges)
        table[2] += torch.bincount(pair_bins, minlength=nbins).double()
    if world > 1:
        dist.all_reduce(table, group=tp_group)
    sums.vocab.add_(table.to(sums.flat.device))
