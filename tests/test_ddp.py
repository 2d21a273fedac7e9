"""Training with DistributedDataParallel: two CPU processes (gloo) against one.

The test starts ``python -m torch.distributed.run --nproc_per_node 2`` on this very file, whose
``__main__`` block is the worker: it loads a synthetic MovieLens folder, trains and (rank 0
only) writes the history as JSON. Two processes take half of each batch from their own shard
and average gradients, so they see other batches than one process does, but as many of the
same size: the final validation loss must agree within 1%.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# measured over 6 seeds in one process: final valid loss 0.3445 +- 0.14%, so 1% is ~5 sigma
SETTINGS = dict(model="dotbias", n_factors=8, epochs=4, lr=2e-2, wd=0.1, bs=256, seed=11)


def write_latent_movielens(folder, n_users=400, n_movies=300, n_ratings=100_000, seed=0):
    """A u.data whose ratings come from a rank-4 model plus noise, so there is a signal to fit
    and validation losses say something (uniform random stars would not)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, n_users + 1, n_ratings)
    movies = rng.integers(1, n_movies + 1, n_ratings)
    user_factors = rng.normal(0, 0.6, (n_users + 1, 4))
    movie_factors = rng.normal(0, 0.6, (n_movies + 1, 4))
    scores = 3.5 + (user_factors[users] * movie_factors[movies]).sum(1) + rng.normal(0, 0.5,
                                                                                    n_ratings)
    stars = np.clip(np.rint(scores), 1, 5).astype(int)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{u}\t{m}\t{r}\t874965758" for u, m, r in zip(users, movies, stars)]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    items = [f"{movie}|Movie {movie} (1995)|01-Jan-1995||http://x|0" for movie in
             range(1, n_movies + 1)]
    (folder / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    return folder


def train_worker(folder, out_json, run_dir):
    """Train on ``folder`` as one process of however many torchrun started."""
    import torch

    from engine.releases import load_release
    from engine.splits import encode_split, random_split
    from engine.train_collab import TrainConfig, train

    torch.set_num_threads(1)  # two processes on two cores
    data = load_release(folder, name="ml-100k")
    train_rows, valid_rows = random_split(data.ratings, 0.2, seed=3)
    result = train(encode_split(train_rows, valid_rows), TrainConfig(**SETTINGS), device="cpu",
                   run_dir=run_dir, progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        rows = [vars(row) for row in result.history]
        Path(out_json).write_text(json.dumps({"history": rows, "files": [
            str(path) for path in result.files]}))
    return result


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_processes_reach_the_loss_of_one(tmp_path):
    folder = write_latent_movielens(tmp_path / "ml-100k")

    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    environment.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", __file__, str(folder), str(tmp_path / "two.json"),
               str(tmp_path / "two")]
    finished = subprocess.run(command, env=environment, cwd=ROOT, capture_output=True,
                              text=True, timeout=300, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]

    one = train_worker(folder, tmp_path / "one.json", tmp_path / "one").history
    two = json.loads((tmp_path / "two.json").read_text())["history"]

    # only rank 0 logs, and it says it trained with two processes
    assert finished.stderr.count("epoch 1/4") == 1
    assert "x 2 processes" in finished.stderr
    assert [row["epoch"] for row in two] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.pt",
                                                                     "model.pt"]
    # the model learnt something over the run
    assert one[-1].valid_loss < 0.8 * one[0].valid_loss
    assert two[-1]["valid_loss"] == pytest.approx(one[-1].valid_loss, rel=0.01)
    # not the same run in disguise: two processes see other batches
    assert two[-1]["valid_loss"] != one[-1].valid_loss


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_worker(*sys.argv[1:4])
