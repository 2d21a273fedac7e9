"""Fit the sheet's latent factors with scipy, the counterpart of Excel Solver's GRG Nonlinear.

Every engine (this one and ``engine.torch_collab``) returns a ``FitResult``, so their answers
can be put side by side: same start, same objective, different optimizer.
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
    """

    engine: str
    device: str
    factors: LatentFactors
    start_rmse: float
    final_rmse: float
    history: list = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0


def fit_scipy(ratings, start, with_bias, max_iter=1000, tol=1e-12):
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

    Returns
    -------
    FitResult
        ``engine="scipy L-BFGS-B"``, ``device="cpu"``.
    """
    started = time.perf_counter()
    ratings = check_problem(ratings, start, with_bias)
    rated = ~np.isnan(ratings)

    def objective(vector):
        factors = unpack(vector, start, with_bias)
        rmse, gradient = _rmse_and_gradient(ratings, rated, factors, with_bias)
        return rmse, pack(gradient, with_bias)

    # the callback only sees x; one more objective call per iteration is cheap at this size
    history = [objective(pack(start, with_bias))[0]]

    def record(vector):
        history.append(objective(vector)[0])

    result = minimize(
        objective, pack(start, with_bias), jac=True, method="L-BFGS-B", tol=tol,
        callback=record, options={"maxiter": max_iter},
    )

    factors = unpack(result.x, start, with_bias)
    final_rmse = _rmse_and_gradient(ratings, rated, factors, with_bias)[0]
    return FitResult(
        engine="scipy L-BFGS-B", device="cpu", factors=factors, start_rmse=history[0],
        final_rmse=final_rmse, history=history, iterations=int(result.nit),
        seconds=time.perf_counter() - started,
    )
