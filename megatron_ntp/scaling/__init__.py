"""Scaling-law fits over runs: L(N, D) per loss setting, IsoFLOP optima and laws, bootstrap
intervals."""

from megatron_ntp.scaling.fit import (
    BootstrapFit,
    ScalingFit,
    bootstrap_scaling_law,
    fit_scaling_law,
)
from megatron_ntp.scaling.isoflop import (
    IsoflopLaw,
    fit_isoflop_law,
    isoflop_groups,
    isoflop_optima,
)

__all__ = ["BootstrapFit", "IsoflopLaw", "ScalingFit", "bootstrap_scaling_law",
           "fit_isoflop_law", "fit_scaling_law", "isoflop_groups", "isoflop_optima"]
