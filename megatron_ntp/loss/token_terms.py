"""Per-token scalar algebra of the shaped loss, shared by every implementation.

Once the vocabulary-wide sums of a token are known, its loss, its stats and the coefficients
of its gradient p_j * W - w_j follow from a handful of [N] tensors; nothing here touches
a [N, V] tensor. Formulas: megatron_ntp/loss/README.md, "The loss".
"""

from dataclasses import dataclass

import torch

from megatron_ntp.loss.config import ShapedLossConfig


def log_target_weight(log_p_target: torch.Tensor, beta: float) -> torch.Tensor:
    """log w_x = (1 - (1 - p_x) ** beta) * log p_x, in log space, never NaN (beta >= -1).

    (1 - p_x) is formed as -expm1(log p_x), exact near p_x = 1. At p_x == 1 (log p_x == 0) the
    weight is exactly 1 whatever beta is (0 * inf would otherwise give NaN for beta < 0); at
    p_x == 0 (a -inf target logit) it is its limit 1 too (p ** (beta p) -> 1).
    """
    log_one_minus_p = torch.log(-torch.expm1(log_p_target))
    limit = (log_p_target == 0) | (log_p_target == float("-inf"))
    power = torch.exp(beta * torch.where(limit, 0.0, log_one_minus_p))  # (1 - p_x) ** beta
    return torch.where(limit, 0.0, (1.0 - power) * log_p_target)


@dataclass
class TokenTerms:
    """Everything a token needs after the sums; all fields are [N]."""

    loss: torch.Tensor
    ce: torch.Tensor
    entropy: torch.Tensor
    topk_mass: torch.Tensor
    log_normalizer: torch.Tensor  # m + log S: p_j = exp(z_j - log_normalizer)
    tail_coef: torch.Tensor  # gradient / p_j for a non-target j outside K: W - lambda_tail
    topk_coef: torch.Tensor  # gradient / p_j for a non-target j inside K: W - lambda_topk
    target_grad: torch.Tensor  # gradient at the target: p_x * W - w_x


def combine_token_sums(
    cfg: ShapedLossConfig,
    logit_max: torch.Tensor,
    sums: torch.Tensor,
    target_in_topk: torch.Tensor,
    valid: torch.Tensor,
) -> TokenTerms:
    """Turn the vocabulary-wide sums of each token into its loss, stats and gradient coefficients.

    Args:
        logit_max: [N] m, the row maximum of the logits.
        sums: [N, 5] over the whole vocabulary, with e = exp(z - m):
            S = sum e, T = sum e * (z - m), S_K = sum_K e, T_K = sum_K e * (z - m), z_x.
        target_in_topk: [N] bool, whether the target token is in K.
        valid: [N] bool, False for ignored targets (their loss, stats and gradient are 0).
    """
    sum_exp, sum_exp_logit, sum_exp_topk, sum_exp_logit_topk, target_logit = sums.unbind(-1)
    log_sum_exp = torch.log(sum_exp)
    log_p_target = target_logit - logit_max - log_sum_exp
    p_target = torch.exp(log_p_target)
    w_target = torch.exp(log_target_weight(log_p_target, cfg.beta))

    plogp_all = sum_exp_logit / sum_exp - log_sum_exp  # sum_a p_a log p_a
    topk_mass = sum_exp_topk / sum_exp
    plogp_topk = sum_exp_logit_topk / sum_exp - topk_mass * log_sum_exp
    plogp_target = torch.where(p_target > 0, p_target * log_p_target, 0.0)  # 0 log 0 = 0
    target_in_topk = target_in_topk.to(sum_exp.dtype)
    target_in_tail = 1.0 - target_in_topk

    # L = -w_x log p_x - lambda_topk * sum_{K\x} p log p - lambda_tail * sum_{tail\x} p log p
    loss = (
        -w_target * log_p_target
        - cfg.lambda_topk * (plogp_topk - target_in_topk * plogp_target)
        - cfg.lambda_tail * (plogp_all - plogp_topk - target_in_tail * plogp_target)
    )
    # W = sum_a w_a
    total_weight = (
        w_target
        + cfg.lambda_topk * (topk_mass - target_in_topk * p_target)
        + cfg.lambda_tail * (1.0 - topk_mass - target_in_tail * p_target)
    )

    def keep(value):  # ignored targets: 0, even where the value is inf (a -inf target logit)
        return torch.where(valid, value, 0.0)

    return TokenTerms(
        loss=keep(loss),
        ce=keep(-log_p_target),
        entropy=keep(-plogp_all),
        topk_mass=keep(topk_mass),
        log_normalizer=logit_max + log_sum_exp,
        tail_coef=keep(total_weight - cfg.lambda_tail),
        topk_coef=keep(total_weight - cfg.lambda_topk),
        target_grad=keep(p_target * total_weight - w_target),
    )
