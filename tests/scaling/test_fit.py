import numpy as np
import pytest

from megatron_ntp.scaling import bootstrap_scaling_law, fit_scaling_law, isoflop_optima

TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "b": 0.28}  # Hoffmann et al.


def _synthetic(noise, seed=0):
    rng = np.random.default_rng(seed)
    n = np.repeat(np.geomspace(2e7, 2e9, 8), 6)
    d = np.tile(np.geomspace(4e8, 4e11, 6), 8)
    clean = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["b"]
    return n, d, clean * np.exp(rng.normal(0, noise, clean.shape))


def test_fit_recovers_known_parameters_from_noisy_data():
    n, d, loss = _synthetic(noise=0.005)
    fit = fit_scaling_law(n, d, loss)
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=0.04)
    assert fit.b == pytest.approx(TRUE["b"], abs=0.04)
    assert fit.E == pytest.approx(TRUE["E"], rel=0.05)
    held_out = fit.predict(1e10, 2e12)
    truth = TRUE["E"] + TRUE["A"] / 1e10 ** TRUE["alpha"] + TRUE["B"] / 2e12 ** TRUE["b"]
    assert held_out == pytest.approx(truth, rel=0.02)


def test_fit_is_robust_to_an_outlier():
    n, d, loss = _synthetic(noise=0.002, seed=1)
    loss[5] *= 1.5  # a diverged run
    fit = fit_scaling_law(n, d, loss)
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=0.04)


def test_bootstrap_intervals_cover_truth():
    n, d, loss = _synthetic(noise=0.005, seed=2)
    intervals = bootstrap_scaling_law(n, d, loss, samples=25, seed=0, level=0.95)
    for p in ("alpha", "b"):
        low, high = intervals[p]
        assert low < high
        assert low - 0.03 <= TRUE[p] <= high + 0.03


def test_isoflop_vertex_matches_the_analytic_optimum():
    # at fixed C = 6 N D, L(N) = E + A N^-alpha + B (C / 6N)^-beta has a known minimiser
    budgets = [1e19, 1e20, 1e21]
    rows = []
    for c in budgets:
        for n in np.geomspace(1e7, 1e11, 25):
            d = c / (6 * n)
            rows.append((n, c, TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["b"]))
    n, flops, loss = map(np.array, zip(*rows))
    optima = isoflop_optima(n, flops, loss)
    assert [o["flops"] for o in optima] == pytest.approx(budgets)
    a, b = TRUE["alpha"], TRUE["b"]
    for o in optima:
        grid = np.geomspace(1e7, 1e11, 20001)
        exact = grid[np.argmin(TRUE["A"] / grid**a + TRUE["B"] / (o["flops"] / (6 * grid)) ** b)]
        assert o["bracketed"]
        assert np.log(o["n_opt"]) == pytest.approx(np.log(exact), abs=0.35)  # parabola in log N


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="L values must be finite and positive, got -1"):
        fit_scaling_law([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 1, 1, 1, -1])
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_scaling_law([1, 2], [1, 2], [1, 2])
