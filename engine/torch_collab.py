"""The sheet's model as PyTorch modules (fastbook chapter 8), fitted on the CPU or a GPU.

``DotProduct`` and ``DotProductBias`` are the chapter's models, built two ways: from
``nn.Embedding`` tables, or from hand-made ``nn.Parameter`` tensors indexed directly (the
chapter's ``create_params``). Looking a row up either way is the sheet's one-hot @ factors.

``fit_torch`` fits them on the sheet objective (RMSE over the rated cells, full batch) so
the answer can be put next to scipy's (``engine.optimize.fit_scipy``) from the same start.
"""

import time

import numpy as np
import torch
from torch import nn

from engine.collab import LatentFactors
from engine.errors import InputError
from engine.objective import check_problem
from engine.optimize import FitResult

DEVICES = ("auto", "cpu", "cuda")
INIT_STD = 0.01  # fastbook's create_params and fastai's Embedding both start this small
INITS = ("normal", "truncated")

# per optimizer: engine name, default max_iter, default lr. Measured on the lecture's 15x15
# block from LatentFactors.random(15, 15, 5, seed=42): Adam at lr 0.05 ends within 1% of
# scipy's RMSE after 3000 steps (1000 leave it ~1.5% above); lr 0.1 overshoots and hovers.
OPTIMIZERS = {
    "lbfgs": ("torch L-BFGS", 1000, 1.0),
    "adam": ("torch Adam", 3000, 0.05),
}


def sigmoid_range(x, lo, hi):
    """Squash ``x`` into the open interval (lo, hi): ``sigmoid(x) * (hi - lo) + lo``."""
    return torch.sigmoid(x) * (hi - lo) + lo


def resolve_device(name):
    """The torch device for a user's ``--device`` choice.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda"}
        "auto" picks the first CUDA GPU when torch sees one, else the CPU.

    Returns
    -------
    torch.device
        ``cpu`` or ``cuda:N`` (N the current CUDA device), so ``str()`` of it is what a
        ``FitResult`` reports.

    Raises
    ------
    InputError
        For any other name, or for "cuda" on a machine where torch sees no CUDA GPU.
    """
    if name not in DEVICES:
        raise InputError(f"device {name!r} is not one of {', '.join(DEVICES)}")

    has_cuda = torch.cuda.is_available()
    if name == "cuda" and not has_cuda:
        raise InputError(
            "device 'cuda' was asked for but CUDA is not available to torch here "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "use --device cpu or --device auto"
        )
    if name == "cpu" or not has_cuda:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _table(n_rows, n_columns, embedding, init="normal"):
    """A (n_rows, n_columns) trainable table, std INIT_STD, as an Embedding or not.

    ``init`` "normal" draws normal(0, INIT_STD); "truncated" draws as fastai's ``Embedding``
    does: a standard normal folded into (-2, 2) by ``fmod``, times INIT_STD.
    """
    if init not in INITS:
        raise ValueError(f"init {init!r} is not one of {', '.join(INITS)}")
    if embedding:
        table = nn.Embedding(n_rows, n_columns)
        weight = table.weight
    else:
        table = weight = nn.Parameter(torch.zeros(n_rows, n_columns))

    with torch.no_grad():
        if init == "normal":
            weight.normal_(0.0, INIT_STD)
        else:
            weight.normal_().fmod_(2).mul_(INIT_STD)
    return table


def _rows(table, index):
    """Rows ``index`` of a table: the Embedding's own lookup, or plain tensor indexing."""
    if isinstance(table, nn.Embedding):
        return table(index)
    return table[index]


def _weight(table):
    return table.weight if isinstance(table, nn.Embedding) else table


def _to_numpy(tensor):
    # a device -> host copy when the module lives on a GPU
    return tensor.detach().to("cpu", torch.float64).numpy().copy()


class DotProduct(nn.Module):
    """Prediction = user_factors[u] . movie_factors[m], optionally squashed into y_range.

    Parameters
    ----------
    n_users, n_movies, n_factors : int
        Table sizes: user_factors is (n_users, n_factors), movie_factors (n_movies, n_factors).
    y_range : (float, float), optional
        When given, predictions go through ``sigmoid_range(., *y_range)``.
    embedding : bool, default True
        True: ``nn.Embedding`` tables. False: ``nn.Parameter`` tensors indexed directly.
    init : {"normal", "truncated"}, default "normal"
        How every table starts: normal(0, 0.01), or fastai's ``Embedding`` init (a normal
        truncated to two standard deviations by ``fmod``, times 0.01).
    """

    def __init__(self, n_users, n_movies, n_factors, y_range=None, embedding=True,
                 init="normal"):
        super().__init__()
        self.y_range = y_range
        self.embedding = embedding
        self.user_factors = _table(n_users, n_factors, embedding, init)
        self.movie_factors = _table(n_movies, n_factors, embedding, init)

    @staticmethod
    def rows(table, index):
        """Rows ``index`` of a factor or bias table; subclasses may look them up another way."""
        return _rows(table, index)

    def dot(self, user_index, movie_index):
        """``user_factors[u] . movie_factors[m]`` for each pair, (batch,); subclasses may
        compute it another way."""
        users = self.rows(self.user_factors, user_index)  # (batch, k)
        movies = self.rows(self.movie_factors, movie_index)  # (batch, k)
        return (users * movies).sum(dim=1)

    def forward(self, user_index, movie_index):
        """Predictions for (user, movie) pairs; indexes are 0-based int64, shape (batch,)."""
        return self._squash(self.dot(user_index, movie_index))

    def _squash(self, scores):
        if self.y_range is None:
            return scores
        return sigmoid_range(scores, *self.y_range)

    @classmethod
    def from_factors(cls, factors, embedding=True, dtype=torch.float64, device="cpu",
                     y_range=None):
        """A module whose weights are ``factors`` (a copy), as ``dtype`` on ``device``.

        ``device`` is a ``torch.device`` or a name for ``resolve_device``.
        """
        n_users, n_factors = np.shape(factors.user_factors)
        n_movies = np.shape(factors.movie_factors)[0]
        module = cls(n_users, n_movies, n_factors, y_range=y_range, embedding=embedding)

        if not isinstance(device, torch.device):
            device = resolve_device(device)
        module = module.to(device=device, dtype=dtype)
        with torch.no_grad():
            for name, weight in module._weights().items():
                value = torch.as_tensor(np.asarray(getattr(factors, name), dtype=np.float64))
                weight.copy_(value.reshape(weight.shape))
        return module

    def to_factors(self, like=None):
        """The weights as LatentFactors (numpy float64 copies, on the host).

        This model has no biases: they are copied from ``like`` when given, else zeros.
        """
        weights = {name: _to_numpy(weight) for name, weight in self._weights().items()}
        for name, size in (("user_bias", len(weights["user_factors"])),
                           ("movie_bias", len(weights["movie_factors"]))):
            if like is not None and getattr(like, name) is not None:
                weights[name] = np.array(getattr(like, name), dtype=np.float64)
            else:
                weights[name] = np.zeros(size)
        return LatentFactors(**weights)

    def _weights(self):
        """Block name -> trainable tensor (an Embedding's weight, or the Parameter itself)."""
        return {
            "user_factors": _weight(self.user_factors),
            "movie_factors": _weight(self.movie_factors),
        }


class DotProductBias(DotProduct):
    """``DotProduct`` plus a bias per user and per movie, added before the squash.

    Bias tables are (n, 1) Embeddings when ``embedding`` is True, else (n,) Parameters.
    """

    def __init__(self, n_users, n_movies, n_factors, y_range=None, embedding=True,
                 init="normal"):
        super().__init__(n_users, n_movies, n_factors, y_range=y_range, embedding=embedding,
                         init=init)
        if embedding:
            self.user_bias = _table(n_users, 1, embedding=True, init=init)
            self.movie_bias = _table(n_movies, 1, embedding=True, init=init)
        else:
            # (n,) like fastbook's create_params([n_users]); same draw as a (n, 1) table
            self.user_bias = nn.Parameter(_table(n_users, 1, False, init).detach().reshape(-1))
            self.movie_bias = nn.Parameter(_table(n_movies, 1, False, init).detach().reshape(-1))

    def forward(self, user_index, movie_index):
        scores = self.dot(user_index, movie_index)  # (batch,)
        # an Embedding bias row is (batch, 1); a Parameter's is (batch,)
        scores = scores + self.rows(self.user_bias, user_index).reshape(-1)
        scores = scores + self.rows(self.movie_bias, movie_index).reshape(-1)
        return self._squash(scores)

    def to_factors(self, like=None):
        """The weights, biases included, as LatentFactors (numpy float64, on the host)."""
        weights = {name: _to_numpy(weight) for name, weight in self._weights().items()}
        weights["user_bias"] = weights["user_bias"].reshape(-1)
        weights["movie_bias"] = weights["movie_bias"].reshape(-1)
        return LatentFactors(**weights)

    def _weights(self):
        weights = super()._weights()
        weights["user_bias"] = _weight(self.user_bias)
        weights["movie_bias"] = _weight(self.movie_bias)
        return weights


def from_factors(factors, with_bias, embedding=True, dtype=torch.float64, device="cpu",
                 y_range=None):
    """``DotProductBias`` (``with_bias``) or ``DotProduct`` holding a copy of ``factors``."""
    model = DotProductBias if with_bias else DotProduct
    return model.from_factors(
        factors, embedding=embedding, dtype=dtype, device=device, y_range=y_range
    )


def rated_cells(ratings):
    """The rated cells of a (n_users, n_movies) tensor, row by row.

    Returns
    -------
    user_index, movie_index : int64 tensors, (n_rated,)
    targets : tensor, (n_rated,)
        On the ratings' device. Finding them costs one device sync (``nonzero``), so a
        training loop calls this once.
    """
    user_index, movie_index = torch.nonzero(~torch.isnan(ratings), as_tuple=True)
    return user_index, movie_index, ratings[user_index, movie_index]


def sheet_objective_torch(ratings, module, cells=None):
    """The sheet RMSE of ``module``'s predictions over the rated cells of ``ratings``.

    Parameters
    ----------
    ratings : tensor, (n_users, n_movies)
        NaN for blanks; same device and dtype as ``module``.
    module : DotProduct or DotProductBias
    cells : tuple, optional
        ``rated_cells(ratings)``, precomputed to spare the device sync in a loop.

    Returns
    -------
    tensor, ()
        Differentiable, except at RMSE 0 where sqrt has no derivative.
    """
    if cells is None:
        cells = rated_cells(ratings)
    user_index, movie_index, targets = cells

    predictions = module(user_index, movie_index)  # (n_rated,)
    return torch.sqrt(torch.mean((predictions - targets) ** 2))


def fit_torch(ratings, start, with_bias, optimizer="lbfgs", device="auto", max_iter=None,
              lr=None, weight_decay=0.0, y_range=None, embedding=True, dtype=torch.float64,
              tol=1e-12):
    """Fit the sheet objective with PyTorch: full batch over the rated cells.

    Parameters
    ----------
    ratings : array-like, (n_users, n_movies)
        Known ratings, NaN for blanks.
    start : LatentFactors
        Starting values; not modified.
    with_bias : bool
        Fit ``DotProductBias`` (True) or ``DotProduct`` (False, ``start``'s biases kept).
    optimizer : {"lbfgs", "adam"}
        "lbfgs": ``torch.optim.LBFGS`` with a strong-Wolfe line search, one iteration per
        ``step`` so each one lands in ``history``; stops when an iteration changes the
        minimised function (RMSE, plus the penalty) by no more than ``tol`` relative
        (scipy's ftol rule) or the gradient's largest component falls to ``tol``.
        "adam": ``torch.optim.Adam`` for exactly ``max_iter`` steps.
    device : {"auto", "cpu", "cuda"}
        See ``resolve_device``.
    max_iter : int, optional
        Defaults: 1000 (lbfgs), 3000 (adam).
    lr : float, optional
        Defaults: 1.0 (lbfgs: the first trial step of each line search), 0.05 (adam).
    weight_decay : float, default 0.0
        Coupled L2 (torch ``Adam``'s own ``weight_decay``, not AdamW's decoupled decay):
        ``weight_decay * p`` is added to every parameter's gradient, i.e. the objective gains
        ``weight_decay / 2 * sum(p**2)``; L-BFGS adds that same penalty to its loss. Coupled,
        both optimizers minimise one function, so their answers stay comparable. fastbook's
        ``loss + wd * sum(p**2)`` is ``weight_decay = 2 * wd``. ``history`` is the RMSE alone.
    y_range : (float, float), optional
        Squash predictions with ``sigmoid_range``; the RMSEs are then of squashed predictions
        and are no longer ``engine.collab.predict``'s.
    embedding : bool, default True
        Build the module from ``nn.Embedding`` (True) or hand-made Parameters (False).
    dtype : torch.dtype, default torch.float64
    tol : float, default 1e-12
        L-BFGS stopping tolerance (unused by Adam).

    Returns
    -------
    FitResult
        ``engine`` "torch L-BFGS" or "torch Adam"; ``factors`` read back as numpy float64.

    Raises
    ------
    InputError
        For an unknown optimizer or device, CUDA asked for but absent, or bad ratings/start.
    """
    started = time.perf_counter()
    if optimizer not in OPTIMIZERS:
        raise InputError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    engine, default_max_iter, default_lr = OPTIMIZERS[optimizer]
    max_iter = default_max_iter if max_iter is None else max_iter
    lr = default_lr if lr is None else lr
    ratings = check_problem(ratings, start, with_bias)
    device = resolve_device(device)

    # everything moves to the device once; the loops below never touch the host's arrays
    module = from_factors(start, with_bias, embedding, dtype, device, y_range)
    ratings_tensor = torch.tensor(ratings, dtype=dtype, device=device)  # a copy, never a view
    cells = rated_cells(ratings_tensor)

    def rmse():
        return sheet_objective_torch(ratings_tensor, module, cells)

    if optimizer == "lbfgs":
        history, converged = _run_lbfgs(module, rmse, max_iter, lr, weight_decay, tol)
    else:
        history, converged = _run_adam(module, rmse, max_iter, lr, weight_decay), None

    return FitResult(
        engine=engine, device=str(device), factors=module.to_factors(like=start),
        start_rmse=history[0], final_rmse=history[-1], history=history,
        iterations=len(history) - 1, seconds=time.perf_counter() - started,
        converged=converged,
    )


def _l2_penalty(module, weight_decay):
    return weight_decay / 2 * sum((p**2).sum() for p in module.parameters())


def _run_lbfgs(module, rmse, max_iter, lr, weight_decay, tol):
    """L-BFGS one iteration per ``step``; returns (the RMSE history as floats, whether it
    stopped on ``tol`` before ``max_iter``)."""
    # max_iter=1: torch keeps the curvature pairs in its state between steps, so this is the
    # same run as one long step, but lets us record and test convergence per iteration.
    # max_eval must then be set: its default (1.25 * max_iter) would leave the line search no
    # evaluation at all. 1 + 20 allows scipy's 20 line-search evaluations (maxls); 10 pairs
    # of memory are scipy's maxcor.
    optimizer = torch.optim.LBFGS(
        module.parameters(), lr=lr, max_iter=1, max_eval=1 + 20, tolerance_grad=tol,
        tolerance_change=tol, history_size=10, line_search_fn="strong_wolfe",
    )

    def minimised():
        # the function L-BFGS minimises: the RMSE, plus the L2 penalty when asked for
        value = rmse()
        if weight_decay:
            value = value + _l2_penalty(module, weight_decay)
        return value

    def closure():
        optimizer.zero_grad()
        loss = minimised()
        loss.backward()
        return loss

    with torch.no_grad():
        history = [rmse().item()]
        loss = minimised().item()
    for _ in range(max_iter):
        optimizer.step(closure)
        with torch.no_grad():
            # .item() is a device sync; L-BFGS's line search syncs many times anyway
            history.append(rmse().item())
            before, loss = loss, minimised().item()

        # scipy's ftol rule, on the function being minimised
        if abs(before - loss) <= tol * max(abs(before), abs(loss), 1.0):
            return history, True
    return history, False


def _run_adam(module, rmse, max_iter, lr, weight_decay):
    """Adam for ``max_iter`` full-batch steps; returns the RMSE history as floats."""
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)

    # RMSEs stay on the device until the end: a .item() per step would sync every step
    losses = []
    for _ in range(max_iter):
        optimizer.zero_grad()
        loss = rmse()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    with torch.no_grad():
        losses.append(rmse())
    return torch.stack(losses).tolist()
