"""The shaped next-token loss (arXiv 2512.22955; the method: megatron_ntp/loss/README.md).

Public API:
    ShapedLossConfig              the knobs (beta, topk, lambda_topk, lambda_tail)
    PAPER_SETTINGS                the paper's five settings, name -> ShapedLossConfig
    LossImpl                      implementation switches (impl=); none changes a result
    vocab_parallel_shaped_loss    per-token loss on a (vocab-parallel) logits shard
    fused_linear_shaped_loss      output-layer matmul + loss, chunked over tokens
    fused_linear_shaped_loss_sum  the same, weighted sum, gradients formed in the forward
    reference_shaped_loss         full-vocabulary reference (the executable specification)
"""

from megatron_ntp.loss.config import ShapedLossConfig
from megatron_ntp.loss.fused import fused_linear_shaped_loss, fused_linear_shaped_loss_sum
from megatron_ntp.loss.impl import LossImpl
from megatron_ntp.loss.reference import reference_shaped_loss
from megatron_ntp.loss.settings import PAPER_SETTINGS
from megatron_ntp.loss.vocab_parallel import vocab_parallel_shaped_loss

__all__ = [
    "LossImpl",
    "PAPER_SETTINGS",
    "ShapedLossConfig",
    "fused_linear_shaped_loss",
    "fused_linear_shaped_loss_sum",
    "reference_shaped_loss",
    "vocab_parallel_shaped_loss",
]
