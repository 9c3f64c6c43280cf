"""CPU checks of benchmarks/gpu_throughput.py (the throughput part of tools/gpu_check.sh): its
arguments and config, the FLOPs and MFU arithmetic, the exit without a GPU, and the three heads
run end to end on the tiny model with local layers (a spawned process; CUDA's timing and memory
calls stubbed), each step calling the loss function its head names: megatron-core's
vocab_parallel_cross_entropy, the unfused shaped loss, the fused head's masked sum."""

import contextlib
import importlib.util
import io
import json
import math
import os
import sys
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp

from megatron_ntp.config.batch import BatchLayout
from megatron_ntp.models.counting import flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "gpu_throughput", os.path.join(ROOT, "benchmarks", "gpu_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()


def test_default_config_is_dense_1b_at_seq_4096_on_te_layers():
    config = bench.benchmark_config(bench.parse_args([]))
    m = config.model
    assert (m.preset, m.num_layers, m.hidden_size, m.vocab_size) == ("dense-1b", 20, 1536, 151936)
    assert m.bf16 and m.transformer_impl == "transformer_engine" and not m.fp8
    assert not m.fused_output_loss  # the heads are switched per step, on one model
    assert (config.data.seq_length, config.train.global_batch_tokens) == (4096, 32768)
    assert BatchLayout(config).num_microbatches == 4
    assert config.train.steps == (2 + 10) * len(bench.HEADS)


def test_overrides_and_rounds():
    args = bench.parse_args(["--warmup", "1", "--rounds", "3", "--peak-tflops", "756",
                             "model.num_layers=4", "train.micro_batch_size=1"])
    config = bench.benchmark_config(args)
    assert (config.model.num_layers, config.train.micro_batch_size) == (4, 1)
    assert config.train.steps == 4 * 3 and args.peak_tflops == 756
    for bad in (["--rounds", "0"], ["--warmup", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_mfu_of_dense_1b_at_seq_4096():
    """The FLOPs by hand from the preset's shapes: 6 x matmul parameters (QKV with 8 KV groups,
    output projection, SwiGLU, output layer) + causal attention (3 x 2 matmuls x 2 FLOPs x
    layers x query width x seq / 2)."""
    h, q, kv, f, layers, vocab, seq = 1536, 16 * 128, 8 * 128, 4096, 20, 151936, 4096
    matmul = 6 * (layers * (h * (q + 2 * kv) + q * h + 3 * h * f) + vocab * h)
    attention = 3 * 2 * 2 * layers * q * seq // 2
    config = bench.benchmark_config(bench.parse_args([]))
    flops = flops_per_token(config.model, seq).model
    assert flops == matmul + attention == 5_804_261_376
    # e.g. 60,000 tokens/s on one H100 SXM: 35.2% MFU
    assert bench.mfu(60_000, flops, 989e12) == pytest.approx(0.35213, abs=1e-5)
    assert bench.mfu(60_000, flops, 989e12, gpus=2) == pytest.approx(0.35213 / 2, abs=1e-5)
    assert math.isnan(bench.mfu(60_000, flops, None))


def test_peak_from_the_device_name_or_the_flag():
    flops, source = bench.peak_bf16_flops("NVIDIA H100 80GB HBM3")
    assert flops == 989e12 and "SXM" in source
    assert bench.peak_bf16_flops("NVIDIA H100 PCIe", tflops=756) == (756e12, "--peak-tflops")
    flops, source = bench.peak_bf16_flops("NVIDIA L4")
    assert flops is None and "--peak-tflops" in source


def test_exits_with_status_2_and_the_reason_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--rounds", "1"])
    assert stop.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_exits_with_status_2_without_transformer_engine(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import fails
    with pytest.raises(SystemExit) as stop:
        bench.main(["--rounds", "1"])
    assert stop.value.code == 2
    assert "needs Transformer Engine" in capsys.readouterr().err


def _count_calls(module, name, calls, head):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[head] += 1
        return original(*args, **kwargs)

    setattr(module, name, counted)


def _heads_on_cpu(sample, run_dir, out):
    """Spawned: measure + report on the tiny model, CUDA's calls stubbed, loss calls counted."""
    from megatron.core import tensor_parallel

    from megatron_ntp.models import shaped_gpt

    stubs = {"synchronize": lambda: None, "reset_peak_memory_stats": lambda: None,
             "max_memory_allocated": lambda: 0,
             "get_device_name": lambda: "NVIDIA H100 80GB HBM3"}
    for name, stub in stubs.items():
        setattr(torch.cuda, name, stub)
    calls = Counter()
    _count_calls(tensor_parallel, "vocab_parallel_cross_entropy", calls, bench.HEADS[0])
    _count_calls(shaped_gpt, "vocab_parallel_shaped_loss", calls, bench.HEADS[1])
    _count_calls(shaped_gpt, "fused_linear_shaped_loss_sum", calls, bench.HEADS[2])
    prefix, tokenizer = sample
    args = bench.parse_args([
        "--warmup", "1", "--rounds", "2", "model.preset=tiny-dense", "model.vocab_size=1024",
        "model.transformer_impl=local", f"data.blend={prefix}",
        f"data.tokenizer_model={tokenizer}", "data.seq_length=128",
        "train.global_batch_tokens=1024", "train.micro_batch_size=4",
        f"logging.run_dir={run_dir}"])
    config = bench.benchmark_config(args)
    results = bench.measure(config, args)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = bench.report(config, args, results)
    with open(out, "w") as f:
        json.dump({"calls": calls, "status": status, "printed": printed.getvalue(),
                   "timed": {head: len(r["seconds"]) for head, r in results.items()},
                   "ce": {head: r["ce"] for head, r in results.items()}}, f)


def test_each_head_runs_its_own_loss(sample_data, tmp_path):
    out = tmp_path / "out.json"
    process = mp.get_context("spawn").Process(
        target=_heads_on_cpu, args=(tuple(sample_data), str(tmp_path / "run"), str(out)))
    process.start()
    process.join()
    assert process.exitcode == 0
    got = json.loads(out.read_text())
    # 2 micro-batches a step, 3 steps a head (1 warm-up, 2 timed)
    assert got["calls"] == {head: 6 for head in bench.HEADS}
    assert got["timed"] == {head: 2 for head in bench.HEADS} and got["status"] == 0
    assert all(math.isfinite(ce) and 0 < ce < 8 for ce in got["ce"].values())  # ln(1024) ~ 6.9
    printed = got["printed"]
    assert "MFU against 989 TFLOP/s" in printed
    for head in bench.HEADS:
        assert f"{head}:" in printed
    for head in bench.HEADS[1:]:
        assert f"tokens/s ratio {head} / megatron-core CE" in printed
