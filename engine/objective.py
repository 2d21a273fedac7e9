"""The sheet objective, its exact gradient, and the flat vector a scipy optimizer moves.

The sheet objective is what Excel's Solver minimises on the lecture's sheet: the RMSE over the
rated cells of ``predict(ratings, user_factors, movie_factors[, user_bias, movie_bias])``.

With ``R`` the set of rated cells, ``N = |R|``, prediction ``p_um`` and residual
``e_um = p_um - r_um``::

    rmse = sqrt(sum_R e_um**2 / N)
    d rmse / d p_um = e_um / (N * rmse)        on R, and 0 on blank cells

and the chain rule through ``p = user_factors @ movie_factors.T + user_bias + movie_bias``
gives each block's gradient (see ``rmse_and_gradient``).

Shapes: ``ratings`` (n_users, n_movies) with NaN for blanks; ``user_factors`` (n_users, k);
``movie_factors`` (n_movies, k); ``user_bias`` (n_users,); ``movie_bias`` (n_movies,).
"""

import numpy as np

from engine.collab import LatentFactors, predict
from engine.errors import InputError


def check_problem(ratings, factors, with_bias):
    """Validate a ratings block against starting factors; returns ratings as float64.

    This is where a user's input enters the fitting code, so every check lives here once.

    Parameters
    ----------
    ratings : array-like, (n_users, n_movies)
        Known ratings, NaN where a user did not rate a movie.
    factors : LatentFactors
        Starting values; their shapes must agree with ``ratings``.
    with_bias : bool
        Whether the biases are variables; when False they are not checked (they may be None).

    Raises
    ------
    InputError
        When shapes disagree, nothing is rated, or a value is not finite.
    """
    ratings = np.asarray(ratings, dtype=np.float64)
    if ratings.ndim != 2:
        raise InputError(
            f"ratings must be a 2-D (n_users, n_movies) block, got shape {ratings.shape}"
        )
    n_users, n_movies = ratings.shape

    rated = ~np.isnan(ratings)
    if not rated.any():
        raise InputError("ratings has no rated cell (all NaN): there is nothing to fit")
    if not np.isfinite(ratings[rated]).all():
        raise InputError("ratings holds an infinite value; use a number, or NaN for a blank")

    n_factors = np.shape(factors.user_factors)[-1] if np.ndim(factors.user_factors) else 0
    expected = {"user_factors": (n_users, n_factors), "movie_factors": (n_movies, n_factors)}
    if with_bias:
        expected.update(user_bias=(n_users,), movie_bias=(n_movies,))
    for name, shape in expected.items():
        value = np.asarray(getattr(factors, name), dtype=np.float64)
        if value.shape != shape:
            raise InputError(
                f"{name} has shape {value.shape}, expected {shape} for a {n_users} x "
                f"{n_movies} ratings block; start from LatentFactors.random({n_users}, "
                f"{n_movies}, k)"
            )
        if not np.isfinite(value).all():
            raise InputError(f"{name} holds a NaN or infinite value; start from finite numbers")

    return ratings


def rmse_and_gradient(ratings, factors, with_bias):
    """The sheet RMSE and its exact gradient with respect to every block of ``factors``.

    Parameters
    ----------
    ratings : array-like, (n_users, n_movies)
        Known ratings, NaN for blanks.
    factors : LatentFactors
        Where to evaluate.
    with_bias : bool
        Whether the biases are part of the model; when False they are ignored and their
        gradients are zeros.

    Returns
    -------
    rmse : float
        RMSE over the rated cells.
    gradient : LatentFactors
        d rmse / d block, each block shaped like its value in ``factors``. At rmse == 0 the
        square root has no derivative; the zero vector (a valid subgradient, the minimum) is
        returned.
    """
    ratings = check_problem(ratings, factors, with_bias)
    return _rmse_and_gradient(ratings, ~np.isnan(ratings), factors, with_bias)


def _rmse_and_gradient(ratings, rated, factors, with_bias):
    """``rmse_and_gradient`` without the checks, for an optimizer's inner loop."""
    biases = (factors.user_bias, factors.movie_bias) if with_bias else (None, None)
    predictions = predict(ratings, factors.user_factors, factors.movie_factors, *biases)

    # blanks: predict() already put 0 there, and NaN - 0 must not leak into the sums
    residuals = np.where(rated, predictions - ratings, 0.0)  # (n_users, n_movies)
    n_rated = np.count_nonzero(rated)
    rmse = float(np.sqrt(np.sum(residuals**2) / n_rated))

    if rmse == 0.0:
        scale = 0.0
    else:
        scale = 1.0 / (n_rated * rmse)
    d_predictions = residuals * scale  # d rmse / d p, (n_users, n_movies)

    # p = U @ M.T + bu[:, None] + bm[None, :]
    d_user_factors = d_predictions @ factors.movie_factors  # (n_users, k)
    d_movie_factors = d_predictions.T @ factors.user_factors  # (n_movies, k)
    if with_bias:
        d_user_bias = d_predictions.sum(axis=1)
        d_movie_bias = d_predictions.sum(axis=0)
    else:
        d_user_bias = np.zeros(len(ratings))
        d_movie_bias = np.zeros(ratings.shape[1])

    return rmse, LatentFactors(d_user_factors, d_movie_factors, d_user_bias, d_movie_bias)


def pack(factors, with_bias):
    """The variables as one flat float64 vector, for ``scipy.optimize.minimize``.

    Order (each block flattened row by row): movie_factors, user_factors, then, only when
    ``with_bias``, movie_bias, user_bias. The order is fixed: ``unpack`` relies on it.

    Returns
    -------
    ndarray, (n_movies*k + n_users*k [+ n_movies + n_users],)
        A new array; changing it does not change ``factors``.
    """
    blocks = [factors.movie_factors, factors.user_factors]
    if with_bias:
        blocks += [factors.movie_bias, factors.user_bias]
    return np.concatenate([np.asarray(block, dtype=np.float64).ravel() for block in blocks])


def unpack(vector, like, with_bias):
    """The inverse of ``pack``: cut ``vector`` back into blocks shaped like those of ``like``.

    When ``with_bias`` is False the vector holds no biases, and ``like``'s biases are copied
    into the result unchanged (None stays None).

    Returns
    -------
    LatentFactors
        New float64 arrays; they share no memory with ``vector`` or ``like``.
    """
    vector = np.asarray(vector, dtype=np.float64)
    names = ["movie_factors", "user_factors"] + (["movie_bias", "user_bias"] if with_bias else [])
    shapes = [np.shape(getattr(like, name)) for name in names]
    sizes = [int(np.prod(shape)) for shape in shapes]
    if vector.shape != (sum(sizes),):
        raise ValueError(
            f"vector has shape {vector.shape}, expected ({sum(sizes)},) for blocks {names} "
            f"with shapes {shapes}"
        )

    blocks = {}
    start = 0
    for name, shape, size in zip(names, shapes, sizes, strict=True):
        blocks[name] = vector[start:start + size].reshape(shape).copy()
        start += size

    for name in ("movie_bias", "user_bias"):
        if name not in blocks:
            value = getattr(like, name)
            blocks[name] = None if value is None else np.array(value, dtype=np.float64)
    return LatentFactors(**blocks)
