"""Training on one GPU (the acceptance check's main part): Transformer Engine layers track the
local layers, FP8 trains, the fused head equals the unfused one, MoE runs with grouped GEMM,
save + resume is bitwise, and a dense-1b-shaped model at sequence 4096 reports its speed.
Figures are printed (`[gpu] ...` lines), never asserted against a time."""

import math
import os
import shutil

import pytest
import torch

from tests.gpu.runs import losses, tiny_overrides, train

pytestmark = pytest.mark.gpu


def test_te_bf16_tracks_the_local_layers(sample_data, tmp_path, transformer_engine, report):
    local = train(tiny_overrides(sample_data, tmp_path / "local", "model.transformer_impl=local"))
    te = train(tiny_overrides(sample_data, tmp_path / "te",
                              "model.transformer_impl=transformer_engine"))
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses(te), losses(local)))
    report(f"TE bf16 vs local bf16 over 10 steps: largest relative loss difference {worst:.2e}")
    assert worst < 0.02


@pytest.mark.parametrize("fp8", ["e4m3", "hybrid"])
def test_fp8_trains(sample_data, tmp_path, transformer_engine, report, fp8):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"FP8 needs compute capability >= 8.9 ({torch.cuda.get_device_name()})")
    records = train(tiny_overrides(sample_data, tmp_path, "model.transformer_impl="
                                   "transformer_engine", f"model.fp8={fp8}", steps=30))
    values = losses(records)
    report(f"fp8 {fp8}: loss {values[0]:.3f} -> {values[-1]:.3f} over 30 steps")
    assert all(math.isfinite(v) for v in values)
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5


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
    resumes from step 3: steps 3-5 must repeat bit for bit."""
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
    assert [r["step"] for r in resumed] == [3, 4, 5]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in straight[3:]]


def test_dense_1b_shape_at_seq_4096_speed(sample_data, tmp_path, transformer_engine, report):
    """dense-1b's width with 4 layers: tokens/s and MFU as the trainer computes them."""
    prefix, tokenizer = sample_data
    records = train([
        "model.preset=dense-1b", "model.num_layers=4", "model.bf16=true",
        "model.transformer_impl=transformer_engine", "model.vocab_size=1024",
        f"data.blend={prefix}", f"data.tokenizer_model={tokenizer}", "data.seq_length=4096",
        "train.global_batch_tokens=32768", "train.micro_batch_size=2", "train.steps=8",
        "train.lr_warmup_steps=2", f"logging.run_dir={tmp_path}", "logging.tensorboard=false"])
    steady = records[3:]  # first steps include compilation and allocator warm-up
    tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    mfu = sum(r.get("mfu", float("nan")) for r in steady) / len(steady)
    report(f"dense-1b shape, 4 layers, seq 4096, {torch.cuda.get_device_name()}: "
           f"{tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%} (steps 3-7)")
    assert all(math.isfinite(r["loss"]) for r in records)
    assert os.path.isfile(tmp_path / "metrics.jsonl")
