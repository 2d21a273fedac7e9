"""Paddy Doctor: the accumulation arithmetic, the multi-target loss, the data checks, and whole
runs (train, memory, ensemble) on a generated folder in Kaggle's layout, all on the CPU.

Tolerances: float64 rtol 1e-12 and float32 rtol 1e-6, each with an absolute floor of the same
size times the largest gradient entry, because a sum that cancels keeps the rounding error of
its largest terms, not of its (small) result.
"""

import argparse
import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner, Recorder, load_learner
from fastai.optimizer import SGD
from numpy.testing import assert_allclose
from torch import nn

import cli.main as cli_main
from cli import paddy as paddy_cli
from engine import paddy
from engine.errors import InputError
from engine.grad_accum import (
    SAMPLES_PER_STEP, accumulate_gradients, accumulated_step, gradients, micro_batch_size,
)
from engine.paddy_data import load_paddy
from paddy_fixtures import IMAGES_PER_LABEL, LABELS, VARIETIES, write_paddy

log = logging.getLogger("xlmirror.tests")

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}
SINGLE_ARCH = "resnet18"  # has batch norm, like the lesson's models
MULTI_ARCH = "mobilenetv3_small_050"  # the fastest timm model here at 32 px
N_TEST = 12


# ------------------------------------------------------------------------ accumulation maths


def small_net(batch_norm, dtype, seed=0):
    """(B, 3, 8, 8) -> (B, 5) logits; with or without one batch-norm layer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6) if batch_norm else nn.Identity(), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5),
    ).to(dtype)


def batch(n, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=generator, dtype=dtype)
    y = torch.randint(0, 5, (n,), generator=generator)
    return x, y


def batch_gradients(model, x, y, n_micro):
    model.zero_grad()
    accumulate_gradients(model, F.cross_entropy, x, y, n_micro)
    return gradients(model)


def plain_gradients(model, x, y):
    """The textbook gradient of the batch's mean loss, without engine.grad_accum."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return gradients(model)


def assert_same_tensors(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    scale = max(float(t.detach().abs().max()) for t in expected)
    for a, e in zip(actual, expected, strict=True):
        assert_allclose(a.detach().numpy(), e.detach().numpy(), rtol=tol, atol=tol * scale)


def relative_difference(actual, expected):
    """max |a - e| over every entry, over max |e|."""
    diff = max(float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True))
    return diff / max(float(e.abs().max()) for e in expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_micro", [1, 2, 4, 8, 3])  # 3: uneven micro-batches (11, 11, 10)
def test_accumulated_gradient_is_the_batch_gradient_without_batch_norm(dtype, n_micro):
    x, y = batch(32, dtype)
    model = small_net(batch_norm=False, dtype=dtype)

    expected = plain_gradients(model, x, y)
    actual = batch_gradients(model, x, y, n_micro)

    assert_same_tensors(actual, expected, dtype)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.Adam(params, lr=0.01),
], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("n_micro", [2, 4])
def test_accumulated_steps_move_the_weights_as_batch_steps(make_optimizer, n_micro):
    dtype = torch.float64
    whole, accumulated = small_net(False, dtype), small_net(False, dtype)
    whole_opt, accumulated_opt = make_optimizer(whole.parameters()), make_optimizer(
        accumulated.parameters())

    for seed in range(3):  # three steps, so momentum and Adam's moments carry over
        x, y = batch(32, dtype, seed=seed)
        whole_opt.zero_grad()
        F.cross_entropy(whole(x), y).backward()
        whole_opt.step()
        accumulated_step(accumulated, F.cross_entropy, accumulated_opt, x, y, n_micro)

    assert_same_tensors(list(accumulated.parameters()), list(whole.parameters()), dtype)


def test_batch_norm_makes_accumulated_gradients_differ(record_property):
    dtype = torch.float64
    x, y = batch(32, dtype)
    model = small_net(batch_norm=True, dtype=dtype)
    expected = plain_gradients(model, x, y)

    differences = {}
    for n_micro in (2, 4, 8):
        difference = relative_difference(batch_gradients(model, x, y, n_micro), expected)
        differences[n_micro] = difference
        record_property(f"batch_norm_relative_gradient_difference_accum_{n_micro}", difference)
        log.info("batch norm, %d micro-batches of %d: max |grad diff| / max |grad| = %.3g",
                 n_micro, 32 // n_micro, difference)

    # each micro-batch is normalised by its own statistics: a real difference, not rounding
    # (measured: about 0.077, 0.077 and 0.14 for 2, 4 and 8 micro-batches)
    assert all(difference > 1e-3 for difference in differences.values()), differences

    # the same network with batch norm in eval mode (running statistics) agrees again,
    # so the difference comes from the batch statistics and nothing else
    model.eval()
    assert_same_tensors(batch_gradients(model, x, y, 4), plain_gradients(model, x, y), dtype)


class StepLog(Callback):
    """Wraps the optimiser's step to record how many training samples came before each."""

    run_valid = False

    def before_fit(self):
        self.samples_seen, self.samples_at_step = 0, []
        step = self.learn.opt.step

        def counted_step(*args, **kwargs):
            self.samples_at_step.append(self.samples_seen)
            return step(*args, **kwargs)

        self.learn.opt.step = counted_step

    def after_loss(self):
        self.samples_seen += len(self.learn.yb[0])


def fastai_accumulated_fit(accum, n_samples=256, lr=0.1):
    """One epoch of fastai at bs 64 // accum with GradientAccumulation(64); plain SGD, float64,
    no shuffling. Returns (trained model, StepLog, x, y)."""
    dtype = torch.float64
    x, y = batch(n_samples, dtype, seed=5)
    x_valid, y_valid = batch(16, dtype, seed=6)
    cpu = torch.device("cpu")
    dls = DataLoaders(
        DataLoader(list(zip(x, y)), bs=SAMPLES_PER_STEP // accum, shuffle=False, device=cpu),
        DataLoader(list(zip(x_valid, y_valid)), bs=16, device=cpu),
        device=cpu,
    )
    step_log = StepLog()
    learn = Learner(dls, small_net(False, dtype), loss_func=F.cross_entropy, opt_func=SGD,
                    lr=lr, cbs=[GradientAccumulation(SAMPLES_PER_STEP), step_log])
    # the Recorder's smoothed loss is a float32 buffer that refuses a float64 loss; it only
    # reports, so training goes on the same without it
    learn.remove_cb(Recorder)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, lr)
    return learn.model, step_log, x, y


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_fastai_gradient_accumulation_steps_once_per_64_samples(accum):
    _, step_log, x, _ = fastai_accumulated_fit(accum)

    assert step_log.samples_seen == len(x) == 256
    assert step_log.samples_at_step == [64, 128, 192, 256]


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_fastai_gradient_accumulation_matches_engine_arithmetic(accum):
    dtype, lr = torch.float64, 0.1
    trained, _, x, y = fastai_accumulated_fit(accum, lr=lr)

    ours, whole = small_net(False, dtype), small_net(False, dtype)
    ours_opt = torch.optim.SGD(ours.parameters(), lr=lr)
    whole_opt = torch.optim.SGD(whole.parameters(), lr=lr)
    for x_step, y_step in zip(x.split(SAMPLES_PER_STEP), y.split(SAMPLES_PER_STEP)):
        accumulated_step(ours, F.cross_entropy, ours_opt, x_step, y_step, n_micro=accum)
        accumulated_step(whole, F.cross_entropy, whole_opt, x_step, y_step, n_micro=1)

    assert_same_tensors(list(trained.parameters()), list(ours.parameters()), dtype)
    assert_same_tensors(list(trained.parameters()), list(whole.parameters()), dtype)


@pytest.mark.parametrize("accum, batch_size", [(1, 64), (2, 32), (4, 16), (8, 8), (64, 1)])
def test_micro_batch_size(accum, batch_size):
    assert micro_batch_size(accum) == batch_size


@pytest.mark.parametrize("accum", [0, 3, 5, 128, -2])
def test_micro_batch_size_refuses_an_accum_that_does_not_divide_64(accum):
    with pytest.raises(InputError, match=f"--accum {accum} does not divide the 64"):
        micro_batch_size(accum)


# ------------------------------------------------------------------------------ multi-target


def numpy_cross_entropy(logits, targets):
    """Mean of -log softmax(logits)[target], from scratch in float64."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(targets)), targets].mean()


def multi_target_batch(n=16, seed=3):
    generator = torch.Generator().manual_seed(seed)
    out = torch.randn(n, 20, generator=generator, dtype=torch.float64) * 3
    disease = torch.randint(0, 10, (n,), generator=generator)
    variety = torch.randint(0, 10, (n,), generator=generator)
    return out, disease, variety


def test_multi_target_loss_is_the_sum_of_both_cross_entropies():
    out, disease, variety = multi_target_batch()

    loss = paddy.DiseaseVarietyLoss(n_labels=10)(out, disease, variety)

    logits = out.numpy()
    expected = (numpy_cross_entropy(logits[:, :10], disease.numpy())
                + numpy_cross_entropy(logits[:, 10:], variety.numpy()))
    assert_allclose(float(loss), expected, rtol=1e-12)
    both = F.cross_entropy(out[:, :10], disease) + F.cross_entropy(out[:, 10:], variety)
    assert_allclose(float(loss), float(both), rtol=1e-12)


def test_multi_target_metrics_and_activation():
    out, disease, variety = multi_target_batch()
    logits = out.numpy()

    disease_error = paddy.disease_error(out, disease, variety, n_labels=10)
    variety_error = paddy.variety_error(out, disease, variety, n_labels=10)
    probs = paddy.DiseaseVarietyLoss(n_labels=10).activation(out).numpy()

    assert float(disease_error) == np.mean(logits[:, :10].argmax(1) != disease.numpy())
    assert float(variety_error) == np.mean(logits[:, 10:].argmax(1) != variety.numpy())
    assert_allclose(probs[:, :10].sum(1), 1.0, rtol=1e-12)
    assert_allclose(probs[:, 10:].sum(1), 1.0, rtol=1e-12)
    assert (probs[:, :10].argmax(1) == logits[:, :10].argmax(1)).all()


# -------------------------------------------------------------------------------- data checks


@pytest.fixture
def paddy_dir(tmp_path):
    return write_paddy(tmp_path / "paddy", n_test=N_TEST)


def test_load_paddy_reads_the_kaggle_layout(paddy_dir):
    data = load_paddy(paddy_dir)

    assert data.labels == sorted(LABELS)
    assert data.varieties == sorted(VARIETIES)
    assert len(data.train) == sum(IMAGES_PER_LABEL) == 85
    sample = pd.read_csv(paddy_dir / "sample_submission.csv")
    assert list(data.test["image_id"]) == list(sample["image_id"])
    assert data.counts().idxmin() == "bacterial_leaf_blight"


def _first_training_image(root):
    row = pd.read_csv(root / "train.csv").iloc[0]
    return root / "train_images" / row["label"] / row["image_id"]


def _rewrite_train_csv(root, change):
    table = pd.read_csv(root / "train.csv", dtype=str)
    change(table).to_csv(root / "train.csv", index=False)


def _drop_column(table, column):
    return table.drop(columns=[column])


def _relabel_first_row(table):
    table.loc[0, "label"] = "leaf_rust"
    return table


def _remove_test_images(root):
    for path in (root / "test_images").iterdir():
        path.unlink()


BAD_INPUTS = {
    "no train.csv": (lambda root: (root / "train.csv").unlink(), r"train\.csv does not exist"),
    "no variety column": (
        lambda root: _rewrite_train_csv(root, lambda t: _drop_column(t, "variety")),
        r"train\.csv lacks the column\(s\) variety"),
    "label without folder": (
        lambda root: _rewrite_train_csv(root, _relabel_first_row),
        r"train\.csv has label\(s\) leaf_rust with no folder"),
    "folder without label": (
        lambda root: (root / "train_images" / "leaf_rust").mkdir(),
        r"train_images/leaf_rust is a label folder with no row in .*train\.csv"),
    "listed image missing": (
        lambda root: _first_training_image(root).unlink(),
        r"bacterial_leaf_blight/100001\.jpg is listed in .*train\.csv but does not exist"),
    "not an image": (
        lambda root: _first_training_image(root).write_text("not a picture"),
        r"bacterial_leaf_blight/100001\.jpg is not a readable image"),
    "empty test folder": (_remove_test_images, r"test_images holds no files"),
    "no sample submission": (
        lambda root: (root / "sample_submission.csv").unlink(),
        r"sample_submission\.csv does not exist"),
    "test image missing": (
        lambda root: (root / "test_images" / "200001.jpg").unlink(),
        r"test_images/200001\.jpg is listed in .*sample_submission\.csv but does not exist"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_an_input_error_naming_the_file(paddy_dir, case):
    spoil, message = BAD_INPUTS[case]
    spoil(paddy_dir)

    with pytest.raises(InputError, match=message):
        load_paddy(paddy_dir)


def make_parser():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    paddy_cli.register(commands)
    return parser


def run_cli(argv):
    args = make_parser().parse_args(argv)
    return args.run(args)


def test_cli_turns_a_bad_folder_into_exit_code_2(paddy_dir, tmp_path, monkeypatch, capsys):
    (paddy_dir / "train.csv").unlink()
    others = tuple(m for m in cli_main.COMMAND_MODULES if m is not paddy_cli)
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", others + (paddy_cli,))

    code = cli_main.main(["paddy", "train", "--data", str(paddy_dir), "--arch", MULTI_ARCH,
                          "--size", "32", "--no-pretrained", "--out", str(tmp_path / "run")])

    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "train.csv does not exist" in error[0], error
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_too_few_images_for_one_step(tmp_path):
    data = load_paddy(write_paddy(tmp_path / "paddy", images_per_label=(3,) * 10))
    config = paddy.TrainConfig(MULTI_ARCH, 32, epochs=1, pretrained=False)

    with pytest.raises(InputError, match=r"train\.csv lists 30 images, which leaves 24"):
        paddy.train_run(data, tmp_path / "run", config, num_workers=0, show_progress=False)


@pytest.mark.parametrize("change, message", [
    ({"arch": "resnet_nonexistent"}, "is not a timm architecture"),
    ({"resize_method": "stretch"}, "--resize-method 'stretch' is not one of"),
    ({"size": 0}, "--size 0 must be at least 1"),
    ({"lr": -1.0}, "--lr -1.0 must be a positive"),
    ({"accum": 3}, "--accum 3 does not divide"),
])
def test_train_config_refuses_bad_settings(change, message):
    settings = dict(arch=MULTI_ARCH, size=32, pretrained=False) | change
    with pytest.raises(InputError, match=message):
        paddy.TrainConfig(**settings).check()


def test_missing_pretrained_weights_are_an_input_error(paddy_dir, monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    data = load_paddy(paddy_dir)
    config = paddy.TrainConfig(MULTI_ARCH, 32, pretrained=True)
    dls = paddy.paddy_dataloaders(data, config, config.batch_size, num_workers=0)

    with pytest.raises(InputError, match="pass --no-pretrained"):
        paddy.paddy_learner(dls, data, config)


@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 * 2**30), ("16GB", 16 * 10**9), ("5.5 gib", int(5.5 * 2**30)),
    ("12000MiB", 12000 * 2**20),
])
def test_parse_bytes(text, expected):
    assert paddy.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["16", "lots", "16 parsecs", ""])
def test_parse_bytes_refuses_a_size_without_a_unit(text):
    with pytest.raises(InputError, match="is not a memory size"):
        paddy.parse_bytes(text)


@pytest.mark.parametrize("counts, label", [
    ({"a": 200, "b": 90, "c": 300}, "b"),  # b: 72 training images, the smallest with 64
    ({"a": 70, "b": 90, "c": 81}, "c"),  # a leaves 56 (< 64); c leaves 65
    ({"a": 20, "b": 30}, None),  # no label alone holds a step: all rows
])
def test_memory_probe_uses_the_smallest_label_with_one_step(counts, label):
    train = pd.DataFrame({"label": [name for name, n in counts.items() for _ in range(n)]})

    rows, chosen = paddy.probe_rows(train)

    assert chosen == label
    assert len(rows) == (counts[label] if label else len(train))


# ----------------------------------------------------------------------------- ensemble checks


def fake_run(folder, probs, test_ids, labels):
    """A run folder as train_run leaves it, minus the model (ensemble reads only these)."""
    folder.mkdir(parents=True)
    np.save(folder / paddy.PROBS_FILE, np.asarray(probs, dtype=np.float32))
    description = {"format": paddy.RUN_FORMAT, "test_ids": test_ids, "labels": labels}
    (folder / paddy.RUN_FILE).write_text(json.dumps(description))
    return folder


def test_ensemble_refuses_runs_that_disagree(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=4)
    ids, labels = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], ["blast", "hispa", "normal"]
    first = paddy.load_predictions(fake_run(tmp_path / "first", probs, ids, labels))

    cases = {
        "labels": (fake_run(tmp_path / "labels", probs, ids, labels[::-1]),
                   r"labels/run\.json has labels \['normal', 'hispa', 'blast'\], but"),
        "order": (fake_run(tmp_path / "order", probs, ids[::-1], labels),
                  r"order/run\.json lists the test images in a different order"),
        "test set": (fake_run(tmp_path / "set", probs, ["x.jpg"] + ids[1:], labels),
                     r"set/run\.json lists the test images of a different test set"),
    }
    for folder, message in cases.values():
        with pytest.raises(InputError, match=message):
            paddy.ensemble_probs([first, paddy.load_predictions(folder)])

    with pytest.raises(InputError, match=r"gives 1 weight\(s\) for 2 run\(s\)"):
        paddy.ensemble_probs([first, first], weights=[1.0])
    with pytest.raises(InputError, match="must be non-negative"):
        paddy.ensemble_probs([first, first], weights=[1.0, -1.0])


def test_ensemble_refuses_broken_run_folders(tmp_path):
    ids, labels = ["a.jpg", "b.jpg"], ["blast", "hispa", "normal"]
    with pytest.raises(InputError, match=r"empty/run\.json does not exist"):
        paddy.load_predictions((tmp_path / "empty"))

    wrong_shape = fake_run(tmp_path / "shape", np.full((3, 3), 1 / 3), ids, labels)
    with pytest.raises(InputError, match=r"shape/test_probs\.npy holds an array of shape"):
        paddy.load_predictions(wrong_shape)

    not_json = fake_run(tmp_path / "json", np.full((2, 3), 1 / 3), ids, labels)
    (not_json / paddy.RUN_FILE).write_text("{")
    with pytest.raises(InputError, match=r"json/run\.json is not valid JSON"):
        paddy.load_predictions(not_json)


def test_write_submission_is_atomic_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "submission.csv"
    probs = np.array([[0.1, 0.9], [0.8, 0.2]])

    paddy.write_submission(out, ["a.jpg", "b.jpg"], ["blast", "hispa"], probs)
    with pytest.raises(InputError, match="submission.csv already exists"):
        paddy.write_submission(out, ["a.jpg", "b.jpg"], ["blast", "hispa"], probs[:, ::-1])
    assert out.read_text() == "image_id,label\na.jpg,hispa\nb.jpg,blast\n"

    paddy.write_submission(out, ["a.jpg", "b.jpg"], ["blast", "hispa"], probs[:, ::-1],
                           force=True)
    assert out.read_text() == "image_id,label\na.jpg,blast\nb.jpg,hispa\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]  # no temp left


# ------------------------------------------------------------------------ runs, end to end


def give_random_weights(monkeypatch):
    """Make timm build every model with random weights, even when asked for pretrained ones,
    so the pretrained code paths (a frozen body, fine_tune) run here without a network."""
    import timm

    create_model = timm.create_model

    def random_weights(*args, **kwargs):
        return create_model(*args, **(kwargs | {"pretrained": False}))

    monkeypatch.setattr(timm, "create_model", random_weights)


@pytest.fixture(scope="module")
def paddy_runs(tmp_path_factory):
    """The generated folder and two finished runs through the command line: single-target
    from random weights with TTA (accum 4), and multi-target "pretrained" (fine_tune: a head
    epoch, then one of all layers) without TTA (accum 2)."""
    root = tmp_path_factory.mktemp("paddy")
    data_dir = write_paddy(root / "data", n_test=N_TEST)
    common = ["--data", str(data_dir), "--size", "32", "--epochs", "1", "--workers", "0"]

    single, multi = root / "single", root / "multi"
    assert run_cli(["paddy", "train", *common, "--arch", SINGLE_ARCH, "--no-pretrained",
                    "--accum", "4", "--tta", "--seed", "1", "--out", str(single)]) == 0
    with pytest.MonkeyPatch.context() as monkeypatch:
        give_random_weights(monkeypatch)
        assert run_cli(["paddy", "train", *common, "--arch", MULTI_ARCH, "--pretrained",
                        "--accum", "2", "--multi-target", "--resize-method", "pad",
                        "--out", str(multi)]) == 0
    return data_dir, single, multi


def test_run_folder_holds_the_whole_run(paddy_runs):
    data_dir, single, multi = paddy_runs
    sample_ids = list(pd.read_csv(data_dir / "sample_submission.csv")["image_id"])

    for run_dir, multi_target, stages in ((single, False, ["all"]),
                                          (multi, True, ["head", "all"])):
        assert sorted(p.name for p in run_dir.iterdir()) == sorted([
            paddy.MODEL_FILE, paddy.METRICS_FILE, paddy.PROBS_FILE, paddy.RUN_FILE,
            paddy.SUBMISSION_FILE])
        description = json.loads((run_dir / paddy.RUN_FILE).read_text())
        probs = np.load(run_dir / paddy.PROBS_FILE)
        submission = pd.read_csv(run_dir / paddy.SUBMISSION_FILE)
        metrics = pd.read_csv(run_dir / paddy.METRICS_FILE)

        assert description["multi_target"] is multi_target
        assert description["pretrained"] is multi_target  # the multi-target run fine-tunes
        assert description["labels"] == sorted(LABELS)
        assert description["test_ids"] == sample_ids
        assert probs.shape == (N_TEST, len(LABELS)) and probs.dtype == np.float32
        assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)  # float32 softmax rows (TTA lerps)
        assert list(submission.columns) == ["image_id", "label"]
        assert list(submission["image_id"]) == sample_ids
        assert set(submission["label"]) <= set(LABELS)
        assert list(submission["label"]) == [description["labels"][i] for i in probs.argmax(1)]
        assert metrics["stage"].tolist() == stages
        assert metrics["epoch"].tolist() == [1] * len(stages)
        errors = ["disease_error", "variety_error"] if multi_target else ["disease_error"]
        for name in errors:
            assert metrics[name].between(0.0, 1.0).all()
        assert ("variety_error" in metrics.columns) is multi_target
        assert np.isfinite(metrics[["train_loss", "valid_loss"]].to_numpy()).all()

    assert json.loads((single / paddy.RUN_FILE).read_text())["batch_size"] == 16
    assert json.loads((multi / paddy.RUN_FILE).read_text())["batch_size"] == 32


def test_exported_multi_target_model_reproduces_the_saved_predictions(paddy_runs):
    data_dir, _, multi = paddy_runs
    data = load_paddy(data_dir)

    learn = load_learner(multi / paddy.MODEL_FILE, cpu=True)
    with learn.no_bar():
        probs = paddy.predict_test(learn, data, tta=False)

    # float32 network run twice on the same images in eval mode
    assert_allclose(probs, np.load(multi / paddy.PROBS_FILE), rtol=1e-5, atol=1e-6)


def test_train_refuses_to_overwrite_a_previous_run(paddy_runs):
    data_dir, single, _ = paddy_runs
    before = (single / paddy.RUN_FILE).read_text()

    with pytest.raises(InputError, match="already holds a previous run; choose a new --out"):
        run_cli(["paddy", "train", "--data", str(data_dir), "--arch", MULTI_ARCH, "--size", "32",
                 "--no-pretrained", "--out", str(single)])
    assert (single / paddy.RUN_FILE).read_text() == before
    paddy.check_run_dir(single, force=True)  # --force lets it through


@pytest.mark.parametrize("weights", [None, [2.0, 1.0]])
def test_ensemble_of_two_runs_is_the_argmax_of_the_weighted_mean(paddy_runs, tmp_path, weights):
    data_dir, single, multi = paddy_runs
    out = tmp_path / "submission.csv"
    argv = ["paddy", "ensemble", str(single), str(multi), "--out", str(out)]
    if weights:
        argv += ["--weights", *map(str, weights)]

    assert run_cli(argv) == 0

    w = weights or [1.0, 1.0]
    p_single = np.load(single / paddy.PROBS_FILE).astype(np.float64)
    p_multi = np.load(multi / paddy.PROBS_FILE).astype(np.float64)
    mean = (w[0] * p_single + w[1] * p_multi) / (w[0] + w[1])
    submission = pd.read_csv(out)
    assert list(submission["image_id"]) == list(
        pd.read_csv(data_dir / "sample_submission.csv")["image_id"])
    assert list(submission["label"]) == [sorted(LABELS)[i] for i in mean.argmax(axis=1)]

    with pytest.raises(InputError, match="submission.csv already exists"):
        run_cli(argv)


def test_memory_command_reports_each_accum(paddy_runs, capsys, monkeypatch):
    data_dir, _, _ = paddy_runs
    give_random_weights(monkeypatch)
    learners = []
    make_learner = paddy.paddy_learner

    def kept_learner(*args, **kwargs):
        learners.append(make_learner(*args, **kwargs))
        return learners[-1]

    monkeypatch.setattr(paddy, "paddy_learner", kept_learner)

    assert run_cli(["paddy", "memory", "--data", str(data_dir), "--arch", MULTI_ARCH,
                    "--size", "32", "--pretrained", "--workers", "0", "--max-accum", "2",
                    "--budget", "16GiB"]) == 0

    # vision_learner froze each pretrained body; the probe must have trained all of it
    assert len(learners) == 2
    assert all(p.requires_grad for learn in learners for p in learn.model.parameters())

    # fastai's own table may come first on stdout (when the log level lets progress show)
    out = capsys.readouterr().out
    cuda = torch.cuda.is_available()
    first = "peak GPU memory" if cuda else "no CUDA: GPU memory can't be measured here"
    report = out[out.index(first):].strip().splitlines()
    heading = report.index(next(line for line in report if line.lstrip().startswith("accum")))
    rows = [line.split() for line in report[heading + 1:-1]]
    assert [row[:2] for row in rows] == [["1", "64"], ["2", "32"]]
    assert all(float(row[2]) > 0 for row in rows)
    if cuda:
        assert "peak GPU MiB" in report[heading]
        assert report[-1].startswith("budget 16GiB:")
    else:
        assert "peak RSS MiB" in report[heading]
        assert report[-1] == "budget 16GiB: not checked, there is no GPU memory to compare"

