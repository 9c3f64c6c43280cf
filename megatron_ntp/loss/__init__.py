"""The shaped next-token loss (../shared/METHOD.md).

Public API:
    ShapedLossConfig              the knobs (beta, topk, lambda_topk, lambda_tail)
    vocab_parallel_shaped_loss    per-token loss on a (vocab-parallel) logits shard
    fused_linear_shaped_loss      output-layer matmul + loss, chunked over tokens
    reference_shaped_loss         full-vocabulary reference (the executable specification)
"""

from megatron_ntp.loss.config import ShapedLossConfig
from megatron_ntp.loss.fused import fused_linear_shaped_loss
from megatron_ntp.loss.reference import reference_shaped_loss
from megatron_ntp.loss.vocab_parallel import vocab_parallel_shaped_loss

__all__ = [
    "ShapedLossConfig",
    "fused_linear_shaped_loss",
    "reference_shaped_loss",
    "vocab_parallel_shaped_loss",
]
