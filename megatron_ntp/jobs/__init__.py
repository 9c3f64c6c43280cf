"""Running a training job: what every Slurm job and every run folder uses.

Modules: slurm (sbatch/squeue command lines, `megatron-ntp submit`'s options), launch (the
per-node launcher that slurm/train.sbatch runs under srun), run_folder (a run's state on disk:
the COMPLETE marker, its metric records), cli (the `submit` subcommand).
"""
