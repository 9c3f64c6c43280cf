"""Slurm jobs and scaling-law sweeps.

Modules: spec (the sweep spec YAML), plan (run folders with full configs, the manifest),
slurm (sbatch/squeue), submit (idempotent submission), jobs (a run's state: COMPLETE marker,
metrics), collect (one CSV of every run's metrics), launch (per-node launchers that
slurm/train.sbatch runs under srun), cli (the `submit` and `sweep` subcommands). The fits and
plots are in megatron_ntp.scaling.
"""
