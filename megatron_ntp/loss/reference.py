"""Full-vocabulary reference of the shaped loss: the executable specification.

Plain PyTorch, no sharding, no fusion, the gradient by autograd. Every other implementation
in this package is tested against it. Formulas: megatron_ntp/loss/README.md, "The loss".
-inf logits (masked entries) have p = 0 and add nothing: 0 * log 0 is taken as 0.
"""

import torch

from megatron_ntp.loss.config import ShapedLossConfig
from megatron_ntp.loss.token_terms import log_target_weight


def topk_membership(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[..., V] bool mask of K: the k largest logits, ties ranked by lower token id first.

    A stable descending sort keeps equal values in ascending index order, which is the tie rule.
    """
    k = min(k, logits.shape[-1])
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    member = torch.zeros_like(logits, dtype=torch.bool)
    return member.scatter_(-1, order[..., :k], True)


def reference_shaped_loss(logits: torch.Tensor, target: torch.Tensor, cfg: ShapedLossConfig):
    """Shaped loss over the whole vocabulary.

    Args:
        logits: [..., V], any float dtype (computed in float32, or float64 for float64 input).
        target: [...] int64 token ids; ids outside [0, V) are ignored (loss 0, no gradient).
    Returns:
        loss [...] whose autograd gradient is p * W - w, and stats {"ce", "entropy",
        "topk_mass"} as [...] tensors (0 at ignored positions).
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(compute_dtype)
    vocab = z.shape[-1]
    valid = (target >= 0) & (target < vocab)
    safe_target = torch.where(valid, target, 0).unsqueeze(-1)

    log_p = torch.log_softmax(z, dim=-1)
    with torch.no_grad():  # the reward weights carry a stop-gradient
        p = log_p.exp()
        in_k = topk_membership(z, cfg.topk)
        weights = torch.full_like(p, cfg.lambda_tail).masked_fill_(in_k, cfg.lambda_topk) * p
        log_p_target = log_p.gather(-1, safe_target)
        weights.scatter_(-1, safe_target, log_target_weight(log_p_target, cfg.beta).exp())
        stats = {
            "ce": -log_p_target.squeeze(-1),
            "entropy": -torch.where(p > 0, p * log_p, 0.0).sum(-1),
            "topk_mass": (p * in_k).sum(-1),
        }
        stats = {name: torch.where(valid, value, 0.0) for name, value in stats.items()}
    loss = -torch.where(weights == 0, 0.0, weights * log_p).sum(-1)
    return torch.where(valid, loss, 0.0), stats
