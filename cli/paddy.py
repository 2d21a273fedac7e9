"""``xlmirror paddy``: train, measure memory and ensemble for Kaggle's Paddy Doctor (lesson 7)."""

import argparse
import logging
from pathlib import Path

from engine.errors import InputError

log = logging.getLogger("xlmirror")

MAX_ACCUM = 16  # the memory probe tries accum 1, 2, 4, ... up to this


def train_command(args):
    from engine.paddy import TrainConfig, check_run_dir, train_run
    from engine.paddy_data import load_paddy

    config = TrainConfig(
        arch=args.arch, size=args.size, resize_method=args.resize_method, accum=args.accum,
        epochs=args.epochs, lr=args.lr, multi_target=args.multi_target, tta=args.tta,
        seed=args.seed, pretrained=args.pretrained,
    )
    # settings and the output folder first: both are cheap to check, the data is not
    config.check()
    check_run_dir(args.out, args.force)
    data = load_paddy(args.data)

    result = train_run(data, args.out, config, force=args.force, num_workers=args.workers,
                       show_progress=log.isEnabledFor(logging.INFO))
    last = result.epochs[-1]
    errors = ", ".join(f"{name} {last[name]:.4f}" for name in ("disease_error", "variety_error")
                       if last.get(name) is not None)
    print(f"{result.run_dir}: {errors} after {len(result.epochs)} epoch(s); "
          f"submission {result.run_dir / 'submission.csv'}")
    return 0


def memory_command(args):
    from engine.paddy import measure_memory, parse_bytes
    from engine.paddy_data import load_paddy

    budget = parse_bytes(args.budget) if args.budget else None
    if args.max_accum < 1:
        raise InputError(f"--max-accum {args.max_accum} must be at least 1")
    accums = [2**power for power in range(args.max_accum.bit_length())]  # 1, 2, 4, ... <= max
    data = load_paddy(args.data)

    report = measure_memory(data, args.arch, args.size, accums=accums,
                            resize_method=args.resize_method, pretrained=args.pretrained,
                            budget_bytes=budget, num_workers=args.workers,
                            show_progress=log.isEnabledFor(logging.INFO))
    print(format_memory_report(report, args.budget))
    return 0


def format_memory_report(report, budget_text=None):
    """The memory table, and which accum fits the budget (or why that can't be said)."""
    if report.kind == "cuda":
        heading = "peak GPU MiB"
        lines = [f"peak GPU memory (torch.cuda.max_memory_allocated) on "
                 f"{report.label or 'all labels'} ({report.n_images} images)"]
    else:
        heading = "peak RSS MiB"
        lines = ["no CUDA: GPU memory can't be measured here; showing this process's peak "
                 "resident memory (ru_maxrss, which never goes down) instead",
                 f"trained on {report.label or 'all labels'} ({report.n_images} images)"]
    lines.append(f"{'accum':>5}  {'batch':>5}  {heading:>13}")
    for point in report.points:
        lines.append(f"{point.accum:>5}  {point.batch_size:>5}  {point.peak_bytes / 2**20:>13.1f}")

    if budget_text is None:
        return "\n".join(lines)
    if report.kind != "cuda":
        lines.append(f"budget {budget_text}: not checked, there is no GPU memory to compare")
        return "\n".join(lines)
    fitting = report.smallest_fitting_accum()
    if fitting is None:
        tried = ", ".join(str(point.accum) for point in report.points)
        lines.append(f"budget {budget_text}: no accum tried ({tried}) fits; try a smaller "
                     "--size or architecture")
    else:
        lines.append(f"budget {budget_text}: the smallest accum that fits is {fitting}")
    return "\n".join(lines)


def ensemble_command(args):
    from engine.paddy import ensemble_probs, load_predictions, write_submission

    out = Path(args.out)
    if out.exists() and not args.force:  # before reading the runs: they may be many
        raise InputError(f"{out} already exists; choose another --out or pass --force")
    runs = [load_predictions(run_dir) for run_dir in args.runs]
    probs = ensemble_probs(runs, args.weights)

    write_submission(out, runs[0].test_ids, runs[0].labels, probs, force=args.force)
    log.info("wrote %s", out)
    print(f"{out}: {len(runs[0].test_ids)} predictions, the weighted mean of {len(runs)} run(s)")
    return 0


def _add_data_options(parser):
    parser.add_argument("--data", metavar="DIR", required=True,
                        help="the Kaggle folder: train.csv, train_images/, test_images/, "
                             "sample_submission.csv")
    parser.add_argument("--arch", metavar="NAME", required=True,
                        help="a timm architecture, e.g. convnext_small_in22k")
    parser.add_argument("--size", metavar="S", type=int, required=True,
                        help="image side in pixels after resizing")
    parser.add_argument("--resize-method", choices=("squish", "crop", "pad"), default="squish",
                        help="how an image becomes S x S (default: squish)")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="start from timm's ImageNet weights (default); --no-pretrained "
                             "starts from random weights")
    parser.add_argument("--workers", metavar="N", type=int,
                        help="data loading processes (default: fastai's, one per CPU up to 16)")


def register(commands):
    """Add ``paddy`` with its steps ``train``, ``memory`` and ``ensemble`` to ``commands``."""
    paddy = commands.add_parser(
        "paddy", help="train, measure and ensemble models for Kaggle's Paddy Doctor",
        description="The image half of fast.ai lesson 7: fine-tune timm architectures on the "
                    "Paddy Doctor competition with fastai, find the gradient accumulation "
                    "that fits a GPU, and average several runs into one submission.",
    )
    steps = paddy.add_subparsers(dest="paddy_command", required=True, metavar="STEP")

    train = steps.add_parser(
        "train", help="train one model and save it with its test predictions",
        description="Train ARCH with fastai (batch 64 // accum, one optimiser step per 64 "
                    "images) and save model.pkl, metrics.csv, test_probs.npy, run.json and "
                    "submission.csv into --out.",
    )
    _add_data_options(train)
    train.add_argument("--accum", metavar="N", type=int, default=1,
                       help="micro-batches per optimiser step, a divisor of 64 (default: 1)")
    train.add_argument("--epochs", metavar="E", type=int, default=12,
                       help="epochs on all layers; a pretrained run first trains its new head "
                            "for one more (default: 12)")
    train.add_argument("--lr", metavar="LR", type=float, default=0.01,
                       help="peak learning rate (default: 0.01)")
    train.add_argument("--multi-target", action="store_true",
                       help="20 outputs: predict the disease and the rice variety together")
    train.add_argument("--tta", action="store_true",
                       help="predict the test set with test-time augmentation")
    train.add_argument("--seed", metavar="N", type=int,
                       help="fix the validation split and the seeds (default: a fresh split "
                            "each run, so ensemble members see different images)")
    train.add_argument("--out", metavar="RUN_DIR", required=True, help="folder for the run")
    train.add_argument("--force", action="store_true",
                       help="replace the run files in a --out folder that is not empty")
    train.set_defaults(run=train_command)

    memory = steps.add_parser(
        "memory", help="peak memory of one short epoch for accum 1, 2, 4, ...",
        description="Train one epoch on the smallest class for each accum and report the peak "
                    "GPU memory (or, without CUDA, this process's peak memory).",
    )
    _add_data_options(memory)
    memory.add_argument("--max-accum", metavar="N", type=int, default=MAX_ACCUM,
                        help=f"try accum 1, 2, 4, ... up to N (default: {MAX_ACCUM})")
    memory.add_argument("--budget", metavar="SIZE",
                        help="GPU memory to fit in, e.g. 16GiB: names the smallest accum that "
                             "fits")
    memory.set_defaults(run=memory_command)

    ensemble = steps.add_parser(
        "ensemble", help="average the test predictions of several runs into a submission",
        description="Average the saved test probabilities of RUN_DIRs (weighted), take the "
                    "most probable label per image and write image_id,label.",
    )
    ensemble.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders of paddy train")
    ensemble.add_argument("--weights", metavar="W", type=float, nargs="+",
                          help="one weight per run (default: 1 each)")
    ensemble.add_argument("--out", metavar="CSV", required=True, help="the submission to write")
    ensemble.add_argument("--force", action="store_true", help="replace an existing --out")
    ensemble.set_defaults(run=ensemble_command)
