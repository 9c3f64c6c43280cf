"""Training on one GPU (the acceptance check's main part): Transformer Engine layers agree with
the local layers from the same weights, FP8 trains, the fused head equals the unfused one, MoE
runs with grouped GEMM, save + resume is bitwise. Figures are printed (`[gpu] ...` lines), never
asserted against a time; speed is benchmarks/gpu_throughput.py's (tools/gpu_check.sh runs it).
Marked `quick`: the tests of `bash tools/gpu_check.sh --quick`."""

import math
import shutil

import pytest
import torch

from megatron_ntp.training.metrics import peak_flops_per_gpu
from tests.gpu.runs import losses, tiny_overrides, train, train_from_same_weights

pytestmark = pytest.mark.gpu


@pytest.mark.quick
def test_te_and_local_layers_agree_from_the_same_weights(sample_data, tmp_path,
                                                         transformer_engine, report):
    """The local model's initial weights copied into the TE model (tests/gpu/layer_names.py),
    both bf16. Tolerances, from a CPU calibration of the tiny model in bf16 against fp32 from
    the same weights (a comparable rounding difference): per-token cross-entropy of the first
    micro-batch max 0.005 / mean 0.0012 nats apart (0.21 / 0.046 with two query heads of one
    layer swapped, the kind of layout error a wrong name mapping makes), mean losses of 10 steps
    within 2.2e-3 relative."""
    runs = train_from_same_weights(
        tiny_overrides(sample_data, tmp_path / "local", "model.transformer_impl=local"),
        tiny_overrides(sample_data, tmp_path / "te", "model.transformer_impl=transformer_engine"))
    local_ce, te_ce = runs.first_ce
    gap = (te_ce - local_ce).abs()
    local, te = (losses(records) for records in runs.records)
    worst = max(abs(a - b) / abs(b) for a, b in zip(te, local))
    report(f"TE vs local bf16 from the same weights: first micro-batch's per-token CE max "
           f"{gap.max().item():.2e} / mean {gap.mean().item():.2e} nats apart; 10 steps' losses "
           f"within {worst:.2e} relative")
    assert gap.max().item() <= 0.05 and gap.mean().item() <= 0.01
    assert worst <= 1e-2
    if peak_flops_per_gpu() is not None:  # the trainer's MFU (the benchmark prints its own)
        assert all(0 < record["mfu"] < 1 for record in runs.records[1])


@pytest.mark.parametrize("fp8", [pytest.param("e4m3", marks=pytest.mark.quick), "hybrid"])
def test_fp8_trains(sample_data, tmp_path, transformer_engine, report, fp8):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"FP8 needs compute capability >= 8.9 ({torch.cuda.get_device_name()})")
    records = train(tiny_overrides(sample_data, tmp_path, "model.transformer_impl="
                                   "transformer_engine", f"model.fp8={fp8}", steps=30))
    values = losses(records)
    report(f"fp8 {fp8}: loss {values[0]:.3f} -> {values[-1]:.3f} over 30 steps")
    assert all(math.isfinite(v) for v in values)
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5


@pytest.mark.quick
def test_fused_head_equals_unfused(sample_data, tmp_path, transformer_engine):
    def run(name, fused):
        return train(tiny_overrides(sample_data, tmp_path / name,
                                    "model.transformer_impl=transformer_engine",
                                    f"model.fused_output_loss={str(fused).lower()}", steps=5))

    unfused, fused = run("unfused", False), run("fused", True)
    for a, b in zip(fused, unfused):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)


def test_moe_with_grouped_gemm(sample_data, tmp_path, transformer_engine, report):
    records = train(tiny_overrides(sample_data, tmp_path, "model.transformer_impl="
                                   "transformer_engine", preset="tiny-moe"))
    values = losses(records)
    report(f"tiny MoE, TE grouped GEMM: loss {values[0]:.3f} -> {values[-1]:.3f}")
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0]


def test_save_and_resume_bitwise(sample_data, tmp_path, transformer_engine, monkeypatch):
    """Six steps saving at 3 and 6; then the step-6 checkpoint is dropped and the same command
    resumes from iter_0000003: steps 4-6 must repeat bit for bit."""
    from megatron_ntp.training.checkpoint_files import TRACKER_FILE, iteration_dir_name

    monkeypatch.setenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")  # deterministic attention bwd
    save_dir = tmp_path / "ckpt"
    overrides = tiny_overrides(sample_data, tmp_path / "run",
                               "model.transformer_impl=transformer_engine",
                               "parallel.distributed_optimizer=true",
                               f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval=3",
                               steps=6)
    straight = train(overrides)
    shutil.rmtree(save_dir / iteration_dir_name(6))
    (save_dir / TRACKER_FILE).write_text("3\n")
    resumed = train(overrides)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in straight[3:]]
