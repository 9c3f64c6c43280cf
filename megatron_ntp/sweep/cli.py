"""The `megatron-ntp sweep plan|submit|collect|fit` subcommands (registered by megatron_ntp.cli)."""

import os

from megatron_ntp.cli import fail as _fail
from megatron_ntp.config import ConfigError


def add_commands(commands) -> None:
    _add_sweep(commands)


# --------------------------------------------------------------------------------------------
# megatron-ntp sweep
# --------------------------------------------------------------------------------------------
def _add_sweep(commands):
    sweep = commands.add_parser(
        "sweep", help="scaling-law sweeps on Slurm: plan, submit, collect, fit",
        description="Scaling-law sweeps: `plan` writes a run folder per (model, loss setting, "
                    "budget) of a sweep spec (examples/sweeps/), `submit` submits the runs that "
                    "are neither complete nor queued, `collect` gathers the metrics into one "
                    "CSV, `fit` fits L(N, D) per loss setting and draws the plots.")
    sub = sweep.add_subparsers(dest="sweep_command", metavar="STEP")
    sweep.set_defaults(run=lambda args: sweep.print_help() or 2)  # no step given

    plan = sub.add_parser("plan", help="write the run folders and the sweep manifest")
    plan.add_argument("spec", help="sweep spec YAML (format: megatron_ntp/sweep/spec.py)")
    plan.add_argument("--root", default=None, help="folder of the runs (default: spec's root)")
    plan.add_argument("--dry-run", action="store_true",
                      help="validate and print the runs; write nothing")
    plan.set_defaults(run=_run_plan)

    submit = sub.add_parser("submit", help="submit the runs that need a job (idempotent)")
    submit.add_argument("root", help="the sweep folder (holding sweep_manifest.json)")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch commands")
    submit.set_defaults(run=_run_sweep_submit)

    collect = sub.add_parser("collect", help="per-step metrics of every run into one CSV")
    collect.add_argument("root")
    collect.add_argument("--out", default=None, help="default: ROOT/sweep_metrics.csv")
    collect.set_defaults(run=_run_collect)

    fit = sub.add_parser("fit", help="scaling-law fit per loss setting, comparison, plots")
    fit.add_argument("table", help="the CSV of `sweep collect`, or the sweep folder")
    fit.add_argument("--out", default=None, help="folder of fits.json and the PNGs "
                                                 "(default: beside the table, fit/)")
    fit.add_argument("--metric", default="auto",
                     help="loss column: auto (valid_ce if every run has it, else ce) or a column")
    fit.add_argument("--params", default="params_non_embedding",
                     choices=("params_non_embedding", "params_active", "params_total"))
    fit.add_argument("--points", default="final", choices=("final", "curve"),
                     help="final: one point per run; curve: every step from --min-fraction on")
    fit.add_argument("--min-fraction", type=float, default=0.25)
    fit.add_argument("--bootstrap", type=int, default=200, help="resamples (0: no intervals)")
    fit.add_argument("--level", type=float, default=0.9, help="interval level")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--budget", type=float, action="append", default=None,
                     help="compute budget (FLOPs) to predict the compute-optimal N, D and loss "
                          "at, with intervals; repeatable (default: 10x the sweep's largest)")
    fit.add_argument("--predict", action="append", default=[], metavar="N:D",
                     help="predict the loss at N parameters and D tokens, e.g. 1e9:2e10; "
                          "repeatable")
    fit.set_defaults(run=_run_fit)


def _run_plan(args):
    from megatron_ntp.sweep.plan import format_plan_table, plan_sweep, write_sweep
    from megatron_ntp.sweep.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec, args.root)
        runs = plan_sweep(spec, prepare_data=not args.dry_run)
        print(format_plan_table(runs), end="")
        if args.dry_run:
            print(f"{len(runs)} runs (dry run: nothing written; root {spec.root})")
            return 0
        created = write_sweep(spec, runs)
    except (SpecError, ConfigError) as err:
        return _fail("sweep plan", err)
    print(f"{len(runs)} runs in {spec.root} ({len(created)} new, "
          f"{len(runs) - len(created)} already planned); manifest {spec.root}/sweep_manifest.json")
    return 0


def _run_sweep_submit(args):
    from megatron_ntp.jobs.slurm import SlurmError
    from megatron_ntp.sweep.spec import SpecError
    from megatron_ntp.sweep.submit import submit_sweep

    try:
        submit_sweep(args.root, dry_run=args.dry_run)
    except SpecError as err:
        return _fail("sweep submit", err)
    except SlurmError as err:
        return _fail("sweep submit", err, 1)
    return 0


def _run_collect(args):
    from megatron_ntp.sweep.collect import collect
    from megatron_ntp.sweep.spec import SpecError

    try:
        path, rows, missing = collect(args.root, args.out)
    except (SpecError, ValueError) as err:
        return _fail("sweep collect", err)
    runs = len({r["run"] for r in rows})
    complete = len({r["run"] for r in rows if r["complete"]})
    print(f"{path}: {len(rows)} rows from {runs} runs ({complete} complete)"
          + (f"; no metrics yet: {', '.join(missing)}" if missing else ""))
    return 0


def _parse_n_d(text: str) -> tuple:
    """--predict N:D -> (N, D), both positive numbers."""
    try:
        n, d = (float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--predict {text!r}: expected N:D, e.g. 1e9:2e10") from None
    if not (n > 0 and d > 0):
        raise ValueError(f"--predict {text!r}: N and D must be positive")
    return n, d


def _run_fit(args):
    from megatron_ntp.scaling.plots import write_plots
    from megatron_ntp.scaling.report import (
        fit_points,
        fit_settings,
        fits_to_json,
        format_comparison,
        read_table,
        resolve_metric,
    )
    from megatron_ntp.files import write_atomic

    table = args.table
    if os.path.isdir(table):
        table = os.path.join(table, "sweep_metrics.csv")
    if not os.path.isfile(table):
        return _fail("sweep fit", f"{table} does not exist (run `megatron-ntp sweep collect`)")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(table)), "fit")
    try:
        at = [_parse_n_d(text) for text in args.predict]
        rows = read_table(table)
        metric = resolve_metric(rows, args.metric)
        entropy = "valid_entropy" if metric.startswith("valid_") else "entropy"
        points = fit_points(rows, metric, args.params, args.points, args.min_fraction)
        final = fit_points(rows, metric, args.params, "final")
        if not points:
            return _fail("sweep fit", f"{table}: no run has a value of {metric} to fit "
                                      f"(points={args.points}; with final, only runs that "
                                      f"reached their last step count)")
        fits = fit_settings(points, bootstrap=args.bootstrap, level=args.level, seed=args.seed,
                            final_points=final)
    except ValueError as err:
        return _fail("sweep fit", err)
    print(format_comparison(fits, metric, args.params, args.level, args.budget, at), end="")
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "fits.json"), fits_to_json(fits, metric, args.params,
                                                              args.points, args.budget, at))
    paths = write_plots(rows, fits, out, metric, entropy, args.params)
    print(f"wrote {os.path.join(out, 'fits.json')}, " + ", ".join(paths))
    return 0
