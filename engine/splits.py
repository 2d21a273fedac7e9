"""Train/validation splits of a ratings table, and the vocabularies that turn ids into rows.

``random_split`` picks the same validation rows as fastai's ``RandomSplitter`` for the same
seed, and ``Vocabulary`` numbers ids the way fastai's ``Categorify`` does (sorted, with index 0
for an id never seen in training), so an embedding table built here lines up row for row with
the one a fastai ``collab_learner`` builds from the same data.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from engine.errors import InputError
from engine.releases import RELEASES, find_release, read_ratings

UNKNOWN = "#na#"  # fastai's name for row 0 of every embedding table
CANONICAL_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")


class Vocabulary:
    """Raw ids -> contiguous indices: the sorted known ids get 1..n, anything else gets 0.

    Parameters
    ----------
    raw_ids : array-like
        The ids seen in training (user ids, movie ids or titles); repeats are fine and missing
        values (NaN, None) are left out, as fastai leaves them out.
    """

    def __init__(self, raw_ids):
        known = pd.Series(np.asarray(raw_ids)).dropna().unique()
        self.ids = np.sort(known)  # (n_known,) in the order fastai's CategoryMap sorts them
        self._positions = pd.Index(self.ids)  # a hash table: encode is O(n), not O(n log n)

    def __len__(self):
        """Rows an embedding table needs: the known ids and row 0 for unknown ones."""
        return len(self.ids) + 1

    def __contains__(self, raw_id):
        return raw_id in self._positions

    def __repr__(self):
        return f"Vocabulary({len(self.ids)} ids + {UNKNOWN})"

    @property
    def classes(self):
        """The list fastai shows as ``dls.classes[name]``: ``'#na#'`` then the sorted ids."""
        return [UNKNOWN, *self.ids.tolist()]

    def encode(self, raw_ids):
        """Indices (int64, the shape of ``raw_ids``); an id not in the vocabulary gives 0."""
        raw_ids = np.asarray(raw_ids)
        positions = self._positions.get_indexer(raw_ids.ravel())  # -1 where unknown
        return (positions + 1).astype(np.int64).reshape(raw_ids.shape)

    def decode(self, indices):
        """The raw ids at ``indices`` (1..n); index 0 has no raw id and is an error."""
        indices = np.asarray(indices, dtype=np.int64)
        outside = (indices < 1) | (indices >= len(self))
        if outside.any():
            raise ValueError(
                f"index {indices[outside].flat[0]} has no raw id: known ids have indices "
                f"1..{len(self) - 1}, and 0 stands for every unknown id"
            )
        return self.ids[indices - 1]


def random_split(ratings, valid_pct=0.2, seed=None):
    """Split rows at random exactly as fastai's ``RandomSplitter(valid_pct, seed)`` does.

    fastai seeds torch, draws ``torch.randperm(len(ratings))`` and takes the first
    ``int(valid_pct * len(ratings))`` positions for validation. The same draw is made here from
    a private generator, so torch's global random state is left alone (fastai reseeds it).

    Parameters
    ----------
    ratings : pandas.DataFrame
        (n_ratings, ...) any columns.
    valid_pct : float
        The share of rows for validation, 0 <= valid_pct < 1.
    seed : int, optional
        None draws from torch's global generator, as fastai does without a seed.

    Returns
    -------
    (train, valid) : pair of pandas.DataFrame
        The rows in the order of the draw, as fastai's ``TabularPandas`` holds them, with
        their original index labels.
    """
    if not 0 <= valid_pct < 1:
        raise InputError(f"the validation share must be in [0, 1), got {valid_pct}")

    import torch  # takes a second or two to import; only splitting needs it

    if seed is None:
        order = torch.randperm(len(ratings))
    else:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(ratings), generator=generator)
    order = order.numpy()

    n_valid = int(valid_pct * len(ratings))
    return ratings.iloc[order[n_valid:]], ratings.iloc[order[:n_valid]]


def canonical_split(folder, name):
    """One of the train/test splits that ship with MovieLens 100K, as ``(train, test)``.

    ``u1``..``u5`` are the five folds of a 80%/20% cross-validation (each rating is in exactly
    one ``uN.test``); ``ua`` and ``ub`` hold out exactly 10 ratings of every user.

    Parameters
    ----------
    folder : path-like
        The ml-100k folder, or a folder holding it.
    name : str
        One of ``CANONICAL_SPLITS``.

    Returns
    -------
    (train, test) : pair of pandas.DataFrame
        Columns user, movie, rating, timestamp as ``engine.releases.load_release`` gives them.
    """
    if name not in CANONICAL_SPLITS:
        raise InputError(
            f"unknown MovieLens 100K split {name!r}: choose one of {', '.join(CANONICAL_SPLITS)}"
        )

    release = RELEASES["ml-100k"]
    folder = find_release(release.name, explicit=Path(folder))
    train = read_ratings(folder / f"{name}.base", release)
    test = read_ratings(folder / f"{name}.test", release)
    return train, test


@dataclass
class EncodedSplit:
    """A split as index arrays ready for embedding lookups; vocabularies from training."""

    users: Vocabulary
    movies: Vocabulary
    train_users: np.ndarray  # (n_train,) int64, 1..len(users) - 1
    train_movies: np.ndarray  # (n_train,) int64
    train_ratings: np.ndarray  # (n_train,) float32
    valid_users: np.ndarray  # (n_valid,) int64, 0 for a user never seen in training
    valid_movies: np.ndarray  # (n_valid,) int64, 0 for a movie never seen in training
    valid_ratings: np.ndarray  # (n_valid,) float32


def encode_split(train, valid, user="user", movie="movie", rating="rating", like_fastai=False):
    """Number users and movies from the training rows and encode both parts with them.

    Parameters
    ----------
    train, valid : pandas.DataFrame
        Rating rows, for instance from ``random_split`` or ``canonical_split``.
    user, movie, rating : str
        The columns to use; ``movie="title"`` numbers titles, as fastbook does.
    like_fastai : bool
        Copy a fastai quirk: ``TabularPandas`` turns text columns into pandas categoricals
        over the whole table before ``Categorify`` looks only at training rows, so a text id
        seen only in validation still gets its own index (an embedding row training never
        updates). Numeric ids come from training rows either way, in fastai and here.

    Returns
    -------
    EncodedSplit
    """
    for part, table in (("train", train), ("valid", valid)):
        missing = [column for column in (user, movie, rating) if column not in table]
        if missing:
            raise ValueError(f"the {part} rows lack column(s) {missing}: have {list(table)}")

    users = _vocabulary(train[user], valid[user], like_fastai)
    movies = _vocabulary(train[movie], valid[movie], like_fastai)
    return EncodedSplit(
        users=users,
        movies=movies,
        train_users=users.encode(train[user]),
        train_movies=movies.encode(train[movie]),
        train_ratings=train[rating].to_numpy(dtype=np.float32),
        valid_users=users.encode(valid[user]),
        valid_movies=movies.encode(valid[movie]),
        valid_ratings=valid[rating].to_numpy(dtype=np.float32),
    )


def _vocabulary(train_ids, valid_ids, like_fastai):
    numeric = pd.api.types.is_numeric_dtype(train_ids) and pd.api.types.is_numeric_dtype(valid_ids)
    if like_fastai and not numeric:
        return Vocabulary(pd.concat([train_ids, valid_ids]))
    return Vocabulary(train_ids)
