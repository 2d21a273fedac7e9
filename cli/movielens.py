"""``xlmirror train movielens`` and ``xlmirror recommend``: collaborative filtering at scale."""

import logging
import os
from pathlib import Path

from engine.errors import InputError

log = logging.getLogger("xlmirror")

SPLITS = ("random", "u1", "u2", "u3", "u4", "u5", "ua", "ub")

# training defaults; the parser leaves unset options at None so that --resume can tell
# which ones the user repeated (and check them) from those it should take from the run
DEFAULTS = {
    "dataset": "ml-100k", "split": "random", "valid_pct": 0.2, "seed": None,
    "model": "dotbias", "factors": 50, "epochs": 5, "lr": 5e-3, "wd": 0.1, "bs": 64,
    "y_range": [0.0, 5.5], "layers": [100, 50],
}
DATA_OPTIONS = ("dataset", "split", "valid_pct", "seed")  # saved as the run's "meta"
CONFIG_NAMES = {"factors": "n_factors"}  # option name -> TrainConfig field, where they differ


def _rank():
    # torchrun tells each process its rank; only rank 0 talks to the user
    return int(os.environ.get("RANK", "0"))


def train_command(args):
    from engine.train_collab import (
        PLOT_FILE,
        check_config,
        check_run_dir,
        save_loss_plot,
        train,
    )

    default_out = Path("runs") / f"{args.dataset or 'ml-100k'}-{args.model or 'dotbias'}"
    out = Path(args.out) if args.out else default_out
    check_run_dir(out, force=args.force, resume=args.resume)
    settings = _settings(args, out)
    config = _config(settings)
    check_config(config)  # before the data is read: a large release takes a while
    if settings["split"] == "random" and not 0 < settings["valid_pct"] < 1:
        raise InputError(f"--valid-pct must be above 0 and below 1, got "
                         f"{settings['valid_pct']}: the validation loss needs ratings to score")
    if args.device == "cuda":
        from engine.torch_collab import resolve_device

        resolve_device("cuda")  # an InputError now, rather than after loading the data
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be 1 or more, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)

    split, titles, where = _load_split(settings, args.data, args.download)
    meta = {name: settings[name] for name in DATA_OPTIONS}
    meta["data"] = str(where)
    result = train(split, config, device=args.device, run_dir=out, resume=args.resume,
                   progress=not args.no_progress, meta=meta, titles=titles)

    if _rank() == 0:
        plot = save_loss_plot(result.history, out / PLOT_FILE,
                              title=f"{settings['dataset']} {config.model}")
        log.info("wrote %s", plot)
        print(format_history(result.history))
    return 0


def _settings(args, out):
    """The run's settings: the options given, the rest from the run resumed or DEFAULTS."""
    given = {name: getattr(args, name) for name in DEFAULTS}
    if args.no_y_range:
        if given["y_range"] is not None:
            raise InputError("give --y-range or --no-y-range, not both")
        given["y_range"] = "none"

    if args.resume:
        from engine.train_collab import CHECKPOINT, load_checkpoint

        saved = load_checkpoint(out / CHECKPOINT)
        base = {**saved["meta"], **{option: saved["config"][CONFIG_NAMES.get(option, option)]
                                    for option in DEFAULTS if option not in DATA_OPTIONS}}
    else:
        base = dict(DEFAULTS)

    settings = {}
    for name, default in base.items():
        if name not in DEFAULTS:
            continue
        value = given[name]
        if value == "none":
            value = None
        elif isinstance(value, tuple):
            value = list(value)
        if given[name] is None:
            value = default
        elif args.resume and value != default:
            raise InputError(
                f"--{name.replace('_', '-')} {_shown(value)} differs from the run being "
                f"resumed ({_shown(default)}); leave it out to continue the run as it was"
            )
        settings[name] = value

    if settings["seed"] is None and settings["split"] == "random":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError("pass --seed when training with several processes: each one "
                             "loads the data and all must draw the same random split")
        settings["seed"] = int.from_bytes(os.urandom(4), "little")
    return settings


def _shown(value):
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _config(settings):
    from engine.train_collab import TrainConfig

    y_range = settings["y_range"]
    return TrainConfig(
        model=settings["model"], n_factors=settings["factors"], epochs=settings["epochs"],
        lr=settings["lr"], wd=settings["wd"], bs=settings["bs"], seed=settings["seed"],
        y_range=None if y_range is None else tuple(y_range), layers=tuple(settings["layers"]),
    )


def _load_split(settings, data_folder, download):
    """(encoded split, titles, folder) for the dataset and split the settings name."""
    from engine.releases import (
        download_release,
        find_release,
        get_release,
        how_to_provide,
        load_release,
    )
    from engine.splits import canonical_split, encode_split, random_split

    name = settings["dataset"]
    release = get_release(name)
    if settings["split"] != "random" and name != "ml-100k":
        raise InputError(f"split {settings['split']!r} ships only with ml-100k; use "
                         f"--split random for {name}")
    folder = find_release(name, explicit=data_folder)
    if folder is None:
        if not download:
            raise InputError(f"MovieLens {name} was not found; {how_to_provide(release)} "
                             f"(--data DIR, --download)")
        folder = download_release(name)
    if _rank() == 0:
        log.info("MovieLens %s found in %s", name, folder)

    data = load_release(folder, name=name)
    if settings["split"] == "random":
        train_rows, valid_rows = random_split(data.ratings, settings["valid_pct"],
                                              seed=settings["seed"])
    else:
        train_rows, valid_rows = canonical_split(folder, settings["split"])
    return encode_split(train_rows, valid_rows), data.titles, folder


def format_history(history):
    """The per-epoch table: epoch, train loss, valid loss, seconds."""
    lines = [f"{'epoch':>5}  {'train_loss':>10}  {'valid_loss':>10}  {'time':>8}"]
    for row in history:
        lines.append(f"{row.epoch:>5}  {row.train_loss:>10.6f}  {row.valid_loss:>10.6f}  "
                     f"{_clock(row.seconds):>8}")
    return "\n".join(lines)


def _clock(seconds):
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes):02d}:{seconds:05.2f}"


def recommend_command(args):
    from engine.recommend import load_run, recommend

    run = load_run(args.run_path, device=args.device)
    picks = recommend(run, args.user, n=args.n)
    if not picks:
        print(f"user {args.user} has rated every movie the model knows")
        return 0
    lines = [f"{'rank':>4}  {'stars':>5}  {'movie':>7}  title"]
    for rank, pick in enumerate(picks, start=1):
        lines.append(f"{rank:>4}  {pick.predicted:>5.2f}  {pick.movie!s:>7}  "
                     f"{pick.title if pick.title is not None else ''}")
    print("\n".join(lines))
    return 0


def register(commands):
    """Add ``train`` (with its dataset ``movielens``) and ``recommend`` to ``commands``."""
    from engine.collab import MODEL_KINDS as MODELS
    from engine.releases import RELEASES

    train = commands.add_parser(
        "train", help="train a model on a dataset",
        description="Train a model on a dataset; see 'xlmirror train movielens -h'.",
    )
    datasets = train.add_subparsers(dest="dataset_kind", required=True, metavar="DATASET")
    movielens = datasets.add_parser(
        "movielens", help="collaborative filtering on a MovieLens release",
        description="Train a collaborative-filtering model on MovieLens with Adam and a "
                    "one-cycle schedule (fastai's fit_one_cycle), MSE loss. Prints the loss of "
                    "each epoch and saves the model, a checkpoint per epoch and a plot of the "
                    "losses into --out. The release is found through --data, $XLMIRROR_DATA "
                    "(a folder holding it), then fastai's data folder. Under torchrun it "
                    "trains with DistributedDataParallel.",
    )
    movielens.add_argument("--dataset", choices=list(RELEASES), metavar="NAME",
                           help="the release: " + ", ".join(RELEASES) + " (default: ml-100k)")
    movielens.add_argument("--data", metavar="DIR",
                           help="the release's folder, or a folder holding it")
    movielens.add_argument("--download", action="store_true",
                           help="download the release with fastai when it is not found")
    movielens.add_argument("--split", choices=SPLITS,
                           help="random (default), or a split shipped with ml-100k "
                                "(u1..u5, ua, ub: train on .base, validate on .test)")
    movielens.add_argument("--valid-pct", type=float, metavar="P",
                           help="share of ratings held out by --split random (default: 0.2)")
    movielens.add_argument("--seed", type=int, metavar="N",
                           help="seeds the split, the initial weights and the batch order "
                                "(default: drawn at random and saved with the run)")
    movielens.add_argument("--model", choices=MODELS,
                           help="dot: dot product; dotbias: plus user and movie biases "
                                "(default); nn: fastbook's two-layer net; embnn: fastai's "
                                "EmbeddingNN")
    movielens.add_argument("--factors", type=int, metavar="K",
                           help="latent factors of dot and dotbias (default: 50)")
    movielens.add_argument("--layers", type=int, nargs="+", metavar="WIDTH",
                           help="hidden widths of embnn (default: 100 50)")
    movielens.add_argument("--y-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                           help="squash predictions into (LOW, HIGH) (default: 0 5.5)")
    movielens.add_argument("--no-y-range", action="store_true",
                           help="leave predictions unsquashed (dot, dotbias, embnn)")
    movielens.add_argument("--epochs", type=int, metavar="E", help="(default: 5)")
    movielens.add_argument("--lr", type=float, metavar="LR",
                           help="peak learning rate of the one-cycle schedule (default: 5e-3)")
    movielens.add_argument("--wd", type=float, metavar="WD",
                           help="decoupled weight decay (default: 0.1)")
    movielens.add_argument("--bs", type=int, metavar="N",
                           help="ratings per step, over all processes (default: 64)")
    movielens.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                           help="where to train (auto: CUDA when available)")
    movielens.add_argument("--threads", type=int, metavar="N",
                           help="torch CPU threads (default: torch's, one per core; on a busy "
                                "machine 1 can be several times faster)")
    movielens.add_argument("--out", metavar="RUN_DIR",
                           help="folder for the run (default: runs/DATASET-MODEL)")
    movielens.add_argument("--resume", action="store_true",
                           help="continue the run in --out from its last finished epoch")
    movielens.add_argument("--force", action="store_true",
                           help="start over in an --out that already holds a run")
    movielens.add_argument("--no-progress", action="store_true", help="no progress bar")
    movielens.set_defaults(run=train_command)

    recommend = commands.add_parser(
        "recommend", help="the best movies a user has not rated, by a trained model",
        description="List the movies a trained model predicts USER rates highest, leaving out "
                    "those the user rated in the training data.",
    )
    recommend.add_argument("run_path", metavar="RUN_DIR_OR_MODEL",
                           help="a folder of 'xlmirror train movielens', or its model.pt")
    recommend.add_argument("--user", required=True, metavar="ID",
                           help="a user id as in the ratings file")
    recommend.add_argument("-n", type=int, default=10, metavar="N",
                           help="how many movies (default: 10)")
    recommend.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                           help="where to predict (default: cpu)")
    recommend.set_defaults(run=recommend_command)
