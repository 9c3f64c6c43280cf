"""Eval statistics on logit shards against a full-vocabulary computation, at TP = 1 and 2."""

import math
import os

import pytest
import torch

from megatron_ntp.eval.metrics import VOCAB_BIN_EDGES, EvalSums, accumulate_token_statistics
from tests.distributed import run_distributed

VOCAB, TOKENS, TOPK = 96, 40, 5


def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(TOKENS, VOCAB, generator=g) * 3
    logits[0, :] = 0.0  # a uniform row: every token tied
    logits[1, 7] = 40.0  # a saturated row
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    target[1] = 7
    target[2] = -100  # ignored
    target[3] = logits[3].argmax()
    return logits, target


def _reference(logits, target, top1_bins=10):
    """Plain full-vocabulary float64 computation of every number of EvalSums.to_dict()."""
    valid = (target >= 0) & (target < VOCAB)
    z, t = logits[valid].double(), target[valid]
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices
    topk_mass = p.gather(-1, order[:, :TOPK]).sum(-1)
    p_max, argmax = p.gather(-1, order[:, :1])[:, 0], order[:, 0]
    p_target = p.gather(-1, t[:, None])[:, 0]
    n = len(t)
    out = {"tokens": n, "ce": -logp.gather(-1, t[:, None]).mean().item(),
           "entropy": -(p * logp).sum(-1).mean().item(), "topk_mass": topk_mass.mean().item(),
           "p_max_mean": p_max.mean().item(), "p_target_mean": p_target.mean().item(),
           "top1_accuracy": (argmax == t).double().mean().item()}
    bins = torch.clamp((p_max * top1_bins).floor().long(), max=top1_bins - 1)
    top1 = [[int((bins == b).sum()), p_max[bins == b].sum().item(),
             int(((argmax == t) & (bins == b)).sum())] for b in range(top1_bins)]
    edges = torch.tensor(VOCAB_BIN_EDGES, dtype=torch.float64)
    vb = torch.bucketize(p.flatten(), edges[1:-1], right=True)
    tb = torch.bucketize(p_target, edges[1:-1], right=True)
    vocab = [[int((vb == b).sum()), p.flatten()[vb == b].sum().item(), int((tb == b).sum())]
             for b in range(len(edges) - 1)]
    return out, top1, vocab


def _check(result, reference):
    want, top1, vocab = reference
    for key, value in want.items():
        assert result[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert result["ppl"] == pytest.approx(math.exp(want["ce"]), rel=1e-5)
    assert result["tail_mass"] == pytest.approx(1 - want["topk_mass"], abs=1e-6)
    for row, (count, conf, correct) in zip(result["calibration"]["top1"]["bins"], top1):
        assert row["count"] == count
        if count:
            assert row["predicted"] == pytest.approx(conf / count, rel=1e-5)
            assert row["observed"] == pytest.approx(correct / count)
    total_pairs = 0
    for row, (count, mass, targets) in zip(result["calibration"]["vocab"]["bins"], vocab):
        # fp32 probabilities right at a bin edge may fall on the other side: allow a pair or two
        assert abs(row["count"] - count) <= 2 and abs(row["targets"] - targets) <= 1
        total_pairs += row["count"]
    assert total_pairs == want["tokens"] * VOCAB
    assert sum(r["targets"] for r in result["calibration"]["vocab"]["bins"]) == want["tokens"]


@pytest.fixture(autouse=True)
def _eager_passes(monkeypatch):
    # the loss passes run eagerly: compiling them costs seconds per process, and the compiled
    # path is the loss tests' business
    monkeypatch.setenv("MEGATRON_NTP_COMPILE", "0")


def test_single_shard_matches_the_full_vocabulary_reference():
    logits, target = _inputs()
    sums = EvalSums()
    # two calls on halves of the tokens: sums add up
    accumulate_token_statistics(sums, logits[:17], target[:17], TOPK)
    accumulate_token_statistics(sums, logits[17:], target[17:], TOPK)
    _check(sums.to_dict(), _reference(logits, target))


def _tp_worker(rank, world_size, out):
    import torch.distributed as dist

    logits, target = _inputs()
    shard = logits.chunk(world_size, dim=-1)[rank].contiguous()
    sums = EvalSums()
    accumulate_token_statistics(sums, shard, target, TOPK, dist.group.WORLD)
    torch.save(sums.flat, os.path.join(out, f"rank{rank}.pt"))


def test_tensor_parallel_shards_match_the_reference(tmp_path):
    run_distributed(2, _tp_worker, str(tmp_path))
    flats = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(flats[0], flats[1])  # every TP rank ends with the same sums
    sums = EvalSums()
    sums.flat = flats[0]
    _check(sums.to_dict(), _reference(*_inputs()))


def test_top1_ece_of_a_calibrated_table_is_zero():
    sums = EvalSums(top1_bins=2)
    sums.scalars[0] = 4
    sums.top1[:, 1] = torch.tensor([4.0, 3.0, 3.0])  # 4 positions, mean p_max 0.75, 3 correct
    assert sums.to_dict()["calibration"]["top1"]["ece"] == pytest.approx(0.0)
