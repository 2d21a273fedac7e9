"""Paddy Doctor, the image half of fastai lesson 7: train, measure memory, ensemble.

``train_run`` fits a timm architecture with fastai's ``vision_learner`` on a checked Kaggle
folder (``engine.paddy_data``) and saves everything an ensemble needs into one run folder:

    model.pkl        the fastai Learner (``learn.export``)
    metrics.csv      one row per epoch: losses, error rate(s), seconds
    test_probs.npy   (n_test, n_labels) float32 disease probabilities, rows in test_ids order
    run.json         the settings, the label vocabulary (the columns of test_probs.npy), the
                     test image ids (its rows) and the last epoch's metrics; written last, so
                     a folder without it holds no finished run
    submission.csv   image_id,label in sample_submission.csv's order

``measure_memory`` trains one short epoch per accumulation setting and reports the peak memory
of each; ``ensemble_probs`` + ``write_submission`` average saved runs into a submission.

Batches follow the lesson: ``64 // accum`` images per forward pass, and fastai's
``GradientAccumulation(64)`` steps the optimiser once per 64 images (``engine.grad_accum``
writes the same arithmetic out and the tests hold the two together).
"""

import gc
import json
import logging
import os
import re
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.learner import Recorder
from fastai.torch_core import set_seed
from fastai.vision.all import (
    CategoryBlock, ColReader, DataBlock, ImageBlock, PadMode, RandomSplitter, Resize,
    aug_transforms, vision_learner,
)

from engine.errors import InputError
from engine.grad_accum import SAMPLES_PER_STEP, micro_batch_size
from engine.paddy_data import SAMPLE_SUBMISSION, TRAIN_CSV

log = logging.getLogger("xlmirror")

RESIZE_METHODS = ("squish", "crop", "pad")
VALID_PCT = 0.2  # fastai's RandomSplitter default, as in the lesson
MIN_SCALE = 0.75  # aug_transforms' random crops keep at least 75% of the image (the lesson's)
DEFAULT_ACCUMS = (1, 2, 4, 8, 16)

RUN_FORMAT = "xlmirror-paddy-run/1"
MODEL_FILE = "model.pkl"
METRICS_FILE = "metrics.csv"
PROBS_FILE = "test_probs.npy"
RUN_FILE = "run.json"
SUBMISSION_FILE = "submission.csv"


@dataclass
class TrainConfig:
    """The settings of one run (the ``xlmirror paddy train`` options)."""

    arch: str  # a timm model name, e.g. "convnext_small_in22k"
    size: int  # pixels: images are resized to size x size
    resize_method: str = "squish"  # one of RESIZE_METHODS
    accum: int = 1  # micro-batches per optimiser step: batch size 64 // accum
    epochs: int = 12
    lr: float = 0.01
    multi_target: bool = False  # 20 outputs: disease and variety
    tta: bool = False  # test-time augmentation for the test predictions
    seed: int = None  # fixes the validation split and fastai's seeds; None: a fresh split
    pretrained: bool = True  # ImageNet weights from timm (needs them cached or a network)

    @property
    def batch_size(self):
        """Images per forward pass: 64 // accum (InputError unless accum divides 64)."""
        return micro_batch_size(self.accum)

    def check(self):
        """Raise InputError for a setting no run could use."""
        if not timm.is_model(self.arch):
            raise InputError(
                f"--arch {self.arch!r} is not a timm architecture; list them with "
                "python -c \"import timm; print(timm.list_models('*convnext*'))\""
            )
        if self.resize_method not in RESIZE_METHODS:
            raise InputError(
                f"--resize-method {self.resize_method!r} is not one of {', '.join(RESIZE_METHODS)}"
            )
        for name, value in (("--size", self.size), ("--epochs", self.epochs)):
            if value < 1:
                raise InputError(f"{name} {value} must be at least 1")
        if not self.lr > 0:
            raise InputError(f"--lr {self.lr} must be a positive learning rate")
        micro_batch_size(self.accum)


@dataclass
class RunResult:
    """What ``train_run`` saved, in memory."""

    run_dir: Path
    epochs: list  # one dict per epoch, the rows of metrics.csv
    probs: np.ndarray  # (n_test, n_labels) float32 disease probabilities
    test_ids: list  # n_test image ids, sample_submission.csv's order
    labels: list  # n_labels disease labels, sorted: the columns of probs
    device: str


# ----------------------------------------------------------------------------- multi-target


def disease_error(out, disease, *variety, n_labels):
    """Share of images whose top disease score is wrong; ``out`` (B, >= n_labels) logits."""
    return (out[:, :n_labels].argmax(dim=1) != disease).float().mean()


def variety_error(out, disease, variety, *, n_labels):
    """Share of images whose top variety score is wrong; ``out`` (B, n_labels + n_varieties)."""
    return (out[:, n_labels:].argmax(dim=1) != variety).float().mean()


class DiseaseVarietyLoss:
    """Cross-entropy of the disease half of the outputs plus cross-entropy of the variety half.

    ``out`` is (B, n_labels + n_varieties) logits, ``disease`` and ``variety`` are (B,) class
    indices. One network learns both; the variety is an extra signal, the disease the answer.
    """

    def __init__(self, n_labels):
        self.n_labels = n_labels

    def __call__(self, out, disease, variety):
        n = self.n_labels
        return F.cross_entropy(out[:, :n], disease) + F.cross_entropy(out[:, n:], variety)

    def activation(self, out):
        """What fastai's get_preds and tta return: each half as probabilities, (B, n_out)."""
        n = self.n_labels
        return torch.cat([out[:, :n].softmax(dim=1), out[:, n:].softmax(dim=1)], dim=1)


# ---------------------------------------------------------------------------------- training


class EpochLog(Callback):
    """Collects and logs each epoch's losses and metrics as the Recorder wrote them."""

    order = Recorder.order + 1  # after the Recorder has finished this epoch's row

    def __init__(self, stages):
        self.stages = stages  # a name per fit: fine_tune fits twice (head only, then all)
        self.rows = []
        self.fit_index = -1

    def before_fit(self):
        self.fit_index += 1

    def before_epoch(self):
        self.started = time.perf_counter()

    def after_epoch(self):
        names = list(self.recorder.metric_names)[1:-1]  # drop 'epoch' and the 'time' string
        values = list(self.recorder.log)[1:len(names) + 1]
        row = {"stage": self.stages[self.fit_index], "epoch": self.epoch + 1}
        row.update({name: _number(value) for name, value in zip(names, values)})
        row["seconds"] = round(time.perf_counter() - self.started, 2)
        self.rows.append(row)
        log.info("%s epoch %d/%d: %s (%.1f s)", row["stage"], row["epoch"], self.n_epoch,
                 ", ".join(f"{name} {row[name]:.4f}" for name in names
                           if row[name] is not None), row["seconds"])


def _number(value):
    return None if value is None else float(value)


def paddy_dataloaders(data, config, batch_size, train=None, num_workers=None):
    """fastai DataLoaders for ``data`` (a PaddyData); ``train`` replaces data.train if given.

    Inputs are (B, 3, size, size) image batches; targets are the disease index (B,), and with
    ``config.multi_target`` also the variety index (B,). 20% of the rows are held out for
    validation by a RandomSplitter seeded with ``config.seed`` (None: a different split each
    run, so the members of an ensemble see different images).
    """
    rows = data.train if train is None else train
    item_tfms = Resize(config.size, method=config.resize_method, pad_mode=PadMode.Zeros)
    batch_tfms = aug_transforms(size=config.size, min_scale=MIN_SCALE)

    if config.multi_target:
        blocks = (ImageBlock, CategoryBlock(vocab=data.labels),
                  CategoryBlock(vocab=data.varieties))
        get_y = [ColReader("label"), ColReader("variety")]
    else:
        blocks = (ImageBlock, CategoryBlock(vocab=data.labels))
        get_y = ColReader("label")
    block = DataBlock(
        blocks=blocks, n_inp=1, get_x=ColReader("path"), get_y=get_y,
        splitter=RandomSplitter(VALID_PCT, seed=config.seed),
        item_tfms=item_tfms, batch_tfms=batch_tfms,
    )

    options = {} if num_workers is None else {"num_workers": num_workers}
    return block.dataloaders(rows, bs=batch_size, **options)


def paddy_learner(dls, data, config, path=None):
    """A fastai Learner: ``config.arch`` from timm with fastai's head, stepping every 64 images.

    Mixed precision (``to_fp16``) only on CUDA: on a CPU it would be slower, not lighter.
    """
    n_labels = len(data.labels)
    if config.multi_target:
        loss_func = DiseaseVarietyLoss(n_labels)
        metrics = [partial(disease_error, n_labels=n_labels),
                   partial(variety_error, n_labels=n_labels)]
        n_out = n_labels + len(data.varieties)
    else:
        loss_func = None  # fastai picks cross-entropy for a CategoryBlock
        metrics = [partial(disease_error, n_labels=n_labels)]
        n_out = None

    try:
        learn = vision_learner(
            dls, config.arch, pretrained=config.pretrained, loss_func=loss_func,
            metrics=metrics, n_out=n_out, path=path,
            cbs=[GradientAccumulation(SAMPLES_PER_STEP)],
        )
    except OSError as exc:  # timm found neither cached weights nor a network to fetch them
        if not config.pretrained:
            raise
        raise InputError(
            f"the pretrained weights of {config.arch} could not be loaded "
            f"({exc.__class__.__name__}); connect to the network once so timm caches them, "
            "or pass --no-pretrained"
        ) from None

    if dls.device.type == "cuda":
        learn.to_fp16()
    return learn


def check_run_dir(run_dir, force=False):
    """Raise InputError if ``run_dir`` holds anything and ``force`` is not set."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir} is a file; --out names the folder a run is saved in")
    if force or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return

    held = "a previous run" if (run_dir / RUN_FILE).is_file() else "other files"
    raise InputError(
        f"{run_dir} already holds {held}; choose a new --out folder, or pass --force to "
        "replace its run files"
    )


def n_training_images(n_images):
    """Images RandomSplitter leaves for training out of ``n_images`` (it holds out the floor)."""
    return n_images - int(VALID_PCT * n_images)


def train_run(data, run_dir, config, force=False, num_workers=None, show_progress=True):
    """Train ``config`` on ``data`` and save the run into ``run_dir`` (see the module's list).

    With ``config.pretrained`` it is fastai's ``fine_tune`` (one epoch on the new head, then
    ``config.epochs`` on all layers); from random weights it is ``fit_one_cycle``, since there
    is no trained body to protect. ``show_progress`` keeps fastai's own bar and table (stdout).

    Returns a RunResult.
    """
    config.check()
    batch_size = config.batch_size
    check_run_dir(run_dir, force)
    n_train = n_training_images(len(data.train))
    if n_train < SAMPLES_PER_STEP:
        raise InputError(
            f"{data.root / TRAIN_CSV} lists {len(data.train)} images, which leaves {n_train} "
            f"for training: less than one optimiser step of {SAMPLES_PER_STEP}; add images"
        )

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # a replaced run must not look finished if this one stops half-way
    (run_dir / RUN_FILE).unlink(missing_ok=True)
    if config.seed is not None:
        set_seed(config.seed, reproducible=True)

    dls = paddy_dataloaders(data, config, batch_size, num_workers=num_workers)
    learn = paddy_learner(dls, data, config, path=run_dir)
    device = str(dls.device)
    log.info("training %s at %d px (%s) on %s: batch %d x %d accumulated = %d per step%s",
             config.arch, config.size, config.resize_method, device, batch_size, config.accum,
             batch_size * config.accum, ", mixed precision" if device.startswith("cuda") else "")

    stages = ["head", "all"] if config.pretrained else ["all"]
    epoch_log = EpochLog(stages)
    with _progress(learn, show_progress):
        if config.pretrained:
            learn.fine_tune(config.epochs, config.lr, cbs=[epoch_log])
        else:
            learn.fit_one_cycle(config.epochs, config.lr, cbs=[epoch_log])
        probs = predict_test(learn, data, tta=config.tta)

    result = RunResult(run_dir, epoch_log.rows, probs, list(data.test["image_id"]),
                       list(data.labels), device)
    _save_run(learn, data, config, result, batch_size)
    return result


def predict_test(learn, data, tta=False):
    """Disease probabilities for the test images, (n_test, n_labels) float32.

    ``tta``: fastai's test-time augmentation (the mean of 4 augmented passes, blended 3:1
    with the plain pass). For a multi-target network the variety half is dropped.
    """
    dl = learn.dls.test_dl(data.test)
    if tta:
        probs, _ = learn.tta(dl=dl)
    else:
        probs, _ = learn.get_preds(dl=dl)
    return probs[:, :len(data.labels)].float().numpy()


def _save_run(learn, data, config, result, batch_size):
    run_dir = result.run_dir

    learn.to_fp32()  # the exported Learner should load on a machine without CUDA
    learn.export(MODEL_FILE)
    write_atomic(run_dir / METRICS_FILE,
                 lambda temp: pd.DataFrame(result.epochs).to_csv(temp, index=False))
    write_atomic(run_dir / PROBS_FILE, lambda temp: _save_npy(temp, result.probs))
    write_submission(run_dir / SUBMISSION_FILE, result.test_ids, result.labels, result.probs,
                     force=True)

    description = dict(
        format=RUN_FORMAT, data=str(data.root), **asdict(config), batch_size=batch_size,
        samples_per_step=SAMPLES_PER_STEP, device=result.device, labels=result.labels,
        varieties=list(data.varieties), test_ids=result.test_ids,
        final_metrics=result.epochs[-1] if result.epochs else None,
    )
    write_atomic(run_dir / RUN_FILE,
                 lambda temp: Path(temp).write_text(json.dumps(description, indent=2) + "\n"))
    for name in (MODEL_FILE, METRICS_FILE, PROBS_FILE, SUBMISSION_FILE, RUN_FILE):
        log.info("wrote %s", run_dir / name)


def _save_npy(path, array):
    with open(path, "wb") as handle:  # np.save(path) would append .npy to the temp name
        np.save(handle, array)


@contextmanager
def _progress(learn, show):
    """Keep fastai's bar and table (they go to stdout), or silence both."""
    if show:
        yield
        return
    with learn.no_bar(), learn.no_logging():
        yield


# ------------------------------------------------------------------------------------ memory


@dataclass
class MemoryPoint:
    accum: int
    batch_size: int  # images per forward pass, 64 // accum
    peak_bytes: int


@dataclass
class MemoryReport:
    """Peak memory per accumulation setting.

    ``kind`` is "cuda" (``torch.cuda.max_memory_allocated``, reset before each setting) or
    "process" (without CUDA: this process's peak resident memory, ``ru_maxrss``, which the
    kernel never resets, so each point is the peak up to the end of that setting's epoch).
    """

    kind: str
    label: str  # the class trained on, or None for the whole training set
    n_images: int
    points: list = field(default_factory=list)
    budget_bytes: int = None

    def smallest_fitting_accum(self):
        """The smallest accum whose GPU peak fits the budget; None if none or not measurable."""
        if self.kind != "cuda" or self.budget_bytes is None:
            return None
        fitting = [p.accum for p in self.points if p.peak_bytes <= self.budget_bytes]
        return min(fitting) if fitting else None


def probe_rows(train):
    """The rows for a memory probe: the smallest label with at least one optimiser step of
    training images (the lesson used its smallest class to keep the epoch short).

    Returns (rows, label), label None when no one label is big enough and all rows are used.
    """
    counts = train["label"].value_counts()
    for label, count in sorted(counts.items(), key=lambda item: (item[1], item[0])):
        if n_training_images(count) >= SAMPLES_PER_STEP:
            return train[train["label"] == label], label
    return train, None


def measure_memory(data, arch, size, accums=DEFAULT_ACCUMS, resize_method="squish",
                   pretrained=True, budget_bytes=None, num_workers=None, show_progress=True):
    """Train all layers one epoch (fit_one_cycle, lr 0.01) per ``accum``; returns a MemoryReport.

    Memory is freed between settings (the Learner dropped, ``gc.collect`` and, on CUDA,
    ``torch.cuda.empty_cache``) so that one setting's cache does not count against the next.
    """
    rows, label = probe_rows(data.train)
    if n_training_images(len(rows)) < SAMPLES_PER_STEP:
        raise InputError(
            f"{data.root / TRAIN_CSV} lists {len(rows)} images, less than one optimiser step of "
            f"{SAMPLES_PER_STEP} for training after the validation split; add images"
        )
    configs = [TrainConfig(arch, size, resize_method, accum, epochs=1, pretrained=pretrained)
               for accum in accums]
    for config in configs:  # every setting checked before the first one runs
        config.check()

    cuda = torch.cuda.is_available()
    report = MemoryReport("cuda" if cuda else "process", label, len(rows),
                          budget_bytes=budget_bytes)
    log.info("measuring memory on %s (%d images)%s", label or "all labels", len(rows),
             "" if cuda else "; no CUDA here, so GPU memory can't be measured: reporting the "
             "peak memory of this process instead")

    for config in configs:
        batch_size = config.batch_size
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        dls = paddy_dataloaders(data, config, batch_size, train=rows, num_workers=num_workers)
        learn = paddy_learner(dls, data, config)
        # vision_learner freezes a pretrained body; the memory that matters is that of the
        # whole network training, as in fine_tune's long phase
        learn.unfreeze()
        with _progress(learn, show_progress):
            learn.fit_one_cycle(1, 0.01)

        peak = torch.cuda.max_memory_allocated() if cuda else process_peak_bytes()
        report.points.append(MemoryPoint(config.accum, batch_size, int(peak)))
        log.info("accum %d (batch %d): peak %s memory %.0f MiB", config.accum, batch_size,
                 "GPU" if cuda else "process", peak / 2**20)

        # drop every reference before measuring the next setting
        del learn, dls
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return report


def process_peak_bytes():
    """This process's peak resident memory in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text):
    """'16GiB' -> 17179869184, '5.5GB' -> 5500000000; InputError for anything without a unit."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise InputError(
            f"--budget {text!r} is not a memory size; write a number and a unit, e.g. 16GiB, "
            "16GB or 12000MiB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# ---------------------------------------------------------------------------------- ensemble


@dataclass
class RunPredictions:
    """A finished run's test predictions, as read back from its folder."""

    run_dir: Path
    probs: np.ndarray  # (n_test, n_labels) float32
    test_ids: list
    labels: list


def load_predictions(run_dir):
    """Read ``run.json`` and ``test_probs.npy`` from a ``train_run`` folder and check them."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise InputError(
            f"{run_file} does not exist: {run_dir} is not a finished `xlmirror paddy train` run"
        )
    try:
        description = json.loads(run_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{run_file} is not valid JSON ({exc}); train the run again") from None
    if not isinstance(description, dict) or description.get("format") != RUN_FORMAT:
        raise InputError(f"{run_file} is not an xlmirror paddy run description ({RUN_FORMAT})")
    if not all(isinstance(description.get(key), list) for key in ("test_ids", "labels")):
        raise InputError(f"{run_file} lacks its test_ids or labels list; train the run again")

    probs_file = run_dir / PROBS_FILE
    try:
        probs = np.load(probs_file, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{probs_file} does not exist; train the run again") from None
    except ValueError as exc:
        raise InputError(f"{probs_file} is not a numpy array file ({exc})") from None

    test_ids, labels = description["test_ids"], description["labels"]
    if probs.shape != (len(test_ids), len(labels)):
        raise InputError(
            f"{probs_file} holds an array of shape {probs.shape}, but {run_file} lists "
            f"{len(test_ids)} test images and {len(labels)} labels; train the run again"
        )
    if not np.isfinite(probs).all():
        raise InputError(f"{probs_file} holds NaN or infinite probabilities; train the run again")
    return RunPredictions(run_dir, probs, test_ids, labels)


def ensemble_probs(runs, weights=None):
    """Weighted mean of the runs' probabilities: sum_i w_i p_i / sum_i w_i, (n_test, n_labels).

    Every run must list the same test ids in the same order and the same labels in the same
    order (the rows and columns being averaged); ``weights`` default to 1 each.
    """
    if not runs:
        raise InputError("name at least one run folder to ensemble")
    weights = [1.0] * len(runs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(runs):
        raise InputError(f"--weights gives {len(weights)} weight(s) for {len(runs)} run(s); "
                         "give one per run, in the same order")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise InputError(f"--weights {weights} must be non-negative with a positive sum")

    first = runs[0]
    for run in runs[1:]:
        _check_same_test_set(first, run)

    total = sum(w * run.probs.astype(np.float64) for w, run in zip(weights, runs))
    return total / sum(weights)


def _check_same_test_set(first, run):
    run_file = run.run_dir / RUN_FILE
    if run.labels != first.labels:
        raise InputError(
            f"{run_file} has labels {run.labels}, but {first.run_dir / RUN_FILE} has "
            f"{first.labels}; ensemble runs trained on the same data"
        )
    if run.test_ids != first.test_ids:
        same_set = sorted(run.test_ids) == sorted(first.test_ids)
        raise InputError(
            f"{run_file} lists the test images "
            f"{'in a different order' if same_set else 'of a different test set'} than "
            f"{first.run_dir / RUN_FILE}; ensemble runs that predicted from the same "
            f"{SAMPLE_SUBMISSION}"
        )


def write_submission(path, test_ids, labels, probs, force=False):
    """Write ``image_id,label`` with the most probable label of each row of ``probs``.

    ``probs`` is (n_test, n_labels) in ``test_ids`` x ``labels`` order. Written to a temporary
    file and renamed, so an interrupted write never leaves half a submission. An existing
    ``path`` is only replaced with ``force``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"{path} already exists; choose another --out or pass --force")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent} is not a folder; create it or choose another --out")

    predicted = np.asarray(labels, dtype=object)[np.argmax(probs, axis=1)]
    table = pd.DataFrame({"image_id": list(test_ids), "label": predicted})
    write_atomic(path, lambda temp: table.to_csv(temp, index=False))
    return path


def write_atomic(path, write):
    """Call ``write(temp_path)`` for a temporary file beside ``path``, then rename it over."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temp)
        os.replace(temp, path)  # atomic on one filesystem: readers see old or new, never half
    finally:
        temp.unlink(missing_ok=True)
