"""Device placement of the GPU path, checked on CPU.

- The model chunks (of training, and of megatron_ntp.eval: both come from build_gpt_model) go
  to the rank's device before Float16Module, DDP and the optimizer see them (megatron-core
  creates the MoE router weight on the CPU even on a GPU machine). The
  rank's device is replaced by `meta` here: any parameter or buffer left behind is on the CPU.
- The fused output head runs the output layer's forward pre-hooks, where megatron-core's DDP
  waits for the layer's parameter all-gather under overlap_param_gather; and with that overlap
  on, a real DDP chunk (distributed optimizer, gloo) dispatches the output weight's all-gather
  from the fused head's forward.
- Meta-device guard: the training step's metric reduction and the statistics of validation
  and of megatron_ntp.eval run with torch's default device set to `meta`, so a tensor created
  without an explicit device fails (or comes out on `meta`).
"""

import math

import pytest
import torch

from megatron.core.parallel_state import destroy_model_parallel

from megatron_ntp.config import load_config, validate_config
from tests.distributed import run_distributed

SEQ, BATCH = 16, 2


def tiny(*overrides):
    return validate_config(load_config(None, [
        "model.num_layers=2", "model.vocab_size=1024", f"data.seq_length={SEQ}",
        *overrides]), world_size=1)


def _chunks_on_the_rank_device(rank, world_size):
    from megatron_ntp.models import gpt
    from megatron_ntp.parallel import initialize_parallel_from_config
    from megatron_ntp.training import build

    config = tiny("model.preset=tiny-moe", "model.num_layers=2", "model.bf16=true")
    initialize_parallel_from_config(config)
    gpt.local_device = lambda: torch.device("meta")  # this process only (spawned)
    model, _ = build.build_model_chunks(config)
    left = [name for chunk in model
            for name, tensor in [*chunk.named_parameters(), *chunk.named_buffers()]
            if tensor.device.type != "meta"]
    assert not left, f"not moved to the rank's device: {left}"
    destroy_model_parallel()  # the harness ends the process group


def test_model_chunks_moved_to_the_rank_device():
    run_distributed(1, _chunks_on_the_rank_device)


def _batch():
    tokens = torch.randint(0, 1000, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    inputs = (tokens[:, :-1], torch.arange(SEQ).expand(BATCH, -1),
              torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).view(1, 1, SEQ, SEQ))
    return inputs, tokens[:, 1:]


def _fused_head_runs_the_pre_hooks(rank, world_size):
    from megatron_ntp.models.gpt import build_gpt_model
    from megatron_ntp.models.shaped_gpt import ShapedLossGPTModel
    from megatron_ntp.parallel import initialize_parallel_from_config

    config = tiny("model.preset=tiny-dense", "model.num_layers=2")
    initialize_parallel_from_config(config)
    model = build_gpt_model(config, model_class=ShapedLossGPTModel, fused_output_loss=True)
    seen = []
    model.output_layer.register_forward_pre_hook(lambda module, args: seen.append(module))
    inputs, labels = _batch()
    model(*inputs, labels=labels).sum().backward()
    assert seen == [model.output_layer]
    destroy_model_parallel()  # the harness ends the process group


def test_fused_head_runs_the_output_layer_pre_hooks():
    run_distributed(1, _fused_head_runs_the_pre_hooks)


def _fused_head_finishes_the_param_gather(rank, world_size):
    from megatron.core.distributed import DistributedDataParallel

    from megatron_ntp.parallel import initialize_parallel_from_config
    from megatron_ntp.training import build

    config = tiny("model.preset=tiny-dense", "model.num_layers=2", "model.fused_output_loss=true",
                  "model.fused_output_chunk_mib=3", "parallel.distributed_optimizer=true")
    initialize_parallel_from_config(config)
    model, mcore_config = build.build_model_chunks(config)
    assert model[0].fused_impl.fused_chunk_bytes == 3 << 20  # model.fused_output_chunk_mib
    settings = build.ddp_config(config)
    settings.overlap_param_gather = True  # what a GPU run gets (the CPU config keeps it off)
    settings.overlap_grad_reduce = True
    settings.bucket_size = 1  # one bucket per parameter: only the output layer's hook waits
    chunk = DistributedDataParallel(mcore_config, settings, model[0])
    weight = model[0].output_layer.weight
    bucket_group = chunk.param_to_bucket_group[weight]
    assert bucket_group.params == {weight}
    finished = []
    original = bucket_group.finish_param_sync
    bucket_group.finish_param_sync = lambda **kwargs: (finished.append(1), original(**kwargs))
    inputs, labels = _batch()
    with torch.no_grad():
        chunk(*inputs, labels=labels)
    assert finished, "the output weight's parameter all-gather was never waited for"
    destroy_model_parallel()  # the harness ends the process group


def test_fused_head_waits_for_its_weight_under_overlap_param_gather():
    run_distributed(1, _fused_head_finishes_the_param_gather)


# ------------------------------------------------------------------------------------------------
# Meta-device guard
# ------------------------------------------------------------------------------------------------
def test_step_metric_reduction_under_the_meta_guard():
    from megatron_ntp.training.step import STAT_NAMES, loss_function, per_token_metrics, reduce_sums

    generator = torch.Generator().manual_seed(0)
    per_token = torch.rand(BATCH, SEQ, generator=generator)
    stats = {name: torch.rand(BATCH, SEQ, generator=generator)
             for name in ("ce", "entropy", "topk_mass")}
    mask = torch.rand(BATCH, SEQ, generator=generator) > 0.3

    def run():
        module = type("Module", (), {"loss_stats": stats, "loss_is_summed": False})()
        total, tokens, report = loss_function(mask, module, per_token)
        sums = reduce_sums([report, report])
        return total, tokens, sums, per_token_metrics(sums)

    expected = run()
    with torch.device("meta"):
        got = run()
    for value in got[:3]:
        assert value.device.type == "cpu"
    torch.testing.assert_close(got[2], expected[2])
    assert got[3] == expected[3]
    assert len(got[2]) == len(STAT_NAMES)
    assert math.isclose(got[3]["ppl"], math.exp(got[3]["ce"]))


def test_validation_statistics_under_the_meta_guard(monkeypatch):
    from megatron_ntp.config.batch import BatchLayout
    from megatron_ntp.training import loop

    step_sums = torch.tensor([6.0, 4.0, 2.0, 1.5, 3.0], dtype=torch.float64)
    monkeypatch.setattr(loop, "eval_step", lambda *args: step_sums.clone())
    monkeypatch.setattr(loop, "micro_batch_iterators", lambda *args: [])
    config = tiny("train.eval_steps=3")
    layout = BatchLayout(config)
    expected = loop.evaluate(config, None, None, layout)
    with torch.device("meta"):
        got = loop.evaluate(config, None, None, layout)
    assert got == expected and got["tokens"] == 9


def test_eval_token_statistics_under_the_meta_guard():
    from megatron_ntp.eval.metrics import EvalSums, accumulate_token_statistics

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 96, generator=generator)
    target = torch.randint(0, 96, (24,), generator=generator)
    target[3] = -100  # not scored

    def run():
        sums = EvalSums(device="cpu")
        accumulate_token_statistics(sums, logits, target, topk=4)
        return sums

    expected = run()
    with torch.device("meta"):
        got = run()
        report = got.to_dict()
    torch.testing.assert_close(got.flat, expected.flat)
    # the same report; floats to rounding (under the default-device context torch.compile may
    # build its kernels afresh, whose fp32 sums can differ in the last bit)
    _assert_same_report(report, expected.to_dict())


def _assert_same_report(got, want, where="report"):
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _assert_same_report(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_report(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), where
    else:
        assert got == want, where
