"""Loss settings and inputs shared by the loss tests."""

import torch
from torch.overrides import TorchFunctionMode

from megatron_ntp.loss import PAPER_SETTINGS, ShapedLossConfig

IGNORE = -100

# The paper's five settings, then the corners of the method.
SETTINGS = {
    **PAPER_SETTINGS,
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


def nonfinite_cases():
    """(name, logits [2, 4], target [2]) whose logits hold NaN or +inf in row 1: refused."""
    good = [2.0, 1.0, float("-inf"), 0.5]
    return [(name, torch.tensor([good, bad]), torch.tensor([0, 1])) for name, bad in (
        ("nan", [0.0, 1.0, 2.0, float("nan")]),
        ("+inf", [0.0, float("inf"), 1.0, 2.0]),
        ("all -inf", [float("-inf")] * 4),
    )]


def tied_bf16_logits(vocab: int, seed: int, shape=(3, 4)):
    """bf16 logits taking only a handful of values: ties everywhere, also at the k-th value."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 3, (*shape, vocab), generator=gen).to(torch.bfloat16) * 0.5
    target = torch.randint(0, vocab, shape, generator=gen)
    return logits, target


class HostSyncTrap(TorchFunctionMode):
    """Raises on every call that would make a GPU wait for the host to read a tensor."""

    SYNCS = {"item", "__bool__", "__float__", "__int__", "__index__", "nonzero", "tolist", "cpu",
             "numpy"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS:
            raise AssertionError(f"host sync: Tensor.{name}")
        return func(*args, **(kwargs or {}))
