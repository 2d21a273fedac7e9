"""Find, read and validate MovieLens 100K, and cut the lecture's dense ratings block from it.

The data is never bundled: it is found through an explicit folder, then the ``XLMIRROR_DATA``
environment variable (a folder holding ``ml-100k/``), then fastai's data folder, and as a last
resort downloaded with fastai's own ``untar_data``.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from engine.errors import InputError

ML_100K = "ml-100k"
DATA_ENV = "XLMIRROR_DATA"
RATINGS_FILE = "u.data"
TITLES_FILE = "u.item"
RATING_COLUMNS = ("user", "movie", "rating", "timestamp")

HOW_TO_PROVIDE = (
    f"pass --ratings DIR (a folder holding {RATINGS_FILE}, or one holding {ML_100K}/), "
    f"set {DATA_ENV} to a folder holding {ML_100K}/, or connect to the network so fastai "
    "can download it"
)


def fastai_data_folder():
    """fastai's configured data folder (``~/.fastai/data`` unless configured otherwise)."""
    from fastai.data.external import fastai_path  # imports torch: only when really needed

    return Path(fastai_path("data"))


def find_ml100k(explicit=None, environ=None, use_fastai=True):
    """Locate MovieLens 100K; returns the folder holding ``u.data``, or None if not found.

    Looks in ``explicit`` (named by ``--ratings``), then ``$XLMIRROR_DATA``, then fastai's data
    folder; see ``engine.releases.find_release``.
    """
    from engine.releases import find_release  # releases builds on this module's readers

    return find_release(ML_100K, explicit, environ, use_fastai, option="--ratings")


def download_ml100k():
    """Download and unpack MovieLens 100K with fastai's ``untar_data``; returns its folder."""
    try:
        from fastai.data.external import URLs, untar_data

        return Path(untar_data(URLs.ML_100k))
    except Exception as exc:  # no network, a proxy, a full disk: all end the same way for a user
        raise InputError(
            f"MovieLens 100K was not found and could not be downloaded ({exc.__class__.__name__}:"
            f" {exc}); {HOW_TO_PROVIDE}"
        ) from None


def load_ratings(folder):
    """Read ``u.data`` (tab separated: user, movie, rating, timestamp) and validate every line.

    Returns a DataFrame with integer columns ``user``, ``movie``, ``rating``, ``timestamp``.
    """
    path = Path(folder) / RATINGS_FILE
    try:
        table = pd.read_csv(
            path, sep="\t", header=None, dtype=str, keep_default_na=False,
            on_bad_lines="error",
        )
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; {HOW_TO_PROVIDE}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{path} is not MovieLens u.data (tab separated user, movie, rating, timestamp): {exc}"
        ) from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty; expected MovieLens ratings") from None

    if table.shape[1] != len(RATING_COLUMNS):
        raise InputError(
            f"{path} has {table.shape[1]} tab-separated columns, expected 4 "
            f"({', '.join(RATING_COLUMNS)})"
        )
    table.columns = RATING_COLUMNS

    numbers = table.apply(pd.to_numeric, errors="coerce")
    bad_rows = numbers.isna().any(axis=1) | (numbers % 1 != 0).any(axis=1)
    if bad_rows.any():
        line = int(np.flatnonzero(bad_rows.to_numpy())[0])
        raise InputError(
            f"{path} line {line + 1}: expected four whole numbers separated by tabs, "
            f"got {chr(9).join(table.iloc[line])!r}"
        )
    ratings = numbers.astype(np.int64)

    out_of_range = ~ratings["rating"].between(1, 5)
    if out_of_range.any():
        line = int(np.flatnonzero(out_of_range.to_numpy())[0])
        raise InputError(
            f"{path} line {line + 1}: rating {ratings['rating'].iloc[line]} is outside 1..5"
        )
    return ratings


def load_titles(folder):
    """Movie id -> title from ``u.item`` (pipe separated, latin-1). Missing file: empty dict."""
    path = Path(folder) / TITLES_FILE
    if not path.is_file():
        return {}

    titles = {}
    with open(path, encoding="latin-1") as lines:
        for number, line in enumerate(lines, start=1):
            fields = line.rstrip("\n").split("|")
            if len(fields) < 2 or not fields[0].strip().isdigit():
                raise InputError(
                    f"{path} line {number}: expected 'movie id|title|...', got {line[:60]!r}"
                )
            titles[int(fields[0])] = fields[1]
    return titles


@dataclass
class RatingsBlock:
    """The most active users x the most rated movies, as a dense block with NaN for blanks."""

    user_ids: np.ndarray  # (n_users,)
    movie_ids: np.ndarray  # (n_movies,)
    ratings: np.ndarray  # (n_users, n_movies) float64, NaN where not rated

    def long_form(self):
        """(user_id, movie_id, rating) rows in user-then-movie order, rated cells only."""
        rows, cols = np.nonzero(~np.isnan(self.ratings))
        return [
            (int(self.user_ids[r]), int(self.movie_ids[c]), float(self.ratings[r, c]))
            for r, c in zip(rows, cols)
        ]


def densest_block(ratings, n_users=15, n_movies=15):
    """The ``n_users`` users with most ratings x the ``n_movies`` most rated movies.

    Ties are broken by the smaller id so the block is deterministic; rows and columns are
    sorted by id, as a crosstab would show them.
    """
    n_found_users = ratings["user"].nunique()
    n_found_movies = ratings["movie"].nunique()
    if n_found_users < n_users or n_found_movies < n_movies:
        raise InputError(
            f"the ratings hold {n_found_users} users and {n_found_movies} movies; the sheets "
            f"need at least {n_users} users and {n_movies} movies: use the full MovieLens 100K "
            "u.data or smaller --users/--movies"
        )

    user_ids = _most_frequent(ratings["user"], n_users)
    movie_ids = _most_frequent(ratings["movie"], n_movies)

    inside = ratings[ratings["user"].isin(user_ids) & ratings["movie"].isin(movie_ids)]
    # a user who rated a movie twice keeps the last rating, as a pivot with 'last' would
    inside = inside.drop_duplicates(["user", "movie"], keep="last")
    block = inside.pivot(index="user", columns="movie", values="rating")
    block = block.reindex(index=user_ids, columns=movie_ids)
    return RatingsBlock(user_ids, movie_ids, block.to_numpy(dtype=np.float64))


def _most_frequent(ids, count):
    counts = ids.value_counts()
    order = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return np.array(sorted(id_ for id_, _ in order[:count]), dtype=np.int64)
