"""Fit the sheet's latent factors with scipy, the counterpart of Excel Solver's GRG Nonlinear.

Every engine (this one and ``engine.torch_collab``) returns a ``FitResult``, so their answers
can be put side by side: same start, same objective, different optimizer.

The sheet objective is not convex, and with k=5 factors on the lecture's 190 ratings it is
barely determined: from one start two correct optimizers can end in different minima, or
drift along a valley where a few factors grow without bound while the RMSE creeps down.
From ``LatentFactors.random(15, 15, 5, seed=42)`` with biases, scipy ends near 0.2126 and
torch L-BFGS at 0.2054. A small ``weight_decay`` makes the problem well posed; then both
reach the same minimum.
"""

import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from engine.collab import LatentFactors
from engine.objective import _rmse_and_gradient, check_problem, pack, unpack


@dataclass
class FitResult:
    """What one optimizer did from one start.

    Attributes
    ----------
    engine : str
        Who optimised, e.g. "scipy L-BFGS-B", "torch L-BFGS", "torch Adam".
    device : str
        Where the numbers were computed: "cpu" or "cuda:0".
    factors : LatentFactors
        The fitted values, numpy float64 on the host.
    start_rmse, final_rmse : float
        Sheet RMSE (rated cells only) at the start and at the returned factors.
    history : list of float
        RMSE after each iteration; ``history[0] == start_rmse``, ``history[-1] == final_rmse``.
    iterations : int
        Optimizer iterations taken (``len(history) - 1``).
    seconds : float
        Wall-clock time of the optimization, setup included.
    converged : bool or None
        True when the optimizer stopped on its own tolerance, False when it hit its iteration
        cap (or, for scipy, gave up in a line search) first; None for a fixed number of steps
        (Adam), where the question does not arise.
    """

    engine: str
    device: str
    factors: LatentFactors
    start_rmse: float
    final_rmse: float
    history: list = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    converged: bool | None = None


def fit_scipy(ratings, start, with_bias, max_iter=1000, tol=1e-12, weight_decay=0.0):
    """Minimise the sheet RMSE with L-BFGS-B and the analytic gradient.

    Parameters
    ----------
    ratings : array-like, (n_users, n_movies)
        Known ratings, NaN for blanks.
    start : LatentFactors
        Starting values; not modified.
    with_bias : bool
        Fit user and movie biases too; when False the biases are left as in ``start``.
    max_iter : int, default 1000
        Most L-BFGS-B iterations.
    tol : float, default 1e-12
        scipy's ``tol``: stop when the relative RMSE change of an iteration or the largest
        gradient component falls to it.
    weight_decay : float, default 0.0
        Adds ``weight_decay / 2 * sum(p**2)`` over the variables to the minimised function,
        the same penalty ``engine.torch_collab.fit_torch`` uses, so the two stay comparable.
        ``history`` and the RMSEs are the sheet RMSE alone. The sheet itself has none.

    Returns
    -------
    FitResult
        ``engine="scipy L-BFGS-B"``, ``device="cpu"``.
    """
    started = time.perf_counter()
    ratings = check_problem(ratings, start, with_bias)
    rated = ~np.isnan(ratings)

    def rmse_and_gradient_at(vector):
        factors = unpack(vector, start, with_bias)
        return _rmse_and_gradient(ratings, rated, factors, with_bias)

    def objective(vector):
        rmse, gradient = rmse_and_gradient_at(vector)
        penalty = weight_decay / 2 * (vector @ vector)
        return rmse + penalty, pack(gradient, with_bias) + weight_decay * vector

    # the callback only sees x; one more objective call per iteration is cheap at this size
    history = [rmse_and_gradient_at(pack(start, with_bias))[0]]

    def record(vector):
        history.append(rmse_and_gradient_at(vector)[0])

    result = minimize(
        objective, pack(start, with_bias), jac=True, method="L-BFGS-B", tol=tol,
        callback=record, options={"maxiter": max_iter},
    )

    return FitResult(
        engine="scipy L-BFGS-B", device="cpu", factors=unpack(result.x, start, with_bias),
        start_rmse=history[0], final_rmse=rmse_and_gradient_at(result.x)[0], history=history,
        iterations=int(result.nit), seconds=time.perf_counter() - started,
        converged=bool(result.success),
    )
