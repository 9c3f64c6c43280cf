"""PNG plots of a sweep (matplotlib, Agg backend: no display needed).

- loss_vs_compute.png: each run's loss curve against training FLOPs (thin), its final point
  (marker), and per setting the fitted compute-optimal frontier
  L*(C) = min_N L(N, C / (k N)), k = the median of C / (N D) over the setting's runs (about 6
  plus the attention and output-layer terms at these N).
- entropy_vs_compute.png: the same for the entropy of the predicted distribution, per setting.
- isoflop.png: one panel per setting: final loss against N for each compute budget, the
  parabola in log N and its vertex (where a budget has >= 3 sizes).
"""

import os

import numpy as np

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
          "tab:pink", "tab:gray")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # settings stay apart where they overlap
LINESTYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _runs(rows):
    by_run = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    return by_run


def _settings(rows):
    return sorted({r["setting"] for r in rows})


def _curve(run_rows, metric):
    pts = sorted((r["flops_seen"], r[metric]) for r in run_rows if r.get(metric) is not None)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def frontier(fit, points, grid_size: int = 200):
    """(C, L*(C)) of a fitted law over the compute range of `points` (report.Points)."""
    k = float(np.median(points.c / (points.n * points.d)))
    cs = np.geomspace(points.c.min() / 2, points.c.max() * 4, grid_size)
    ns = np.geomspace(points.n.min() / 30, points.n.max() * 30, 400)
    best = [float(np.min(fit.predict(ns, c / (k * ns)))) for c in cs]
    return cs, np.array(best)


def plot_metric_vs_compute(rows, metric, path, title, fits=None):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    settings = _settings(rows)
    index = {s: i for i, s in enumerate(settings)}
    color = {s: COLORS[i % len(COLORS)] for s, i in index.items()}
    marker = {s: MARKERS[i % len(MARKERS)] for s, i in index.items()}
    style = {s: LINESTYLES[i % len(LINESTYLES)] for s, i in index.items()}
    for run, run_rows in _runs(rows).items():
        setting = run_rows[0]["setting"]
        x, y = _curve(run_rows, metric)
        if len(x):
            ax.plot(x, y, color=color[setting], linestyle=style[setting], alpha=0.45,
                    linewidth=0.9)
        final = [r for r in run_rows if r.get("final") == 1 and r.get(metric) is not None]
        if final:
            ax.scatter([final[0]["flops_seen"]], [final[0][metric]], color=color[setting],
                       marker=marker[setting], s=28, zorder=3, facecolors="none")
    for setting in settings:
        ax.plot([], [], color=color[setting], marker=marker[setting], linestyle=style[setting],
                markerfacecolor="none", label=f"{setting} (runs; final points)")
        result = (fits or {}).get(setting)
        if result is not None and result.fit is not None:
            cs, best = frontier(result.fit, result.points)
            f = result.fit
            ax.plot(cs, best, color=color[setting], linestyle="--", linewidth=1.8,
                    label=f"{setting} fitted frontier: alpha={f.alpha:.2f}, b={f.b:.2f}, "
                          f"E={f.E:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_isoflop(fits, path, params_label="N"):
    plt = _pyplot()
    settings = list(fits)
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 4), squeeze=False)
    from matplotlib.ticker import NullFormatter

    from megatron_ntp.scaling.isoflop import isoflop_groups

    for ax, setting in zip(axes[0], settings):
        result = fits[setting]
        p = result.final_points if result.final_points is not None else result.points
        if len(p.loss) == 0:
            continue
        labels = p.budgets if all(b is not None for b in p.budgets) else None
        groups = isoflop_groups(p.c, labels=labels)
        optima = {round(o["flops"], 6): o for o in result.isoflop}
        for i, g in enumerate(groups):
            order = np.argsort(p.n[g])
            n, loss = p.n[g][order], p.loss[g][order]
            c = float(np.mean(p.c[g]))
            col = COLORS[i % len(COLORS)]
            planned = f"{float(labels[g[0]]):.2g} planned, " if labels else ""
            ax.plot(n, loss, marker="o", color=col, linewidth=0.8,
                    label=f"C = {planned}{c:.2g} run")
            o = optima.get(round(c, 6))
            if o is not None:
                xs = np.linspace(np.log(n.min()) - 0.3, np.log(n.max()) + 0.3, 100)
                c2, c1, c0 = o["coeffs"]
                ax.plot(np.exp(xs), c2 * xs**2 + c1 * xs + c0, color=col, linestyle=":")
                ax.scatter([o["n_opt"]], [o["loss_opt"]], color=col, marker="*", s=80, zorder=4)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
        ax.set_xlabel(params_label)
        ax.set_ylabel("final loss")
        ax.set_title(f"IsoFLOP: {setting}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(rows, fits, out_dir, metric, entropy_metric, params_label):
    """The three PNGs into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in
             ("loss_vs_compute.png", "entropy_vs_compute.png", "isoflop.png")]
    plot_metric_vs_compute(rows, metric, paths[0], f"{metric} vs compute, fitted frontier "
                           f"per setting", fits)
    plot_metric_vs_compute(rows, entropy_metric, paths[1], f"{entropy_metric} vs compute")
    plot_isoflop(fits, paths[2], params_label)
    return paths
