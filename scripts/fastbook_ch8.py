"""fastbook chapter 8 on MovieLens 100K: every model of the chapter trained by our engine and,
in the same run, by fastai, with the per-epoch losses side by side.

Both routes get the same data: the ratings with their titles (the chapter's items are titles),
the same random 20% held out (``engine.splits.random_split`` draws what fastai's
``RandomSplitter`` draws) and the same vocabularies. fastai trains either its own model
(``collab_learner``) or, where the chapter writes a model by hand, the same module class as our
engine wrapped for fastai's (batch, 2) input, in a plain ``Learner``. The target is that the two
end within 0.01 valid MSE of each other.

By default (``--start same``) both routes start from the same weights (fastai's own model's
initial weights copied into ours, or one draw of the chapter's module copied into both) and
fastai's loader is handed our engine's batch order for every epoch, so that what is left
between the two columns is the difference between the implementations (fastai's ``Adam`` and
its callbacks against ``engine.train_collab``), not the luck of a seed: the models without
weight decay move by ~0.015 valid MSE from one seed to the next. ``--start own`` lets each
route draw its own weights and order; compare means over ``--seeds`` then.

Where the chapter gives no weight decay, fastai's Adam uses its default wd of 0.01; the same
value is given to our engine (the book's table calls it 0).

fastai 2.8 trains tabular and collab models from ``TabWeightedDL`` (``TabularPandas._dl_type``
in fastai/tabular/core.py), which draws each epoch's rows *with replacement*
(``np.random.choice``): an epoch sees ~63% of the ratings, some twice. fastbook was written with
a permutation per epoch, as our engine does, so by default fastai is given ``TabDataLoader``
(a permutation); ``--fastai-sampling replacement`` shows fastai 2.8's default instead.

Takes ~10 minutes on two CPU cores (fastai's bs-64 loop is ~12 s an epoch, ours ~1.5 s):

    python scripts/fastbook_ch8.py                       # all models, 5 epochs
    python scripts/fastbook_ch8.py --models dot,embnn --epochs 2
    python scripts/fastbook_ch8.py --no-fastai           # our engine only
    python scripts/fastbook_ch8.py --models dot --start own --seeds 4   # independent draws
"""

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.collab_nets import CollabNN, build_model, load_fastai_state  # noqa: E402
from engine.releases import find_release, load_release  # noqa: E402
from engine.splits import encode_split, random_split  # noqa: E402
from engine.torch_collab import DotProduct, DotProductBias  # noqa: E402
from engine.train_collab import TrainConfig, epoch_order, train  # noqa: E402

log = logging.getLogger("xlmirror")

Y_RANGE = (0.0, 5.5)
FASTAI_DEFAULT_WD = 0.01  # fastai's Adam default, in force where the chapter passes no wd


@dataclass
class Chapter:
    """One model of the chapter: how each route builds it and what the book reports."""

    label: str
    wd: float
    book: float  # the chapter's validation MSE after epoch 5
    ours: callable  # (n_users, n_movies) -> nn.Module with forward(user_index, movie_index)
    fastai: str  # "learner": fastai trains ``ours``'s class; else a collab_learner preset


MODELS = {
    "dot": Chapter("dot product", FASTAI_DEFAULT_WD, 0.884,
                   lambda u, m: DotProduct(u, m, 50, init="truncated"), "learner"),
    "dot-range": Chapter("dot product, sigmoid range", FASTAI_DEFAULT_WD, 0.878,
                         lambda u, m: DotProduct(u, m, 50, Y_RANGE, init="truncated"),
                         "learner"),
    "dotbias": Chapter("dot product + biases, sigmoid range", FASTAI_DEFAULT_WD, 0.893,
                       lambda u, m: DotProductBias(u, m, 50, Y_RANGE, init="truncated"),
                       "learner"),
    "dotbias-wd": Chapter("dot product + biases, sigmoid range", 0.1, 0.823,
                          lambda u, m: DotProductBias(u, m, 50, Y_RANGE, init="truncated"),
                          "learner"),
    "dotbias-params": Chapter("same, hand-made parameters (normal, std 0.01)", 0.1, 0.824,
                              lambda u, m: DotProductBias(u, m, 50, Y_RANGE, embedding=False,
                                                          init="normal"), "learner"),
    "collab-learner": Chapter("fastai collab_learner, y_range (0, 5.5)", 0.1, 0.822,
                              lambda u, m: build_model("dotbias", u, m, 50, Y_RANGE),
                              "collab_learner"),
    "nn": Chapter("two-layer net on concatenated embeddings", 0.01, 0.867,
                  lambda u, m: CollabNN(u, m, y_range=Y_RANGE), "learner"),
    "embnn": Chapter("fastai EmbeddingNN, layers 100, 50", 0.1, 0.865,
                     lambda u, m: build_model("embnn", u, m, y_range=Y_RANGE,
                                              layers=(100, 50)), "collab_learner_nn"),
}


class PairInput(nn.Module):
    """Our (user_index, movie_index) models behind fastai's input: x of shape (batch, 2)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x[:, 0], x[:, 1])


def load_data(data_folder, seed):
    """The chapter's ratings (items are titles), split as fastai splits them for ``seed``."""
    folder = find_release("ml-100k", explicit=data_folder)
    if folder is None:
        raise SystemExit("MovieLens 100K not found: pass --data DIR or set XLMIRROR_DATA")
    data = load_release(folder, name="ml-100k")
    ratings = data.with_titles()[["user", "title", "rating"]]

    train_rows, valid_rows = random_split(ratings, 0.2, seed=seed)
    # like_fastai: fastai numbers text ids over all rows (see engine.splits.encode_split)
    split = encode_split(train_rows, valid_rows, movie="title", like_fastai=True)
    log.info("MovieLens 100K from %s: %d users, %d titles (vocabularies with #na#)", folder,
             len(split.users), len(split.movies))
    return ratings, split


def initial_model(chapter, split, seed):
    """The chapter's module for our engine, its weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return chapter.ours(len(split.users), len(split.movies))


def run_ours(model, chapter, split, epochs, seed, progress):
    config = TrainConfig(epochs=epochs, lr=5e-3, wd=chapter.wd, bs=64, seed=seed)
    result = train(split, config, device="cpu", progress=progress, model=model)
    return [(row.train_loss, row.valid_loss, row.seconds) for row in result.history]


def fastai_learner(chapter, ratings, split, seed, sampling, start=None):
    """fastai's Learner for the chapter's model, on the same split as ours.

    With ``start`` (our engine's initial module) the two runs are made to start alike: a
    hand-made chapter model trains a copy of ``start``; for fastai's own models the other way
    round, fastai's initial weights are copied into ``start``. The training loader then
    draws each epoch in the order given to it by the ``GivenOrder`` callback.
    """
    from fastai.collab import CollabDataLoaders, collab_learner
    from fastai.learner import Learner
    from fastai.losses import MSELossFlat
    from fastai.tabular.core import TabDataLoader, TabWeightedDL
    from fastai.torch_core import set_seed

    class GivenOrderDL(TabDataLoader):
        """fastai's tabular loader, its epoch a given permutation of the rows."""

        order = None  # set before each epoch by GivenOrder

        def shuffle_fn(self, idxs):
            if self.order is None:
                raise RuntimeError("GivenOrderDL draws an epoch only after the GivenOrder "
                                   "callback has handed it that epoch's order")
            return [idxs[i] for i in self.order.tolist()]

    set_seed(seed)
    if start is not None:
        dl_type = GivenOrderDL
    else:
        dl_type = TabDataLoader if sampling == "permutation" else TabWeightedDL
    dls = CollabDataLoaders.from_df(ratings, valid_pct=0.2, seed=seed, user_name="user",
                                    item_name="title", rating_name="rating", bs=64,
                                    dl_type=dl_type)
    if list(dls.classes["title"]) != split.movies.classes:
        raise SystemExit("fastai numbered the titles differently from engine.splits")
    if start is not None:
        # the same order means the same batches only if the rows are the same, in one order
        rows = dls.train.items
        if not (np.array_equal(rows["user"].to_numpy(), split.train_users)
                and np.array_equal(rows["title"].to_numpy(), split.train_movies)):
            raise SystemExit("fastai's training rows differ from engine.splits' (order or "
                             "encoding): the same start would not give the same batches")

    if chapter.fastai == "learner":
        model = (copy.deepcopy(start) if start is not None
                 else chapter.ours(len(split.users), len(split.movies)))
        return Learner(dls, PairInput(model), loss_func=MSELossFlat())
    learn = collab_learner(dls, n_factors=50, y_range=Y_RANGE,
                           use_nn=chapter.fastai == "collab_learner_nn", layers=[100, 50])
    if start is not None:
        load_fastai_state(start, learn.model.state_dict())
    return learn


def run_fastai(learn, chapter, epochs, progress, orders=None):
    """Fit ``learn`` as the chapter does; ``orders`` (one per epoch) for a GivenOrderDL."""
    from fastai.callback.core import Callback
    from tqdm.auto import tqdm

    class EpochBar(Callback):
        """A tqdm bar per epoch and the epoch's time (fastai's own bar floods a log file)."""

        order = 70  # after the Recorder, whose values the epoch line reads

        def before_epoch(self):
            self.started = time.perf_counter()
            self.bar = tqdm(total=len(self.dls.train), desc=f"fastai epoch {self.epoch + 1}",
                            leave=False, disable=not progress, mininterval=0.5)

        def after_batch(self):
            if self.training:
                self.bar.update(1)

        def after_epoch(self):
            self.bar.close()
            self.learn.epoch_seconds.append(time.perf_counter() - self.started)

    class GivenOrder(Callback):
        """Hands the training loader this epoch's order before it draws its batches."""

        def before_train(self):
            self.dls.train.order = orders[self.epoch]

    callbacks = [EpochBar()] + ([GivenOrder()] if orders is not None else [])
    learn.epoch_seconds = []
    with learn.no_bar(), learn.no_logging():
        if chapter.wd == FASTAI_DEFAULT_WD:
            learn.fit_one_cycle(epochs, 5e-3, cbs=callbacks)  # as the chapter: no wd given
        else:
            learn.fit_one_cycle(epochs, 5e-3, wd=chapter.wd, cbs=callbacks)
    # the Recorder's train loss is its smoothed loss at the end of the epoch (fastai's table)
    return [(train_loss, valid_loss, seconds) for (train_loss, valid_loss), seconds
            in zip(learn.recorder.values, learn.epoch_seconds)]


def run_both(chapter, ratings, split, args, seed):
    """(our epochs, fastai's epochs or None) for one chapter model and seed."""
    progress = not args.no_progress
    model = initial_model(chapter, split, seed)
    if args.no_fastai:
        return run_ours(model, chapter, split, args.epochs, seed, progress), None

    same = args.start == "same"
    learn = fastai_learner(chapter, ratings, split, seed, args.fastai_sampling,
                           start=model if same else None)
    orders = ([epoch_order(seed, epoch, len(split.train_ratings)) for epoch in
               range(args.epochs)] if same else None)
    theirs = run_fastai(learn, chapter, args.epochs, progress, orders)
    ours = run_ours(model, chapter, split, args.epochs, seed, progress)
    return ours, theirs


def side_by_side(key, chapter, seed, start, ours, theirs):
    lines = [f"\n{key}: {chapter.label}, wd {chapter.wd:g}, seed {seed}, {start} start "
             f"(fastbook: {chapter.book:.3f})",
             f"{'epoch':>5} | {'ours train':>10} {'ours valid':>10} {'s':>6} | "
             f"{'fastai train*':>13} {'fastai valid':>12} {'s':>6}"]
    for epoch in range(len(ours)):
        left = "{:>10.4f} {:>10.4f} {:>6.1f}".format(*ours[epoch])
        right = "{:>13.4f} {:>12.4f} {:>6.1f}".format(*theirs[epoch]) if theirs else ""
        lines.append(f"{epoch + 1:>5} | {left} | {right}")
    return "\n".join(lines)


def summary(results):
    """The last epoch's valid MSE per model, averaged over the seeds run."""
    n_seeds = len(next(iter(results.values()))["runs"])
    over = f", mean of {n_seeds} seeds" if n_seeds > 1 else ""
    lines = [f"\nvalid MSE at the last epoch{over} (* fastai's train loss is its smoothed loss)",
             f"{'model':<16}{'wd':>6}{'fastbook':>10}{'ours':>9}{'fastai':>9}{'|diff|':>9}"
             f"  within 0.01"]
    for key, row in results.items():
        ours = statistics.mean(run["ours"][-1][1] for run in row["runs"])
        line = f"{key:<16}{row['wd']:>6g}{row['book']:>10.3f}{ours:>9.4f}"
        if row["runs"][0]["fastai"] is None:
            lines.append(line)
            continue
        theirs = statistics.mean(run["fastai"][-1][1] for run in row["runs"])
        diff = abs(ours - theirs)
        lines.append(f"{line}{theirs:>9.4f}{diff:>9.4f}  {'yes' if diff <= 0.01 else 'NO'}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", metavar="DIR", help="MovieLens 100K folder (default: "
                        "$XLMIRROR_DATA, then fastai's data folder)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42, help="split, weights, batch order")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run seeds SEED..SEED+N-1 and compare the means: the models "
                             "without weight decay vary by ~0.01 from seed to seed")
    parser.add_argument("--no-fastai", action="store_true", help="train only with our engine")
    parser.add_argument("--start", choices=("same", "own"), default="same",
                        help="same (default): fastai starts from our initial weights and draws "
                             "our batch order; own: each route draws its own")
    parser.add_argument("--fastai-sampling", choices=("permutation", "replacement"),
                        default="permutation",
                        help="with --start own, fastai's epoch: a permutation of the rows as "
                             "in fastbook and our engine (default), or fastai 2.8's draw with "
                             "replacement")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: bs-64 steps are too small to share)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    keys = [key.strip() for key in args.models.split(",") if key.strip()]
    unknown = [key for key in keys if key not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
    if args.start == "same" and args.fastai_sampling == "replacement" and not args.no_fastai:
        parser.error("--fastai-sampling replacement draws fastai's own batches: use it with "
                     "--start own")

    results = {key: {"label": MODELS[key].label, "wd": MODELS[key].wd,
                     "book": MODELS[key].book, "runs": []} for key in keys}
    for seed in range(args.seed, args.seed + args.seeds):
        ratings, split = load_data(args.data, seed)
        for number, key in enumerate(keys, start=1):
            chapter = MODELS[key]
            log.info("[%d/%d] %s: %s, wd %g, seed %d", number, len(keys), key, chapter.label,
                     chapter.wd, seed)
            ours, theirs = run_both(chapter, ratings, split, args, seed)
            results[key]["runs"].append({"seed": seed, "ours": ours, "fastai": theirs})
            print(side_by_side(key, chapter, seed, args.start, ours, theirs), flush=True)

    print(summary(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
