"""The paper's five loss settings (arXiv 2512.22955; megatron_ntp/loss/README.md, "Settings"),
defined once: every other use (tests, examples, sweeps) imports this table."""

from megatron_ntp.loss.config import ShapedLossConfig

PAPER_SETTINGS: dict[str, ShapedLossConfig] = {
    "cross_entropy": ShapedLossConfig(),
    "precision": ShapedLossConfig(beta=-0.25),  # global low entropy
    "diversity": ShapedLossConfig(beta=0.5),  # global high entropy
    "tail_suppression": ShapedLossConfig(topk=100, lambda_tail=-0.1),  # local precision
    "head_preservation": ShapedLossConfig(topk=100, lambda_topk=0.1),  # local diversity
}
"""Setting name -> ShapedLossConfig, in the paper's order."""


def config_overrides(cfg: ShapedLossConfig) -> dict[str, object]:
    """The loss section's dotted overrides that give `cfg` ({"loss.beta": -0.25, ...}): the
    fields that differ from ShapedLossConfig's defaults (sweep specs and the examples use
    them)."""
    default = ShapedLossConfig()
    return {f"loss.{name}": value for name, value in vars(cfg).items()
            if value != getattr(default, name)}
