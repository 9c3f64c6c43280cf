"""Short single-GPU training runs for tests/gpu: one rank, the sample dataset of
tests/conftest.py, in-process (run_training joins and leaves a one-rank NCCL group)."""

import os
from typing import NamedTuple
from unittest import mock

from megatron_ntp.config import load_config, validate_config
from tests.gpu.layer_names import copy_weights, local_to_te_keys_map


def tiny_overrides(sample_data, run_dir, *extra, preset="tiny-dense", steps=10):
    prefix, tokenizer = sample_data
    return [
        f"model.preset={preset}", "model.vocab_size=1024", "model.bf16=true",
        f"data.blend={prefix}", f"data.tokenizer_model={tokenizer}", "data.seq_length=256",
        "data.split=98,2,0", "train.global_batch_tokens=4096", "train.micro_batch_size=4",
        f"train.steps={steps}", "train.lr=3e-3", "train.lr_warmup_steps=2",
        "loss.beta=-0.25", "loss.topk=4", "loss.lambda_tail=-0.1",
        f"logging.run_dir={run_dir}", "logging.tensorboard=false", *extra]


def config_of(overrides):
    return validate_config(load_config(None, list(overrides)), world_size=1)


def train(overrides):
    """Per-step records of a one-GPU run of `overrides`."""
    from megatron_ntp.training.loop import run_training

    with open(os.devnull, "w") as quiet:
        return run_training(config_of(overrides), stream=quiet)


class SameWeightRuns(NamedTuple):
    first_ce: tuple  # per-token cross-entropy [b, s] of micro-batch 0 before training, per model
    records: tuple  # the per-step records of each run


def train_from_same_weights(source_overrides, target_overrides) -> SameWeightRuns:
    """Two runs in one process group whose models start from the same weights, the source
    model's, copied into the target model before the optimizer takes its fp32 master copies.
    Source and target may differ in model.transformer_impl (local -> transformer_engine: names
    mapped by tests/gpu/layer_names.py) or in anything that keeps the parameter shapes (e.g.
    model.bf16). Before training, both models score the first micro-batch (per-token
    cross-entropy, no gradient): the comparison that the mean loss would average away."""
    from megatron_ntp.config import check_environment
    from megatron_ntp.session import parallel_session
    from megatron_ntp.training import build
    from megatron_ntp.training.loop import train as train_loop

    configs = config_of(source_overrides), config_of(target_overrides)
    for config in configs:
        check_environment(config)  # TE without a GPU fails here, naming the field
    keys_map = keys_map_between(*configs)
    with parallel_session(configs[0]), open(os.devnull, "w") as quiet:
        built = [build.build_model_chunks(config) for config in configs]
        for source_chunk, target_chunk in zip(built[0][0], built[1][0]):
            copy_weights(source_chunk, target_chunk, keys_map)
        first_ce = tuple(first_batch_ce(config, chunks[0]) for config, (chunks, _) in
                         zip(configs, built))
        records = []
        for config, chunks in zip(configs, built):
            # build_training_objects as training runs it, on these chunks
            with mock.patch.object(build, "build_model_chunks", return_value=chunks):
                objects = build.build_training_objects(config)
            records.append(train_loop(config, stream=quiet, objects=objects))
    return SameWeightRuns(first_ce, tuple(records))


def keys_map_between(source, target) -> dict:
    """The renaming of copy_weights from config `source`'s model to config `target`'s."""
    impls = source.model.transformer_impl, target.model.transformer_impl
    if impls == ("local", "transformer_engine"):
        return local_to_te_keys_map(source)
    if impls[0] == impls[1]:
        return {}
    raise ValueError(f"weights are copied local -> transformer_engine or within one spec, "
                     f"not {impls[0]} -> {impls[1]}")


def first_batch_ce(config, model):
    """Per-token cross-entropy [b, s] (fp32) of unwrapped model chunk `model` on micro-batch 0
    of step 0, without gradients (inside the run's process group)."""
    import torch

    from megatron_ntp.config.batch import BatchLayout
    from megatron_ntp.training import data as data_lib
    from megatron_ntp.training.loop import micro_batch_iterators

    layout = BatchLayout(config)
    dataset, _, _ = data_lib.build_train_valid(config, layout.global_sequences)
    batch = next(micro_batch_iterators(config, dataset, layout, 0)[0])
    with torch.no_grad():
        model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
              labels=batch["labels"])
    return model.loss_stats["ce"].float()


def losses(records):
    return [r["loss"] for r in records]
