"""Every command shown in a README runs as written, or has a listed reason (issue 30).

The shell commands of every README.md in git (tests/docs/readme_commands.py says which lines
count) are looked up in COMMANDS, keyed by README and a distinctive part of the command (a
regular expression): a command without its row, or a row without its command, fails
test_every_command_has_exactly_one_row. Each README's commands then run in order, as written, in
one temporary stand-in for the repository root (readme_commands.workspace: the repository's
files linked, examples/ copied), so that what a command writes (run folders, `data/`, `hf/x`,
`logs/`) stays out of the checkout and a command may use what an earlier one of the same README
wrote (the data README's corpus -> tokenizer -> preprocessing). Every command must exit with 0,
or the exit status its transcript documents, and print no Python traceback; a transcript's
output lines must appear where its row says so.

What a row may change, each with its reason in the row:
- `append`: arguments added at the end: the documented small size of a training run (SMALL),
  `--dry-run` for Slurm submission;
- `subs`: a placeholder the README names as one (`runs/x/ckpt`: the checkpoint of the session
  fixture `trained`; a dataset: `sample_data`'s; `...`: the arguments of the command above),
  replaced word for word;
- `how="sbatch"`: `sbatch OPTIONS SCRIPT ARGS` runs as `NTP_DRY_RUN=1 bash SCRIPT ARGS` with the
  node and GPU counts that sbatch would give the job (slurm/train.sbatch's dry run), then the
  job's first step, the config's validation at the job's world size
  (`python -m megatron_ntp.jobs.run_folder run-dir`), which the dry run does not reach;
- `how="skip"`: not run, for the reason given (a GPU, a real cluster, the suite itself);
- `defect`: a known defect of the code: the command must fail (a strict xfail naming it).

The environment of every command: `.venv/bin` first on PATH and VIRTUAL_ENV set (what the
READMEs' `source .venv/bin/activate` does; that line itself is sourced, to check it), a
temporary HOME (TORCH_EXTENSIONS_DIR kept where the CPU loss kernels are already built, so they
are not rebuilt), MEGATRON_NTP_SAMPLE_DIR a session folder (the built-in sample dataset, built
by the first training command and reused, as the training README says), PET_MASTER_PORT a
free port (torchrun's --master-port from the environment: the commands' default 29500 would
collide with other runs on the machine), and MEGATRON_NTP_COMPILE=0: the shaped loss's eager
passes where its CPU kernels do not serve (eval's statistics) instead of torch.compile's, the same
numbers (megatron_ntp/loss/README.md) without ~2 minutes of compiling in every eval process.
"""

import dataclasses
import json
import os
import re
import resource
import shlex
import subprocess
import time

import pytest

from tests.distributed import free_port
from tests.docs.readme_commands import ROOT, commands_in, readme_commands, readmes, workspace

# The documented small size of a training run: 2 steps, no warmup or decay steps (the tiny
# configs' 10 + 20 would not fit in 2 steps); README.md and the training README name the fields.
SMALL = "train.steps=2 train.lr_warmup_steps=0 train.lr_decay_steps=0"
GPU = "needs a CUDA GPU (and Transformer Engine)"
BENCHMARK = ("a benchmark, run by hand per machine (its figures name it), not a pass/fail check: "
             "minutes of CPU even at the smallest size the script takes (loss_bench.py --tokens 64 "
             "--vocab 2048: 1 min 43 s of CPU), beyond this test's budget; no test runs it")
SUITE = "the test suite itself: CI (.ci/run) runs `bash tools/test.sh`, this test among its tests"
SUBMIT_ARGS = ("--nodes 4 --gpus-per-node 8 --time 24:00:00 "
               "--config examples/configs/dense_1b.yaml loss.beta=-0.25 "
               "checkpoint.save_dir=/ckpt/dense1b-precision logging.run_dir=runs/dense1b-precision")


@dataclasses.dataclass(frozen=True)
class Row:
    match: str              # a regular expression found in one command of the README (or in
    #                         several identical ones)
    how: str = "run"        # run | sbatch | skip
    why: str = ""           # the reason for anything but running the command as written
    append: str = ""        # arguments appended
    subs: tuple = ()        # (placeholder, value): a value "@name" is made by Values
    expect: int = 0         # the exit status the README documents
    output: bool = False    # the transcript's output lines must appear in the command's output
    env: tuple = ()         # (name, value) set for this command; "@tmp" is a temporary folder
    cwd: str = "workspace"  # or "root": the repository itself
    defect: str = ""        # a known defect of the code: the command must fail


COMMANDS = {
    "README.md": [
        Row("tools/quickstart.sh", cwd="root", append=SMALL,
            env=(("QUICKSTART_DIR", "@tmp"),),
            why="the quickstart changes to its repository itself (install.sh reuses .venv); "
                "QUICKSTART_DIR (its documented output folder) is a temporary one; arguments are "
                "config overrides: the small size"),
        Row(r"^bash tools/test\.sh$", how="skip", why=SUITE),
        Row("source .venv/bin/activate",
            why="sourced in a shell of its own, to check it; every command gets what it sets "
                "(PATH, VIRTUAL_ENV) from the test's environment"),
        Row("plan --config examples/configs/dense_4b.yaml parallel.tensor=4"),
        Row("tiny_dense.yaml train.steps=30"),
        Row("tiny_moe.yaml", append=SMALL, why="a training run: the small size"),
        Row("megatron-ntp submit", append="--dry-run",
            why="submits to Slurm: --dry-run prints the sbatch command after the config's "
                "validation at the job's world size"),
        Row("train --help"),
    ],
    "benchmarks/README.md": [
        Row(r"loss_bench\.py --hidden 1024 --tp 1 2", how="skip", why=BENCHMARK),
        Row(r"for mib in", how="skip", why=BENCHMARK),
        Row(r"gpu_throughput\.py$", how="skip",
            why=GPU + "; its exit status 2 without CUDA or Transformer Engine and its config are "
                "tested by tests/gpu/test_gpu_throughput_cpu.py; tools/gpu_check.sh runs it"),
        Row(r"gpu_throughput\.py --rounds 3", how="skip", why=GPU + " (as above)"),
        Row(r"index_build_bench\.py", how="skip",
            why="a benchmark of a 500B-token blend (9.4 GiB of simulated index files, minutes); "
                "--tokens 1e7 still takes ~40 s on 2 busy cores: beyond this test's budget; no "
                "test runs it"),
    ],
    "examples/README.md": [
        Row("--config run.yaml", how="skip",
            why="run.yaml is the reader's file with the mistakes shown; the same report is "
                "tests/config/test_errors.py::test_every_problem_of_a_file_reported_at_once_"
                "with_its_line"),
        Row("train.steps=20 parallel.tensor=3", expect=2, output=True),
        Row("--config broken.yaml", how="skip",
            why="broken.yaml is the reader's file; tests/config/test_errors.py::"
                "test_a_yaml_syntax_error_is_one_line_with_exit_2"),
        Row("dense_4b.yaml loss.beta=-0.25 parallel.tensor=4"),
        Row("model.preset=moe-20b-a1b"),
        Row("plan --help"),
        Row("^megatron-ntp presets$"),
        Row(r"plan --config examples/configs/moe_20b_a1b\.yaml$"),
        Row("train.loss_schedule="),
    ],
    "megatron_ntp/data/README.md": [
        Row("^mkdir -p data$"),
        Row("sample_corpus"),
        Row("train_tokenizer.py"),
        Row("preprocess_data.py"),
    ],
    "megatron_ntp/eval/README.md": [
        Row("--split valid --sequences 256", subs=(("runs/x/ckpt", "@checkpoint"),),
            why="runs/x/ckpt: the README's placeholder for a checkpoint"),
        Row("torchrun .* eval", subs=(("runs/x/ckpt", "@checkpoint"),), why="as above"),
        Row("data.blend=/data/other_text_document",
            subs=(("runs/x/ckpt", "@checkpoint"), ("/data/other_text_document", "@dataset")),
            why="placeholders: the checkpoint, and another dataset with its tokenizer "
                "(sample_data's, which `trained` was trained on)"),
        Row("generate", subs=(("runs/x/ckpt", "@checkpoint"),), why="as above"),
        Row("passk", subs=(("runs/x/ckpt", "@checkpoint"), ("gsm8k_test.jsonl", "@tasks")),
            why="placeholders: the checkpoint, and a task file of yours (TASKS, numeric answers)"),
    ],
    "megatron_ntp/export/README.md": [
        Row("megatron-ntp export", subs=(("runs/x/ckpt", "@checkpoint"),),
            why="runs/x/ckpt: the eval README's placeholder for a checkpoint"),
        Row("from_pretrained"),
    ],
    "megatron_ntp/sweep/README.md": [
        Row("sweep plan .* --dry-run"),
        Row(r"sweep plan examples/sweeps/h100_dense_isoflop\.yaml$"),
        Row("sweep submit", append="--dry-run",
            why="submits 45 jobs to Slurm: --dry-run prints their sbatch commands"),
        Row("sweep collect", how="skip",
            why="needs the sweep's runs trained (45 jobs on H100 nodes); plan, submit, collect "
                "and fit of a CPU sweep on a local Slurm: tests/slurm/test_sweep.py::"
                "test_sweep_plan_submit_collect_fit"),
        Row("sweep fit", how="skip", why="as collect"),
    ],
    "megatron_ntp/training/README.md": [
        Row("tiny_dense.yaml train.steps=30", how="skip",
            why="README.md's command, run by its test"),
        Row(r"tiny_dense\.yaml train\.steps=20$", expect=2, output=True),
        Row("tiny_dense.yaml parallel.tensor=2 parallel.sequence_parallel=true", append=SMALL,
            why="a training run: the small size"),
        Row("tiny_moe.yaml parallel.expert=2", append=SMALL, why="a training run: the small size"),
        Row("checkpoint verify ckpt", subs=(("ckpt", "@checkpoint"),),
            why="ckpt: the example's checkpoint folder (its damaged checkpoint is not rebuilt: "
                "the output is not compared; tests/training/test_checkpoint_verify.py)"),
        Row("--config mid.yaml", how="skip",
            why="the reader's files (mid.yaml, ckpt/pretrain, two datasets) at sequence 16384; "
                "the same start from a checkpoint (load_dir, finetune, a new sequence length and "
                "RoPE base) is tests/training/test_checkpoint.py::"
                "test_crash_during_save_and_mid_training_start"),
    ],
    "slurm/README.md": [
        Row(r"^megatron-ntp submit --nodes 4", append="--dry-run",
            why="submits to Slurm: --dry-run"),
        Row(r"submit --dry-run \.\.\.$", subs=(("...", SUBMIT_ARGS),),
            why="...: the arguments of the command above"),
        Row(r"submit --chain 5 \.\.\.$", subs=(("...", SUBMIT_ARGS),), append="--dry-run",
            why="...: the arguments of the command above; --dry-run: submits 5 jobs"),
        Row("^mkdir -p logs$"),
        Row(r"^sbatch --nodes=4", how="sbatch",
            why="a job on 4 nodes of 8 GPUs: its dry run and its config validation at 32 ranks"),
        Row(r"^NTP_DRY_RUN=1 bash slurm/train\.sbatch --config \.\.\.$",
            subs=(("...", "examples/configs/dense_1b.yaml loss.beta=-0.25 parallel.data=32"),),
            why="...: the config and overrides of the sbatch command above"),
        Row("--container-image=nvcr.io", how="skip",
            why="needs a Slurm cluster with pyxis and the NGC image; install.sh's container "
                "path: tests/tools/test_install_script.py::"
                "test_container_install_keeps_the_container_torch"),
        Row("pip install --no-deps", how="skip",
            why="installs into a CUDA environment of the reader's (bare metal); the CPU "
                "environment is tools/install.sh's, pinned (tests/tools/test_install_script.py)"),
        Row("pip install psutil", how="skip", why="as above"),
        Row(r"pip install -e", how="skip", why="as above; builds Transformer Engine: " + GPU),
        Row("NTP_CONTAINER_IMAGE=nvcr.io"),
        Row(r"sbatch --parsable --array", how="skip",
            why="an array job on a real cluster (16 tasks of 32 CPUs, a 2 TB corpus); the same "
                "array + merge on a local Slurm: tests/slurm/test_preprocess_job.py::"
                "test_array_of_three_shards_then_merge"),
        Row(r"sbatch --dependency=afterok", how="skip", why="as the array job above"),
    ],
    "tests/README.md": [
        Row(r"^bash tools/test\.sh$", how="skip", why=SUITE),
        Row(r"test\.sh tests/loss", how="skip", why=SUITE + " (this part included)"),
        Row(r"test\.sh -m slurm", how="skip", why=SUITE + " (this part included)"),
        Row(r"test\.sh --oldest-stack", how="skip",
            why="the oldest-stack lane, which CI runs after the main suite (tools/test.sh)"),
        Row(r"gpu_check\.sh --quick", how="skip",
            why=GPU + "; without one it stops with exit status 2: tests/tools/"
                "test_gpu_check_script.py::test_stops_before_any_work_without_cuda"),
        Row(r"gpu_check\.sh$", how="skip", why=GPU + " (as above)"),
        Row(r"gpu_check\.sh --dry-run"),
        Row(r"gpu_check\.sh --bench-only", how="skip", why=GPU + " (as above)"),
    ],
}
# The task file given for the passk example's gsm8k_test.jsonl.
TASKS = [{"prompt": "Q: 2 + 3 = ?\nA:", "answer": "5"},
         {"prompt": "Q: 7 - 4 = ?\nA:", "answer": "3"}]


def rows_of(commands, readme: str):
    """{command index: row}, and the problems: a command with no row or several, a row
    matching no command (or different commands)."""
    rows, problems, found = COMMANDS.get(readme, []), [], {}
    for i, command in enumerate(commands):
        matching = [row for row in rows if re.search(row.match, command.text)]
        if len(matching) != 1:
            problems.append(f"{readme}:{command.line}: {len(matching)} rows in COMMANDS match "
                            f"{command.text!r}: give it exactly one (run, or a reason)")
        else:
            found[i] = matching[0]
    for row in rows:
        texts = {commands[i].text for i, r in found.items() if r is row}
        if len(texts) != 1:
            problems.append(f"{readme}: the row {row.match!r} matches {len(texts)} commands")
    return found, problems


def test_blocks_are_split_into_the_commands_bash_reads():
    text = "\n".join([
        "```bash",
        "# a comment line",
        "megatron-ntp plan --config a.yaml \\",
        "    x.y=1   # a comment after a continuation",
        "srun --container-image=nvcr.io#nvidia/pytorch:25.09-py3 echo '# kept' \"a  b\"",
        "for i in 1 2; do",
        "  echo $i",
        "done",
        "```",
        "```",
        "$ megatron-ntp train --config x.yaml \\",
        "    a.b=1",
        "error: one",
        "$ megatron-ntp presets",
        "```",
        "```python",
        "python = 1",
        "```",
        "```",
        "python tools/x.py",
        "```"])
    commands, problems = commands_in("R.md", text)
    assert [(c.line, c.text, c.output) for c in commands] == [
        (3, "megatron-ntp plan --config a.yaml x.y=1", ()),
        (5, "srun --container-image=nvcr.io#nvidia/pytorch:25.09-py3 echo '# kept' \"a  b\"", ()),
        (6, "for i in 1 2; do\n  echo $i\ndone", ()),
        (11, "megatron-ntp train --config x.yaml a.b=1", ("error: one",)),
        (14, "megatron-ntp presets", ())]
    assert problems == ["R.md:19: an untagged block of commands: tag it ```bash (or show it as a "
                        "`$ ` transcript)"]


def test_every_command_has_exactly_one_row():
    problems = []
    for readme in readmes():
        commands, untagged = readme_commands(readme)
        problems += untagged + rows_of(commands, readme)[1]
    problems += [f"{readme}: the row {row.match!r} changes or skips its command without a reason"
                 for readme, rows in COMMANDS.items() for row in rows
                 if not row.why and (row.how != "run" or row.append or row.subs or row.env
                                     or row.cwd != "workspace")]
    problems += [f"{readme}: in COMMANDS but not in git"
                 for readme in sorted(set(COMMANDS) - set(readmes()))]
    assert problems == [], "\n".join(problems)


def sbatch_dry_run(text: str) -> tuple[str, str]:
    """`sbatch OPTIONS SCRIPT ARGS` as its dry run and its first step: (command, the topology
    line the dry run must print)."""
    words = shlex.split(text)
    assert words[0] == "sbatch", text
    options, i = {}, 1
    while words[i].startswith("-"):
        name, _, value = words[i].partition("=")
        options[name] = value
        i += 1
    script, args = words[i], shlex.join(words[i + 1:])
    nodes, gpus = int(options.get("--nodes", 1)), int(options.get("--gpus-per-node", 1))
    command = (f"NTP_DRY_RUN=1 SLURM_JOB_NUM_NODES={nodes} SLURM_GPUS_ON_NODE={gpus} "
               f"bash {script} {args} && python -m megatron_ntp.jobs.run_folder run-dir "
               f"--world-size {nodes * gpus} {args}")
    return command, f"{nodes} node(s) x {gpus} rank(s)"


class Values:
    """The values of a row's "@name" placeholders, each made only when a command needs it."""

    def __init__(self, request, tmp_path):
        self.request, self.tmp_path = request, tmp_path

    def __getitem__(self, name: str) -> str:
        if name == "checkpoint":
            return self.request.getfixturevalue("trained")["dense"]["checkpoint"]
        if name == "dataset":
            return self.request.getfixturevalue("sample_data")[0]
        if name == "tasks":
            path = self.tmp_path / "tasks.jsonl"
            path.write_text("".join(json.dumps(task) + "\n" for task in TASKS))
            return str(path)
        if name == "tmp":
            folder = self.tmp_path / f"tmp{len(list(self.tmp_path.glob('tmp*')))}"
            folder.mkdir()
            return str(folder)
        raise KeyError(name)


def resolve(value: str, values: Values) -> str:
    return values[value[1:]] if value.startswith("@") else value


def command_line(command, row: Row, values: Values) -> tuple[str, list[str]]:
    """The shell text a row runs for a command, and what its output must contain."""
    text, expected = command.text, list(command.output) if row.output else []
    for placeholder, value in row.subs:
        pattern = r"(?<![\w./-])" + re.escape(placeholder) + r"(?![\w./-])"
        assert re.search(pattern, text), f"{placeholder!r} is not in {text!r}"
        text = re.sub(pattern, lambda _: resolve(value, values), text)
    if row.how == "sbatch":
        text, topology = sbatch_dry_run(text)
        expected.append(topology)
    return f"{text} {row.append}".strip(), [line.strip() for line in expected]


@pytest.fixture(scope="session")
def base_environment(tmp_path_factory):
    """The environment of every command (see the module's docstring)."""
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR")
    if extensions is None:  # where torch puts the kernels under the real HOME
        from torch.utils.cpp_extension import _get_build_directory

        from megatron_ntp.loss.cpu_kernels import extension_name

        extensions = os.path.dirname(_get_build_directory(extension_name(), verbose=False))
    venv = os.path.join(ROOT, ".venv")
    return dict(os.environ, PATH=os.path.join(venv, "bin") + os.pathsep + os.environ["PATH"],
                VIRTUAL_ENV=venv, TORCH_EXTENSIONS_DIR=extensions, MEGATRON_NTP_COMPILE="0",
                MEGATRON_NTP_SAMPLE_DIR=str(tmp_path_factory.mktemp("builtin_sample")))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(command, row: Row, folder: str, environment: dict, values: Values):
    """None if the command did what the README says, else what went wrong."""
    text, expected = command_line(command, row, values)
    env = dict(environment, PET_MASTER_PORT=str(free_port()),
               **{name: resolve(value, values) for name, value in row.env})
    start, cpu = time.monotonic(), _children_cpu()
    done = subprocess.run(["bash", "-c", text], cwd=ROOT if row.cwd == "root" else folder,
                          env=env, capture_output=True, text=True, errors="replace")
    print(f"{time.monotonic() - start:6.1f} s ({_children_cpu() - cpu:5.1f} s CPU)  "
          f"{command.readme}:{command.line}: {text}")  # shown with pytest -rP
    output = done.stdout + done.stderr
    wrong = []
    if done.returncode != row.expect:
        wrong.append(f"exit status {done.returncode}, expected {row.expect}")
    if "Traceback (most recent call last)" in output:
        wrong.append("a Python traceback")
    wrong += [f"no line {line!r} in its output" for line in expected if line not in output]
    if not wrong:
        return None
    return (f"{command.readme}:{command.line}: {command.text}\n  ran: {text}\n  "
            f"{'; '.join(wrong)}\n--- stdout (end)\n{done.stdout[-3000:]}\n"
            f"--- stderr (end)\n{done.stderr[-5000:]}")


RUN = [readme for readme in readmes() if any(row.how != "skip" for row in COMMANDS.get(readme, []))]


@pytest.mark.parametrize("readme", RUN)
def test_readme_commands_run_as_written(readme, tmp_path, request, base_environment):
    commands, _ = readme_commands(readme)
    rows, problems = rows_of(commands, readme)
    assert problems == [], "\n".join(problems)
    values = Values(request, tmp_path)
    (tmp_path / "home").mkdir()
    environment = dict(base_environment, HOME=str(tmp_path / "home"))
    folder = workspace(str(tmp_path / "repo"))
    failures, defects = [], []
    for i, command in enumerate(commands):
        row = rows[i]
        if row.how == "skip":
            continue
        failure = run_command(command, row, folder, environment, values)
        if row.defect and failure is None:
            failures.append(f"{readme}:{command.line}: {command.text}\n  runs now: the known "
                            f"defect ({row.defect}) is fixed; remove it from its row")
        elif row.defect:
            defects.append(f"{readme}:{command.line}: {row.defect}")
        elif failure:
            failures.append(failure)
    assert failures == [], "\n\n".join(failures)
    if defects:
        pytest.xfail("known defects: " + "; ".join(defects))
