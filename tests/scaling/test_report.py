"""Fits per loss setting from a sweep table (megatron_ntp.scaling.report), the comparison
table and the plots, on synthetic sweeps drawn from known laws."""

import csv
import json
import os

import numpy as np
import pytest

from megatron_ntp.scaling.plots import write_plots
from megatron_ntp.scaling.report import (
    fit_points,
    fit_settings,
    fits_to_json,
    format_comparison,
    read_table,
)

LAW = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "b": 0.28}
# the question a sweep answers: does a setting move the exponents or only the constants?
SETTINGS = {"cross_entropy": LAW, "constant_shift": {**LAW, "E": 1.79},
            "steeper": {**LAW, "alpha": 0.40, "A": 900.0}}


def _law(p, n, d):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["b"]


def _table(noise=0.004, seed=0, sizes=8, budgets=6):
    rng = np.random.default_rng(seed)
    rows = []
    for setting, p in SETTINGS.items():
        for n in np.geomspace(2e7, 2e9, sizes):
            for d in np.geomspace(4e8, 4e11, budgets):
                steps = 10
                run = f"{setting}-{n:.3g}-{d:.3g}"
                for step in range(1, steps + 1):  # numbered as in metrics.jsonl
                    tokens = d * step / steps
                    loss = _law(p, n, tokens) * np.exp(rng.normal(0, noise))
                    rows.append({"run": run, "model": f"{n:.3g}", "setting": setting,
                                 "budget_kind": "tokens", "budget": d, "steps": steps,
                                 "final": int(step == steps), "complete": 1, "step": step,
                                 "tokens_seen": tokens, "flops_seen": 6 * n * tokens,
                                 "params_non_embedding": n, "params_active": n,
                                 "params_total": n, "ce": loss, "valid_ce": loss,
                                 "entropy": loss + 0.5, "valid_entropy": loss + 0.5})
    return rows


def test_settings_are_told_apart_by_constant_or_exponent():
    rows = _table()
    points = fit_points(rows, "valid_ce", points="final")
    assert {s: len(p.loss) for s, p in points.items()} == {s: 48 for s in SETTINGS}
    fits = fit_settings(points, bootstrap=0)
    base, shifted, steeper = (fits[s].fit for s in ("cross_entropy", "constant_shift", "steeper"))
    for fit in (base, shifted):
        assert fit.alpha == pytest.approx(0.34, abs=0.04)
        assert fit.b == pytest.approx(0.28, abs=0.04)
    assert shifted.E - base.E == pytest.approx(0.10, abs=0.04)
    assert steeper.alpha == pytest.approx(0.40, abs=0.04)
    assert steeper.b == pytest.approx(0.28, abs=0.04)


def test_comparison_table_json_and_plots(tmp_path):
    rows = _table(sizes=5, budgets=4)
    # write and read back through the CSV the sweep collects
    path = _write_csv(rows, tmp_path / "t.csv")
    table = read_table(str(path))
    assert table[0]["setting"] == "cross_entropy" and isinstance(table[0]["ce"], float)

    curve = fit_points(table, "auto", points="curve", min_fraction=0.5)
    assert len(curve["steeper"].loss) == 20 * 6  # steps 5..10 of 20 runs
    # a table collected before steps were numbered from 1 (steps 0..9) gives the same points
    numbered_from_zero = [{**row, "step": row["step"] - 1} for row in table]
    old = fit_points(numbered_from_zero, "auto", points="curve", min_fraction=0.5)
    assert old["steeper"].loss.tolist() == curve["steeper"].loss.tolist()
    final = fit_points(table, "auto", points="final")
    fits = fit_settings(curve, bootstrap=10, final_points=final)
    text = format_comparison(fits, "valid_ce", "params_non_embedding", budgets=[1e21],
                             at=[(1e9, 2e10)])
    assert "constant_shift" in text and "alpha" in text and "[" in text
    assert "at C = 1e+21 FLOPs, law (approach 3): N_opt" in text
    assert "IsoFLOP law N_opt" in text and "L(N = 1e+09, D = 2e+10) = " in text
    saved = json.loads(fits_to_json(fits, "valid_ce", "params_non_embedding", "curve",
                                    budgets=[1e21], at=[(1e9, 2e10)]))
    assert set(saved["settings"]) == set(SETTINGS)
    for entry in saved["settings"].values():
        assert set(entry["fit"]) == {"E", "A", "alpha", "B", "b", "objective", "starts",
                                     "starts_at_best", "starts_converged"}
        assert entry["bootstrap"]["resamples"] == 10
        low, high = entry["intervals"]["alpha"]
        assert low <= entry["fit"]["alpha"] <= high or high - low < 1e-3
        budget = entry["predictions"]["budgets"][0]
        law = budget["law"]
        assert law["n_interval"][0] <= law["n_opt"] <= law["n_interval"][1]
        assert 6 * law["n_opt"] * law["d_opt"] == pytest.approx(1e21)
        assert budget["isoflop"]["n_opt"] > 0 and entry["isoflop_law"]["exponent"] > 0
        point = entry["predictions"]["points"][0]
        assert point["loss_interval"][0] <= point["loss"] <= point["loss_interval"][1]
    paths = write_plots(table, fits, str(tmp_path / "plots"), "valid_ce", "valid_entropy",
                        "params_non_embedding")
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 10_000


def test_too_few_points_are_reported_not_fitted():
    rows = [r for r in _table(sizes=2, budgets=2) if r["setting"] == "cross_entropy"]
    fits = fit_settings(fit_points(rows, "ce"), bootstrap=5)
    assert fits["cross_entropy"].fit is None
    assert "4 points, 5 parameters need at least 5" in format_comparison(fits)


def test_isoflop_groups_by_planned_flop_budget():
    rows = []
    for c in (1e18, 1e19):
        for n in np.geomspace(1e7, 1e10, 7):
            d = c / (6 * n) * (1 + 0.01 * np.log10(n))  # step rounding: FLOPs off by ~1-10%
            rows.append({"run": f"{c}-{n}", "setting": "s", "budget_kind": "flops", "budget": c,
                         "steps": 1, "final": 1, "step": 1, "tokens_seen": d,
                         "flops_seen": 6 * n * d, "params_non_embedding": n,
                         "ce": _law(LAW, n, d)})
    fits = fit_settings(fit_points(rows, "ce"), bootstrap=0)
    optima = fits["s"].isoflop
    assert [o["flops"] for o in optima] == pytest.approx([1e18, 1e19], rel=0.1)
    assert all(o["bracketed"] for o in optima)
    assert optima[1]["n_opt"] > optima[0]["n_opt"]  # more compute, larger optimal model


def test_sweep_fit_cli_prints_predictions_with_intervals(tmp_path, capsys):
    from megatron_ntp.cli import main

    path = _write_csv(_table(sizes=5, budgets=4), tmp_path / "sweep_metrics.csv")
    assert main(["sweep", "fit", str(path), "--bootstrap", "5", "--budget", "1e21",
                 "--predict", "1e9:2e10", "--out", str(tmp_path / "fit")]) == 0
    text = capsys.readouterr().out
    assert "at C = 1e+21 FLOPs, law (approach 3): N_opt" in text
    assert "L(N = 1e+09, D = 2e+10) = " in text
    saved = json.loads((tmp_path / "fit" / "fits.json").read_text())
    assert saved["settings"]["steeper"]["predictions"]["points"][0]["n"] == 1e9
    assert main(["sweep", "fit", str(path), "--predict", "1e9"]) == 2
    assert "--predict '1e9': expected N:D" in capsys.readouterr().err


def _write_csv(rows: list[dict], path):
    """`rows` as the CSV `megatron-ntp sweep collect` writes; returns `path`."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
