"""End to end: `megatron-ntp eval`, `passk` and `generate` on tiny checkpoints trained at TP = 2,
run in other layouts (one process, torchrun with TP = 2, PP = 2, DP = 2 x EP = 2)."""

import json
import math
import os

import pytest

from megatron_ntp.eval.passk import cons_at_k, pass_at_k
from megatron_ntp.eval.tasks import resolve_checker
from tests.eval.checkpoints import run_cli

EVAL_ARGS = ["--sequences", "4", "--split", "valid", "--topk", "5"]


@pytest.fixture(scope="module")
def eval_results(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    checkpoint = trained["dense"]["checkpoint"]
    results = {}
    # one process with no layout override: the default TP=PP=EP=1 (trained at TP=2)
    for name, nproc, overrides in [("tp1", 1, []),
                                   ("tp2", 2, ["parallel.tensor=2"]),
                                   ("pp2", 2, ["parallel.tensor=1", "parallel.pipeline=2",
                                               "train.micro_batch_size=1"])]:
        path = out / f"{name}.json"
        done = run_cli(["eval", "--checkpoint", checkpoint, *EVAL_ARGS, "--output", str(path),
                        *overrides], nproc=nproc)
        results[name] = (json.loads(path.read_text()), done.stdout)
    return results


def test_eval_numbers_are_consistent(eval_results):
    r, stdout = eval_results["tp1"]
    assert "ppl" in stdout and "top-1 calibration" in stdout
    assert r["step"] == 3 and r["tokens"] == 4 * 32
    assert r["ppl"] == pytest.approx(math.exp(r["ce"]))
    assert 0 < r["entropy"] < math.log(1024) + 1e-6
    assert 0 < r["topk_mass"] <= 1 and r["tail_mass"] == pytest.approx(1 - r["topk_mass"])
    top1 = r["calibration"]["top1"]["bins"]
    assert sum(b["count"] for b in top1) == r["tokens"]
    correct = sum(b["observed"] * b["count"] for b in top1 if b["count"])
    assert correct == pytest.approx(r["top1_accuracy"] * r["tokens"])
    vocab = r["calibration"]["vocab"]["bins"]
    assert sum(b["count"] for b in vocab) == r["tokens"] * 1024  # every padded entry
    assert sum(b["targets"] for b in vocab) == r["tokens"]
    mass = sum(b["predicted"] * b["count"] for b in vocab if b["count"])
    assert mass == pytest.approx(r["tokens"], rel=1e-5)  # each row's p sums to 1


def test_eval_agrees_with_the_training_validation(trained, eval_results):
    # the training loop validated the same 4 sequences with the same weights (after step 3)
    with open(os.path.join(trained["dense"]["run_dir"], "valid.jsonl")) as f:
        valid = [json.loads(line) for line in f][-1]
    r = eval_results["tp1"][0]
    assert valid["tokens"] == r["tokens"]
    assert r["ce"] == pytest.approx(valid["ce"], rel=1e-5)
    assert r["entropy"] == pytest.approx(valid["entropy"], rel=1e-5)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_eval_is_the_same_in_other_layouts(eval_results, layout):
    one, other = eval_results["tp1"][0], eval_results[layout][0]
    assert other["tokens"] == one["tokens"]
    for key in ("ce", "ppl", "entropy", "topk_mass", "top1_accuracy", "p_target_mean"):
        assert other[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(one["calibration"]["top1"]["bins"], other["calibration"]["top1"]["bins"]):
        assert a["count"] == b["count"]


def _arithmetic_tasks(path, n=6):
    with open(path, "w") as f:
        for i in range(n):
            a, b = 3 * i + 1, 7 * i + 2
            f.write(json.dumps({"id": i, "prompt": f"{a} + {b} = ", "answer": str(a + b)}) + "\n")


@pytest.fixture(scope="module")
def passk_results(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("passk")
    tasks = out / "tasks.jsonl"
    _arithmetic_tasks(tasks)
    common = ["--checkpoint", trained["moe"]["checkpoint"], "--tasks", str(tasks),
              "--checker", "numeric", "-m", "4", "--temperature", "1.0", "--top-p", "0.95",
              "--max-new-tokens", "6", "--stop", "\\n", "--seed", "11", "--batch-size", "5"]
    results = {}
    for name, nproc, overrides in [
            ("single", 1, []),  # the default layout TP=PP=EP=1 (trained at TP=2 x EP=2)
            ("dp2_ep2", 2, ["parallel.tensor=1", "parallel.expert=2",
                            "parallel.sequence_parallel=false"])]:
        path = out / f"{name}.json"
        run_cli(["passk", *common, "--output", str(path), *overrides], nproc=nproc)
        results[name] = json.loads(path.read_text())
    return results


def test_passk_numbers_follow_from_the_samples(passk_results):
    r = passk_results["single"]
    assert r["tasks"] == 6 and r["samples_per_task"] == 4 and r["step"] == 3
    checker = resolve_checker("numeric")
    for task in r["per_task"]:
        texts = [c["text"] for c in task["completions"]]
        assert len(texts) == 4 and all("\n" not in t for t in texts)
        answers = [checker.extract(t) for t in texts]
        correct = [a is not None and checker.check(a, task["reference"]) for a in answers]
        assert [c["correct"] for c in task["completions"]] == correct
        c = sum(correct)
        assert task["correct"] == c
        assert task["pass_at_k"] == pytest.approx({str(k): pass_at_k(4, c, k)
                                                   for k in (1, 2, 4)})
        assert task["avg"] == pytest.approx(c / 4)
        assert task["cons"] == cons_at_k(answers, task["reference"], checker.check)
        for entry in task["completions"]:
            assert entry["finish"] in ("eod", "length") and 0 <= entry["tokens"] <= 6
    for k in ("1", "2", "4"):
        mean = sum(t["pass_at_k"][k] for t in r["per_task"]) / 6
        assert r["pass@k"][k] == pytest.approx(mean)
    assert r["avg@4"] == pytest.approx(sum(t["avg"] for t in r["per_task"]) / 6)


def test_samples_do_not_depend_on_the_data_parallel_layout(passk_results):
    # each (prompt, sample) row has its own generator: DP = 2 x EP = 2 deals the rows to two
    # replicas (which step together through the MoE layers) and draws the same samples
    single, split = passk_results["single"], passk_results["dp2_ep2"]
    for a, b in zip(single["per_task"], split["per_task"]):
        assert [c["text"] for c in a["completions"]] == [c["text"] for c in b["completions"]]


def test_generate_is_deterministic_for_a_seed_in_any_layout(trained, tmp_path):
    # torchrun at TP = 2 (logits all-gathered over the TP group) and at PP = 2 (tokens
    # broadcast from the last stage): the same samples for the same seed (the one-process
    # path is the passk tests')
    common = ["generate", "--checkpoint", trained["dense"]["checkpoint"], "--prompt", "def ",
              "--prompt", "The number", "-m", "3", "--max-new-tokens", "8", "--seed", "5"]
    runs = []
    for name, nproc, overrides in [("tp2", 2, ["parallel.tensor=2"]),
                                   ("pp2", 2, ["parallel.pipeline=2"])]:
        path = tmp_path / f"{name}.jsonl"
        run_cli([*common, "--output", str(path), *overrides], nproc=nproc)
        runs.append([json.loads(line) for line in path.read_text().splitlines()])
    assert len(runs[0]) == 6 and runs[0] == runs[1]
    # each sample has its own generator: the 3 samples of a prompt differ
    assert len({r["text"] for r in runs[0][:3]}) > 1


def test_subcommands_print_results_and_no_library_warnings(trained, tmp_path):
    # with Python's warnings on, as a user runs them: the torch and megatron-core warnings of a
    # checkpoint load are filtered (megatron_ntp/console.py), as they are for train
    checkpoint = trained["dense"]["checkpoint"]
    tasks = tmp_path / "tasks.jsonl"
    _arithmetic_tasks(tasks, n=2)
    runs = {"eval": ["eval", "--checkpoint", checkpoint, *EVAL_ARGS],
            "generate": ["generate", "--checkpoint", checkpoint, "--prompt", "def ",
                         "--max-new-tokens", "4"],
            "passk": ["passk", "--checkpoint", checkpoint, "--tasks", str(tasks), "-m", "2",
                      "--max-new-tokens", "4"]}
    for name, args in runs.items():
        done = run_cli(args, warnings=True)
        assert done.stdout.strip(), f"{name} printed no results"
        assert done.stderr == "", f"{name} printed on stderr:\n{done.stderr}"


def test_generate_output_says_where_the_samples_went(trained, tmp_path):
    path = tmp_path / "samples.jsonl"
    done = run_cli(["generate", "--checkpoint", trained["dense"]["checkpoint"], "--prompt",
                    "def ", "--prompt", "The number", "-m", "3", "--max-new-tokens", "4",
                    "--output", str(path)])
    assert len(path.read_text().splitlines()) == 6
    assert done.stdout == f"generate: 6 samples (2 prompts x 3) written to {path}\n"
