"""The neural collaborative-filtering models of fastbook chapter 8, and one factory for all.

Every model here takes ``forward(user_index, movie_index)`` (int64, shape (batch,)) and
returns predictions of shape (batch,), like ``engine.torch_collab.DotProduct``:

- ``FastDotProduct`` and ``FastDotProductBias``: ``engine.torch_collab``'s models with a
  hand-written backward pass (``PairDot``), for training at scale.
- ``CollabNN``: the chapter's hand-written net. The user's and the movie's embeddings are
  concatenated and go through Linear -> ReLU -> Linear -> sigmoid_range.
- ``EmbeddingNN``: what fastai's ``collab_learner(use_nn=True, layers=[100, 50])`` builds, a
  ``TabularModel`` without continuous columns. Its modules carry fastai's names and shapes, so
  ``load_fastai_state`` copies a trained fastai model into it.

``build_model`` makes any of the four models the command line offers (``MODELS``).
"""

from itertools import pairwise

import torch
from torch import nn

from engine.collab import MODEL_KINDS
from engine.torch_collab import DotProduct, DotProductBias, _table, _weight, sigmoid_range

MODELS = MODEL_KINDS
Y_RANGE = (0.0, 5.5)  # fastbook's range: a little above 5 so that 5 stars is reachable


def emb_sz_rule(n_categories):
    """Embedding width for a vocabulary of ``n_categories`` rows, by fastai's rule of thumb.

    ``min(600, round(1.6 * n_categories ** 0.56))``: 74 for ml-100k's 944 user rows, 101 for
    its 1635 title rows in a fastbook training split.
    """
    return min(600, round(1.6 * n_categories**0.56))


def lookup(table, index):
    """Rows ``index`` of a table (an ``nn.Embedding`` or a Parameter), (batch, width).

    The same values as ``table(index)``, taken with ``index_select``, whose backward pass is
    one ``index_add_`` into a zeroed gradient. ``nn.Embedding``'s own backward does more work:
    measured on one CPU core for 8192 rows of width 50, 0.28 ms against 0.99 ms, which was a
    quarter of a whole training step.
    """
    return _weight(table).index_select(0, index)


CPU_CHUNK = 4096  # pairs per pass on the CPU: their (chunk, width) rows stay in the L2 cache


class PairDot(torch.autograd.Function):
    """``(user_table[u] * movie_table[m]).sum(1)`` as one autograd node.

    Autograd would record two look-ups, a product and a sum, run their four backward functions
    and keep the gathered (batch, width) rows between the passes. Here the backward pass is
    written out: the gradient of a user row is the sum, over the pairs it appears in, of
    ``grad * movie row``, scattered with ``scatter_add_`` (on one CPU core, for 4096 rows of
    width 50: 0.15 ms, ``index_add_`` 0.22 ms). On the CPU both passes go through the batch
    ``CPU_CHUNK`` pairs at a time, gathering the rows again in the backward pass instead of
    keeping them: at 16,000 pairs of width 50 the whole-batch buffers (3.2 MB each) spill out
    of the cache, and a 5-epoch ml-100k fit measured 16% faster chunked. On a GPU a chunk is
    the whole batch.
    """

    @staticmethod
    def forward(ctx, user_table, movie_table, user_index, movie_index):
        ctx.save_for_backward(user_table, movie_table, user_index, movie_index)
        scores = user_table.new_empty(len(user_index))
        for pairs in _chunks(user_index):
            users = user_table.index_select(0, user_index[pairs])  # (chunk, k)
            movies = movie_table.index_select(0, movie_index[pairs])
            torch.sum(users.mul_(movies), dim=1, out=scores[pairs])
        return scores

    @staticmethod
    def backward(ctx, grad_scores):
        user_table, movie_table, user_index, movie_index = ctx.saved_tensors
        grad_users = torch.zeros_like(user_table) if ctx.needs_input_grad[0] else None
        grad_movies = torch.zeros_like(movie_table) if ctx.needs_input_grad[1] else None
        for pairs in _chunks(user_index):
            grad = grad_scores[pairs].unsqueeze(1)  # (chunk, 1), broadcast over the factors
            users, movies = user_index[pairs], movie_index[pairs]
            if grad_users is not None:
                rows = movie_table.index_select(0, movies).mul_(grad)
                grad_users.scatter_add_(0, users.unsqueeze(1).expand_as(rows), rows)
            if grad_movies is not None:
                rows = user_table.index_select(0, users).mul_(grad)
                grad_movies.scatter_add_(0, movies.unsqueeze(1).expand_as(rows), rows)
        return grad_users, grad_movies, None, None


def _chunks(index):
    """Slices that cut the pairs of ``index`` into passes (one, off the CPU)."""
    step = CPU_CHUNK if index.device.type == "cpu" else max(len(index), 1)
    return [slice(start, start + step) for start in range(0, len(index), step)]


def pair_dot(user_table, movie_table, user_index, movie_index):
    """Dot products of rows ``user_index`` of one table with rows ``movie_index`` of the
    other, (batch,): ``PairDot`` for Embeddings or Parameters.

    Unlike the plain look-up, the two index tensors must be 1-D and of one length (no
    broadcasting), the tables of one dtype, and the tables must not be changed in place
    between the forward and the backward pass (autograd then raises, as they are saved).
    """
    if user_index.dim() != 1 or user_index.shape != movie_index.shape:
        raise ValueError(f"user and movie indexes must be 1-D and of one length, got "
                         f"{tuple(user_index.shape)} and {tuple(movie_index.shape)}")
    return PairDot.apply(_weight(user_table), _weight(movie_table), user_index, movie_index)


class _PairDotFactors:
    """The factor dot products through ``pair_dot``, for a ``DotProduct`` subclass."""

    def dot(self, user_index, movie_index):
        return pair_dot(self.user_factors, self.movie_factors, user_index, movie_index)


class FastDotProduct(_PairDotFactors, DotProduct):
    """``DotProduct`` (same parameters, same predictions) with ``PairDot``'s backward pass."""


class FastDotProductBias(_PairDotFactors, DotProductBias):
    """``DotProductBias`` (same parameters, same predictions) with ``PairDot``'s backward
    pass; the bias rows through ``lookup``."""

    rows = staticmethod(lookup)


class CollabNN(nn.Module):
    """fastbook's two-layer net on concatenated user and movie embeddings.

    Parameters
    ----------
    n_users, n_movies : int
        Rows of the two embedding tables (vocabulary sizes, the unknown row 0 included).
    user_size, movie_size : int, optional
        Embedding widths; default ``emb_sz_rule`` of the table's rows (74 and 101 on ml-100k).
    n_hidden : int, default 100
        Width of the hidden layer.
    y_range : (float, float), default (0, 5.5)
        Predictions are squashed into it with ``sigmoid_range``.
    init : {"truncated", "normal"}, default "truncated"
        How the embeddings start (std 0.01); "truncated" is fastai's ``Embedding``, which the
        chapter uses. The linear layers keep PyTorch's default initialisation, as there.
    """

    def __init__(self, n_users, n_movies, user_size=None, movie_size=None, n_hidden=100,
                 y_range=Y_RANGE, init="truncated"):
        super().__init__()
        user_size = emb_sz_rule(n_users) if user_size is None else user_size
        movie_size = emb_sz_rule(n_movies) if movie_size is None else movie_size
        self.y_range = y_range
        self.user_factors = _table(n_users, user_size, embedding=True, init=init)
        self.movie_factors = _table(n_movies, movie_size, embedding=True, init=init)
        self.layers = nn.Sequential(
            nn.Linear(user_size + movie_size, n_hidden),
            nn.ReLU(),
            nn.Linear(n_hidden, 1),
        )

    def forward(self, user_index, movie_index):
        """Predictions for (user, movie) pairs: int64 indexes (batch,) -> (batch,)."""
        users = lookup(self.user_factors, user_index)  # (batch, user_size)
        movies = lookup(self.movie_factors, movie_index)  # (batch, movie_size)
        scores = self.layers(torch.cat([users, movies], dim=1))  # (batch, 1)
        return sigmoid_range(scores.reshape(-1), *self.y_range)


class EmbeddingNN(nn.Module):
    """fastai's ``EmbeddingNN``: a ``TabularModel`` over the user and movie embeddings.

    The layout is fastai's default (``lin_first=True``, batch norm on every block but the last):
    ``embeds`` -> ``emb_drop`` -> for each width in ``layers`` a block Linear (no bias) -> ReLU
    -> BatchNorm1d, then Linear(layers[-1], 1) with a bias -> sigmoid_range. fastai also holds a
    ``BatchNorm1d(0)`` for continuous columns, of which collaborative filtering has none; it
    has no weights, so it is left out here (``load_fastai_state`` drops its empty entries).

    Parameters
    ----------
    n_users, n_movies : int
        Rows of the two embedding tables (the unknown row 0 included).
    layers : sequence of int, default (100, 50)
        Widths of the hidden blocks.
    user_size, movie_size : int, optional
        Embedding widths; default ``emb_sz_rule`` of the table's rows.
    y_range : (float, float) or None, default (0, 5.5)
    embed_p : float, default 0.0
        Dropout on the concatenated embeddings (fastai's default is none).
    init : {"truncated", "normal"}, default "truncated"
        Embedding init (std 0.01). Batch norms start as fastai's do: weight 1, bias 0.001.
    """

    def __init__(self, n_users, n_movies, layers=(100, 50), user_size=None, movie_size=None,
                 y_range=Y_RANGE, embed_p=0.0, init="truncated"):
        super().__init__()
        user_size = emb_sz_rule(n_users) if user_size is None else user_size
        movie_size = emb_sz_rule(n_movies) if movie_size is None else movie_size
        self.y_range = y_range
        self.embeds = nn.ModuleList([
            _table(n_users, user_size, embedding=True, init=init),
            _table(n_movies, movie_size, embedding=True, init=init),
        ])
        self.emb_drop = nn.Dropout(embed_p)

        widths = [user_size + movie_size, *layers]
        blocks = [_hidden_block(n_in, n_out) for n_in, n_out in pairwise(widths)]
        blocks.append(nn.Sequential(nn.Linear(widths[-1], 1)))
        self.layers = nn.Sequential(*blocks)

    def forward(self, user_index, movie_index):
        """Predictions for (user, movie) pairs: int64 indexes (batch,) -> (batch,)."""
        users = lookup(self.embeds[0], user_index)  # (batch, user_size)
        movies = lookup(self.embeds[1], movie_index)  # (batch, movie_size)
        x = self.emb_drop(torch.cat([users, movies], dim=1))
        scores = self.layers(x).reshape(-1)  # (batch,)
        if self.y_range is None:
            return scores
        return sigmoid_range(scores, *self.y_range)


def _hidden_block(n_in, n_out):
    # batch norm comes right after, so a bias in the Linear would be removed by it anyway
    norm = nn.BatchNorm1d(n_out)
    with torch.no_grad():
        norm.bias.fill_(1e-3)  # fastai's BatchNorm starts its bias here, not at 0
    return nn.Sequential(nn.Linear(n_in, n_out, bias=False), nn.ReLU(inplace=True), norm)


def build_model(kind, n_users, n_movies, n_factors=50, y_range=Y_RANGE, layers=(100, 50),
                n_hidden=100, init="truncated"):
    """One of the models of ``MODELS``, sized for the vocabularies.

    Parameters
    ----------
    kind : {"dot", "dotbias", "nn", "embnn"}
        ``FastDotProduct``, ``FastDotProductBias`` (fastai's ``EmbeddingDotBias``),
        ``CollabNN`` or ``EmbeddingNN``.
    n_users, n_movies : int
        Vocabulary sizes, the unknown row 0 included.
    n_factors : int, default 50
        Width of the dot-product models' tables (the nets size theirs by ``emb_sz_rule``).
    y_range : (float, float) or None, default (0, 5.5)
        ``CollabNN`` needs one; the others leave predictions unsquashed with None.
    layers : sequence of int, default (100, 50)
        ``EmbeddingNN``'s hidden widths.
    n_hidden : int, default 100
        ``CollabNN``'s hidden width.
    init : {"truncated", "normal"}, default "truncated"
        How embeddings start (std 0.01).

    Returns
    -------
    torch.nn.Module
        On the CPU, float32.
    """
    if kind == "dot":
        return FastDotProduct(n_users, n_movies, n_factors, y_range=y_range, init=init)
    if kind == "dotbias":
        return FastDotProductBias(n_users, n_movies, n_factors, y_range=y_range, init=init)
    if kind == "nn":
        if y_range is None:
            raise ValueError("model 'nn' needs a y_range: its output goes through sigmoid_range")
        return CollabNN(n_users, n_movies, n_hidden=n_hidden, y_range=y_range, init=init)
    if kind == "embnn":
        return EmbeddingNN(n_users, n_movies, layers=layers, y_range=y_range, init=init)
    raise ValueError(f"model {kind!r} is not one of {', '.join(MODELS)}")


# fastai's parameter names -> ours, per model
FASTAI_NAMES = {
    "EmbeddingDotBias": {
        "u_weight.weight": "user_factors.weight",
        "i_weight.weight": "movie_factors.weight",
        "u_bias.weight": "user_bias.weight",
        "i_bias.weight": "movie_bias.weight",
    },
    # fastbook's CollabNN calls its movie table item_factors
    "CollabNN": {"item_factors.weight": "movie_factors.weight"},
}


def load_fastai_state(model, fastai_state):
    """Copy a fastai model's ``state_dict`` into ``model`` (ours, built with the same sizes).

    Parameters
    ----------
    model : DotProductBias, CollabNN or EmbeddingNN
        Built with ``embedding=True`` tables where there is a choice.
    fastai_state : dict
        ``state_dict()`` of fastai's ``EmbeddingDotBias``, of fastbook's ``CollabNN``, or of
        fastai's ``EmbeddingNN``; the empty ``bn_cont`` entries of the latter are dropped.

    Returns
    -------
    model
        The same module, its weights replaced. Shapes are checked by ``load_state_dict``.
    """
    if isinstance(model, DotProductBias):
        names = FASTAI_NAMES["EmbeddingDotBias"]
    elif isinstance(model, CollabNN):
        names = FASTAI_NAMES["CollabNN"]
    else:
        names = {}

    state = {}
    for name, value in fastai_state.items():
        if name.startswith("bn_cont.") and value.numel() <= 1:
            continue  # BatchNorm1d(0) for the absent continuous columns; num_batches is a 0-d
        state[names.get(name, name)] = value
    model.load_state_dict(state, strict=True)
    return model
