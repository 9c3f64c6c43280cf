"""Fit L(N, D) = E + A / N**alpha + B / D**b (the Chinchilla form) to measured losses.

The data exponent is called b (Hoffmann et al. write beta) so that it is not confused with the
loss knob beta of the shaped loss.

Method (Hoffmann et al. 2022, approach 3): in log space, log L = LSE(e, a - alpha log N,
log B - b log D) with E = exp(e), A = exp(a); minimise the Huber loss of the
residuals log L_hat - log L with L-BFGS-B from every point of a grid of starts, keep the best.
Every start runs to convergence (the objective is scaled so that L-BFGS-B's stopping test
means what it should, see `_scaled_objective`), and the fit says how many starts reached the
best objective. Confidence intervals come from refitting on bootstrap resamples of the runs;
the refits keep every draw, so predictions (loss at N, D; compute-optimal N, D) get intervals
too. IsoFLOP fits (approach 2) are in megatron_ntp/scaling/isoflop.py.
"""

import contextlib
import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

PARAMS = ("E", "A", "alpha", "B", "b")


@dataclass(frozen=True)
class ScalingFit:
    E: float
    A: float
    alpha: float
    B: float
    b: float
    objective: float  # Huber loss of the log residuals at the optimum
    starts: int = 1  # starting points tried
    starts_at_best: int = 1  # starts that ended at the best objective (within BEST_RTOL)
    starts_converged: int = 1  # starts whose L-BFGS-B run met its tolerances

    def predict(self, n, d):
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n**self.alpha + self.B / d**self.b

    def compute_optimal(self, flops):
        """(N_opt, D_opt) minimising the law at C = 6 N D (Hoffmann et al., eq. 4):
        N_opt = G (C/6)^(b/(alpha+b)), G = (alpha A / (b B))^(1/(alpha+b)), D_opt = C/(6 N_opt)."""
        flops = np.asarray(flops, float)
        exponent = self.b / (self.alpha + self.b)
        g = (self.alpha * self.A / (self.b * self.B)) ** (1 / (self.alpha + self.b))
        n_opt = g * (flops / 6) ** exponent
        return n_opt, flops / (6 * n_opt)

    def params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in PARAMS}


# Starts whose objective is within this relative distance of the best count as reaching it.
BEST_RTOL = 1e-6


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


def _objective(theta, log_n, log_d, log_loss, delta):
    """Huber loss of log residuals and its gradient in theta = (e, a, alpha, log B, b).

    log L_hat = LSE(e, a - alpha log N, log B - b log D), written out (scipy's logsumexp costs
    ~3x the rest; the fits evaluate this ~10^5 times)."""
    e, a, alpha, log_b, b = theta
    model_term = a - alpha * log_n  # [R]
    data_term = log_b - b * log_d  # [R]
    top = np.maximum(np.maximum(model_term, data_term), e)
    exp_e, exp_model, exp_data = np.exp(e - top), np.exp(model_term - top), np.exp(data_term - top)
    total = exp_e + exp_model + exp_data
    resid = top + np.log(total) - log_loss
    g = np.clip(resid, -delta, delta) / total  # d huber / d pred, over the softmax denominator
    g_model, g_data = g * exp_model, g * exp_data  # times d pred / d term (softmax weights)
    grad = np.array([g @ exp_e, g_model.sum(), -(g_model @ log_n), g_data.sum(),
                     -(g_data @ log_d)])
    abs_resid = np.abs(resid)
    huber = np.where(abs_resid <= delta, 0.5 * resid**2, delta * (abs_resid - 0.5 * delta))
    return float(huber.sum()), grad


def _scaled_objective(theta, log_n, log_d, log_loss, delta):
    """The objective divided by delta**2 (the Huber loss of residuals in units of delta).

    L-BFGS-B stops when the objective's drop is below ftol * max(|f|, 1): at the raw scale
    (~1e-3 for delta = 1e-3) that is an absolute 2e-9, reached while the parameters are still
    far from the optimum. Scaled, f is ~1e3 and the test is relative, as intended."""
    value, grad = _objective(theta, log_n, log_d, log_loss, delta)
    return value / delta**2, grad / delta**2


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
    """Best L-BFGS-B fit over the grid of starts. n: parameters, d: tokens, loss: final loss.

    Every start runs to convergence (objective scaled, see `_scaled_objective`); the result
    says how many starts converged and how many reached the best objective."""
    with single_threaded_blas():
        return _fit_scaling_law(n, d, loss, huber_delta, grid)


BOUNDS = [(None, None), (None, None), (0.0, 3.0), (None, None), (0.0, 3.0)]


def _fit_scaling_law(n, d, loss, huber_delta, grid) -> ScalingFit:
    n, d, loss = _check(n, d, loss)
    data = (np.log(n), np.log(d), np.log(loss), huber_delta)
    results = [minimize(_scaled_objective, np.array(start, float), args=data, jac=True,
                        method="L-BFGS-B", bounds=BOUNDS,
                        options={"maxiter": 20_000, "maxfun": 40_000})
               for start in (grid if grid is not None else default_grid())]
    best = min(results, key=lambda r: r.fun)
    at_best = sum(r.fun <= best.fun * (1 + BEST_RTOL) for r in results)
    e, a, alpha, log_b, b = best.x
    return ScalingFit(np.exp(e), np.exp(a), alpha, np.exp(log_b), b,
                      float(best.fun * huber_delta**2), starts=len(results),
                      starts_at_best=int(at_best),
                      starts_converged=sum(bool(r.success) for r in results))


@dataclass(frozen=True)
class BootstrapFit:
    """Refits of the law on resamples of the runs: percentile intervals of the parameters and
    of anything computed from them (predictions, compute-optimal sizes)."""

    draws: np.ndarray  # [refits, 5] E, A, alpha, B, b of each refit
    level: float  # e.g. 0.9 for 5th-95th percentile intervals
    resamples: int  # resamples drawn
    degenerate: int  # resamples skipped: fewer than 5 distinct (N, D) points
    converged: int  # refits whose best start met L-BFGS-B's tolerances

    def _fits(self):
        return [ScalingFit(*row, objective=float("nan")) for row in self.draws]

    def interval(self, values) -> tuple:
        """Percentile interval of per-refit values ([refits] or [refits, ...])."""
        if len(self.draws) == 0:
            return (float("nan"), float("nan"))
        tail = (1 - self.level) / 2 * 100
        low, high = np.percentile(np.asarray(values, float), [tail, 100 - tail], axis=0)
        return (low.tolist(), high.tolist())

    @property
    def intervals(self) -> dict:
        """{param: (low, high)}."""
        return {p: self.interval(self.draws[:, i] if len(self.draws) else [])
                for i, p in enumerate(PARAMS)}

    def predict(self, n, d) -> tuple:
        """Interval of the predicted loss at (n, d)."""
        return self.interval([fit.predict(n, d) for fit in self._fits()])

    def compute_optimal(self, flops) -> tuple:
        """(interval of N_opt, interval of D_opt) at compute budget `flops`."""
        optima = [fit.compute_optimal(flops) for fit in self._fits()]
        return (self.interval([o[0] for o in optima]), self.interval([o[1] for o in optima]))


def bootstrap_scaling_law(n, d, loss, *, samples: int = 200, seed: int = 0, level: float = 0.9,
                          huber_delta: float = 1e-3, grid=None, full: ScalingFit | None = None
                          ) -> BootstrapFit:
    """Refit the law on `samples` resamples (with replacement) of the runs.

    Each resample starts from the full-data optimum (`full`, fitted here when not given) and
    from two points around it, each run to convergence; a resample's optimum lies near that of
    the data, so this finds what the full grid would, for a fraction of the cost.
    """
    n, d, loss = _check(n, d, loss)
    if full is None:
        full = fit_scaling_law(n, d, loss, huber_delta=huber_delta, grid=grid)
    start = (np.log(full.E), np.log(full.A), full.alpha, np.log(full.B), full.b)
    local_grid = [start] + [tuple(s + j for s, j in zip(start, jitter))
                            for jitter in ((0.3, 1, 0.1, 1, 0.1), (-0.3, -1, -0.1, -1, -0.1))]
    rng = np.random.default_rng(seed)
    draws, degenerate, converged = [], 0, 0
    for _ in range(samples):
        pick = rng.integers(0, len(n), len(n))
        if len(set(zip(n[pick], d[pick]))) < 5:
            degenerate += 1  # a degenerate resample cannot identify 5 parameters
            continue
        fit = fit_scaling_law(n[pick], d[pick], loss[pick], huber_delta=huber_delta,
                              grid=local_grid)
        draws.append([fit.E, fit.A, fit.alpha, fit.B, fit.b])
        converged += fit.starts_converged > 0
    return BootstrapFit(np.array(draws, float).reshape(-1, len(PARAMS)), level, samples,
                        degenerate, converged)
