"""Loss settings and inputs shared by the loss tests."""

import torch

from megatron_ntp.loss import ShapedLossConfig

IGNORE = -100

# ../shared/METHOD.md section 5, then the corners of the method.
SETTINGS = {
    "cross_entropy": ShapedLossConfig(),
    "precision": ShapedLossConfig(beta=-0.25),
    "diversity": ShapedLossConfig(beta=0.5),
    "tail_suppression": ShapedLossConfig(topk=100, lambda_tail=-0.1),
    "head_preservation": ShapedLossConfig(topk=100, lambda_topk=0.1),
    "k1": ShapedLossConfig(topk=1, lambda_topk=0.3, lambda_tail=-0.2),
    "k_at_least_vocab": ShapedLossConfig(topk=10**6, lambda_topk=0.2, lambda_tail=-0.3),
    "beta_neg_both_lambdas": ShapedLossConfig(beta=-0.25, topk=5, lambda_topk=0.1, lambda_tail=-0.1),
    "beta_pos_both_lambdas": ShapedLossConfig(beta=0.5, topk=3, lambda_topk=0.2, lambda_tail=-0.05),
}


def make_inputs(vocab: int, seed: int, shape=(2, 5), dtype=torch.float64, scale=4.0):
    """logits [*shape, vocab] and targets [*shape] with two ignored positions."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, vocab, shape, generator=gen)
    target.view(-1)[1] = IGNORE
    target.view(-1)[-1] = vocab  # out of range: ignored too
    return logits, target


def tied_bf16_logits(vocab: int, seed: int, shape=(3, 4)):
    """bf16 logits taking only a handful of values: ties everywhere, also at the k-th value."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 3, (*shape, vocab), generator=gen).to(torch.bfloat16) * 0.5
    target = torch.randint(0, vocab, shape, generator=gen)
    return logits, target
