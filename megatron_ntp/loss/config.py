"""The knobs of the shaped next-token loss (megatron_ntp/loss/README.md)."""

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ShapedLossConfig:
    """Settings of the shaped reward. The defaults give cross-entropy exactly; the paper's
    five settings are megatron_ntp.loss.PAPER_SETTINGS (megatron_ntp/loss/settings.py)."""

    beta: float = 0.0
    """Global entropy knob: the ground-truth token's weight is p_x ** (1 - (1 - p_x) ** beta).
    beta < 0 sharpens the distribution (lower entropy), beta > 0 flattens it, 0 is cross-entropy.
    Must be >= -1: below, the weight diverges as p_x -> 1 (log w_x ~ (1 - p_x) ** (1 + beta))."""

    topk: int = 0
    """Size k of the set K of the largest logits (ties broken by lower global token id).
    K also defines the logged `topk_mass`; 0 means K is empty (every negative is in the tail)."""

    lambda_topk: float = 0.0
    """Reward of a negative token inside K (paper: lambda-tilde). > 0 keeps alternatives alive."""

    lambda_tail: float = 0.0
    """Reward of a negative token outside K (paper: lambda-hat). < 0 suppresses the tail."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in (float, "float"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"ShapedLossConfig.{f.name} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"ShapedLossConfig.{f.name} must be finite, got {value!r}")
                object.__setattr__(self, f.name, float(value))
        if self.beta < -1:
            raise ValueError(
                f"ShapedLossConfig.beta must be >= -1, got {self.beta}: below -1 the target "
                f"weight w_x diverges as p_x -> 1 (log w_x ~ (1 - p_x) ** (1 + beta)), so the "
                f"loss is inf and its gradient NaN on confident tokens")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int):
            raise ValueError(f"ShapedLossConfig.topk must be an integer, got {self.topk!r}")
        if self.topk < 0:
            raise ValueError(f"ShapedLossConfig.topk must be >= 0, got {self.topk}")

    @property
    def is_cross_entropy(self) -> bool:
        """True when the settings reduce the loss to plain cross-entropy (whatever topk is)."""
        return self.beta == 0.0 and self.lambda_topk == 0.0 and self.lambda_tail == 0.0
