"""Tiny checkpoints trained at TP = 2, shared by the eval and export tests (built once per
session), with the megatron-core logits of the trained model on fixed probe tokens.

- dense: 2 layers, GQA (4 query heads, 2 groups), untied embeddings, vocabulary 1000 (the
  sample tokenizer's) padded to 1024 by megatron-core at TP = 2; trained at TP = 2.
- moe: 2 layers of 4 experts, top-2, tied embeddings; trained at TP = 2 x EP = 2 with sequence
  parallelism (the expert weights are spread over the two ranks).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_distributed

SEQ_LENGTH = 32
PROBE = torch.randint(4, 1000, (2, SEQ_LENGTH), generator=torch.Generator().manual_seed(7))
_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
          "model.num_query_groups=2", "model.kv_channels=16", "model.vocab_size=1000",
          "model.init_method_std=0.05"]
CASES = {
    "dense": _MODEL + ["model.ffn_hidden_size=96", "parallel.tensor=2"],
    "moe": _MODEL + ["model.ffn_hidden_size=0", "model.num_experts=4", "model.moe_router_topk=2",
                     "model.moe_ffn_hidden_size=32", "model.tie_embeddings=true",
                     "model.moe_token_dispatcher=alltoall", "parallel.tensor=2",
                     "parallel.expert=2", "parallel.sequence_parallel=true"],
}


def common_overrides(sample_data, root: str, name: str) -> list[str]:
    prefix, tokenizer = sample_data
    return [f"data.blend={prefix}", f"data.tokenizer_model={tokenizer}",
            f"data.seq_length={SEQ_LENGTH}", f"data.cache_dir={os.path.join(root, 'cache')}",
            f"train.global_batch_tokens={4 * SEQ_LENGTH}", "train.micro_batch_size=2",
            "train.steps=3", "train.lr=0.01", "train.min_lr=0.0", "train.lr_warmup_steps=0",
            # validation after the last step: the first 4 valid sequences (one global batch),
            # scored with the checkpoint's weights: `megatron-ntp eval --sequences 4` must agree
            "train.eval_interval=3", "train.eval_steps=1",
            "logging.tensorboard=false", f"logging.run_dir={os.path.join(root, name, 'run')}",
            f"checkpoint.save_dir={os.path.join(root, name, 'ckpt')}"]


def _gathered_logits(module, tokens):
    """[b, s, V_padded] logits of the whole vocabulary, gathered over the TP group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ntp.eval.generate import causal_mask

    b, s = tokens.shape
    positions = torch.arange(s)[None].expand(b, s).contiguous()
    with torch.no_grad():
        logits = module(tokens, positions, causal_mask(s, "cpu"))  # [b, s, V_local]
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _train_worker(rank, world_size, cases, root):
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from megatron_ntp.config import load_config, validate_config
    from megatron_ntp.parallel import initialize_parallel_from_config
    from megatron_ntp.training.build import build_training_objects, loss_modules
    from megatron_ntp.training.loop import train

    for name, overrides in cases:
        config = validate_config(load_config(None, overrides), world_size=world_size)
        initialize_parallel_from_config(config)
        objects = build_training_objects(config)
        with open(os.devnull, "w") as quiet:
            records = train(config, stream=quiet, objects=objects)
        (module,) = loss_modules(objects.model)
        module.eval()
        logits = _gathered_logits(module, PROBE)
        if rank == 0:
            torch.save(logits, os.path.join(root, name, "probe_logits.pt"))
            with open(os.path.join(root, name, "records.json"), "w") as f:
                json.dump(records, f)
        parallel_state.destroy_model_parallel()
        destroy_moe_metrics_tracker()


def trained_checkpoints(tmp_path_factory, sample_data) -> dict:
    """{name: {"checkpoint", "logits", "overrides"}} for dense and moe."""
    root = str(tmp_path_factory.mktemp("trained"))
    cases = [(name, overrides + common_overrides(sample_data, root, name))
             for name, overrides in CASES.items()]
    for name, _ in cases:
        os.makedirs(os.path.join(root, name))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEGATRON_NTP_COMPILE", "0")  # inherited by the spawned ranks
        run_distributed(2, _train_worker, cases, root)
    return {
        name: {"checkpoint": os.path.join(root, name, "ckpt"),
               "run_dir": os.path.join(root, name, "run"),
               "logits": torch.load(os.path.join(root, name, "probe_logits.pt")),
               "overrides": overrides, "root": root}
        for name, overrides in cases}


def run_cli(args: list[str], nproc: int = 1, check: bool = True,
            warnings: bool = False) -> subprocess.CompletedProcess:
    """`megatron-ntp ARGS` in a fresh process (torchrun with nproc > 1); Python warnings are
    silenced unless `warnings` (then the process prints what a user's would)."""
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", "-m", "megatron_ntp.cli", *args]
    else:
        command = [sys.executable, "-m", "megatron_ntp.cli", *args]
    # eager loss passes: torch.compile would cost seconds in every process (tested elsewhere)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               MEGATRON_NTP_COMPILE="0")
    if warnings:
        for name in ("PYTHONWARNINGS", "MEGATRON_NTP_ALL_WARNINGS"):
            env.pop(name, None)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args[:1])} failed ({done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done
