"""Scaling-law fits per loss setting from a sweep table (megatron_ntp.sweep.collect's CSV).

    table = read_table("sweep_metrics.csv")
    points = fit_points(table)                    # {setting: Points}
    fits = fit_settings(points, bootstrap=200)    # {setting: SettingFit}
    print(format_comparison(fits))

Which numbers are fitted:
- L: the metric, default "auto" = valid_ce (the validation cross-entropy) when every point has
  it, else ce (the training cross-entropy of the step's global batch). Cross-entropy, not the
  surrogate loss, which is not comparable across settings (megatron_ntp/loss/README.md).
- N: the parameter column, default params_non_embedding (active parameters without the
  embedding and output layer, as Kaplan et al.; at the tiny sizes of CPU sweeps the embedding
  dominates the total). params_active or params_total on request.
- D: tokens_seen; C (compute, for the plots and IsoFLOP groups): flops_seen.
- points="final": one point per run, its last planned step (Hoffmann et al.'s approach 3).
  points="curve": every row of every run from min_fraction of its steps on, so a few runs give
  many (N, D) points (the intermediate losses of a run also carry its learning-rate schedule,
  so prefer "final" when there are enough runs). Training-loss points are averaged over a
  trailing window of max(1, steps // 20) steps (one global batch is noisy); validation points
  are used as logged.
"""

import csv
import json
import math
from dataclasses import dataclass, field

import numpy as np

from megatron_ntp.scaling.fit import (
    PARAMS,
    BootstrapFit,
    ScalingFit,
    bootstrap_scaling_law,
    fit_scaling_law,
)
from megatron_ntp.scaling.isoflop import IsoflopLaw, fit_isoflop_law, isoflop_optima

TEXT_COLUMNS = {"run", "model", "setting", "budget_kind"}
PARAM_COLUMNS = ("params_non_embedding", "params_active", "params_total")
MIN_POINTS = 5


def read_table(path: str) -> list[dict]:
    """Rows of the CSV with numbers parsed; empty cells become None."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    for row in rows:
        for key, value in row.items():
            if key in TEXT_COLUMNS:
                continue
            if value == "" or value is None:
                row[key] = None
            elif value in ("True", "False"):
                row[key] = value == "True"
            else:
                try:
                    row[key] = float(value)
                except ValueError:
                    pass
    return rows


@dataclass
class Points:
    """The (N, D, C, L) points of one setting, with the run and budget of each."""

    n: np.ndarray
    d: np.ndarray
    c: np.ndarray
    loss: np.ndarray
    runs: list
    budgets: list  # planned budget label of each point's run (IsoFLOP groups)


@dataclass
class SettingFit:
    setting: str
    points: Points
    fit: ScalingFit | None = None
    intervals: dict = field(default_factory=dict)
    isoflop: list = field(default_factory=list)
    note: str = ""
    final_points: Points | None = None  # the runs' final points (IsoFLOP curves)
    bootstrap: BootstrapFit | None = None  # the refits behind `intervals`
    isoflop_law: IsoflopLaw | None = None  # approach 2: N_opt ~ C^a through the vertices
    isoflop_note: str = ""  # why there is no IsoFLOP law


def resolve_metric(rows: list[dict], metric: str = "auto") -> str:
    finals = [r for r in rows if r.get("final") == 1]
    if metric != "auto":
        if not any(r.get(metric) is not None for r in rows):
            raise ValueError(f"metric {metric!r} is not a column with values in the table")
        return metric
    if finals and all(r.get("valid_ce") is not None for r in finals):
        return "valid_ce"
    return "ce"


def _trailing_mean(rows: list[dict], metric: str, window: int) -> dict:
    """{step: mean of metric over the steps in (step - window, step]} for one run's rows."""
    values = sorted((int(r["step"]), r[metric]) for r in rows if r.get(metric) is not None)
    if not values:
        return {}
    steps = np.array([s for s, _ in values])
    sums = np.concatenate([[0.0], np.cumsum([v for _, v in values])])
    first = np.searchsorted(steps, steps - window, side="right")  # first index in the window
    last = np.arange(1, len(steps) + 1)
    return dict(zip(steps.tolist(), ((sums[last] - sums[first]) / (last - first)).tolist()))


def fit_points(rows: list[dict], metric: str = "auto", params: str = "params_non_embedding",
               points: str = "final", min_fraction: float = 0.25) -> dict:
    """{setting: Points} from the table's rows (see the module docstring)."""
    if params not in PARAM_COLUMNS:
        raise ValueError(f"params={params!r} must be one of {', '.join(PARAM_COLUMNS)}")
    if points not in ("final", "curve"):
        raise ValueError(f"points={points!r} must be final or curve")
    metric = resolve_metric(rows, metric)
    by_run = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    out = {}
    for run, run_rows in by_run.items():
        first = run_rows[0]
        steps = int(first["steps"])
        smooth = not metric.startswith("valid_")
        means = _trailing_mean(run_rows, metric, max(1, steps // 20)) if smooth else None
        # steps are numbered 1..steps; a table collected before that numbering starts at 0
        shift = int(min(row["step"] for row in run_rows) == 0)
        for row in run_rows:
            if row.get(metric) is None:
                continue
            if points == "final" and row.get("final") != 1:
                continue
            if points == "curve" and row["step"] + shift < min_fraction * steps:
                continue
            value = means[int(row["step"])] if smooth else row[metric]
            p = out.setdefault(first["setting"], {"n": [], "d": [], "c": [], "loss": [],
                                                  "runs": [], "budgets": []})
            p["n"].append(first[params])
            p["d"].append(row["tokens_seen"])
            p["c"].append(row["flops_seen"])
            p["loss"].append(value)
            p["runs"].append(run)
            # IsoFLOP groups: the planned compute budget; None (group by measured FLOPs) when
            # the sweep planned tokens
            p["budgets"].append(f"{first['budget']:g}" if first["budget_kind"] == "flops"
                                else None)
    return {s: Points(np.array(p["n"], float), np.array(p["d"], float), np.array(p["c"], float),
                      np.array(p["loss"], float), p["runs"], p["budgets"])
            for s, p in sorted(out.items())}


def _budget_labels(p: Points):
    """The planned FLOP budget of each point, or None (group by measured FLOPs)."""
    return p.budgets if all(b is not None for b in p.budgets) else None


def isoflop_of(p: Points) -> list:
    """IsoFLOP optima of one setting's final points (groups: the planned FLOP budgets, else
    FLOPs within 5%)."""
    if len(p.loss) < 3:
        return []
    return isoflop_optima(p.n, p.c, p.loss, labels=_budget_labels(p))


def fit_settings(points: dict, bootstrap: int = 200, level: float = 0.9, seed: int = 0,
                 final_points: dict | None = None) -> dict:
    """{setting: SettingFit}: the law (when there are >= 5 points), its bootstrap intervals
    (`bootstrap` resamples; 0 = none), the IsoFLOP optima of final_points (default: points,
    which should then be final points) and, with 2 or more budgets, the IsoFLOP law with
    intervals from as many resamples."""
    fits = {}
    final_points = points if final_points is None else final_points
    for setting, p in points.items():
        result = SettingFit(setting, p)
        if len(p.loss) < MIN_POINTS:
            result.note = (f"not fitted: {len(p.loss)} points, 5 parameters need at least "
                           f"{MIN_POINTS} (more runs, or points=curve)")
        else:
            result.fit = fit_scaling_law(p.n, p.d, p.loss)
            if bootstrap:
                result.bootstrap = bootstrap_scaling_law(p.n, p.d, p.loss, samples=bootstrap,
                                                         seed=seed, level=level, full=result.fit)
                result.intervals = result.bootstrap.intervals
        final = result.final_points = final_points.get(setting, p)
        result.isoflop = isoflop_of(final)
        if len(result.isoflop) >= 2:
            result.isoflop_law = fit_isoflop_law(final.n, final.c, final.loss,
                                                 labels=_budget_labels(final),
                                                 samples=bootstrap, seed=seed, level=level)
        else:
            result.isoflop_note = (f"no IsoFLOP law: {len(result.isoflop)} budget(s) with a "
                                   f"minimum, 2 needed")
        fits[setting] = result
    return fits


def default_budget(fits: dict) -> float:
    """10x the largest compute of any final point: a budget one step beyond the sweep."""
    return 10 * max(float(np.max(r.final_points.c)) for r in fits.values())


def predictions(result: SettingFit, budgets=(), at=()) -> dict:
    """Predictions of one setting with intervals (None where there are no bootstrap draws):
    per budget C, the compute-optimal N and D of approach 3 (the law) and of approach 2 (the
    IsoFLOP law) and the law's loss there; per (N, D) in `at`, the law's loss."""
    out = {"budgets": [], "points": []}
    fit, boot, law = result.fit, result.bootstrap, result.isoflop_law
    for c in budgets:
        entry = {"flops": float(c)}
        if fit:
            n_opt, d_opt = (float(x) for x in fit.compute_optimal(c))
            n_int, d_int = boot.compute_optimal(c) if boot else (None, None)
            entry["law"] = {"n_opt": n_opt, "n_interval": n_int, "d_opt": d_opt,
                            "d_interval": d_int, "loss": float(fit.predict(n_opt, d_opt)),
                            "loss_interval": boot.predict(n_opt, d_opt) if boot else None}
        if law:
            n_int, d_int = law.compute_optimal(c) if len(law.draws) else (None, None)
            entry["isoflop"] = {"n_opt": float(law.n_opt(c)), "n_interval": n_int,
                                "d_opt": float(law.d_opt(c)), "d_interval": d_int}
        out["budgets"].append(entry)
    for n, d in at if fit else ():
        out["points"].append({"n": float(n), "d": float(d), "loss": float(fit.predict(n, d)),
                              "loss_interval": boot.predict(n, d) if boot else None})
    return out


def format_comparison(fits: dict, metric: str = "", params: str = "", level: float = 0.9,
                      budgets=None, at=()) -> str:
    """Table of E, A, alpha, B, b per setting with bootstrap intervals, the IsoFLOP optima and
    laws, and the predictions (see `predictions`; budgets default to `default_budget`)."""
    head = (f"L(N, D) = E + A / N^alpha + B / D^b per loss setting"
            f"{f'; L = {metric}' if metric else ''}{f', N = {params}' if params else ''}, "
            f"D = tokens; [{level:.0%} bootstrap interval]")
    table = [["setting", "points", *PARAMS, "objective", "starts at best", "refits converged"]]
    notes = []
    for setting, result in fits.items():
        if result.fit is None:
            notes.append(f"{setting}: {result.note}")
            continue
        values, fit, boot = result.fit.params(), result.fit, result.bootstrap
        table.append([setting, str(len(result.points.loss)),
                      *(_with_interval(values[p], result.intervals.get(p)) for p in PARAMS),
                      f"{fit.objective:.3g}", f"{fit.starts_at_best}/{fit.starts}",
                      f"{boot.converged}/{boot.resamples - boot.degenerate}" if boot else "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [head] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                      for row in table] + notes
    lines += _isoflop_lines(fits)
    if budgets is None:
        budgets = [default_budget(fits)] if fits else []
    lines += _prediction_lines(fits, budgets, at, level)
    return "\n".join(lines) + "\n"


def _isoflop_lines(fits: dict) -> list:
    optima = [(s, o) for s, r in fits.items() for o in r.isoflop]
    if not optima:
        return []
    lines = ["", "IsoFLOP optima (parabola of L in log N per compute budget)",
             f"{'setting':<20} {'FLOPs':>10} {'N_opt':>12} {'L_opt':>9}  bracketed"]
    for setting, o in optima:
        lines.append(f"{setting:<20} {o['flops']:>10.3g} {o['n_opt']:>12.4g} "
                     f"{o['loss_opt']:>9.4f}  {'yes' if o['bracketed'] else 'no'}")
    for setting, r in fits.items():
        law = r.isoflop_law
        if law:
            lines.append(f"{setting}: IsoFLOP law N_opt = {law.coefficient:.4g} C^"
                         f"{_with_interval(law.exponent, law.exponent_interval)} "
                         f"(D_opt = C / 6 N_opt); {len(law.draws)} of {law.resamples} "
                         f"resamples usable (a resampled budget needs 3 distinct sizes and a "
                         f"minimum)")
    return lines


def _with_interval(value: float, interval, fmt: str = ".4g") -> str:
    text = format(value, fmt)
    if interval and all(math.isfinite(x) for x in interval):
        text += f" [{format(interval[0], fmt)}, {format(interval[1], fmt)}]"
    return text


def _prediction_lines(fits: dict, budgets, at, level: float) -> list:
    lines = []
    for setting, result in fits.items():
        if result.fit is None and result.isoflop_law is None:
            continue
        pred = predictions(result, budgets, at)
        for entry in pred["budgets"]:
            c = entry["flops"]
            if "law" in entry:
                e = entry["law"]
                lines.append(f"{setting}: at C = {c:.3g} FLOPs, law (approach 3): N_opt "
                             f"{_with_interval(e['n_opt'], e['n_interval'])}, D_opt "
                             f"{_with_interval(e['d_opt'], e['d_interval'])}, L "
                             f"{_with_interval(e['loss'], e['loss_interval'])}")
            if "isoflop" in entry:
                e = entry["isoflop"]
                lines.append(f"{setting}: at C = {c:.3g} FLOPs, IsoFLOP (approach 2): N_opt "
                             f"{_with_interval(e['n_opt'], e['n_interval'])}, D_opt "
                             f"{_with_interval(e['d_opt'], e['d_interval'])}")
        for e in pred["points"]:
            lines.append(f"{setting}: L(N = {e['n']:.3g}, D = {e['d']:.3g}) = "
                         f"{_with_interval(e['loss'], e['loss_interval'])}")
    if lines:
        lines = ["", f"Predictions [{level:.0%} bootstrap interval]"] + lines
    return lines


def fits_to_json(fits: dict, metric: str, params: str, points: str, budgets=None,
                 at=()) -> str:
    if budgets is None:
        budgets = [default_budget(fits)] if fits else []
    out = {"metric": metric, "params": params, "points": points, "settings": {}}
    for setting, r in fits.items():
        fit, boot, law = r.fit, r.bootstrap, r.isoflop_law
        out["settings"][setting] = {
            "points": int(len(r.points.loss)),
            "fit": (fit.params() | {"objective": fit.objective, "starts": fit.starts,
                                    "starts_at_best": fit.starts_at_best,
                                    "starts_converged": fit.starts_converged}) if fit else None,
            "intervals": r.intervals,
            "bootstrap": ({"resamples": boot.resamples, "degenerate": boot.degenerate,
                           "converged": boot.converged, "level": boot.level} if boot else None),
            "isoflop": r.isoflop,
            "isoflop_law": ({"exponent": law.exponent, "coefficient": law.coefficient,
                             "exponent_interval": law.exponent_interval} if law else None),
            "predictions": predictions(r, budgets, at),
            "note": r.note or r.isoflop_note}
    return json.dumps(out, indent=1, allow_nan=True) + "\n"
