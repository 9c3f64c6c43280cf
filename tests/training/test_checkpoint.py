"""Checkpoints: exact resume after SIGKILL (also during the rename), a crash while saving, resume
into another layout, SIGTERM (exit code 75 and a checkpoint, ranks agreeing under torchrun),
mid-training start. Damaged checkpoints: test_checkpoint_faults.py.

Runs go through the command line (`python -m megatron_ntp.cli train`, torchrun for several
ranks) as a Slurm job would, on a tiny float32 model with the full shaped loss; every process
uses one thread so that reruns are bit-identical. The crash and mid-training scenarios run in
one spawned rank (tests/training/checkpoint_runs.py).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_ntp.training import PREEMPTED_EXIT_CODE
from tests.distributed import free_port, run_distributed
from tests.training.checkpoint_runs import crash_resume_finetune

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
STEPS = 6
COMPARED = ("loss", "ce", "entropy", "topk_mass", "grad_norm", "lr", "tokens")
RTOL = 5e-5  # other layouts agree with the single rank to <= 1.6e-5 (test_layouts.py)
HANG = 600  # seconds: a deadlock guard for polling, not a performance bound


def base_overrides(prefix, tokenizer):
    return [
        "model.preset=tiny-dense", "model.vocab_size=1024",
        f"data.blend={prefix}", f"data.tokenizer_model={tokenizer}", "data.seq_length=32",
        "data.split=98,2,0", "data.eod_mask_loss=true",
        "loss.beta=-0.25", "loss.topk=4", "loss.lambda_topk=0.05", "loss.lambda_tail=-0.1",
        "train.global_batch_tokens=128", "train.micro_batch_size=2", "train.lr=3e-3",
        "train.lr_warmup_steps=1", "train.lr_decay_steps=2",
        "train.eval_interval=2", "train.eval_steps=1", "logging.tensorboard=false",
    ]


def run_args(base, folder, *extra, steps=STEPS):
    return base + [f"train.steps={steps}", "checkpoint.save_interval=3",
                   f"checkpoint.save_dir={folder}/ckpt", f"logging.run_dir={folder}/run",
                   *extra]


def cli(args, nproc=1):
    if nproc == 1:
        return [sys.executable, "-m", "megatron_ntp.cli", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "megatron_ntp.cli", "train", *args]


def run(args, nproc=1):
    result = subprocess.run(cli(args, nproc), cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


class Background:
    """A run in the background; its output goes to files (a full pipe would stall it)."""

    def __init__(self, args, folder, nproc=1):
        self.out, self.err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(cli(args, nproc), cwd=ROOT, env=ENV, stdout=out,
                                            stderr=err)

    def wait_until(self, condition):
        deadline = time.monotonic() + HANG
        while not condition():
            assert self.process.poll() is None, f"exited early: {self.finish()[1][-4000:]}"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)

    def finish(self):
        """(stdout, stderr) once the process has ended."""
        self.process.wait(timeout=HANG)
        with open(self.out) as out, open(self.err) as err:
            return out.read(), err.read()


def records(folder, name="metrics.jsonl"):
    with open(os.path.join(folder, "run", name)) as f:
        return [json.loads(line) for line in f]


def records_so_far(folder):
    """Complete lines of metrics.jsonl while a run is writing it."""
    try:
        with open(os.path.join(folder, "run", "metrics.jsonl")) as f:
            return [line for line in f.read().split("\n")[:-1] if line]
    except FileNotFoundError:
        return []


def tracker(folder):
    try:
        with open(os.path.join(folder, "ckpt", "latest_checkpointed_iteration.txt")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def checkpoints(folder):
    return sorted(name for name in os.listdir(os.path.join(folder, "ckpt")))


def assert_same(got, want, rel=0.0):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in COMPARED:
            if rel:
                assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), (a["step"], key)
            else:
                assert a[key] == b[key], (a["step"], key, a[key], b[key])


@pytest.fixture(scope="module")
def base(sample_data):
    return base_overrides(*sample_data)


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 3 and 6, only the last one kept)."""
    folder = tmp_path_factory.mktemp("reference")
    run(run_args(base, folder, "checkpoint.keep_last=1"))
    return folder


@pytest.fixture(scope="module")
def killed_and_resumed(base, tmp_path_factory):
    """The same run SIGKILLed once the checkpoint of step 3 is published, then rerun."""
    folder = tmp_path_factory.mktemp("killed")
    args = run_args(base, folder)
    job = Background(args, folder)
    job.wait_until(lambda: tracker(folder) == "3")
    job.process.kill()
    job.finish()
    killed = {"returncode": job.process.returncode, "records": records(folder)}
    resumed = run(args)
    return folder, killed, resumed


def test_reference_saves_and_keeps_the_last(reference):
    assert tracker(reference) == "6"
    assert checkpoints(reference) == ["iter_0000006", "latest_checkpointed_iteration.txt"]
    saved = os.path.join(reference, "ckpt", "iter_0000006")
    with open(os.path.join(saved, "checkpoint.json")) as f:
        info = json.load(f)
    assert info["step"] == 6 and info["consumed_samples"] == 6 * 4
    assert os.path.isfile(os.path.join(saved, "config.yaml"))
    assert os.path.isfile(os.path.join(saved, "metadata.json"))  # megatron-core's torch_dist


def test_resume_after_sigkill_gives_identical_losses(reference, killed_and_resumed):
    folder, killed, resumed = killed_and_resumed
    assert killed["returncode"] == -signal.SIGKILL
    assert len(killed["records"]) >= 3
    assert "resuming from" in resumed.stdout and "iter_0000003 at step 3" in resumed.stdout
    # metrics.jsonl: appended, every step once, equal to the uninterrupted run's
    assert_same(records(folder), records(reference))
    assert records(folder, "valid.jsonl") == records(reference, "valid.jsonl")
    assert tracker(folder) == "6"
    assert checkpoints(folder) == ["iter_0000003", "iter_0000006",
                                   "latest_checkpointed_iteration.txt"]


def test_sigkill_during_the_rename_loses_nothing(base, reference, tmp_path):
    """Killed right after iter_0000006.tmp became iter_0000006, before the tracker moved: the
    rerun resumes from the tracker's iter_0000003 and ends as the uninterrupted run."""
    args = run_args(base, tmp_path)
    code = ("import sys; from tests.training.checkpoint_runs import train_killed_after_rename; "
            "train_killed_after_rename(sys.argv[1:], 6)")
    killed = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=HANG)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert tracker(tmp_path) == "3"
    assert checkpoints(tmp_path) == ["iter_0000003", "iter_0000006",
                                     "latest_checkpointed_iteration.txt"]
    resumed = run(args)
    assert f"resuming from {tmp_path}/ckpt/iter_0000003 at step 3/6" in resumed.stdout
    assert "WARNING" not in resumed.stderr
    assert_same(records(tmp_path), records(reference))
    assert tracker(tmp_path) == "6"
    assert checkpoints(tmp_path) == ["iter_0000003", "iter_0000006",
                                     "latest_checkpointed_iteration.txt"]


def test_resume_into_tp2_pp2(base, reference, killed_and_resumed, tmp_path):
    """A single-rank checkpoint continued at TP=2 x PP=2 (4 ranks) tracks the single rank."""
    folder, _, _ = killed_and_resumed
    run(run_args(base, tmp_path, "parallel.tensor=2", "parallel.pipeline=2",
                 f"checkpoint.load_dir={folder}/ckpt/iter_0000003"), nproc=4)
    assert_same(records(tmp_path), records(reference)[3:], rel=RTOL)
    assert tracker(tmp_path) == "6"  # and it saves in its own layout


def test_sigterm_saves_and_exits_75(base, tmp_path):
    job = Background(run_args(base, tmp_path, "checkpoint.save_interval=100", steps=200),
                     tmp_path)
    job.wait_until(lambda: len(records_so_far(tmp_path)) >= 1)
    job.process.send_signal(signal.SIGTERM)
    out, err = job.finish()
    assert job.process.returncode == PREEMPTED_EXIT_CODE == 75, err[-4000:]
    done = len(records(tmp_path))
    assert 1 <= done < 200 and f"preempted (SIGTERM) after step {done}/200" in out
    assert tracker(tmp_path) == str(done)
    assert f"iter_{done:07d}" in checkpoints(tmp_path)


def test_sigterm_to_one_torchrun_rank_stops_all_and_resumes(base, reference, tmp_path):
    """DP=2 with the distributed optimizer: SIGTERM reaches rank 1 only; both ranks save the
    same step, exit 75; the rerun resumes and tracks the single-rank run (optimizer state, with
    its per-parameter step counts, restored)."""
    args = run_args(base, tmp_path, "parallel.distributed_optimizer=true",
                    "checkpoint.save_interval=100")
    job = Background(args, tmp_path, nproc=2)
    job.wait_until(lambda: len(records_so_far(tmp_path)) >= 1)
    workers = psutil.Process(job.process.pid).children()
    rank1 = next(w for w in workers if w.environ().get("LOCAL_RANK") == "1")
    rank1.send_signal(signal.SIGTERM)
    out, err = job.finish()
    done = len(records(tmp_path))
    if done == STEPS:  # the run ended before the signal was handled: nothing to check
        pytest.skip("the run finished before the signal arrived")
    # torchrun reports its workers' exit code 75 and fails with its own status
    assert job.process.returncode != 0 and re.search(r"exitcode\s*:\s*75", err), err[-4000:]
    assert out.count(f"preempted (SIGTERM) after step {done}/{STEPS}") == 1
    assert tracker(tmp_path) == str(done)
    run(args, nproc=2)
    assert_same(records(tmp_path), records(reference), rel=RTOL)


def test_crash_during_save_and_mid_training_start(base, sample_data, tmp_path):
    run_distributed(1, crash_resume_finetune, base, str(tmp_path))
    with open(tmp_path / "results.json") as f:
        r = json.load(f)
    # a failed save leaves the previous checkpoint the latest; its temporary folder is ignored
    assert r["crash_raised"].startswith(f"saving checkpoint {tmp_path}/ckpt/iter_0000004 failed "
                                        f"(injected: the job died while saving iter_0000004)")
    assert r["after_crash"]["tracker"] == "2" and r["after_crash"]["complete"] == [2]
    assert r["after_crash"]["latest"] == "iter_0000002"
    assert "iter_0000004.tmp" in r["after_crash"]["entries"]
    # rerun: resumes from iter_0000002, redoes steps 3 and 4 exactly, cleans up, publishes 4
    assert [x["step"] for x in r["resumed_records"]] == [3, 4]
    assert_same(r["resumed_metrics"], r["crashed_metrics"])
    assert r["after_resume"]["tracker"] == "4"
    assert r["after_resume"]["entries"] == ["iter_0000002", "iter_0000004",
                                            "latest_checkpointed_iteration.txt"]
    # mid-training from it: seq 64, RoPE base 1e6, new schedule and blend; weights and Adam
    # state kept
    assert r["finetune_start"] == [0, 0, True]
    assert r["finetune_weights_equal"] and r["finetune_adam_equal"]
    assert r["finetune_adam_steps"] == [4.0] and r["finetune_adam_steps_distinct"]
    steps = r["finetune_records"]
    assert [x["step"] for x in steps] == [1, 2]  # the step count starts afresh
    assert steps[0]["lr"] <= 1e-3 and steps[-1]["lr"] == pytest.approx(1e-4)  # the new WSD
    assert all(x["tokens"] > 128 for x in steps)  # 4 sequences of 64 tokens
    prefix = sample_data[0]
    assert r["finetune_saved_config"] == {"rotary_base": 1e6, "seq_length": 64,
                                          "blend": f"0.7 {prefix} 0.3 {prefix}"}
    assert r["load_model_weights_step"] == 4 and r["load_model_weights_equal"]


def test_latest_checkpoint_trusts_only_published_folders(tmp_path):
    """The file-system protocol alone: the tracker, its fallbacks, temporaries, pruning."""
    from megatron_ntp.training import checkpoint

    def make(name, complete=True):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / checkpoint.INFO_FILE).write_text("{}")

    assert checkpoint.latest_checkpoint(str(tmp_path)) is None
    for step in (10, 20, 30):
        make(f"iter_{step:07d}")
    make("iter_0000040.tmp")  # a crashed save
    make("iter_0000050", complete=False)  # not ours / unfinished: no checkpoint.json
    assert sorted(checkpoint.complete_checkpoints(str(tmp_path))) == [10, 20, 30]
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("iter_0000030")  # no tracker
    (tmp_path / checkpoint.TRACKER_FILE).write_text("20\n")
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("iter_0000020")
    (tmp_path / checkpoint.TRACKER_FILE).write_text("60\n")  # names a folder that is gone
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("iter_0000030")
    explicit = str(tmp_path / "iter_0000010")
    assert checkpoint.resolve_checkpoint_dir(explicit) == explicit
    checkpoint.prune_checkpoints(str(tmp_path), keep_last=2, newest=30)
    checkpoint.remove_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["iter_0000020", "iter_0000030", "iter_0000050",
                                            checkpoint.TRACKER_FILE]
    with pytest.raises(ValueError, match="holds no checkpoint"):
        checkpoint.resolve_checkpoint_dir(str(tmp_path / "iter_0000050"))


@pytest.mark.parametrize("overrides, message", [
    (["checkpoint.keep_last=0"], "checkpoint.keep_last=0 must be >= 1"),
    (["checkpoint.save_interval=0"], "checkpoint.save_interval=0 must be >= 1"),
    (["checkpoint.finetune=true"], "checkpoint.finetune=true needs checkpoint.load_dir"),
    (["checkpoint.finetune=true", "checkpoint.load_dir=ck", "checkpoint.save_dir=ck/"],
     "load_dir == checkpoint.save_dir"),
])
def test_checkpoint_fields_are_validated(overrides, message):
    from megatron_ntp.config import ConfigError, load_config, validate_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(load_config(None, ["train.steps=1"] + overrides), world_size=1)


def test_where_a_run_starts(tmp_path):
    """plan_start's rules: the run's own checkpoints first, then load_dir (resume or finetune),
    else scratch; load_dir == save_dir may be empty (a first run)."""
    from megatron_ntp.config import ConfigError, load_config
    from megatron_ntp.training import checkpoint

    def fake_checkpoint(root, step):
        folder = tmp_path / root / f"iter_{step:07d}"
        folder.mkdir(parents=True)
        (folder / checkpoint.INFO_FILE).write_text(json.dumps(
            {"step": step, "consumed_samples": 4 * step}))
        (tmp_path / root / checkpoint.TRACKER_FILE).write_text(f"{step}\n")

    def start(*overrides):
        return checkpoint.plan_start(load_config(None, list(overrides)))

    own, other = f"checkpoint.save_dir={tmp_path}/own", f"checkpoint.load_dir={tmp_path}/pre"
    assert start() == checkpoint.StartPoint()
    assert start(own, f"checkpoint.load_dir={tmp_path}/own") == checkpoint.StartPoint()
    with pytest.raises(ConfigError, match="checkpoint.load_dir=.*does not exist"):
        start(own, other)
    fake_checkpoint("pre", 100)
    assert start(own, other) == checkpoint.StartPoint(100, 400, f"{tmp_path}/pre/iter_0000100")
    assert start(own, other, "checkpoint.finetune=true") == checkpoint.StartPoint(
        0, 0, f"{tmp_path}/pre/iter_0000100", finetune=True)
    fake_checkpoint("own", 30)  # the new phase saved: a rerun resumes it, not the pre-training
    assert start(own, other, "checkpoint.finetune=true") == checkpoint.StartPoint(
        30, 120, f"{tmp_path}/own/iter_0000030")
