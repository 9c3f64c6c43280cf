"""A training run's folder on disk: its metric records (read, truncated on resume) and whether it
is complete.

A run is *complete* when `<logging.run_dir>/COMPLETE` exists. slurm/train.sbatch writes it (with
`python -m megatron_ntp.jobs.run_folder mark-complete`) only after the trainer exited 0 and
metrics.jsonl holds the run's last step; the trainer has then saved its final checkpoint. Nothing
else writes it, so "complete" never means "the metrics happen to look finished".

Steps are numbered as Megatron-LM numbers its iterations: a step's number is how many optimizer
steps are complete after it, 1..train.steps. The record of the first step is step 1, a
validation after step 25 is step 25, and the checkpoint saved after step 50 is iter_0000050
(megatron_ntp/training/README.md, "Step numbering"). Run folders written before this numbering
began at step 0 (metrics.jsonl) and logged validations one lower; `read_metrics` reads them in
today's numbering and a resume rewrites them (`renumber_from_zero`).

metrics.jsonl may hold a step more than once: a run stopped between two checkpoints re-runs (and
re-logs) the steps after the checkpoint it resumes from. `read_jsonl_by_step` keeps the last
record of each step, i.e. the one that belongs to the surviving trajectory.

Command line (used by the batch script; arguments after the subcommand are `megatron-ntp train`'s):

    python -m megatron_ntp.jobs.run_folder run-dir [--world-size N] --config FILE [overrides ...]
    python -m megatron_ntp.jobs.run_folder mark-complete [--job ID] --config FILE [overrides ...]
"""

import argparse
import json
import os
import sys
import math
import time

from megatron_ntp.files import write_atomic

COMPLETE_MARKER = "COMPLETE"
METRICS_FILE = "metrics.jsonl"  # training records, one per step (training/metrics.py writes it)
VALID_FILE = "valid.jsonl"  # validation records


def read_jsonl_by_step(path: str) -> list[dict]:
    """Records of a metrics file sorted by step, the last record of each step kept. A missing
    file is an empty run; a torn last line (a process killed mid-write) is skipped."""
    if not os.path.isfile(path):
        return []
    by_step = {}
    with open(path) as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # the last line of a killed writer
            raise ValueError(f"{path}:{number}: not a JSON record: {line[:80]!r}") from None
        if "step" not in record:
            raise ValueError(f"{path}:{number}: record without a 'step' field")
        by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def read_metrics(run_dir: str, name: str = METRICS_FILE, missing_ok: bool = False) -> list[dict]:
    """The step records of run_dir/<name> (metrics.jsonl or valid.jsonl), the last record of
    each step kept, in today's step numbering (a folder numbered from 0 is shifted by one); a
    missing file is an error naming it, or no records with missing_ok."""
    path = os.path.join(run_dir, name)
    if not missing_ok and not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics (has the run started?)")
    records = read_jsonl_by_step(path)
    if numbered_from_zero(run_dir):
        records = [{**record, "step": record["step"] + 1} for record in records]
    return records


def numbered_from_zero(run_dir: str) -> bool:
    """Whether the run folder was written before steps were numbered from 1: its metrics.jsonl
    starts at step 0, which today's trainer never writes (both of its files are then one low)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        first = next((line for line in f if line.strip()), "")
    return _step(first) == 0  # records are appended in step order: the first is the lowest


def renumber_from_zero(run_dir: str) -> bool:
    """Rewrite a folder numbered from 0 (`numbered_from_zero`) in today's numbering, so that a
    resumed run appends to records of one numbering; False when there was nothing to do."""
    if not numbered_from_zero(run_dir):
        return False
    # metrics.jsonl's step 0 is what marks the folder, so it is rewritten last: a kill between
    # the two atomic replaces would otherwise leave valid.jsonl one low with nothing to show it
    for name in (VALID_FILE, METRICS_FILE):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                lines = [line for line in f if line.strip() and line.endswith("\n")]
            shifted = [{**record, "step": record["step"] + 1}
                       for record in map(json.loads, lines)]
            write_atomic(path, "".join(json.dumps(record) + "\n" for record in shifted))
    return True


def truncate_records(path: str, completed: int) -> int:
    """Drop the records of the steps after `completed` from a JSONL file (a run resumed from the
    checkpoint iter_<completed> redoes them), and a last line cut short by a kill; returns how
    many lines were dropped. The file is replaced atomically."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if line.endswith("\n") and _step(line) <= completed]
    if len(kept) < len(lines):
        write_atomic(path, "".join(kept))
    return len(lines) - len(kept)


def _step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # not a complete record: dropped


def is_complete(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, COMPLETE_MARKER))


def last_step(run_dir: str) -> int:
    """The largest step in <run_dir>/metrics.jsonl: how many steps are complete (0 when none)."""
    records = read_metrics(run_dir, missing_ok=True)
    return records[-1]["step"] if records else 0


def mark_complete(run_dir: str, steps: int, job_id: str = "") -> None:
    """Write the COMPLETE marker after checking that metrics.jsonl reached the last step,
    `steps`."""
    reached = last_step(run_dir)
    if reached < steps:
        raise RuntimeError(f"{run_dir}: the trainer exited 0 but metrics.jsonl ends at step "
                           f"{reached}, not at the last step {steps}; not marking it complete")
    record = {"job_id": job_id, "steps": steps, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                        time.gmtime())}
    write_atomic(os.path.join(run_dir, COMPLETE_MARKER), json.dumps(record) + "\n")


def _resolved_config(args):
    from megatron_ntp.config import load_config, validate_config

    return validate_config(load_config(args.config, args.overrides), world_size=args.world_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_ntp.jobs.run_folder",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run-dir", "mark-complete"):
        p = sub.add_parser(name)
        p.add_argument("--world-size", type=int, default=None)
        p.add_argument("--job", default=os.environ.get("SLURM_JOB_ID", ""))
        p.add_argument("--config", metavar="FILE")
        p.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from megatron_ntp.config import ConfigError

    try:
        config = _resolved_config(args)
    except ConfigError as err:
        print(f"megatron-ntp job: {err}", file=sys.stderr)
        return 2
    run_dir = os.path.abspath(config.logging.run_dir)
    if args.command == "run-dir":
        print(run_dir)
        return 0
    try:
        mark_complete(run_dir, config.train.steps, args.job)
    except RuntimeError as err:
        print(f"megatron-ntp job: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
