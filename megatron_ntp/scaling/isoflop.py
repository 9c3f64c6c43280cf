"""IsoFLOP fits (Hoffmann et al. 2022, approach 2).

For each compute budget, a parabola of the loss in log N through the runs of that budget; its
vertex is the compute-optimal size N_opt(C). A power law N_opt = k C^a through the vertices
(least squares in log-log) then predicts N_opt and D_opt = C / (6 N_opt) at other budgets.
Intervals come from resampling the runs within each budget (the sweep's design is kept: every
budget keeps its number of runs) and redoing both steps.
"""

from dataclasses import dataclass

import numpy as np


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


def _vertex(n, loss):
    """(x_opt = log N_opt, loss_opt, coefficients c2, c1, c0) of the parabola of loss in
    log N, or None when it has no minimum (c2 <= 0) or fewer than 3 distinct sizes."""
    if len(set(n)) < 3:
        return None
    x = np.log(n)
    c2, c1, c0 = np.polyfit(x, loss, 2)
    if c2 <= 0:
        return None  # no minimum: the budget's sizes do not bracket the optimum
    x_opt = -c1 / (2 * c2)
    return x_opt, c0 + c1 * x_opt + c2 * x_opt**2, (c2, c1, c0)


def isoflop_optima(n, flops, loss, *, budget_rtol: float = 0.05, labels=None):
    """Per compute budget: the parabola of loss in log N and its vertex.

    Budgets are formed by isoflop_groups (labels, else FLOPs within budget_rtol); budgets with
    fewer than 3 sizes are skipped. Returns a list of dicts {flops, n_opt, loss_opt, coeffs,
    bracketed} sorted by flops.
    """
    n, flops, loss = (np.asarray(x, float).ravel() for x in (n, flops, loss))
    optima = []
    for g in isoflop_groups(flops, budget_rtol=budget_rtol, labels=labels):
        vertex = _vertex(n[g], loss[g])
        if vertex is None:
            continue
        x_opt, loss_opt, coeffs = vertex
        optima.append({
            "flops": float(np.mean(flops[g])),
            "n_opt": float(np.exp(x_opt)),
            "loss_opt": float(loss_opt),
            "coeffs": tuple(float(c) for c in coeffs),
            "bracketed": bool(np.log(n[g]).min() <= x_opt <= np.log(n[g]).max()),
        })
    return optima


@dataclass(frozen=True)
class IsoflopLaw:
    """N_opt = coefficient * C^exponent through the IsoFLOP vertices, with bootstrap draws."""

    exponent: float  # a in N_opt ~ C^a (D_opt ~ C^(1 - a))
    coefficient: float  # k
    optima: list  # the vertices fitted (isoflop_optima's dicts)
    draws: np.ndarray  # [refits, 2]: exponent, log coefficient of each resample's fit
    level: float
    resamples: int
    degenerate: int  # resamples skipped: a budget lost its minimum, or fewer than 2 budgets left

    def n_opt(self, flops):
        return self.coefficient * np.asarray(flops, float) ** self.exponent

    def d_opt(self, flops):
        return np.asarray(flops, float) / (6 * self.n_opt(flops))

    def _interval(self, values) -> tuple:
        if len(self.draws) == 0:
            return (float("nan"), float("nan"))
        tail = (1 - self.level) / 2 * 100
        low, high = np.percentile(np.asarray(values, float), [tail, 100 - tail])
        return (float(low), float(high))

    @property
    def exponent_interval(self) -> tuple:
        return self._interval(self.draws[:, 0] if len(self.draws) else [])

    def compute_optimal(self, flops: float) -> tuple:
        """(interval of N_opt, interval of D_opt) at budget `flops`."""
        n_opts = np.exp(self.draws[:, 1]) * flops ** self.draws[:, 0] if len(self.draws) else []
        return self._interval(n_opts), self._interval(flops / (6 * np.asarray(n_opts)))


def _power_law(flops, n_opt):
    """(exponent, log coefficient) of log N_opt = exponent * log C + log coefficient."""
    exponent, log_coefficient = np.polyfit(np.log(flops), np.log(n_opt), 1)
    return float(exponent), float(log_coefficient)


def fit_isoflop_law(n, flops, loss, *, budget_rtol: float = 0.05, labels=None,
                    samples: int = 200, seed: int = 0, level: float = 0.9) -> IsoflopLaw:
    """Approach 2: vertices per budget, the power law through them, resampled `samples` times.

    Raises ValueError when fewer than 2 budgets have a parabola with a minimum."""
    n, flops, loss = (np.asarray(x, float).ravel() for x in (n, flops, loss))
    optima = isoflop_optima(n, flops, loss, budget_rtol=budget_rtol, labels=labels)
    if len(optima) < 2:
        raise ValueError(f"an IsoFLOP law needs at least 2 budgets with a minimum (3 or more "
                         f"sizes each, bracketing the optimum); got {len(optima)}")
    exponent, log_coefficient = _power_law([o["flops"] for o in optima],
                                           [o["n_opt"] for o in optima])
    groups = [g for g in isoflop_groups(flops, budget_rtol=budget_rtol, labels=labels)
              if _vertex(n[g], loss[g]) is not None]
    rng = np.random.default_rng(seed)
    draws, degenerate = [], 0
    for _ in range(samples):
        vertices = []
        for g in groups:
            pick = rng.choice(g, len(g))
            vertex = _vertex(n[pick], loss[pick])
            if vertex is not None:
                vertices.append((float(np.mean(flops[g])), float(np.exp(vertex[0]))))
        if len(vertices) < 2:
            degenerate += 1
            continue
        draws.append(_power_law(*zip(*vertices)))
    return IsoflopLaw(exponent, float(np.exp(log_coefficient)), optima,
                      np.array(draws, float).reshape(-1, 2), level, samples, degenerate)
