"""The method's fixed point (megatron_ntp/loss/README.md): free logits optimised with the shaped
loss against targets sampled from a fixed distribution q settle where the knobs say.

No model: a plain parameter z of [rows, V] (each row an independent copy of the problem), targets
drawn from q every step, Adam with a decaying rate. Cross-entropy's fixed point is p = q; beta < 0
sharpens (lower entropy), beta > 0 flattens (higher entropy), lambda_tail < 0 moves mass from the
tail (outside the top k) into the head.
"""

import math

import pytest
import torch

from megatron_ntp.loss import ShapedLossConfig, vocab_parallel_shaped_loss

VOCAB, ROWS, SAMPLES, STEPS, K = 32, 8, 256, 150, 4


def target_distribution():
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float64)
    q = ranks.pow(-1.1)  # Zipf-like: a clear head and a long tail
    return q / q.sum()


def optimise(cfg: ShapedLossConfig, seed: int = 0) -> torch.Tensor:
    """p = softmax(z) after optimisation, [ROWS, VOCAB] float64."""
    generator = torch.Generator().manual_seed(seed)
    q = target_distribution()
    z = torch.nn.Parameter(torch.zeros(ROWS, VOCAB, dtype=torch.float64))
    optimizer = torch.optim.Adam([z], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / STEPS)
    for _ in range(STEPS):
        targets = torch.multinomial(q.expand(ROWS, -1), SAMPLES, replacement=True,
                                    generator=generator)  # [ROWS, SAMPLES]
        logits = z[:, None, :].expand(ROWS, SAMPLES, VOCAB)
        loss, _ = vocab_parallel_shaped_loss(logits, targets, cfg)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        schedule.step()
    return torch.softmax(z.detach(), dim=-1)


def entropy(p):
    return float(-(p * p.log()).sum(-1).mean())


def tail_mass(p):
    return float((1 - p.topk(K, dim=-1).values.sum(-1)).mean())


@pytest.fixture(scope="module")
def fixed_points():
    settings = {
        "ce": ShapedLossConfig(),
        "precision": ShapedLossConfig(beta=-0.25),
        "diversity": ShapedLossConfig(beta=0.5),
        "tail_suppression": ShapedLossConfig(topk=K, lambda_tail=-0.1),
    }
    return {name: optimise(cfg) for name, cfg in settings.items()}


def test_cross_entropy_recovers_the_target_distribution(fixed_points):
    q = target_distribution()
    entropy_q = float(-(q * q.log()).sum())
    assert entropy(fixed_points["ce"]) == pytest.approx(entropy_q, abs=0.05)


def test_beta_orders_the_entropy(fixed_points):
    low, ce, high = (entropy(fixed_points[n]) for n in ("precision", "ce", "diversity"))
    assert low < ce - 0.02 and ce + 0.02 < high, (low, ce, high)


def test_negative_lambda_tail_suppresses_the_tail(fixed_points):
    suppressed, ce = tail_mass(fixed_points["tail_suppression"]), tail_mass(fixed_points["ce"])
    assert suppressed < ce - 0.01, (suppressed, ce)
    assert math.isfinite(suppressed)
