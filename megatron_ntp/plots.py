"""PNG plots of training runs: cross-entropy and entropy per step, one line per run.

    python -m megatron_ntp.plots RUN_DIR [RUN_DIR ...] --out curves.png [--labels A B ...]
    python -m megatron_ntp.plots RUN_DIR --describe      # the run in one line, from config.yaml

Reads each run's metrics.jsonl (megatron_ntp/training/loop.py writes it); the x axis is the
step number of its records, 1..train.steps (optimizer steps complete), as on the console and in
the checkpoint names. Used by the quickstart and the loss-settings sweep under examples/.
"""

import argparse
import os
import sys

from megatron_ntp.files import atomic_path
from megatron_ntp.jobs.run_folder import read_metrics


LOSS_KNOBS = (("beta", "beta"), ("topk", "k"), ("lambda_topk", "lambda_topk"),
              ("lambda_tail", "lambda_tail"))


def describe_run(run_dir: str) -> str:
    """The run in one line from its own config.yaml (what it trained, not what a script meant
    to ask for): model, loss knobs (or cross-entropy), layout."""
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        config = yaml.safe_load(f)
    m, loss, p = config["model"], config["loss"], config["parallel"]
    model = m.get("preset") or f"{m['num_layers']} layers, hidden {m['hidden_size']}"
    knobs = " ".join(f"{label}={loss[key]}" for key, label in LOSS_KNOBS if loss.get(key))
    if not any(loss.get(key) for key in ("beta", "lambda_topk", "lambda_tail")):
        knobs = "cross-entropy"
    layout = f"TP={p['tensor']} PP={p['pipeline']} DP={p['data']}"
    if p.get("expert", 1) > 1:
        layout += f" EP={p['expert']}"
    return f"{model}, {knobs}, {layout}"


def plot_runs(run_dirs: list[str], out_png: str, labels: list[str] | None = None,
              title: str = "") -> str:
    """Two panels (cross-entropy, entropy) against step; writes out_png atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir, label in zip(run_dirs, labels):
        records = read_metrics(run_dir)
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["ce"] for r in records], label=label)
        axes[1].plot(steps, [r["entropy"] for r in records], label=label)
    for ax, name in zip(axes, ("cross-entropy (nats/token)", "entropy of p (nats/token)")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as temporary:
        fig.savefig(temporary, dpi=110)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", help="PNG file to write")
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--title", default=None,
                        help="default: one run's description from its config.yaml (--describe)")
    parser.add_argument("--describe", action="store_true",
                        help="print each run's description and write nothing")
    args = parser.parse_args(argv)
    if not args.describe and not args.out:
        parser.error("--out is required (or --describe)")
    try:
        if args.describe:
            for run_dir in args.run_dirs:
                print(describe_run(run_dir))
            return 0
        title = args.title
        if title is None:
            title = describe_run(args.run_dirs[0]) if len(args.run_dirs) == 1 else ""
        print(plot_runs(args.run_dirs, args.out, args.labels, title))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
