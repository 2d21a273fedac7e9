"""Recommend movies with a trained run: the best predicted titles a user has not rated yet."""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.collab_nets import build_model
from engine.errors import InputError
from engine.splits import Vocabulary
from engine.torch_collab import resolve_device
from engine.train_collab import MODEL_FILE, TrainConfig, load_checkpoint, predict

log = logging.getLogger("xlmirror")


@dataclass
class TrainedRun:
    """A trained model with its vocabularies, titles and what each user rated in training."""

    model: torch.nn.Module  # in eval mode
    config: TrainConfig
    meta: dict
    users: Vocabulary
    movies: Vocabulary
    titles: list  # title of movie row i + 1 (None where the release has none)
    seen_indptr: np.ndarray  # (len(users) + 1,) int64
    seen_movies: np.ndarray  # (n_train,) int32 movie rows, grouped by user row
    history: list  # dicts: epoch, train_loss, valid_loss, seconds
    path: Path


@dataclass
class Recommendation:
    movie: object  # the raw movie id
    title: str | None
    predicted: float  # the model's rating, in stars


def load_run(path, device="cpu"):
    """Load ``model.pt`` from a run folder (or the file itself) onto ``device``.

    Returns
    -------
    TrainedRun
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise InputError(
            f"{path} does not exist: pass a folder written by 'xlmirror train movielens' "
            f"(it holds {MODEL_FILE} once training has finished) or the {MODEL_FILE} itself"
        )
    saved = load_checkpoint(path)
    if "seen_indptr" not in saved:
        if saved.get("epoch") == saved["config"].get("epochs"):
            raise InputError(f"{path} is a training checkpoint; the trained model is "
                             f"{path.parent / MODEL_FILE}: pass it or its folder")
        raise InputError(f"{path} is a checkpoint of an unfinished run, not a trained model: "
                         f"finish it with --resume")

    config = TrainConfig.from_dict(saved["config"])
    users, movies = Vocabulary(saved["users"]), Vocabulary(saved["movies"])
    model = build_model(config.model, len(users), len(movies), n_factors=config.n_factors,
                        y_range=config.y_range, layers=config.layers,
                        n_hidden=config.n_hidden, init=config.init)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError:  # the weights do not fit the model its own settings describe
        raise InputError(f"{path} is damaged: its weights do not match its settings "
                         f"({config.model}, {config.n_factors} factors); train it again") from None
    model = model.to(resolve_device(device)).eval()
    log.info("loaded %s (%s, %d users, %d movies)", path, config.model, len(users) - 1,
             len(movies) - 1)
    return TrainedRun(model, config, saved.get("meta", {}), users, movies, saved["titles"],
                      saved["seen_indptr"].numpy(), saved["seen_movies"].numpy(),
                      saved["history"], path)


def _user_row(run, user_id):
    """The embedding row of a raw user id; InputError for an id the model never trained on."""
    ids = run.users.ids
    if ids.dtype.kind in "iu" and isinstance(user_id, str):
        try:
            user_id = int(user_id)
        except ValueError:
            raise InputError(f"user ids in this run are whole numbers, got {user_id!r}") from None
    row = int(run.users.encode([user_id])[0])
    if row == 0:
        # row 0 is the shared "unknown" row: its prediction would be the same for anyone
        raise InputError(
            f"user {user_id} is not among the {len(ids)} users this model was trained on "
            f"(ids {ids[0]}..{ids[-1]}); it has no factors to recommend from"
        )
    return row


def recommend(run, user_id, n=10):
    """The ``n`` movies with the highest predicted rating that ``user_id`` did not rate.

    Parameters
    ----------
    run : TrainedRun
    user_id : int or str
        A raw user id as in the ratings file.
    n : int, default 10

    Returns
    -------
    list of Recommendation
        Best first; fewer than ``n`` when the user has rated nearly everything.
    """
    if n < 1:
        raise InputError(f"the number of recommendations must be 1 or more, got {n}")
    row = _user_row(run, user_id)

    # every known movie (rows 1..n; row 0 is "unknown") minus those rated in training
    candidates = np.ones(len(run.movies), dtype=bool)
    candidates[0] = False
    candidates[run.seen_movies[run.seen_indptr[row]:run.seen_indptr[row + 1]]] = False
    movie_rows = np.flatnonzero(candidates)
    if len(movie_rows) == 0:
        return []

    device = next(run.model.parameters()).device
    movie_index = torch.from_numpy(movie_rows).to(device)
    user_index = torch.full_like(movie_index, row)
    scores = predict(run.model, user_index, movie_index)  # (n_candidates,)

    best = torch.topk(scores, min(n, len(movie_rows))).indices.cpu().numpy()
    chosen = movie_rows[best]
    raw_ids = run.movies.decode(chosen)
    predicted = scores.cpu().numpy()[best]
    return [Recommendation(movie.item() if hasattr(movie, "item") else movie,
                           run.titles[index - 1], float(score))
            for movie, index, score in zip(raw_ids, chosen, predicted)]
