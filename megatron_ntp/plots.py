"""PNG plots of training runs: cross-entropy and entropy per step, one line per run.

    python -m megatron_ntp.plots RUN_DIR [RUN_DIR ...] --out curves.png [--labels A B ...]

Reads each run's metrics.jsonl (megatron_ntp/training/loop.py writes it); the x axis is the
step number of its records, 1..train.steps (optimizer steps complete), as on the console and in
the checkpoint names. Used by the quickstart and the loss-settings sweep under examples/.
"""

import argparse
import os
import sys

from megatron_ntp.files import atomic_path
from megatron_ntp.jobs.run_folder import read_metrics


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
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        print(plot_runs(args.run_dirs, args.out, args.labels, args.title))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
