import pytest
import torch

from megatron_ntp.eval.generate import SamplingParams, row_seed, sample_tokens


def _grid(n):
    # evenly spaced uniforms: the counts of inverse-CDF sampling are then exact up to 1 / n
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def _counts(logits_row, params, n=20000, vocab_limit=None):
    logits = logits_row.expand(n, -1)
    tokens = sample_tokens(logits, _grid(n), params, vocab_limit)
    return torch.bincount(tokens, minlength=logits_row.shape[-1]).double() / n


def test_greedy_takes_the_lowest_id_among_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 5.0]])
    got = sample_tokens(logits, torch.rand(2, dtype=torch.float64), SamplingParams(temperature=0))
    assert got.tolist() == [1, 0]


def test_temperature_one_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    freq = _counts(logits, SamplingParams())
    assert torch.allclose(freq, torch.softmax(logits[0].double(), -1), atol=1e-3)


def test_temperature_scales_the_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    freq = _counts(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(freq, torch.softmax(logits[0].double() / 0.5, -1), atol=1e-3)


def test_top_k_keeps_the_k_most_likely_renormalised():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    freq = _counts(logits, SamplingParams(top_k=2))
    want = torch.zeros(5, dtype=torch.float64)
    want[[1, 3]] = torch.softmax(torch.tensor([3.0, 2.0], dtype=torch.float64), -1)
    assert torch.allclose(freq, want, atol=1e-3)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log().float()[None]
    # mass before each token: 0, 0.5, 0.8, 0.95 -> with p = 0.8 the first two are kept
    freq = _counts(logits, SamplingParams(top_p=0.8))
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64),
                          atol=1e-3)
    # a tiny p keeps only the most likely token
    assert _counts(logits, SamplingParams(top_p=1e-6))[0] == 1.0


def test_top_k_then_top_p():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    logits = probs.log().float()[None]
    # top-k = 3 renormalises to 4/9, 3/9, 2/9; top-p = 0.5 then keeps the first two
    freq = _counts(logits, SamplingParams(top_k=3, top_p=0.5))
    assert torch.allclose(freq, torch.tensor([4 / 7, 3 / 7, 0, 0], dtype=torch.float64),
                          atol=1e-3)


def test_vocab_limit_never_samples_padding():
    logits = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # the padding rows are the likeliest
    assert _counts(logits, SamplingParams(), vocab_limit=2)[2:].sum() == 0
    assert sample_tokens(logits, _grid(1), SamplingParams(temperature=0), 2).item() == 0


def test_the_same_uniforms_give_the_same_tokens():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    u = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.7, top_p=0.95, top_k=50)
    assert torch.equal(sample_tokens(logits, u, params), sample_tokens(logits.clone(), u, params))


def test_row_seeds_differ_and_repeat():
    seeds = {row_seed(1234, i, j) for i in range(50) for j in range(50)}
    assert len(seeds) == 2500
    assert row_seed(7, 3, 4) == row_seed(7, 3, 4) != row_seed(8, 3, 4)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                 dict(top_k=-1), dict(num_samples=0), dict(max_new_tokens=0)])
def test_sampling_params_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
