"""Train a collaborative-filtering model on MovieLens at scale: one process or many.

The loop follows fastai's ``fit_one_cycle`` so that its numbers can be compared with fastbook
chapter 8, but leaves out everything that costs time per sample:

- the ratings sit on the device as three tensors (user index, movie index, rating); an epoch
  is one ``randperm``, one gather of the three tensors in that order, and then contiguous
  slices, so there is no DataLoader, no collation and no per-sample Python;
- the optimizer is ``torch.optim.AdamW`` with fastai's ``Adam`` defaults (betas (0.9, 0.99),
  eps 1e-5) and its decoupled weight decay ``p -= lr * wd * p`` on every embedding table,
  biases included; as fastai's ``Learner`` (``wd_bn_bias=False``) does, the biases of linear
  layers and the batch norms are not decayed;
- ``OneCycle`` is fastai's one-cycle policy: learning rate lr_max/25 -> lr_max -> lr_max/1e5
  and beta1 0.95 -> 0.85 -> 0.95, cosine in both phases, the turn after 25% of the steps;
- losses stay on the device and are read once an epoch (every ``.item()`` is a device sync).
- on the CPU, glibc's malloc is told to keep freed memory (``keep_freed_memory``), so the
  batch-sized buffers of one step are reused by the next instead of page-faulted in anew.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel
(gloo on the CPU, NCCL on CUDA). Every process keeps its own shard of the training ratings
(every ``world_size``-th row), takes ``bs / world_size`` of each batch from it, and the
gradients are averaged, so a step sees ``bs`` ratings as in one process. Only rank 0 logs and
writes files.

Every epoch ends with a checkpoint (``checkpoint.pt`` in the run folder, written atomically);
``resume=True`` continues from it to the same weights an uninterrupted run reaches.
"""

import ctypes
import functools
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.collab_nets import MODELS, Y_RANGE, build_model
from engine.errors import InputError
from engine.torch_collab import resolve_device

log = logging.getLogger("xlmirror")

CHECKPOINT = "checkpoint.pt"  # the latest finished epoch, for resume
MODEL_FILE = "model.pt"  # the trained model with what ``recommend`` needs
PLOT_FILE = "losses.png"
FORMAT = "xlmirror-collab/1"
ADAM_BETA2 = 0.99  # fastai's sqr_mom
ADAM_EPS = 1e-5  # fastai's Adam eps (torch's default is 1e-8)
EVAL_BATCH = 1 << 18  # rows per forward pass when only predicting (no activations kept)
# from this many ratings a step, each batch is put in user order first. The set is the same, so
# the step is too (up to float rounding), but the user table is then read and its gradient
# accumulated front to back: at ML-25M size (162,541 x 50), batch 131,072, one CPU core,
# gather 18 -> 7 ms and index_add 45 -> 15 ms, for a 4 ms sort (measured before the dot
# products moved to PairDot's chunked scatter_add_, which reads the tables the same way).
# Small batches gain nothing, nor do small user tables, which stay in the cache anyway
# (ml-100k's 944 users: the sort only cost time). Sizes between were not measured.
SORTED_BATCH = 8192
SORTED_USERS = 50_000


@dataclass
class TrainConfig:
    """What defines a training run; saved with every checkpoint and compared on resume.

    Parameters
    ----------
    model : {"dot", "dotbias", "nn", "embnn"}, default "dotbias"
        See ``engine.collab_nets.build_model``.
    n_factors : int, default 50
        Width of the dot-product models' tables.
    y_range : (float, float) or None, default (0, 5.5)
        Predictions squashed into this range by ``sigmoid_range``; None leaves them raw.
    layers : tuple of int, default (100, 50)
        Hidden widths of "embnn".
    n_hidden : int, default 100
        Hidden width of "nn".
    init : {"truncated", "normal"}, default "truncated"
        How the embeddings start (std 0.01); "truncated" is fastai's.
    epochs : int, default 5
    lr : float, default 5e-3
        The one-cycle peak learning rate.
    wd : float, default 0.1
        Decoupled weight decay: each step multiplies the decayed weights by ``1 - lr * wd``.
    bs : int, default 64
        Ratings per optimizer step, over all processes together.
    pct_start, div, div_final : float, defaults 0.25, 25, 1e5
        One-cycle shape (fastai's ``fit_one_cycle`` defaults).
    moms : (float, float, float), default (0.95, 0.85, 0.95)
        Adam's beta1 at the start, at the peak learning rate and at the end.
    seed : int or None
        Seeds the initial weights and the order of every epoch; None draws one (then kept in
        the checkpoint, so a resumed run uses it).
    amp : bool, default True
        Mixed precision (float16 autocast with a gradient scaler) when on CUDA; ignored on
        the CPU.
    """

    model: str = "dotbias"
    n_factors: int = 50
    y_range: tuple | None = Y_RANGE
    layers: tuple = (100, 50)
    n_hidden: int = 100
    init: str = "truncated"
    epochs: int = 5
    lr: float = 5e-3
    wd: float = 0.1
    bs: int = 64
    pct_start: float = 0.25
    div: float = 25.0
    div_final: float = 1e5
    moms: tuple = (0.95, 0.85, 0.95)
    seed: int | None = None
    amp: bool = True

    def to_dict(self):
        """Plain types only (lists for tuples), so that ``torch.load(weights_only=True)``
        reads it back."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        values = {key: tuple(value) if isinstance(value, list) else value
                  for key, value in values.items()}
        return cls(**values)


@dataclass
class EpochStats:
    """One epoch: mean training loss over its batches, validation MSE, wall time (s)."""

    epoch: int  # 1-based
    train_loss: float
    valid_loss: float
    seconds: float


@dataclass
class TrainResult:
    model: nn.Module  # trained, on ``device``, not wrapped in DDP
    history: list  # of EpochStats, the resumed epochs included
    device: str
    config: TrainConfig
    files: list = field(default_factory=list)  # paths written (rank 0 only)


# ---------------------------------------------------------------------------------------------
# one-cycle schedule


def cosine_anneal(start, end, pos):
    """``start`` at pos 0 to ``end`` at pos 1 along half a cosine."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


@dataclass(frozen=True)
class OneCycle:
    """fastai's one-cycle policy as a function of the optimizer step.

    Parameters
    ----------
    lr_max : float
        The peak learning rate.
    total_steps : int
        Optimizer steps in the whole run (epochs * steps per epoch).
    pct_start, div, div_final, moms
        As in ``TrainConfig``.

    Notes
    -----
    Step ``i`` (0-based) is at position ``pos = i / total_steps``, the ``pct_train`` fastai's
    ``ParamScheduler`` sees before batch ``i``. For ``pos < pct_start`` the learning rate goes
    from ``lr_max / div`` up to ``lr_max``, afterwards down to ``lr_max / div_final``; beta1
    follows ``moms`` the same way.
    """

    lr_max: float
    total_steps: int
    pct_start: float = 0.25
    div: float = 25.0
    div_final: float = 1e5
    moms: tuple = (0.95, 0.85, 0.95)

    def _phase(self, step):
        """(phase 0 or 1, position within it in [0, 1]) of optimizer step ``step``."""
        pos = step / self.total_steps
        if pos < self.pct_start:
            return 0, pos / self.pct_start
        return 1, (pos - self.pct_start) / (1 - self.pct_start)

    def lr(self, step):
        phase, pos = self._phase(step)
        if phase == 0:
            return cosine_anneal(self.lr_max / self.div, self.lr_max, pos)
        return cosine_anneal(self.lr_max, self.lr_max / self.div_final, pos)

    def mom(self, step):
        phase, pos = self._phase(step)
        start, middle, end = self.moms
        if phase == 0:
            return cosine_anneal(start, middle, pos)
        return cosine_anneal(middle, end, pos)


# ---------------------------------------------------------------------------------------------
# optimizer


def decay_groups(model):
    """Split the parameters as fastai's ``Learner(wd_bn_bias=False)`` does.

    Returns
    -------
    (decayed, not_decayed) : pair of lists of parameters
        Not decayed: every parameter of a batch norm and the ``bias`` of any module that has
        one (linear layers). Embedding tables, bias tables included, are decayed.
    """
    exempt = {}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            exempt.update((id(p), p) for p in module.parameters(recurse=False))
        elif isinstance(getattr(module, "bias", None), nn.Parameter):
            exempt[id(module.bias)] = module.bias
    decayed = [p for p in model.parameters() if id(p) not in exempt]
    return decayed, list(exempt.values())


def make_optimizer(model, config, device):
    """AdamW with fastai's Adam defaults; the schedule sets lr and beta1 before each step."""
    decayed, not_decayed = decay_groups(model)
    groups = [{"params": decayed, "weight_decay": config.wd}]
    if not_decayed:
        groups.append({"params": not_decayed, "weight_decay": 0.0})
    hypers = {"lr": config.lr, "betas": (config.moms[0], ADAM_BETA2), "eps": ADAM_EPS}
    try:
        # fused: one kernel per tensor for the whole update instead of one per operation, on
        # the CPU too (measured on one core: 19 ms against 77 ms for ML-25M-sized tables)
        return torch.optim.AdamW(groups, fused=True, **hypers)
    except RuntimeError:  # torch before 2.4 fuses on CUDA only
        return torch.optim.AdamW(groups, **hypers)


def set_hypers(optimizer, lr, mom):
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["betas"] = (mom, ADAM_BETA2)


# ---------------------------------------------------------------------------------------------
# processes


@dataclass
class Processes:
    """This process's place among the training processes (one, unless under torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    started_group: bool = False  # we initialised torch.distributed, so we tear it down

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def start_processes(device_name):
    """Join the process group torchrun set up, if any, and pick this process's device.

    torchrun passes ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in the environment; a
    process started any other way trains alone.
    """
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes(device=device)

    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device, started)


def _all_sum(tensor, processes):
    """The sum of ``tensor`` over all processes (itself when alone)."""
    if processes.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _barrier(processes):
    if processes.distributed:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------------------
# data


def _shard(array, processes, length=None):
    """Every ``world_size``-th row of ``array`` from ``rank`` on, cut to ``length`` rows.

    Strided rather than contiguous: canonical MovieLens splits are sorted by user, and a
    contiguous block would give each process other users.
    """
    shard = array[processes.rank::processes.world_size]
    return shard if length is None else shard[:length]


def _device_tensors(users, movies, ratings, device):
    """The three columns as (int64, int64, float32) tensors on ``device``: one copy each."""
    # torch.tensor copies: the arrays may be read-only views into a DataFrame
    return (
        torch.tensor(np.asarray(users), dtype=torch.int64, device=device),
        torch.tensor(np.asarray(movies), dtype=torch.int64, device=device),
        torch.tensor(np.asarray(ratings), dtype=torch.float32, device=device),
    )


@functools.cache
def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the OS.

    A CPU training step allocates a few batch-sized buffers (3.2 MB each at 16,000 ratings of
    width 50) and frees them again. glibc serves blocks that large with ``mmap``, or returns
    the top of its heap to the OS once it is freed, so steps keep page-faulting fresh zeroed
    memory in: ~10,000 to 40,000 faults in a 5-epoch fit on ml-100k, about none with this.
    Raising ``M_MMAP_THRESHOLD`` to its 32 MiB maximum and ``M_TRIM_THRESHOLD`` to 1 GiB
    makes later steps reuse the same pages (the fit measured ~25% faster on one core). The
    cost is that the process keeps its peak heap until it exits. Process-wide, done once;
    does nothing where the C library is not glibc.

    Returns
    -------
    bool
        True when both settings were taken.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this Python runs on
    except (OSError, AttributeError):  # one without mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    taken = [mallopt(m_mmap_threshold, 32 << 20), mallopt(m_trim_threshold, 1 << 30)]
    return all(taken)


def _epoch_generator(seed, epoch, rank, device):
    """A generator for one epoch's order, a function of (seed, epoch, rank) only.

    Keyed rather than carried over from epoch to epoch, so a resumed run draws the same
    orders without restoring any generator state.
    """
    key = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(key))
    return generator


def _shuffled_order(n_rows, generator, device):
    """A random permutation of ``range(n_rows)``, (n_rows,) int64 on ``device``."""
    return torch.randperm(n_rows, generator=generator, device=device)


def epoch_order(seed, epoch, n_rows, rank=0, device="cpu"):
    """The order in which ``train`` visits a process's ``n_rows`` training rows in epoch
    ``epoch`` (0-based) of a run seeded ``seed``, (n_rows,) int64 on ``device``; batches are
    consecutive slices of it. Another trainer given these orders sees the same batches."""
    device = torch.device(device)
    return _shuffled_order(n_rows, _epoch_generator(seed, epoch, rank, device), device)


@torch.no_grad()
def predict(model, user_index, movie_index, bs=EVAL_BATCH):
    """Predictions of ``model`` (in eval mode) for index tensors on its device, (n,) float32."""
    was_training = model.training
    model.eval()
    parts = [model(user_index[i:i + bs], movie_index[i:i + bs]).float()
             for i in range(0, len(user_index), bs)]
    model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, device=user_index.device)


@torch.no_grad()
def _squared_error_sum(model, user_index, movie_index, ratings, amp, bs=EVAL_BATCH):
    """Sum of squared errors over the given rows, a 0-d float64 tensor (no device sync)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=ratings.device)
    for i in range(0, len(ratings), bs):
        with _autocast(ratings.device, amp):
            predictions = model(user_index[i:i + bs], movie_index[i:i + bs])
        errors = predictions.float() - ratings[i:i + bs]
        total += (errors * errors).sum(dtype=torch.float64)
    model.train(was_training)
    return total


def _autocast(device, amp):
    # float16 autocast only on CUDA: the CPU has no GradScaler path and bfloat16 there is slower
    return torch.autocast(device_type=device.type, dtype=torch.float16,
                          enabled=amp and device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# checks


def check_config(config):
    """InputError for settings no run can use."""
    if config.model not in MODELS:
        raise InputError(f"model {config.model!r} is not one of {', '.join(MODELS)}")
    for name in ("epochs", "bs", "n_factors", "n_hidden"):
        if getattr(config, name) < 1:
            raise InputError(f"{name} must be 1 or more, got {getattr(config, name)}")
    if not config.layers or min(config.layers) < 1:
        raise InputError(f"layers must be one or more widths of 1 or more, got "
                         f"{list(config.layers)}")
    if not config.lr > 0:
        raise InputError(f"the learning rate must be above 0, got {config.lr}")
    if not config.wd >= 0:
        raise InputError(f"the weight decay must be 0 or more, got {config.wd}")
    if not 0 <= config.pct_start < 1:
        raise InputError(f"pct_start must be in [0, 1), got {config.pct_start}")
    if config.y_range is not None and not config.y_range[0] < config.y_range[1]:
        raise InputError(f"y_range must be (low, high) with low < high, got {config.y_range}")
    if config.model == "nn" and config.y_range is None:
        raise InputError("model 'nn' squashes its output into y_range: give one")


def check_run_dir(run_dir, force=False, resume=False):
    """Refuse to write over a finished or started run unless told to; create the folder.

    With ``force`` (and no ``resume``) the old run's checkpoint, model and plot are deleted,
    so that the folder never mixes two runs.

    Returns
    -------
    pathlib.Path
    """
    run_dir = Path(run_dir)
    existing = [name for name in (CHECKPOINT, MODEL_FILE) if (run_dir / name).exists()]
    if resume:
        if not (run_dir / CHECKPOINT).exists():
            raise InputError(f"cannot resume: {run_dir / CHECKPOINT} does not exist")
    elif existing and not force:
        raise InputError(
            f"{run_dir} already holds a run ({', '.join(existing)}): pass --resume to continue "
            f"it, --force to start over there, or another --out"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir} exists and is not a folder")
    try:  # now, not after the first epoch: a parent that is a file fails here
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the run folder {run_dir}: {exc.strerror}; choose "
                         f"another --out") from None
    if force and not resume:
        # a forced run starts over: the old run's files must not pass for the new run's,
        # even if this one is interrupted before it writes its own
        for name in (CHECKPOINT, MODEL_FILE, PLOT_FILE):
            (run_dir / name).unlink(missing_ok=True)
    return run_dir


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_atomic(obj, path):
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed.

    A crash while writing leaves the previous file intact: the rename is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as stream:
        torch.save(obj, stream)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def _vocabulary_ids(vocabulary):
    """The raw ids of rows 1..n as a plain list (ints or strings): weights_only-loadable."""
    return vocabulary.ids.tolist()


def _rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(path):
    """The dict a training run saved; an InputError if it is not one."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder, not a checkpoint file") from None
    except Exception as exc:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise InputError(f"{path} is not a readable checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path} is not an xlmirror collaborative-filtering checkpoint")
    return state


def _first_line(exc):
    """A short reason for a failed load: torch's own messages run to many lines of advice."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if not text or text.isdigit() or "weights_only" in text or len(text) > 120:
        return f"{type(exc).__name__}: not a PyTorch file, or a damaged one"
    return f"{type(exc).__name__}: {text}"


def _check_same_run(saved, config, split, path):
    """InputError when ``resume`` is asked to continue a run with other settings or data."""
    differences = [
        f"{key}: run {value!r}, now {config.to_dict()[key]!r}"
        for key, value in saved["config"].items() if config.to_dict().get(key) != value
    ]
    if differences:
        raise InputError(
            f"{path} was started with other settings ({'; '.join(differences)}); resume with "
            f"the same ones or start a new run"
        )
    if (saved["users"] != _vocabulary_ids(split.users)
            or saved["movies"] != _vocabulary_ids(split.movies)):
        raise InputError(
            f"{path} was trained on other data (its user or movie vocabulary differs); resume "
            f"with the same dataset, split and seed"
        )


# ---------------------------------------------------------------------------------------------
# the training loop


def train(split, config, device="auto", run_dir=None, resume=False, progress=True,
          stop_after_epoch=None, model=None, meta=None, titles=None):
    """Train ``config.model`` on an encoded split with one-cycle Adam; MSE loss.

    Parameters
    ----------
    split : engine.splits.EncodedSplit
        Index arrays and float32 ratings for training and validation, vocabularies from the
        training part (row 0 of each table is the unknown id).
    config : TrainConfig
    device : {"auto", "cpu", "cuda"}, default "auto"
        Under torchrun with CUDA, each process takes the GPU of its ``LOCAL_RANK``.
    run_dir : path-like, optional
        Where ``checkpoint.pt`` (every epoch) and ``model.pt`` (at the end) go. None writes
        nothing (and cannot resume).
    resume : bool, default False
        Continue the run saved in ``run_dir/checkpoint.pt``: same settings and data required.
    progress : bool, default True
        A tqdm bar per epoch on stderr (rank 0 only).
    stop_after_epoch : int, optional
        Stop once this many epochs are done, the schedule still spanning ``config.epochs``:
        a long run split over several sessions, continued with ``resume``.
    model : torch.nn.Module, optional
        Train this module instead of building ``config.model`` (``forward(user_index,
        movie_index) -> (batch,)``); ``config.model`` then only labels the run. On resume,
        pass one built the same way.
    meta : dict, optional
        Plain values saved beside the config (where the data came from, the split), for the
        caller to read back.
    titles : dict, optional
        Raw movie id -> title, saved in ``model.pt`` for ``recommend``.

    Returns
    -------
    TrainResult

    Notes
    -----
    On the CPU this calls ``keep_freed_memory``: from then on the whole process keeps freed
    memory for reuse, so its resident size stays at its peak until it exits.
    """
    check_config(config)
    if resume and run_dir is None:
        raise InputError("resume needs the run's folder")
    processes = start_processes(device)
    try:
        return _train(split, config, processes, run_dir, resume, progress, stop_after_epoch,
                      model, meta or {}, titles)
    finally:
        if processes.started_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(split, config, processes, run_dir, resume, progress, stop_after_epoch, model,
           meta, titles):
    device = processes.device
    run_dir = None if run_dir is None else Path(run_dir)
    checkpoint_path = None if run_dir is None else run_dir / CHECKPOINT
    saved = load_checkpoint(checkpoint_path) if resume else None
    if config.seed is None:
        # a resumed run keeps the seed it drew; a new one draws its own (kept in checkpoints)
        seed = saved["config"]["seed"] if saved else _draw_seed(processes)
        config = replace(config, seed=seed)
    amp = config.amp and device.type == "cuda"
    if device.type == "cpu":
        keep_freed_memory()

    local_bs, n_local, steps_per_epoch = _batches(config.bs, len(split.train_ratings),
                                                  processes.world_size)

    # the same start on every process (DDP would broadcast rank 0's anyway), and the caller's
    # global random state left as it was
    label = config.model if model is None else type(model).__name__
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if model is None:
            model = build_model(config.model, len(split.users), len(split.movies),
                                n_factors=config.n_factors, y_range=config.y_range,
                                layers=config.layers, n_hidden=config.n_hidden,
                                init=config.init)
    model = model.to(device)
    optimizer = make_optimizer(model, config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    schedule = OneCycle(config.lr, config.epochs * steps_per_epoch, config.pct_start,
                        config.div, config.div_final, config.moms)

    history, start_epoch = [], 0
    if saved is not None:
        _check_same_run(saved, config, split, checkpoint_path)
        history, start_epoch = _restore(saved, model, optimizer, scaler, device)
        if processes.is_main:
            log.info("resuming %s after epoch %d of %d", checkpoint_path, start_epoch,
                     config.epochs)

    # this process's shard of the ratings, on the device once for the whole run
    train_data = _device_tensors(
        _shard(split.train_users, processes, n_local),
        _shard(split.train_movies, processes, n_local),
        _shard(split.train_ratings, processes, n_local), device)
    valid_data = _device_tensors(
        _shard(split.valid_users, processes), _shard(split.valid_movies, processes),
        _shard(split.valid_ratings, processes), device)
    n_valid = len(split.valid_ratings)

    trained = model  # the module itself, for evaluation and saving
    if processes.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if processes.is_main:
        log.info(
            "training %s on %s%s: %d training ratings (%d steps of %d per epoch), %d "
            "validation ratings, %d users, %d movies, seed %d",
            label, device,
            f" x {processes.world_size} processes" if processes.distributed else "",
            steps_per_epoch * config.bs, steps_per_epoch, config.bs, n_valid,
            len(split.users) - 1, len(split.movies) - 1, config.seed)

    sort_batches = local_bs >= SORTED_BATCH and len(split.users) >= SORTED_USERS
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()

        # one permutation and one gather per epoch; batches are then contiguous slices
        order = epoch_order(config.seed, epoch, n_local, processes.rank, device)
        # index_select: a plain gather, cheaper than advanced indexing (column[order])
        users, movies, ratings = (column.index_select(0, order) for column in train_data)

        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        bar = _progress_bar(steps_per_epoch, epoch, config.epochs,
                            progress and processes.is_main)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            set_hypers(optimizer, schedule.lr(step), schedule.mom(step))
            batch = slice(i * local_bs, (i + 1) * local_bs)
            batch_users, batch_movies, batch_ratings = users[batch], movies[batch], ratings[batch]
            if sort_batches:
                by_user = torch.argsort(batch_users)
                batch_users, batch_movies, batch_ratings = (
                    column.index_select(0, by_user)
                    for column in (batch_users, batch_movies, batch_ratings))

            with _autocast(device, amp):
                predictions = model(batch_users, batch_movies)  # (local_bs,)
            loss = F.mse_loss(predictions.float(), batch_ratings)

            optimizer.zero_grad(set_to_none=True)
            # with amp the loss is scaled up so float16 gradients do not underflow; the
            # scaler divides it out again before the step (and skips steps that overflowed)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

            loss_sum += loss.detach()  # stays on the device: no sync per step
            bar.update(1)
        bar.close()
        del users, movies, ratings, order  # freed before the next epoch's copies are made

        # the epoch's two numbers, summed over processes: the only device syncs of the epoch
        train_loss = _all_sum(loss_sum, processes) / (steps_per_epoch * processes.world_size)
        squared_errors = _squared_error_sum(trained, *valid_data, amp)
        if n_valid:
            valid_loss = _all_sum(squared_errors, processes) / n_valid
        else:  # no validation ratings: NaN, never a loss of 0 that reads like a perfect fit
            valid_loss = torch.tensor(math.nan)
        stats = EpochStats(epoch + 1, train_loss.item(), valid_loss.item(),
                           time.perf_counter() - started)
        history.append(stats)

        if processes.is_main:
            log.info("epoch %d/%d: train loss %.6f, valid loss %.6f (%.1f s)", stats.epoch,
                     config.epochs, stats.train_loss, stats.valid_loss, stats.seconds)
            if checkpoint_path is not None:
                save_atomic(_checkpoint(trained, optimizer, scaler, config, split, history,
                                        epoch + 1, device, meta), checkpoint_path)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break

    files = []
    finished = len(history) == config.epochs
    if processes.is_main and run_dir is not None:
        files.append(checkpoint_path)
        if finished:
            model_path = run_dir / MODEL_FILE
            save_atomic(_trained_model(trained, config, split, history, meta, titles),
                        model_path)
            files.append(model_path)
        for path in files:
            log.info("wrote %s", path)
    _barrier(processes)  # no process leaves before the files are there
    return TrainResult(trained, history, str(device), config, files)


def _batches(bs, n_train, world_size):
    """(ratings per process and step, rows of each process's shard, steps per epoch)."""
    if bs % world_size:
        raise InputError(f"batch size {bs} does not split evenly over {world_size} processes")
    local_bs = bs // world_size
    n_local = n_train // world_size  # equal shards, so every process takes as many steps
    steps_per_epoch = n_local // local_bs  # the last, partial batch is dropped, as in fastai
    if steps_per_epoch == 0:
        raise InputError(
            f"batch size {bs} is larger than the {n_train} training ratings: lower --bs"
        )
    return local_bs, n_local, steps_per_epoch


def _restore(saved, model, optimizer, scaler, device):
    """Put a checkpoint's state back; returns (history so far, epochs done)."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    _restore_rng(saved["rng"], device)
    return [EpochStats(**row) for row in saved["history"]], saved["epoch"]


def _draw_seed(processes):
    """A fresh seed, the same on every process (rank 0's, broadcast)."""
    seed = torch.tensor([int.from_bytes(os.urandom(4), "little")], dtype=torch.int64)
    if processes.distributed:
        import torch.distributed as dist

        # gloo broadcasts CPU tensors; NCCL needs them on the GPU
        seed = seed.to(processes.device)
        dist.broadcast(seed, src=0)
    return int(seed.item())


def _progress_bar(total, epoch, epochs, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                disable=not enabled, leave=False, mininterval=0.5)


def _checkpoint(model, optimizer, scaler, config, split, history, epochs_done, device, meta):
    return {
        "format": FORMAT,
        "config": config.to_dict(),
        "meta": meta,
        "epoch": epochs_done,
        "history": [asdict(row) for row in history],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_state(device),
        "users": _vocabulary_ids(split.users),
        "movies": _vocabulary_ids(split.movies),
    }


def seen_by_user(user_index, movie_index, n_users):
    """The movies each user rated, in compressed-row form.

    Returns
    -------
    indptr : int64 tensor, (n_users + 1,)
        User ``u`` rated ``movies[indptr[u]:indptr[u + 1]]``.
    movies : int32 tensor, (n_ratings,)
        Movie indexes, grouped by user.
    """
    user_index = np.asarray(user_index)
    order = np.argsort(user_index, kind="stable")
    counts = np.bincount(user_index, minlength=n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    movies = np.asarray(movie_index)[order].astype(np.int32)
    return torch.from_numpy(indptr.astype(np.int64)), torch.from_numpy(movies)


def _trained_model(model, config, split, history, meta, titles):
    """What ``model.pt`` holds: enough to rebuild the model and recommend with it."""
    seen_indptr, seen_movies = seen_by_user(split.train_users, split.train_movies,
                                            len(split.users))
    movie_ids = _vocabulary_ids(split.movies)
    titles = titles or {}
    return {
        "format": FORMAT,
        "config": config.to_dict(),
        "meta": meta,
        "history": [asdict(row) for row in history],
        "model": {name: value.cpu() for name, value in model.state_dict().items()},
        "users": _vocabulary_ids(split.users),
        "movies": movie_ids,
        "titles": [titles.get(movie) for movie in movie_ids],
        "seen_indptr": seen_indptr,
        "seen_movies": seen_movies,
    }


def save_loss_plot(history, path, title=None):
    """Train and validation loss per epoch as a PNG (matplotlib's Agg, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    epochs = [row.epoch for row in history]
    axes.plot(epochs, [row.train_loss for row in history], marker="o", label="train")
    axes.plot(epochs, [row.valid_loss for row in history], marker="o", label="valid")
    axes.set_xlabel("epoch")
    axes.set_ylabel("MSE")
    axes.set_xticks(epochs)
    if title:
        axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return Path(path)
