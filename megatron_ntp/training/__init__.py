"""The training program on megatron-core: model chunks, DDP, optimizer, WSD schedule, the step
on megatron-core's forward-backward schedules, metrics and validation.

    from megatron_ntp.training import run_training
    run_training(validate_config(load_config("run.yaml", overrides)))

Modules: data (datasets, the offline sample, micro-batches), build (model/DDP/optimizer/
scheduler), step (loss function, one step, reductions), metrics (console/JSONL/TensorBoard),
checkpoint (dist_checkpointing save/resume/mid-training, load_model_weights), preemption
(SIGTERM -> save -> exit PREEMPTED_EXIT_CODE), loop (the program).
"""

# Exit status of a run stopped by SIGTERM after saving its checkpoint: EX_TEMPFAIL of
# sysexits.h ("try again later"). Job scripts requeue on it; the same command then resumes.
PREEMPTED_EXIT_CODE = 75


def run_training(config, stream=None):
    from megatron_ntp.training.loop import run_training as run

    return run(config, stream=stream)


__all__ = ["PREEMPTED_EXIT_CODE", "run_training"]
