"""Splits and vocabularies, checked against fastai's own RandomSplitter and CollabDataLoaders."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from engine.errors import InputError
from engine.releases import load_release
from engine.splits import (
    CANONICAL_SPLITS, Vocabulary, canonical_split, encode_split, random_split,
)
from tests.conftest import write_movielens


@pytest.fixture(scope="module")
def ratings(ml100k):
    """The real ml-100k ratings with fastbook's title column, in file order."""
    return load_release(ml100k).with_titles()


def fastai_dataloaders(ratings, item, seed):
    from fastai.collab import CollabDataLoaders

    with warnings.catch_warnings():  # fastai's own deprecation noise, not ours to fix
        warnings.simplefilter("ignore")
        return CollabDataLoaders.from_df(
            ratings, item_name=item, bs=64, valid_pct=0.2, seed=seed
        )


# ---------------------------------------------------------------------------------------------
# random_split against fastai's RandomSplitter


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_random_split_picks_fastais_rows(ratings, seed):
    from fastai.data.transforms import RandomSplitter

    fastai_train, fastai_valid = RandomSplitter(valid_pct=0.2, seed=seed)(range(len(ratings)))

    train, valid = random_split(ratings, valid_pct=0.2, seed=seed)

    assert len(valid) == 20_000 and len(train) == 80_000
    assert valid.index.tolist() == list(fastai_valid)
    assert train.index.tolist() == list(fastai_train)


@pytest.mark.parametrize("n_rows, valid_pct", [(7, 0.2), (1001, 0.1), (2048, 0.33), (50, 0.0)])
def test_random_split_picks_fastais_rows_for_odd_sizes(n_rows, valid_pct):
    from fastai.data.transforms import RandomSplitter

    table = pd.DataFrame({"user": np.arange(n_rows)})
    fastai_train, fastai_valid = RandomSplitter(valid_pct=valid_pct, seed=5)(range(n_rows))

    train, valid = random_split(table, valid_pct=valid_pct, seed=5)

    assert valid["user"].tolist() == list(fastai_valid)
    assert train["user"].tolist() == list(fastai_train)


def test_random_split_leaves_torchs_global_generator_alone():
    table = pd.DataFrame({"user": np.arange(100)})
    torch.manual_seed(123)
    before = torch.get_rng_state()

    random_split(table, seed=7)

    assert torch.equal(torch.get_rng_state(), before)


def test_random_split_without_a_seed_is_a_partition():
    table = pd.DataFrame({"user": np.arange(1000)})

    train, valid = random_split(table, valid_pct=0.25)

    assert len(valid) == 250
    assert sorted(train["user"].tolist() + valid["user"].tolist()) == list(range(1000))


@pytest.mark.parametrize("valid_pct", [1.0, -0.1, 20])
def test_random_split_rejects_impossible_shares(valid_pct):
    with pytest.raises(InputError, match=r"validation share must be in \[0, 1\)"):
        random_split(pd.DataFrame({"user": [1, 2]}), valid_pct=valid_pct)


# ---------------------------------------------------------------------------------------------
# vocabularies against fastai's CollabDataLoaders


@pytest.mark.parametrize("seed", [0, 42])
def test_movie_id_vocabulary_is_fastais(ratings, seed):
    dls = fastai_dataloaders(ratings[["user", "movie", "rating"]], "movie", seed)

    encoded = encode_split(*random_split(ratings, valid_pct=0.2, seed=seed))

    # README: 943 users, each with at least 20 ratings, so all of them are in training
    assert len(encoded.users) == 944 == len(dls.classes["user"])
    assert encoded.users.classes == list(dls.classes["user"])
    assert encoded.movies.classes == list(dls.classes["movie"])
    assert len(encoded.movies) < 1683  # some of the 1682 movies are only in validation
    np.testing.assert_array_equal(encoded.train_users, dls.train_ds.xs["user"].to_numpy())
    np.testing.assert_array_equal(encoded.train_movies, dls.train_ds.xs["movie"].to_numpy())
    np.testing.assert_array_equal(encoded.valid_movies, dls.valid_ds.xs["movie"].to_numpy())
    np.testing.assert_array_equal(encoded.train_ratings, dls.train_ds.ys["rating"].to_numpy())


@pytest.mark.parametrize("seed", [0, 42])
def test_title_vocabulary_is_fastais_with_its_quirk(ratings, seed):
    from fastai.data.transforms import RandomSplitter

    dls = fastai_dataloaders(ratings[["user", "title", "rating"]], "title", seed)
    train_rows, _ = RandomSplitter(valid_pct=0.2, seed=seed)(range(len(ratings)))
    titles_in_training = ratings["title"].iloc[list(train_rows)].nunique()

    like_fastai = encode_split(*random_split(ratings, seed=seed), movie="title", like_fastai=True)
    from_training = encode_split(*random_split(ratings, seed=seed), movie="title")

    # fastai makes the text column a categorical of the whole table first: all 1664 titles
    assert len(dls.classes["title"]) == 1665
    assert like_fastai.movies.classes == list(dls.classes["title"])
    np.testing.assert_array_equal(like_fastai.train_movies, dls.train_ds.xs["title"].to_numpy())
    np.testing.assert_array_equal(like_fastai.valid_movies, dls.valid_ds.xs["title"].to_numpy())
    # by default only titles seen in training get a row
    assert len(from_training.movies) == titles_in_training + 1 < 1665
    assert (from_training.valid_movies == 0).any()
    assert len(from_training.users) == len(like_fastai.users) == 944


# ---------------------------------------------------------------------------------------------
# Vocabulary on its own


def test_vocabulary_numbers_sorted_ids_from_1():
    vocabulary = Vocabulary([30, 10, 20, 10, np.nan])

    assert len(vocabulary) == 4
    assert vocabulary.classes == ["#na#", 10.0, 20.0, 30.0]
    np.testing.assert_array_equal(vocabulary.encode([10, 30, 99, 20]), [1, 3, 0, 2])
    assert vocabulary.encode([[20], [40]]).shape == (2, 1)
    assert vocabulary.encode([10]).dtype == np.int64
    assert 20 in vocabulary and 99 not in vocabulary


def test_vocabulary_of_text_sorts_like_python():
    titles = ["b", "B", "a", "'Til There Was You (1997)", "101 Dalmatians (1996)", "Z"]

    vocabulary = Vocabulary(titles)

    assert vocabulary.classes == ["#na#", *sorted(titles)]
    np.testing.assert_array_equal(vocabulary.decode(vocabulary.encode(titles)), titles)


def test_vocabulary_decode_refuses_the_unknown_row():
    vocabulary = Vocabulary([5, 6])

    np.testing.assert_array_equal(vocabulary.decode([2, 1]), [6, 5])
    with pytest.raises(ValueError, match="index 0 has no raw id"):
        vocabulary.decode([1, 0])
    with pytest.raises(ValueError, match="index 3 has no raw id"):
        vocabulary.decode([3])


def test_encode_split_maps_unseen_ids_to_0():
    train = pd.DataFrame({"user": [7, 3, 7], "movie": [100, 200, 300], "rating": [4, 3.5, 2]})
    valid = pd.DataFrame({"user": [3, 8], "movie": [400, 100], "rating": [1.0, 5.0]})

    encoded = encode_split(train, valid)

    np.testing.assert_array_equal(encoded.train_users, [2, 1, 2])
    np.testing.assert_array_equal(encoded.train_movies, [1, 2, 3])
    np.testing.assert_array_equal(encoded.valid_users, [1, 0])
    np.testing.assert_array_equal(encoded.valid_movies, [0, 1])
    assert encoded.train_ratings.dtype == np.float32
    np.testing.assert_array_equal(encoded.valid_ratings, [1.0, 5.0])
    with pytest.raises(ValueError, match=r"valid rows lack column\(s\) \['rating'\]"):
        encode_split(train, valid.drop(columns="rating"))


# ---------------------------------------------------------------------------------------------
# the splits that ship with MovieLens 100K


def test_u1_is_an_80_20_split(ml100k):
    train, test = canonical_split(ml100k, "u1")

    assert (len(train), len(test)) == (80_000, 20_000)
    assert train.dtypes.astype(str).tolist() == ["int64", "int64", "float32", "int64"]


@pytest.mark.parametrize("name", ["ua", "ub"])
def test_ua_and_ub_hold_out_10_ratings_per_user(ml100k, name):
    train, test = canonical_split(ml100k.parent, name)  # a folder holding ml-100k/ will do

    # README: exactly 10 ratings of each of the 943 users in the test set
    assert (len(train), len(test)) == (90_570, 9_430)
    assert (test["user"].value_counts() == 10).all()


def test_the_five_folds_cover_u_data_once(ml100k):
    every = pd.read_csv(ml100k / "u.data", sep="\t", names=["user", "movie", "rating", "t"])
    keys = set(zip(every["user"], every["movie"]))

    tests = [canonical_split(ml100k, f"u{fold}")[1] for fold in range(1, 6)]

    test_keys = [set(zip(test["user"], test["movie"])) for test in tests]
    assert sum(len(k) for k in test_keys) == 100_000
    assert set().union(*test_keys) == keys  # disjoint, since the sizes add up


def test_canonical_split_names(tmp_path):
    folder = write_movielens(tmp_path / "ml-100k")

    with pytest.raises(InputError, match="unknown MovieLens 100K split 'u6': .*u1, u2"):
        canonical_split(folder, "u6")
    with pytest.raises(InputError, match=r"u2.base does not exist"):
        canonical_split(folder, "u2")
    assert CANONICAL_SPLITS == ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
