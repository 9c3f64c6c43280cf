"""The same tiny model and data trained at the paper's five loss settings.

    .venv/bin/python examples/loss_settings/run.py [--out experiments/loss_settings]
        [--steps 200] [overrides ...]

One `megatron-ntp train` run per setting (tiny-dense preset, the built-in offline sample data,
the same seed, so the same initial weights and batches), then a table (printed and written as
table.md) and one PNG of cross-entropy and entropy per setting over the steps. Every run logs
the top-100 mass: with both lambdas at 0 the set K does not change the loss (cross-entropy
exactly, whatever k is), so k = 100 everywhere only adds the statistic. A run folder that
already holds all its steps is reused, so the script can be re-run to redo the table and plot.
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from megatron_ntp.jobs.run_folder import read_metrics  # noqa: E402
from megatron_ntp.loss.settings import PAPER_SETTINGS, config_overrides  # noqa: E402
from megatron_ntp.plots import plot_runs  # noqa: E402

TOPK = 100  # every run logs its top-100 mass (with both lambdas 0, K does not change the loss)


def _settings() -> dict[str, dict]:
    """label ("precision (beta=-0.25)") -> loss overrides, from the one table of the paper's
    settings (megatron_ntp.loss.settings)."""
    settings = {}
    for name, cfg in PAPER_SETTINGS.items():
        knobs = {key: value for key, value in config_overrides(cfg).items() if key != "loss.topk"}
        shown = ", ".join(f"{key.removeprefix('loss.')}={value}" for key, value in knobs.items())
        settings[name.replace("_", " ") + (f" ({shown})" if shown else "")] = knobs
    return settings


SETTINGS = _settings()


def folder_name(setting: str) -> str:
    return setting.split(" (")[0].replace(" ", "_")


def train(run_dir: str, knobs: dict, steps: int, overrides: list[str]):
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics) and len(read_metrics(run_dir)) >= steps:
        print(f"{run_dir}: complete, reused")
        return
    if os.path.exists(run_dir):
        raise SystemExit(f"{run_dir} exists but is incomplete: remove it or choose another --out")
    command = [sys.executable, "-m", "megatron_ntp.cli", "train",
               "--config", os.path.join(ROOT, "examples/configs/tiny_dense.yaml"),
               f"logging.run_dir={run_dir}", f"train.steps={steps}", f"loss.topk={TOPK}",
               "train.eval_interval=50", "train.eval_steps=4",
               *(f"{key}={value}" for key, value in knobs.items()), *overrides]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def last_mean(records: list[dict], key: str, last: int = 20) -> float:
    values = [r[key] for r in records[-last:]]
    return sum(values) / len(values)


def summary_table(out: str) -> str:
    rows = ["| setting | train CE (last 20 steps) | valid CE | valid PPL | valid entropy | "
            "valid top-100 mass | valid tail mass |", "|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        run_dir = os.path.join(out, folder_name(setting))
        records = read_metrics(run_dir)
        valid = read_metrics(run_dir, "valid.jsonl")[-1]
        rows.append(f"| {setting} | {last_mean(records, 'ce'):.3f} | {valid['ce']:.3f} | "
                    f"{valid['ppl']:.1f} | {valid['entropy']:.3f} | {valid['topk_mass']:.3f} | "
                    f"{1 - valid['topk_mass']:.3f} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "loss_settings"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for setting, knobs in SETTINGS.items():
        train(os.path.join(args.out, folder_name(setting)), knobs, args.steps, args.overrides)
    table = summary_table(args.out)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    png = plot_runs([os.path.join(args.out, folder_name(s)) for s in SETTINGS],
                    os.path.join(args.out, "curves.png"), labels=list(SETTINGS),
                    title=f"tiny-dense, {args.steps} steps x 4096 tokens, offline sample data")
    print("plot:", png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
