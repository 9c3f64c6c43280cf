"""`megatron-ntp sweep collect`: every run's per-step metrics in one CSV table.

One row per (run, step) of each run's metrics.jsonl (the last record of a step that was re-run
after a resume), with the run's parameters from the sweep manifest and:

    step         the step's number, 1..train.steps: optimizer steps complete after it (as in
                 metrics.jsonl; a run folder numbered from 0 is read in this numbering)
    complete     1 when the run is complete (its COMPLETE marker exists)
    final        1 on the row of the run's last planned step (step = train.steps)
    tokens_seen  step x train.global_batch_tokens
    flops_seen   tokens_seen x flops_per_token
    valid_<key>  the validation metrics (valid.jsonl) logged at that step, else empty

The training metrics are those of megatron_ntp.training.metrics (ce, ppl, entropy, topk_mass,
loss, lr, grad_norm, tokens_per_s, ...). The final-loss table of a sweep is the rows with
final = 1; `megatron-ntp sweep fit` reads this file.
"""

import csv
import io
import os

from megatron_ntp.files import write_atomic
from megatron_ntp.jobs.run_folder import METRICS_FILE, VALID_FILE, is_complete, read_metrics
from megatron_ntp.sweep.plan import load_manifest

RUN_COLUMNS = ("run", "model", "setting", "budget_kind", "budget", "params_total",
               "params_active", "params_non_embedding", "flops_per_token", "seq_length",
               "global_batch_tokens", "steps", "tokens", "flops", "beta", "topk", "lambda_topk",
               "lambda_tail")
STEP_COLUMNS = ("complete", "step", "tokens_seen", "flops_seen", "final")
FIRST_METRICS = ("ce", "ppl", "entropy", "topk_mass", "loss", "lr", "grad_norm", "tokens_per_s")


def collect_rows(root: str) -> tuple[list[dict], list[str]]:
    """(rows, names of the runs without any metrics yet)."""
    manifest = load_manifest(root)
    rows, missing = [], []
    for run in manifest["runs"]:
        run_dir = os.path.join(root, run["dir"])
        records = read_metrics(run_dir, METRICS_FILE, missing_ok=True)
        valid = {r["step"]: r for r in read_metrics(run_dir, VALID_FILE, missing_ok=True)}
        if not records:
            missing.append(run["name"])
            continue
        complete = int(is_complete(run_dir))
        base = {key: run[key] for key in RUN_COLUMNS if key != "run"}
        for record in records:
            step = int(record["step"])
            tokens = step * run["global_batch_tokens"]
            row = {"run": run["name"], **base, "complete": complete, "step": step,
                   "tokens_seen": tokens, "flops_seen": float(tokens * run["flops_per_token"]),
                   "final": int(step == run["steps"])}
            row.update({k: v for k, v in record.items() if k != "step"})
            row.update({f"valid_{k}": v for k, v in valid.get(step, {}).items() if k != "step"})
            rows.append(row)
    return rows, missing


def columns_of(rows: list[dict]) -> list[str]:
    seen = {key for row in rows for key in row}
    fixed = [c for c in RUN_COLUMNS + STEP_COLUMNS]
    metrics = [c for c in FIRST_METRICS if c in seen]
    rest = sorted(k for k in seen if k not in fixed and k not in metrics
                  and not k.startswith("valid_"))
    valid = sorted(k for k in seen if k.startswith("valid_"))
    return fixed + metrics + rest + valid


def write_csv(rows: list[dict], path: str) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns_of(rows), restval="",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def collect(root: str, out: str | None = None) -> tuple[str, list[dict], list[str]]:
    """Write the table (default <root>/sweep_metrics.csv); (path, rows, runs without metrics)."""
    rows, missing = collect_rows(root)
    if not rows:
        raise ValueError(f"{root}: no run has metrics yet (metrics.jsonl); submit the sweep first")
    path = out or os.path.join(root, "sweep_metrics.csv")
    write_csv(rows, path)
    return path, rows, missing
