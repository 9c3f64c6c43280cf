"""Fit L(N, D) = E + A / N**alpha + B / D**b (the Chinchilla form) to measured losses.

The data exponent is called b (Hoffmann et al. write beta) so that it is not confused with the
loss knob beta of the shaped loss.

Method (Hoffmann et al. 2022, approach 3): in log space, log L = LSE(e, a - alpha log N,
log B - b log D) with E = exp(e), A = exp(a); minimise the Huber loss of the
residuals log L_hat - log L with L-BFGS-B from every point of a grid of starts, keep the best.
Confidence intervals come from refitting on bootstrap resamples of the runs.
IsoFLOP optima: for each compute budget, a parabola of loss in log N; its vertex is the
compute-optimal model size at that budget.
"""

import contextlib
import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

PARAMS = ("E", "A", "alpha", "B", "b")


@dataclass(frozen=True)
class ScalingFit:
    E: float
    A: float
    alpha: float
    B: float
    b: float
    objective: float  # Huber loss of the log residuals at the optimum

    def predict(self, n, d):
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n**self.alpha + self.B / d**self.b

    def params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in PARAMS}


def _check(n, d, loss):
    n, d, loss = (np.asarray(x, dtype=float).ravel() for x in (n, d, loss))
    if not len(n) == len(d) == len(loss):
        raise ValueError(f"N, D and L must have equal lengths, got {len(n)}, {len(d)}, {len(loss)}")
    for name, x in (("N", n), ("D", d), ("L", loss)):
        if not np.all(np.isfinite(x)) or np.any(x <= 0):
            bad = x[~(np.isfinite(x) & (x > 0))][0]
            raise ValueError(f"{name} values must be finite and positive, got {bad}")
    if len(n) < 5:
        raise ValueError(f"fitting 5 parameters needs at least 5 runs, got {len(n)}")
    return n, d, loss


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _huber_grad(r, delta):
    return np.clip(r, -delta, delta)


def _objective(theta, log_n, log_d, log_loss, delta):
    """Huber loss of log residuals and its gradient in theta = (e, a, alpha, log B, b)."""
    e, a, alpha, log_b, b = theta
    terms = np.stack([np.full_like(log_n, e), a - alpha * log_n, log_b - b * log_d])  # [3, R]
    pred = logsumexp(terms, axis=0)
    resid = pred - log_loss
    weights = np.exp(terms - pred)  # softmax over the three terms, d pred / d term
    g = _huber_grad(resid, delta)
    grad = np.array([
        np.sum(g * weights[0]),
        np.sum(g * weights[1]),
        np.sum(g * weights[1] * -log_n),
        np.sum(g * weights[2]),
        np.sum(g * weights[2] * -log_d),
    ])
    return np.sum(_huber(resid, delta)), grad


def default_grid():
    """Starting points (e, a, alpha, log B, b) in the spirit of Hoffmann et al."""
    return itertools.product(
        (0.0, 0.5, 1.0), (0.0, 5.0, 10.0), (0.2, 0.6), (0.0, 5.0, 10.0), (0.2, 0.6)
    )


@contextlib.contextmanager
def single_threaded_blas():
    """One BLAS thread while fitting: L-BFGS-B's 5-dimensional steps call LAPACK on tiny
    matrices, where OpenBLAS's thread hand-offs dominate (measured: a fit took 9.6 s with two
    threads on a busy 2-core machine, 1.5 s with one)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def fit_scaling_law(n, d, loss, *, huber_delta: float = 1e-3, grid=None) -> ScalingFit:
    """Best L-BFGS-B fit over the grid of starts. n: parameters, d: tokens, loss: final loss."""
    with single_threaded_blas():
        return _fit_scaling_law(n, d, loss, huber_delta, grid)


def _fit_scaling_law(n, d, loss, huber_delta, grid) -> ScalingFit:
    n, d, loss = _check(n, d, loss)
    data = (np.log(n), np.log(d), np.log(loss), huber_delta)
    bounds = [(None, None), (None, None), (0.0, 3.0), (None, None), (0.0, 3.0)]
    best = None
    for start in grid if grid is not None else default_grid():
        result = minimize(_objective, np.array(start, float), args=data, jac=True,
                          method="L-BFGS-B", bounds=bounds, options={"maxiter": 300})
        if best is None or result.fun < best.fun:
            best = result
    e, a, alpha, log_b, b = best.x
    return ScalingFit(np.exp(e), np.exp(a), alpha, np.exp(log_b), b, float(best.fun))


def bootstrap_scaling_law(n, d, loss, *, samples: int = 200, seed: int = 0, level: float = 0.9,
                          huber_delta: float = 1e-3, grid=None) -> dict:
    """{param: (low, high)} percentile intervals from refits on resampled runs.

    Each resample refits from the full-data optimum and a small grid (much cheaper than the
    full grid, and the optimum of a resample lies near that of the data).
    """
    n, d, loss = _check(n, d, loss)
    full = fit_scaling_law(n, d, loss, huber_delta=huber_delta, grid=grid)
    start = (np.log(full.E), np.log(full.A), full.alpha, np.log(full.B), full.b)
    local_grid = [start] + [tuple(s + j for s, j in zip(start, jitter))
                            for jitter in ((0.3, 1, 0.1, 1, 0.1), (-0.3, -1, -0.1, -1, -0.1))]
    rng = np.random.default_rng(seed)
    draws = {p: [] for p in PARAMS}
    for _ in range(samples):
        pick = rng.integers(0, len(n), len(n))
        if len(set(zip(n[pick], d[pick]))) < 5:
            continue  # a degenerate resample cannot identify 5 parameters
        fit = fit_scaling_law(n[pick], d[pick], loss[pick], huber_delta=huber_delta, grid=local_grid)
        for p, v in fit.params().items():
            draws[p].append(v)
    tail = (1 - level) / 2 * 100
    if not draws["E"]:  # every resample was degenerate (too few distinct runs)
        return {p: (float("nan"), float("nan")) for p in PARAMS}
    return {p: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
            for p, v in draws.items()}


def isoflop_groups(flops, *, budget_rtol: float = 0.05, labels=None) -> list[list[int]]:
    """Indices of the runs of each compute budget, by increasing FLOPs: runs with the same label
    (e.g. the planned FLOP budget, which the runs' step rounding misses by a little), else runs
    whose FLOPs agree within budget_rtol of the smallest of the group."""
    flops = np.asarray(flops, float).ravel()
    if labels is not None:
        labels = list(labels)
        by_label = {}
        for i, label in enumerate(labels):
            by_label.setdefault(label, []).append(i)
        return sorted(by_label.values(), key=lambda g: float(np.mean(flops[g])))
    order = np.argsort(flops)
    groups, current = [], [order[0]]
    for i in order[1:]:
        if abs(flops[i] - flops[current[0]]) <= budget_rtol * flops[current[0]]:
            current.append(i)
        else:
            groups.append(current)
            current = [i]
    groups.append(current)
    return groups


def isoflop_optima(n, flops, loss, *, budget_rtol: float = 0.05, labels=None):
    """Per compute budget: the parabola of loss in log N and its vertex.

    Budgets are formed by isoflop_groups (labels, else FLOPs within budget_rtol); budgets with
    fewer than 3 sizes are skipped. Returns a list of dicts {flops, n_opt, loss_opt, coeffs,
    bracketed} sorted by flops.
    """
    n, flops, loss = (np.asarray(x, float).ravel() for x in (n, flops, loss))
    groups = isoflop_groups(flops, budget_rtol=budget_rtol, labels=labels)
    optima = []
    for g in groups:
        if len(set(n[g])) < 3:
            continue
        x = np.log(n[g])
        c2, c1, c0 = np.polyfit(x, loss[g], 2)
        if c2 <= 0:
            continue  # no minimum: the budget's sizes do not bracket the optimum
        x_opt = -c1 / (2 * c2)
        optima.append({
            "flops": float(np.mean(flops[g])),
            "n_opt": float(np.exp(x_opt)),
            "loss_opt": float(c0 + c1 * x_opt + c2 * x_opt**2),
            "coeffs": (float(c2), float(c1), float(c0)),
            "bracketed": bool(x.min() <= x_opt <= x.max()),
        })
    return optima
