"""Compatibility shims for running megatron-core where it was not written to run (CPU, gloo)."""

from megatron_ntp.compat.cpu import apply_cpu_patches, cpu_patches_applied

__all__ = ["apply_cpu_patches", "cpu_patches_applied"]
