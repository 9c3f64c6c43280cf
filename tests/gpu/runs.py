"""Short single-GPU training runs for tests/gpu: one rank, the sample dataset of
tests/conftest.py, in-process (run_training joins and leaves a one-rank NCCL group)."""

import os

from megatron_ntp.config import load_config, validate_config


def tiny_overrides(sample_data, run_dir, *extra, preset="tiny-dense", steps=10):
    prefix, tokenizer = sample_data
    return [
        f"model.preset={preset}", "model.vocab_size=1024", "model.bf16=true",
        f"data.blend={prefix}", f"data.tokenizer_model={tokenizer}", "data.seq_length=256",
        "data.split=98,2,0", "train.global_batch_tokens=4096", "train.micro_batch_size=4",
        f"train.steps={steps}", "train.lr=3e-3", "train.lr_warmup_steps=2",
        "loss.beta=-0.25", "loss.topk=4", "loss.lambda_tail=-0.1",
        f"logging.run_dir={run_dir}", "logging.tensorboard=false", *extra]


def train(overrides):
    """Per-step records of a one-GPU run of `overrides`."""
    from megatron_ntp.training.loop import run_training

    config = validate_config(load_config(None, list(overrides)), world_size=1)
    with open(os.devnull, "w") as quiet:
        return run_training(config, stream=quiet)


def losses(records):
    return [r["loss"] for r in records]
