"""Scaling-law fits over runs: L(N, D) per loss setting, IsoFLOP optima, bootstrap intervals."""

from megatron_ntp.scaling.fit import (
    ScalingFit,
    bootstrap_scaling_law,
    fit_scaling_law,
    isoflop_groups,
    isoflop_optima,
)

__all__ = ["ScalingFit", "bootstrap_scaling_law", "fit_scaling_law", "isoflop_groups",
           "isoflop_optima"]
