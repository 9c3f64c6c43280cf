"""slurm/preprocess.sbatch on a real local Slurm: an array of 3 tasks preprocesses 3 shards of
the input files, a job depending on it merges them, and the result equals preprocessing all the
files in one run, byte for byte. Rerunning a task of a finished shard does nothing."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.data.helpers import file_bytes
from tests.slurm.harness import ROOT

pytestmark = pytest.mark.slurm

SCRIPT = os.path.join(ROOT, "slurm", "preprocess.sbatch")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL")


def _sbatch(*args, logs):
    env = {**os.environ, "NTP_PYTHON": sys.executable, "NTP_ROOT": ROOT,
           "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--mem=1000",
                             f"--output={logs}/%A_%a.out", *args], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().split(";")[0]


def _wait_array(slurm, array_id, tasks, timeout=600):
    """{task id: JobState} once every task of the array has finished."""
    deadline = time.monotonic() + timeout
    while True:
        states = {fields.get("ArrayTaskId"): fields["JobState"]
                  for fields in slurm.jobs().values() if fields.get("ArrayJobId") == array_id}
        if len(states) == tasks and all(s in TERMINAL for s in states.values()):
            return states
        assert time.monotonic() < deadline, f"array {array_id} not finished: {states}"
        time.sleep(1)


def _logs(folder):
    return "\n".join(open(os.path.join(folder, n)).read() for n in sorted(os.listdir(folder)))


def test_array_of_three_shards_then_merge(slurm, tiny_data, tmp_path):
    from megatron_ntp.data.preprocess import PreprocessOptions, output_paths, preprocess
    from megatron_ntp.data.sample_corpus import write_sample_corpus

    _, tokenizer_model = tiny_data
    corpus = tmp_path / "corpus.jsonl"
    write_sample_corpus(str(corpus), max_bytes=120_000)
    lines = corpus.read_bytes().splitlines(keepends=True)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(5):  # 5 files of uneven size for 3 shards
        (inputs / f"part{i}.jsonl").write_bytes(b"".join(lines[i * len(lines) // 7:
                                                               (i + 2) * len(lines) // 7]))
    (tmp_path / "out").mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    prefix = str(tmp_path / "out" / "corpus")
    args = ["--input", str(inputs / "*.jsonl"), "--output-prefix", prefix, "--tokenizer-type",
            "sentencepiece", "--tokenizer-model", tokenizer_model, "--append-eod",
            "--log-interval", "0"]
    array = _sbatch("--array=0-2", SCRIPT, *args, logs=logs)
    merge = _sbatch(f"--dependency=afterok:{array}", SCRIPT, "merge", "--shards", "3",
                    "--output-prefix", prefix, logs=logs)
    assert _wait_array(slurm, array, 3) == {str(i): "COMPLETED" for i in range(3)}, _logs(logs)
    assert slurm.wait_finished([merge])[merge]["JobState"] == "COMPLETED", _logs(logs)

    single = str(tmp_path / "single")
    preprocess(PreprocessOptions([str(inputs / "*.jsonl")], single, "sentencepiece",
                                 tokenizer_model, append_eod=True, log_interval=0, workers=1))
    merged, whole = output_paths(prefix, "text"), output_paths(single, "text")
    assert file_bytes(merged["bin"], merged["idx"]) == file_bytes(whole["bin"], whole["idx"])
    summary = json.loads(open(f"{prefix}_preprocess_summary.json").read())
    assert [len(json.loads(open(f"{prefix}_shard{i:05d}_preprocess_summary.json").read())
                ["inputs"]) for i in range(3)] == [s["inputs"] for s in summary["shards"]]
    assert sum(s["inputs"] for s in summary["shards"]) == 5

    # resumable: task 1 again (an explicit --num-shards, the array no longer starts at 0)
    again = _sbatch("--array=1", SCRIPT, *args, "--num-shards", "3", logs=logs)
    assert _wait_array(slurm, again, 1) == {"1": "COMPLETED"}, _logs(logs)
    assert "shard 1 of 3 was finished before" in open(logs / f"{again}_1.out").read()
