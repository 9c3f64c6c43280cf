"""`megatron-ntp train` end to end: torchrun with two gloo ranks on the built-in offline sample
data, one step numbering in every output, and the FP8 error on a machine without a GPU."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-m", "megatron_ntp.cli", "train"]
REQUIRED_KEYS = {"step", "ce", "ppl", "entropy", "topk_mass", "loss", "lr", "grad_norm",
                 "tokens_per_s"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is the CPU behaviour")
def test_fp8_without_gpu_fails_before_any_work(tmp_path):
    result = subprocess.run(
        CLI + ["--config", "examples/configs/tiny_dense.yaml", "model.fp8=e4m3",
               "model.transformer_impl=transformer_engine", f"logging.run_dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "model.fp8='e4m3'" in result.stderr and "needs a CUDA GPU" in result.stderr
    assert not os.path.exists(tmp_path / "run")  # nothing was started


def test_torchrun_two_ranks_on_the_sample_data(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, MEGATRON_NTP_SAMPLE_DIR=str(tmp_path / "sample"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", "-m", "megatron_ntp.cli", "train",
               "--config", "examples/configs/tiny_dense.yaml", "parallel.tensor=2",
               "parallel.sequence_parallel=true", "loss.topk=100", "loss.lambda_tail=-0.1",
               "data.seq_length=64", "train.global_batch_tokens=256", "train.micro_batch_size=2",
               "train.steps=4", "train.lr_warmup_steps=1", "train.lr_decay_steps=2",
               "train.eval_interval=2", "train.eval_steps=1", f"logging.run_dir={run_dir}",
               f"checkpoint.save_dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=4"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "step 4/4 | loss" in result.stdout  # the console progress line, from rank 0 only
    assert result.stdout.count("step 4/4") == 1
    # A quiet console (megatron_ntp/console.py): none of megatron-core's or torch's known-benign
    # warnings, on any rank, and not torchrun's thread notice (OMP_NUM_THREADS is set).
    noise = [line for line in (result.stdout + result.stderr).splitlines()
             if any(word in line for word in ("Warning", "DEPRECATED", "deprecated", "is ignored",
                                              "Rerun State Machine", "RerunStateMachine"))]
    assert noise == []

    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # optimizer steps complete
    for record in records:
        assert REQUIRED_KEYS <= record.keys()
        assert record["ppl"] == pytest.approx(2.718281828 ** record["ce"], rel=1e-6)
        assert 0 < record["topk_mass"] < 1 and record["tokens_per_s"] > 0
    # warmup-stable-decay: 1 warmup step, stable, then 2 decay steps ending at min_lr
    lrs = [r["lr"] for r in records]
    assert lrs[0] == lrs[1] == pytest.approx(1e-3) and lrs[1] > lrs[2] > lrs[3]
    assert lrs[3] == pytest.approx(1e-4)

    with open(run_dir / "valid.jsonl") as f:
        valid = [json.loads(line) for line in f]
    assert [v["step"] for v in valid] == [2, 4]  # after steps 2 and 4
    assert all({"ce", "ppl", "entropy", "topk_mass"} <= v.keys() for v in valid)
    events = os.listdir(run_dir / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert (run_dir / "config.yaml").is_file()


def test_single_process_on_a_preprocessed_prefix(tmp_path, sample_data):
    prefix, tokenizer = sample_data
    run_dir = tmp_path / "run"
    result = subprocess.run(
        CLI + ["--config", "examples/configs/tiny_dense.yaml", f"data.blend={prefix}",
               f"data.tokenizer_model={tokenizer}", "model.vocab_size=1024",
               "data.seq_length=32", "train.global_batch_tokens=128", "train.micro_batch_size=2",
               "train.steps=2", "train.lr_warmup_steps=1", "train.lr_decay_steps=0",
               "logging.tensorboard=false", f"logging.run_dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2] and records[0]["tokens"] == 128
    assert not (run_dir / "tensorboard").exists()
    with open(run_dir / "valid.jsonl") as f:
        assert f.read() == ""  # no validation without train.eval_interval


def _plotted_steps(run_dir, monkeypatch) -> list:
    """The x values of the cross-entropy curve megatron_ntp.plots draws for run_dir."""
    import matplotlib.pyplot as plt

    from megatron_ntp.plots import plot_runs

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot_runs closes
    plot_runs([str(run_dir)], str(run_dir / "curves.png"))
    (line,) = figures[0].axes[0].lines
    return [int(x) for x in line.get_xdata()]


def _tensorboard_steps(run_dir, tag) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_every_output_numbers_the_steps_alike(tmp_path, sample_data, monkeypatch):
    """Step n is the step after which n optimizer steps are complete (Megatron-LM's iteration):
    4 steps validating and saving every 2 give steps 1..4 everywhere, validations and
    checkpoints at 2 and 4, on the console, in both files, TensorBoard, the plot and the
    checkpoint folders."""
    prefix, tokenizer = sample_data
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    result = subprocess.run(
        CLI + ["--config", "examples/configs/tiny_dense.yaml", f"data.blend={prefix}",
               f"data.tokenizer_model={tokenizer}", "model.vocab_size=1024",
               "data.seq_length=32", "train.global_batch_tokens=128", "train.micro_batch_size=2",
               "train.steps=4", "train.lr_warmup_steps=1", "train.lr_decay_steps=0",
               "train.eval_interval=2", "train.eval_steps=1", "logging.log_interval=1",
               f"logging.run_dir={run_dir}", f"checkpoint.save_dir={ckpt}",
               "checkpoint.save_interval=2", "checkpoint.keep_last=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    console = result.stdout
    assert [int(n) for n in re.findall(r"^step (\d+)/4 \| loss", console, re.M)] == [1, 2, 3, 4]
    assert [int(n) for n in re.findall(r"^validation at step (\d+) \|", console, re.M)] == [2, 4]
    assert re.findall(r"^saved checkpoint \S+/(iter_\d+)$", console, re.M) == \
        ["iter_0000002", "iter_0000004"]

    with open(run_dir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    with open(run_dir / "valid.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]
    assert _tensorboard_steps(run_dir, "train/ce") == [1, 2, 3, 4]
    assert _tensorboard_steps(run_dir, "valid/ce") == [2, 4]
    assert _plotted_steps(run_dir, monkeypatch) == [1, 2, 3, 4]

    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004",
                                        "latest_checkpointed_iteration.txt"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    for step in (2, 4):
        with open(ckpt / f"iter_{step:07d}" / "checkpoint.json") as f:
            assert json.load(f)["step"] == step


def test_missing_dataset_prefix_is_a_config_error(tmp_path):
    result = subprocess.run(
        CLI + ["--config", "examples/configs/tiny_dense.yaml", f"data.blend={tmp_path}/none",
               f"data.tokenizer_model={tmp_path}/none.model", f"logging.run_dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "megatron-ntp train:" in result.stderr and f"{tmp_path}/none" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_errors_are_printed_by_rank_0_only(monkeypatch, capsys):
    from megatron_ntp.cli import main

    bad = ["train", "--config", "examples/configs/tiny_dense.yaml", "parallel.tensor=3"]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RANK", "1")
    assert main(bad) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(bad) == 2
    assert "megatron-ntp train: invalid config" in capsys.readouterr().err
