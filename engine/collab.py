"""Latent-factor collaborative filtering on a small ratings block, as the lecture's sheets do it.

Shapes: ``ratings`` is (n_users, n_movies) with NaN where a user did not rate a movie;
``user_factors`` is (n_users, k); ``movie_factors`` is (n_movies, k); biases are 1-D.
"""

from dataclasses import dataclass

import numpy as np


# the models the torch engine trains at scale (engine.collab_nets builds them); named here,
# away from torch, so the command line can list them without importing it
MODEL_KINDS = ("dot", "dotbias", "nn", "embnn")


@dataclass
class LatentFactors:
    """The variables of the model: what Excel's Solver changes to lower the RMSE."""

    user_factors: np.ndarray
    movie_factors: np.ndarray
    user_bias: np.ndarray
    movie_bias: np.ndarray

    @classmethod
    def random(cls, n_users, n_movies, n_factors=5, seed=42):
        """Uniform draws in [0, 1), as the lecture's ``RAND()`` start; same seed, same numbers."""
        rng = np.random.default_rng(seed)
        movie_factors = rng.random((n_movies, n_factors))
        user_factors = rng.random((n_users, n_factors))
        movie_bias = rng.random(n_movies)
        user_bias = rng.random(n_users)
        return cls(user_factors, movie_factors, user_bias, movie_bias)


def predict(ratings, user_factors, movie_factors, user_bias=None, movie_bias=None):
    """Predicted ratings: factor dot product (plus biases), and 0 where the rating is blank.

    The zeros mirror the sheets' ``IF(rating="", 0, ...)`` so blanks add nothing to the loss.
    """
    ratings = np.asarray(ratings, dtype=np.float64)
    scores = np.asarray(user_factors) @ np.asarray(movie_factors).T
    if user_bias is not None:
        scores = scores + np.asarray(user_bias)[:, None]
    if movie_bias is not None:
        scores = scores + np.asarray(movie_bias)[None, :]

    return np.where(np.isnan(ratings), 0.0, scores)


def rmse(ratings, predictions):
    """Root mean squared error over the rated cells only (NaN ratings are skipped)."""
    ratings = np.asarray(ratings, dtype=np.float64)
    rated = ~np.isnan(ratings)
    errors = ratings[rated] - np.asarray(predictions, dtype=np.float64)[rated]
    return float(np.sqrt(np.mean(errors**2)))


def positions(ids, vocabulary):
    """1-based position of each id in ``vocabulary`` (an exact-match ``MATCH``).

    Raises ``KeyError`` naming the first id that is not in the vocabulary.
    """
    index = {}
    for pos, value in enumerate(vocabulary, start=1):
        index.setdefault(value, pos)  # MATCH returns the first of duplicate ids
    return np.array([index[value] for value in ids], dtype=np.int64)


def one_hot(positions_1based, n_rows):
    """(len(positions), n_rows) matrix with a single 1 per row at the given 1-based position."""
    rows = np.zeros((len(positions_1based), n_rows))
    rows[np.arange(len(positions_1based)), np.asarray(positions_1based) - 1] = 1.0
    return rows


def embedding_lookup(positions_1based, table):
    """Rows of ``table`` picked by position, computed as one-hot @ table.

    This is the lecture's point: looking an embedding up is the same as multiplying a one-hot
    vector by the factor matrix, so the result is exact, not just close.
    """
    table = np.asarray(table, dtype=np.float64)
    return one_hot(positions_1based, table.shape[0]) @ table
