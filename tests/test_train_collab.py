"""The collaborative-filtering trainer against fastai, against itself resumed, and end to end.

fastai is the second route throughout: its models given our weights, its one-cycle schedule,
and a whole ``fit_one_cycle`` of its ``Learner`` fed the same batches in the same order as our
loop. float32 tolerances are 1e-6 where one forward pass is compared and looser (with the
reason) where hundreds of optimizer steps are.
"""

import argparse
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import fastai.collab as fastai_collab
import torch
from numpy.testing import assert_allclose

import engine.collab_nets as collab_nets
import engine.train_collab as train_collab
from cli import movielens as movielens_cli
from cli.main import EXIT_USAGE, _report_to_stderr
from engine.collab_nets import (
    CollabNN,
    EmbeddingNN,
    PairDot,
    build_model,
    emb_sz_rule,
    load_fastai_state,
)
from engine.errors import InputError
from engine.recommend import load_run, recommend
from engine.releases import load_release
from engine.splits import encode_split, random_split
from engine.torch_collab import DotProduct, DotProductBias
from engine.train_collab import (
    CHECKPOINT,
    MODEL_FILE,
    OneCycle,
    TrainConfig,
    decay_groups,
    keep_freed_memory,
    load_checkpoint,
    train,
)
from tests.conftest import write_movielens

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_split(tmp_path, seed=0, n_users=60, n_movies=50, valid_pct=0.2, split_seed=7):
    folder = write_movielens(tmp_path / "ml-100k", n_users=n_users, n_movies=n_movies,
                             density=0.5, seed=seed)
    data = load_release(folder, name="ml-100k")
    train_rows, valid_rows = random_split(data.ratings, valid_pct, seed=split_seed)
    return data, train_rows, valid_rows, encode_split(train_rows, valid_rows)


def index_pairs(n_users, n_movies, n=500, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, n_users, (n,), generator=generator),
            torch.randint(0, n_movies, (n,), generator=generator))


# ---------------------------------------------------------------------------------------------
# the models against fastai's


@pytest.mark.parametrize("y_range", [None, (0.0, 5.5)])
def test_dotbias_predicts_as_fastai_embedding_dot_bias(y_range):
    torch.manual_seed(0)
    theirs = fastai_collab.EmbeddingDotBias(12, 30, 40, y_range=y_range)
    with torch.no_grad():
        for parameter in theirs.parameters():  # far from the 0.01 start, so errors would show
            parameter.normal_(0.0, 0.5)
    ours = load_fastai_state(DotProductBias(30, 40, 12, y_range=y_range), theirs.state_dict())

    users, movies = index_pairs(30, 40)
    expected = theirs(torch.stack([users, movies], dim=1))
    assert_allclose(ours(users, movies).detach().numpy(), expected.detach().numpy(),
                    rtol=1e-6, atol=1e-6)


def test_embnn_predicts_as_fastai_embedding_nn():
    torch.manual_seed(0)
    sizes = [(944, emb_sz_rule(944)), (1635, emb_sz_rule(1635))]
    theirs = fastai_collab.EmbeddingNN(emb_szs=sizes, layers=[100, 50], y_range=(0, 5.5))
    users, movies = index_pairs(944, 1635, n=256)
    x = torch.stack([users, movies], dim=1)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        theirs.train()
        theirs(x)  # moves the batch norms' running statistics off their start
    ours = EmbeddingNN(944, 1635, layers=(100, 50))
    load_fastai_state(ours, theirs.state_dict())

    for mode in ("train", "eval"):  # batch statistics, then running statistics
        theirs.train(mode == "train")
        ours.train(mode == "train")
        assert_allclose(ours(users, movies).detach().numpy(),
                        theirs(x).detach().numpy().reshape(-1), rtol=1e-6, atol=1e-6)


def test_collab_nn_is_fastbooks_two_layer_net():
    model = CollabNN(944, 1635)
    # fastbook: get_emb_sz gives 74 and 101 on ml-100k, so the first layer is Linear(175, 100)
    assert (model.user_factors.weight.shape[1], model.movie_factors.weight.shape[1]) == (74, 101)
    assert model.layers[0].weight.shape == (100, 175)
    assert model.layers[2].weight.shape == (1, 100)

    # the forward pass written out in numpy from the same weights
    users, movies = index_pairs(944, 1635, n=64)
    w = {name: value.detach().double().numpy() for name, value in model.state_dict().items()}
    x = np.concatenate([w["user_factors.weight"][users], w["movie_factors.weight"][movies]], 1)
    hidden = np.maximum(x @ w["layers.0.weight"].T + w["layers.0.bias"], 0)
    scores = (hidden @ w["layers.2.weight"].T + w["layers.2.bias"]).reshape(-1)
    expected = 5.5 / (1 + np.exp(-scores))
    assert_allclose(model(users, movies).detach().numpy(), expected, rtol=1e-6)


def test_pair_dot_gradient_passes_finite_differences():
    generator = torch.Generator().manual_seed(0)
    user_table = torch.randn(7, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    movie_table = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    # repeated rows: their gradients must add up; rows 2 of users and 1 of movies never appear
    users = torch.tensor([0, 3, 3, 6, 0, 5])
    movies = torch.tensor([4, 0, 0, 2, 3, 4])
    assert torch.autograd.gradcheck(PairDot.apply, (user_table, movie_table, users, movies))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("chunk", [7, 4096])  # 500 pairs: 72 passes, or one
@pytest.mark.parametrize("kind, plain", [("dot", DotProduct), ("dotbias", DotProductBias)])
def test_fast_models_differentiate_as_the_plain_modules(kind, plain, chunk, dtype, rtol,
                                                        monkeypatch):
    # the hand-written backward against autograd through the look-up-multiply-sum modules
    monkeypatch.setattr(collab_nets, "CPU_CHUNK", chunk)
    fast = build_model(kind, 30, 40, n_factors=6).to(dtype)
    reference = plain(30, 40, 6, y_range=(0.0, 5.5)).to(dtype)
    with torch.no_grad():
        for parameter in fast.parameters():  # far from the 0.01 start, so errors would show
            parameter.normal_(0.0, 0.5)
    reference.load_state_dict(fast.state_dict())

    users, movies = index_pairs(30, 40)
    weights = torch.rand(len(users), dtype=dtype)
    predictions = {}
    for name, model in (("fast", fast), ("reference", reference)):
        predictions[name] = model(users, movies)
        (predictions[name] * weights).sum().backward()
    assert_allclose(predictions["fast"].detach().numpy(),
                    predictions["reference"].detach().numpy(), rtol=rtol)
    for (name, ours), theirs in zip(fast.named_parameters(), reference.parameters()):
        assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=rtol, atol=rtol / 100,
                        err_msg=name)


def test_pair_dot_refuses_indexes_of_two_lengths():
    model = build_model("dot", 30, 40, n_factors=6)
    with pytest.raises(ValueError, match=r"one length, got \(5,\) and \(4,\)"):
        model(torch.arange(5), torch.arange(4))


# three batch-sized buffers (16,000 x 50 float32) alive at once, then freed: a training step
STEPS_AFTER_KEEP_FREED_MEMORY = """
import resource, torch
from engine.train_collab import keep_freed_memory
taken = keep_freed_memory()
def step():
    buffers = [torch.empty(800_000).fill_(1.0) for _ in range(3)]
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(taken, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_lets_batch_buffers_be_reused():
    # a fresh process: this one's heap has long been shaped by everything pytest ran before.
    # Without the call, glibc's adaptive thresholds make the count depend on the heap's layout
    # (0 to ~115,000 faults seen for these 50 steps), so only the call's side is asserted.
    printed = subprocess.run([sys.executable, "-c", STEPS_AFTER_KEEP_FREED_MEMORY],
                             capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout.split()
    taken, faults = printed[-2], int(printed[-1])

    assert taken == str(platform.libc_ver()[0] == "glibc")  # mallopt took both settings
    if taken == "True":
        assert faults < 100  # 50 steps of 9.6 MB: the same pages every step


def test_truncated_init_draws_what_fastai_embedding_draws():
    from fastai.layers import Embedding

    torch.manual_seed(5)
    theirs = Embedding(300, 20).weight
    torch.manual_seed(5)
    ours = DotProductBias(300, 10, 20, init="truncated").user_factors.weight
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ours.abs().max() < 0.02  # folded into two standard deviations


def test_emb_sz_rule_matches_fastai():
    from fastai.tabular.model import emb_sz_rule as fastai_rule

    for n in (2, 10, 944, 1635, 1665, 162_542, 59_048):
        assert emb_sz_rule(n) == fastai_rule(n)


def test_decay_groups_leave_out_what_fastai_leaves_out():
    from fastai.torch_core import norm_bias_params

    model = EmbeddingNN(50, 60, layers=(20, 10))
    decayed, not_decayed = decay_groups(model)
    expected = {id(p) for p in norm_bias_params(model)}
    assert {id(p) for p in not_decayed} == expected
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))
    # every table of the dot-product model is decayed, its bias tables included
    assert decay_groups(DotProductBias(5, 6, 3))[1] == []


# ---------------------------------------------------------------------------------------------
# the schedule


def test_one_cycle_matches_fastai_combined_cos():
    from fastai.callback.schedule import combined_cos

    lr_max, total = 5e-3, 5 * 1250
    theirs_lr = combined_cos(0.25, lr_max / 25, lr_max, lr_max / 1e5)
    theirs_mom = combined_cos(0.25, 0.95, 0.85, 0.95)
    ours = OneCycle(lr_max, total)
    # fastai computes the position within a phase in float32, hence rtol 1e-6
    for step in (0, 1, 311, 1562, 1563, 2000, 4000, total - 1):
        assert ours.lr(step) == pytest.approx(theirs_lr(step / total), rel=1e-6)
        assert ours.mom(step) == pytest.approx(theirs_mom(step / total), rel=1e-6)
    assert ours.lr(0) == pytest.approx(lr_max / 25)
    assert ours.lr(total // 4) == pytest.approx(lr_max)
    assert ours.lr(total) == pytest.approx(lr_max / 1e5)


def test_one_cycle_matches_what_fastai_sets_batch_by_batch(tmp_path):
    data, *_ = synthetic_split(tmp_path)
    dls = fastai_collab.CollabDataLoaders.from_df(data.ratings[["user", "movie", "rating"]],
                                                  bs=32, seed=7)
    learn = fastai_collab.collab_learner(dls, n_factors=4, y_range=(0, 5.5))
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(3, 1e-2)
    lrs, moms = learn.recorder.hps["lr"], learn.recorder.hps["mom"]

    ours = OneCycle(1e-2, len(lrs))
    assert len(lrs) == 3 * len(dls.train)
    # fastai's position in float32 (pct_train summed 1/n at a time, phases cut in float32)
    # is off by ~1e-7: near the end, where the rate is ~1e-7 of its peak, that is a large
    # relative error, so the tolerance is 1e-7 of the peak there
    assert_allclose([ours.lr(step) for step in range(len(lrs))], lrs, rtol=1e-6, atol=1e-9)
    assert_allclose([ours.mom(step) for step in range(len(moms))], moms, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# a whole run against fastai's Learner


@pytest.mark.parametrize("kind", ["dotbias", "embnn"])
def test_training_matches_fastai_fit_one_cycle(tmp_path, monkeypatch, kind):
    data, _, _, split = synthetic_split(tmp_path)
    ratings = data.ratings[["user", "movie", "rating"]]
    # no shuffling on either side: fastai then batches the training rows in the order of its
    # RandomSplitter draw, which is the order random_split returns them in
    dls = fastai_collab.CollabDataLoaders.from_df(ratings, valid_pct=0.2, seed=7, bs=32,
                                                  shuffle=False, drop_last=True)
    learn = fastai_collab.collab_learner(dls, n_factors=8, y_range=(0, 5.5),
                                         use_nn=kind == "embnn", layers=[20, 10])
    assert dls.classes["user"][1:] == split.users.ids.tolist()
    assert dls.classes["movie"][1:] == split.movies.ids.tolist()

    ours = build_model(kind, len(split.users), len(split.movies), n_factors=8, layers=(20, 10))
    load_fastai_state(ours, learn.model.state_dict())
    monkeypatch.setattr(train_collab, "_shuffled_order",
                        lambda n_rows, generator, device: torch.arange(n_rows, device=device))

    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(3, 1e-2, wd=0.1)
    config = TrainConfig(model=kind, n_factors=8, layers=(20, 10), epochs=3, lr=1e-2, wd=0.1,
                         bs=32, seed=0)
    result = train(split, config, device="cpu", progress=False, model=ours)

    # ~100 Adam steps in float32 by two implementations (torch's AdamW and fastai's Adam
    # round differently, e.g. lerp against mul+add): 1e-5 rather than 1e-6
    theirs_valid = [values[1] for values in learn.recorder.values]
    assert_allclose([row.valid_loss for row in result.history], theirs_valid, rtol=1e-5)
    theirs_state = learn.model.state_dict()
    names = {"u_weight.weight": "user_factors.weight", "i_weight.weight": "movie_factors.weight",
             "u_bias.weight": "user_bias.weight", "i_bias.weight": "movie_bias.weight"}
    for name, value in theirs_state.items():
        if name.startswith("bn_cont") or name.endswith("num_batches_tracked"):
            continue
        assert_allclose(ours.state_dict()[names.get(name, name)].numpy(), value.numpy(),
                        atol=1e-5, err_msg=name)


def test_batches_put_in_user_order_train_the_same(tmp_path, monkeypatch):
    *_, split = synthetic_split(tmp_path)
    config = TrainConfig(model="embnn", layers=(16, 8), epochs=2, lr=1e-2, bs=32, seed=2)
    monkeypatch.setattr(train_collab, "SORTED_BATCH", 10**9)
    as_drawn = train(split, config, device="cpu", progress=False)
    monkeypatch.setattr(train_collab, "SORTED_BATCH", 1)
    monkeypatch.setattr(train_collab, "SORTED_USERS", 1)
    sorted_by_user = train(split, config, device="cpu", progress=False)

    # the same ratings in each step, summed in another order: float32 rounding only
    assert_allclose([r.valid_loss for r in sorted_by_user.history],
                    [r.valid_loss for r in as_drawn.history], rtol=1e-5)
    for name, value in as_drawn.model.state_dict().items():
        assert_allclose(sorted_by_user.model.state_dict()[name].numpy(), value.numpy(),
                        atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_resume_reaches_the_uninterrupted_run(tmp_path):
    *_, split = synthetic_split(tmp_path)
    config = TrainConfig(model="embnn", layers=(16, 8), epochs=3, lr=1e-2, bs=16, seed=3)

    straight = train(split, config, device="cpu", run_dir=tmp_path / "straight",
                     progress=False)
    stopped = train(split, config, device="cpu", run_dir=tmp_path / "split", progress=False,
                    stop_after_epoch=2)
    saved = load_checkpoint(tmp_path / "split" / CHECKPOINT)
    assert saved["epoch"] == 2 and len(stopped.history) == 2
    assert not (tmp_path / "split" / MODEL_FILE).exists()  # unfinished: no model yet

    resumed = train(split, config, device="cpu", run_dir=tmp_path / "split", resume=True,
                    progress=False)

    # the CPU kernels are deterministic, so equal; 1e-6 allows for a change of thread count
    assert [row.epoch for row in resumed.history] == [1, 2, 3]
    assert_allclose([r.valid_loss for r in resumed.history],
                    [r.valid_loss for r in straight.history], rtol=0, atol=1e-6)
    assert_allclose([r.train_loss for r in resumed.history],
                    [r.train_loss for r in straight.history], rtol=0, atol=1e-6)
    for name, value in straight.model.state_dict().items():
        assert_allclose(resumed.model.state_dict()[name].numpy(), value.numpy(), rtol=0,
                        atol=1e-6, err_msg=name)
    # and the third epoch did change the weights: the comparison above means something
    third = resumed.model.state_dict()["embeds.0.weight"]
    assert not torch.equal(third, stopped.model.state_dict()["embeds.0.weight"])
    assert resumed.history[2].valid_loss != stopped.history[1].valid_loss


def test_resume_refuses_other_settings(tmp_path):
    *_, split = synthetic_split(tmp_path)
    config = TrainConfig(epochs=2, bs=16, seed=1)
    train(split, config, device="cpu", run_dir=tmp_path / "run", progress=False,
          stop_after_epoch=1)
    other = TrainConfig(epochs=2, bs=16, seed=1, lr=1e-3)
    with pytest.raises(InputError, match="lr: run 0.005, now 0.001"):
        train(split, other, device="cpu", run_dir=tmp_path / "run", resume=True,
              progress=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    train_collab.save_atomic({"format": "old"}, path)

    def broken_save(obj, stream):
        stream.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train_collab.save_atomic({"format": "new"}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"format": "old"}


# ---------------------------------------------------------------------------------------------
# real data


def test_dotbias_on_ml100k_reaches_fastbooks_loss(ml100k):
    """fastbook ch. 8: dot product + biases, sigmoid range, wd 0.1: valid MSE 0.823."""
    data = load_release(ml100k)
    train_rows, valid_rows = random_split(data.ratings, 0.2, seed=42)
    split = encode_split(train_rows, valid_rows)
    # fastbook's settings but bs 512 at lr 1e-2, to keep the test to a few seconds
    config = TrainConfig(model="dotbias", epochs=5, lr=1e-2, wd=0.1, bs=512, seed=0)
    result = train(split, config, device="cpu", progress=False)

    # a mean over 20,000 ratings: its recomputation from the returned model, in float64
    index = [torch.as_tensor(a) for a in (split.valid_users, split.valid_movies)]
    predictions = train_collab.predict(result.model, *index).double().numpy()
    mse = np.mean((predictions - split.valid_ratings) ** 2)
    assert result.history[-1].valid_loss == pytest.approx(mse, rel=1e-6)
    assert 0.79 < mse < 0.85
    assert result.history[-1].train_loss < result.history[0].train_loss


# ---------------------------------------------------------------------------------------------
# the command line


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="xlmirror")
    parser.add_argument("-q", "--quiet", action="store_true")
    movielens_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    _report_to_stderr(quiet=args.quiet)
    try:
        return args.run(args)
    except InputError as exc:
        print(f"xlmirror: error: {exc}")
        return EXIT_USAGE


def test_cli_trains_saves_and_recommends(tmp_path, capsys):
    folder = write_movielens(tmp_path / "ml-100k", n_users=40, n_movies=30, density=0.5,
                             titles={7: "Seven (1995)"})
    out = tmp_path / "run"
    argv = ["train", "movielens", "--data", str(folder), "--seed", "5", "--epochs", "2",
            "--bs", "32", "--lr", "0.01", "--out", str(out), "--no-progress"]
    assert run_cli(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["epoch", "train_loss", "valid_loss", "time"]
    assert [line.split()[0] for line in table[1:]] == ["1", "2"]
    assert {path.name for path in out.iterdir()} == {CHECKPOINT, MODEL_FILE, "losses.png"}
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the printed valid loss is the MSE of the saved model on the same split, made again
    run = load_run(out)
    data = load_release(folder)
    train_rows, valid_rows = random_split(data.ratings, 0.2, seed=5)
    users = torch.as_tensor(run.users.encode(valid_rows["user"]))
    movies = torch.as_tensor(run.movies.encode(valid_rows["movie"]))
    predictions = train_collab.predict(run.model, users, movies).double().numpy()
    mse = np.mean((predictions - valid_rows["rating"].to_numpy()) ** 2)
    assert float(table[-1].split()[2]) == pytest.approx(mse, abs=1e-6)

    # recommendations: unseen in training, best first, scored by the model
    user = int(train_rows["user"].iloc[0])
    picks = recommend(run, user, n=5)
    rated = set(train_rows.loc[train_rows["user"] == user, "movie"])
    assert len(picks) == 5 and not rated & {pick.movie for pick in picks}
    scores = [pick.predicted for pick in picks]
    assert scores == sorted(scores, reverse=True)
    unseen = sorted(set(run.movies.ids) - rated)
    all_scores = train_collab.predict(
        run.model, torch.full((len(unseen),), int(run.users.encode([user])[0])),
        torch.as_tensor(run.movies.encode(unseen))).numpy()
    assert scores[0] == pytest.approx(all_scores.max(), rel=1e-6)
    everything = recommend(run, user, n=len(unseen) + 5)
    assert sorted(pick.movie for pick in everything) == unseen
    assert {pick.movie: pick.title for pick in everything} == {
        movie: data.titles[movie] for movie in unseen}
    assert data.titles[7] == "Seven (1995)"

    assert run_cli(["recommend", str(out), "--user", str(user), "-n", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split()[2]) for line in lines[1:]] == [p.movie for p in picks[:3]]


def test_cli_refuses_what_it_should(tmp_path, capsys):
    folder = write_movielens(tmp_path / "ml-100k", n_users=30, n_movies=20)
    out = tmp_path / "run"
    base = ["train", "movielens", "--data", str(folder), "--seed", "1", "--epochs", "1",
            "--bs", "16", "--out", str(out), "--no-progress"]
    assert run_cli(base) == 0
    capsys.readouterr()

    assert run_cli(base) == EXIT_USAGE
    assert "already holds a run" in capsys.readouterr().out
    assert run_cli(base + ["--resume", "--lr", "0.1"]) == EXIT_USAGE
    assert "--lr 0.1 differs from the run being resumed (0.005)" in capsys.readouterr().out
    assert run_cli(base + ["--force"]) == 0
    capsys.readouterr()

    assert run_cli(["recommend", str(out), "--user", "9999"]) == EXIT_USAGE
    message = capsys.readouterr().out
    assert "user 9999 is not among the 30 users" in message
    assert run_cli(["recommend", str(tmp_path / "nothing"), "--user", "1"]) == EXIT_USAGE
    assert run_cli(base[:-1] + ["--out", str(tmp_path / "b"), "--bs", "100000"]) == EXIT_USAGE
    assert "lower --bs" in capsys.readouterr().out


def test_cli_refuses_bad_runs_before_training(tmp_path, capsys):
    folder = write_movielens(tmp_path / "ml-100k", n_users=30, n_movies=20)
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    base = ["train", "movielens", "--data", str(folder), "--seed", "1", "--epochs", "1",
            "--bs", "16", "--no-progress"]
    cases = [
        (["--out", str(a_file / "run")], "cannot create the run folder"),
        (["--out", str(tmp_path / "r1"), "--model", "embnn", "--layers", "0"], "layers must"),
        (["--out", str(tmp_path / "r2"), "--model", "embnn", "--layers", "-5"], "layers must"),
        (["--out", str(tmp_path / "r3"), "--valid-pct", "0"], "--valid-pct must be above 0"),
    ]
    for extra, fragment in cases:
        assert run_cli(base + extra) == EXIT_USAGE, extra
        captured = capsys.readouterr()
        assert fragment in captured.out, extra
        assert "epoch 1" not in captured.err, extra  # refused before any training
    assert a_file.read_text() == "mine"


def test_forced_run_never_leaves_the_old_runs_files(tmp_path, capsys, monkeypatch):
    folder = write_movielens(tmp_path / "ml-100k", n_users=30, n_movies=20)
    out = tmp_path / "run"
    base = ["train", "movielens", "--data", str(folder), "--seed", "1", "--epochs", "1",
            "--bs", "16", "--out", str(out), "--no-progress"]
    assert run_cli(base) == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_collab, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(base + ["--force", "--seed", "2"])
    assert list(out.iterdir()) == []  # no model of the old run left to pass for the new one


def test_recommend_explains_files_that_are_not_trained_models(tmp_path, capsys):
    folder = write_movielens(tmp_path / "ml-100k", n_users=30, n_movies=20)
    out = tmp_path / "run"
    assert run_cli(["train", "movielens", "--data", str(folder), "--seed", "1", "--epochs",
                    "1", "--bs", "16", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()

    assert run_cli(["recommend", str(out / CHECKPOINT), "--user", "1"]) == EXIT_USAGE
    assert f"the trained model is {out / MODEL_FILE}" in capsys.readouterr().out

    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)
    assert run_cli(["recommend", str(tmp_path / "noise.pt"), "--user", "1"]) == EXIT_USAGE
    message = capsys.readouterr().out
    assert "not a readable checkpoint" in message and "weights_only" not in message
    assert len(message.strip().splitlines()) == 1

    saved = torch.load(out / MODEL_FILE, weights_only=True)
    saved["config"]["n_factors"] = 7  # settings that no longer describe the weights
    torch.save(saved, tmp_path / "damaged.pt")
    assert run_cli(["recommend", str(tmp_path / "damaged.pt"), "--user", "1"]) == EXIT_USAGE
    assert "its weights do not match its settings" in capsys.readouterr().out


def test_loss_plot_and_history_survive_a_json_round_trip(tmp_path):
    history = [train_collab.EpochStats(1, 1.0, 0.9, 0.5), train_collab.EpochStats(2, 0.8, 0.85,
                                                                                   0.4)]
    path = train_collab.save_loss_plot(history, tmp_path / "losses.png")
    assert path.stat().st_size > 1000
    config = TrainConfig(layers=(7, 3), seed=4)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert math.isclose(OneCycle(1.0, 10).lr(10), 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["embnn", "dot", "dotbias"])
def test_cuda_with_mixed_precision_matches_cpu(tmp_path, kind):
    *_, split = synthetic_split(tmp_path, n_users=200, n_movies=100)
    config = TrainConfig(model=kind, layers=(32, 16), epochs=3, lr=1e-2, bs=64, seed=0)
    on_cpu = train(split, config, device="cpu", progress=False)
    on_gpu = train(split, config, device="cuda", progress=False)
    assert on_gpu.device.startswith("cuda")
    # other batch orders (the GPU draws its own permutation) and float16 matmuls: 2%
    assert on_gpu.history[-1].valid_loss == pytest.approx(on_cpu.history[-1].valid_loss,
                                                          rel=0.02)
