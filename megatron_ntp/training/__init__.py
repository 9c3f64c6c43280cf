"""The training program on megatron-core: model chunks, DDP, optimizer, WSD schedule, the step
on megatron-core's forward-backward schedules, metrics and validation.

    from megatron_ntp.training import run_training
    run_training(validate_config(load_config("run.yaml", overrides)))

Modules: data (datasets, the offline sample, micro-batches), build (model/DDP/optimizer/
scheduler), step (loss function, one step, reductions), metrics (console/JSONL/TensorBoard),
loop (the program).
"""


def run_training(config, stream=None):
    from megatron_ntp.training.loop import run_training as run

    return run(config, stream=stream)


__all__ = ["run_training"]
