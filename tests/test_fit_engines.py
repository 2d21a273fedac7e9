"""The sheet objective's gradient, the torch modules and the three optimizers, each checked
against a second, independent route: torch autograd, finite differences, engine.collab's
numpy predictions, and the other optimizers from the same start.
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from engine.collab import LatentFactors, predict, rmse
from engine.errors import InputError
from engine.objective import pack, rmse_and_gradient, unpack
from engine.optimize import fit_scipy
from engine.torch_collab import (
    INIT_STD, DotProduct, DotProductBias, fit_torch, from_factors, resolve_device,
    sheet_objective_torch, sigmoid_range,
)

BLOCKS = ("user_factors", "movie_factors", "user_bias", "movie_bias")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT64 = 1e-12


def blank_ratings(seed, n_users=15, n_movies=15, blank=0.4):
    """Whole stars 1..5 with about ``blank`` of the cells NaN (a sheet's empty cells)."""
    rng = np.random.default_rng(seed)
    ratings = rng.integers(1, 6, size=(n_users, n_movies)).astype(np.float64)
    ratings[rng.random(ratings.shape) < blank] = np.nan
    return ratings


def low_rank_ratings(seed, n=15, rank=2, blank=0.15, noise=0.3):
    """Ratings from a rank-``rank`` model with biases, plus noise; about ``blank`` NaN.

    Fitted with ``rank`` factors this problem is well posed (about 190 ratings for 90
    variables), so every optimizer can reach the same minimum. The lecture's k=5 on its 190
    ratings is not: some starts drift along valleys where factors grow without bound, and
    optimizers from one start can end in different places.
    """
    rng = np.random.default_rng(seed)
    user_factors = rng.normal(0.0, 0.7, (n, rank))
    movie_factors = rng.normal(0.0, 0.7, (n, rank))
    user_bias = rng.normal(0.0, 0.5, (n, 1))
    movie_bias = rng.normal(0.0, 0.5, (1, n))

    ratings = 3.5 + user_factors @ movie_factors.T + user_bias + movie_bias
    ratings += rng.normal(0.0, noise, (n, n))
    ratings[rng.random(ratings.shape) < blank] = np.nan
    return ratings


def autograd_rmse_and_gradient(ratings, factors, with_bias):
    """The sheet RMSE written afresh in torch and differentiated by autograd."""
    blocks = {
        name: torch.tensor(getattr(factors, name), dtype=torch.float64, requires_grad=True)
        for name in BLOCKS
    }
    scores = blocks["user_factors"] @ blocks["movie_factors"].T
    if with_bias:
        scores = scores + blocks["user_bias"][:, None] + blocks["movie_bias"][None, :]

    targets = torch.tensor(ratings)
    rated = ~torch.isnan(targets)
    loss = torch.sqrt(((scores - targets)[rated] ** 2).mean())
    loss.backward()

    # blocks the loss never touched (biases without with_bias) have no .grad: d/d = 0
    gradient = {
        name: np.zeros(tensor.shape) if tensor.grad is None else tensor.grad.numpy()
        for name, tensor in blocks.items()
    }
    return loss.item(), LatentFactors(**gradient)


def sheet_predictions(ratings, factors, with_bias):
    biases = (factors.user_bias, factors.movie_bias) if with_bias else ()
    return predict(ratings, factors.user_factors, factors.movie_factors, *biases)


def snapshot(factors):
    return {name: np.array(getattr(factors, name), copy=True) for name in BLOCKS}


# --- the objective and its gradient ------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_analytic_gradient_equals_autograd(with_bias, seed):
    ratings = blank_ratings(seed)
    factors = LatentFactors.random(15, 15, 5, seed=seed)

    loss, gradient = rmse_and_gradient(ratings, factors, with_bias)
    expected_loss, expected = autograd_rmse_and_gradient(ratings, factors, with_bias)

    assert 0.3 < np.isnan(ratings).mean() < 0.5
    assert_allclose(loss, expected_loss, rtol=FLOAT64)
    assert_allclose(loss, rmse(ratings, sheet_predictions(ratings, factors, with_bias)),
                    rtol=FLOAT64)
    for name in BLOCKS:
        # rtol 1e-10 plus a tiny atol: sums of opposite-signed terms can land near zero
        assert_allclose(getattr(gradient, name), getattr(expected, name), rtol=1e-10,
                        atol=1e-14, err_msg=name)
    if not with_bias:
        assert not gradient.user_bias.any() and not gradient.movie_bias.any()


@pytest.mark.parametrize("with_bias", [False, True])
def test_analytic_gradient_equals_central_differences(with_bias):
    ratings = blank_ratings(2)
    factors = LatentFactors.random(15, 15, 5, seed=2)
    vector = pack(factors, with_bias)
    gradient = pack(rmse_and_gradient(ratings, factors, with_bias)[1], with_bias)

    def loss_at(moved):
        return rmse_and_gradient(ratings, unpack(moved, factors, with_bias), with_bias)[0]

    # a movie factor, a user factor, and (with biases) a movie and a user bias
    n_factors = 15 * 5
    coordinates = [0, 7, n_factors + 3, 2 * n_factors - 1]
    if with_bias:
        coordinates += [2 * n_factors + 4, len(vector) - 1]

    # central differences: truncation error ~ h**2 * f''' ~ 1e-12 and rounding error
    # ~ eps * f / h ~ 1e-10, so 1e-10 relative agreement is all they can show; rtol 1e-6
    # leaves room for curvature without hiding a wrong gradient (that would be off by O(1))
    step = 1e-6
    for coordinate in coordinates:
        up, down = vector.copy(), vector.copy()
        up[coordinate] += step
        down[coordinate] -= step
        estimate = (loss_at(up) - loss_at(down)) / (2 * step)
        assert_allclose(gradient[coordinate], estimate, rtol=1e-6, err_msg=str(coordinate))


def test_pack_order_and_round_trip():
    factors = LatentFactors.random(4, 3, 2, seed=5)

    vector = pack(factors, with_bias=True)
    expected = np.concatenate([
        factors.movie_factors.ravel(), factors.user_factors.ravel(),
        factors.movie_bias, factors.user_bias,
    ])
    assert_array_equal(vector, expected)
    back = unpack(vector, factors, with_bias=True)
    for name in BLOCKS:
        assert_array_equal(getattr(back, name), getattr(factors, name))

    without = pack(factors, with_bias=False)
    assert len(without) == 3 * 2 + 4 * 2
    back = unpack(without * 2, factors, with_bias=False)
    assert_array_equal(back.user_factors, factors.user_factors * 2)
    assert_array_equal(back.user_bias, factors.user_bias)  # not a variable: carried over
    assert back.user_bias is not factors.user_bias


def test_gradient_is_zero_at_a_perfect_fit():
    factors = LatentFactors.random(6, 5, 2, seed=3)
    ratings = factors.user_factors @ factors.movie_factors.T
    ratings[0, 0] = np.nan

    loss, gradient = rmse_and_gradient(ratings, factors, with_bias=False)

    assert loss == 0.0
    assert not gradient.user_factors.any() and not gradient.movie_factors.any()


def test_mismatched_shapes_and_empty_ratings_are_input_errors():
    factors = LatentFactors.random(15, 15, 5, seed=0)
    with pytest.raises(InputError, match=r"user_factors has shape \(15, 5\), expected \(14, 5\)"):
        rmse_and_gradient(blank_ratings(0, n_users=14), factors, with_bias=True)
    with pytest.raises(InputError, match="no rated cell"):
        fit_scipy(np.full((15, 15), np.nan), factors, with_bias=False)
    with pytest.raises(InputError, match="optimizer 'sgd'"):
        fit_torch(blank_ratings(0), factors, with_bias=False, optimizer="sgd", device="cpu")


# --- the torch modules -------------------------------------------------------------------


@pytest.mark.parametrize("embedding", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_module_predictions_equal_sheet_predictions(with_bias, embedding):
    ratings = blank_ratings(3)
    factors = LatentFactors.random(15, 15, 5, seed=3)
    module = from_factors(factors, with_bias, embedding=embedding)
    assert isinstance(module, DotProductBias if with_bias else DotProduct)

    rated = ~np.isnan(ratings)
    user_index, movie_index = (torch.from_numpy(index) for index in np.nonzero(rated))
    with torch.no_grad():
        predictions = module(user_index, movie_index).numpy()
        loss = sheet_objective_torch(torch.tensor(ratings), module).item()

    expected = sheet_predictions(ratings, factors, with_bias)
    assert_allclose(predictions, expected[rated], rtol=FLOAT64)
    assert_allclose(loss, rmse(ratings, expected), rtol=FLOAT64)

    back = module.to_factors(like=factors)
    for name in BLOCKS:
        assert_array_equal(getattr(back, name), getattr(factors, name))


@pytest.mark.parametrize("embedding", [True, False])
def test_module_with_y_range_squashes_the_sheet_predictions(embedding):
    ratings = blank_ratings(4)
    factors = LatentFactors.random(15, 15, 5, seed=4)
    module = from_factors(factors, with_bias=True, embedding=embedding, y_range=(0.0, 5.5))

    rated = ~np.isnan(ratings)
    user_index, movie_index = (torch.from_numpy(index) for index in np.nonzero(rated))
    with torch.no_grad():
        predictions = module(user_index, movie_index).numpy()

    scores = sheet_predictions(ratings, factors, with_bias=True)[rated]
    assert_allclose(predictions, 5.5 / (1.0 + np.exp(-scores)), rtol=FLOAT64)


@pytest.mark.parametrize("embedding", [True, False])
def test_new_modules_start_normal_with_std_001(embedding):
    torch.manual_seed(0)
    module = DotProductBias(1000, 800, 50, embedding=embedding)

    for name, weight in module.named_parameters():
        values = weight.detach().double().reshape(-1)
        n = values.numel()
        # 5 standard errors: the sample std of n normals has SE std / sqrt(2n), the mean std
        # / sqrt(n); a wrong init (torch's Embedding default is std 1) misses by far more
        assert abs(values.std().item() - INIT_STD) < 5 * INIT_STD / np.sqrt(2 * n), name
        assert abs(values.mean().item()) < 5 * INIT_STD / np.sqrt(n), name


def test_sigmoid_range_maps_into_the_open_interval():
    # beyond |x| ~ 36 float64's sigmoid rounds to exactly 0 or 1 and the bounds are reached
    x = np.linspace(-30.0, 30.0, 601)
    lo, hi = 0.5, 5.5

    squashed = sigmoid_range(torch.tensor(x), lo, hi).numpy()

    assert ((squashed > lo) & (squashed < hi)).all()
    assert (np.diff(squashed) > 0).all()
    assert_allclose(squashed, lo + (hi - lo) / (1.0 + np.exp(-x)), rtol=FLOAT64)


# --- devices -----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present on this machine")
def test_cuda_without_cuda_is_an_input_error():
    with pytest.raises(InputError, match="CUDA is not available.*--device cpu"):
        resolve_device("cuda")


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="'tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu")


# --- the optimizers, against each other ----------------------------------------------------


@pytest.fixture(scope="module")
def scipy_fits():
    """fit_scipy on the well-posed problem, with and without biases (the reference)."""
    ratings = low_rank_ratings(0)
    start = LatentFactors.random(15, 15, 2, seed=0)
    return ratings, start, {wb: fit_scipy(ratings, start, wb) for wb in (False, True)}


def check_result(result, ratings, with_bias):
    """The bookkeeping every FitResult owes, checked against engine.collab's own RMSE."""
    assert result.history[0] == result.start_rmse
    assert result.history[-1] == result.final_rmse
    assert result.iterations == len(result.history) - 1
    assert result.final_rmse < result.start_rmse
    # float32 fits report float32 RMSEs: 1e-6 is that dtype's tolerance
    assert_allclose(result.final_rmse,
                    rmse(ratings, sheet_predictions(ratings, result.factors, with_bias)),
                    rtol=1e-6)


@pytest.mark.parametrize("with_bias", [False, True])
def test_scipy_fit(scipy_fits, with_bias):
    ratings, start, fits = scipy_fits
    result = fits[with_bias]

    check_result(result, ratings, with_bias)
    assert result.engine == "scipy L-BFGS-B" and result.device == "cpu"
    if not with_bias:
        assert_array_equal(result.factors.user_bias, start.user_bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("embedding", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_lbfgs_agrees_with_scipy(scipy_fits, with_bias, embedding, dtype, device):
    ratings, start, fits = scipy_fits
    before = snapshot(start)

    result = fit_torch(ratings, start, with_bias, "lbfgs", device=device, embedding=embedding,
                       dtype=dtype)

    check_result(result, ratings, with_bias)
    assert result.engine == "torch L-BFGS"
    assert result.device == str(resolve_device(device))
    assert_allclose(result.final_rmse, fits[with_bias].final_rmse, rtol=0.01)
    for name in BLOCKS:
        assert_array_equal(getattr(start, name), before[name], err_msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_adam_gets_near_scipy(scipy_fits, with_bias, device):
    ratings, start, fits = scipy_fits
    before = snapshot(start)

    result = fit_torch(ratings, start, with_bias, "adam", device=device, max_iter=1000)

    check_result(result, ratings, with_bias)
    assert result.engine == "torch Adam" and result.iterations == 1000
    # a fixed-lr Adam has no convergence test: it ends wherever its last step lands, near
    # the minimum but circling it at a distance set by lr, hence 3% and not L-BFGS's 1%
    assert_allclose(result.final_rmse, fits[with_bias].final_rmse, rtol=0.03)
    for name in BLOCKS:
        assert_array_equal(getattr(start, name), before[name], err_msg=name)


def test_fits_say_whether_they_stopped_on_their_tolerance(scipy_fits):
    ratings, start, fits = scipy_fits
    capped = {"scipy": fit_scipy(ratings, start, True, max_iter=3),
              "lbfgs": fit_torch(ratings, start, True, "lbfgs", device="cpu", max_iter=3)}
    converged = fit_torch(ratings, start, True, "lbfgs", device="cpu")

    # the well-posed problem converges well inside the default cap of 1000 iterations
    assert fits[True].converged is True and fits[True].iterations < 1000
    assert converged.converged is True and converged.iterations < 1000
    for name, result in capped.items():
        assert result.converged is False and result.iterations == 3, name
        assert result.final_rmse > fits[True].final_rmse + 1e-3, name  # really unfinished
    adam = fit_torch(ratings, start, True, "adam", device="cpu", max_iter=5)
    assert adam.converged is None


@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_decay_means_the_same_penalty_everywhere(scipy_fits, with_bias):
    ratings, start, fits = scipy_fits
    weight_decay = 0.01

    scipy_fit = fit_scipy(ratings, start, with_bias, weight_decay=weight_decay)
    lbfgs = fit_torch(ratings, start, with_bias, "lbfgs", device="cpu",
                      weight_decay=weight_decay)
    adam = fit_torch(ratings, start, with_bias, "adam", device="cpu", max_iter=1000,
                     weight_decay=weight_decay)

    # the penalty pulls the factors in, so the RMSE alone ends above the unpenalised fit's
    assert scipy_fit.final_rmse > fits[with_bias].final_rmse * 1.001
    assert_allclose(lbfgs.final_rmse, scipy_fit.final_rmse, rtol=0.01)
    assert_allclose(adam.final_rmse, scipy_fit.final_rmse, rtol=0.03)  # why 3%: see above
    assert_allclose(lbfgs.factors.user_factors @ lbfgs.factors.movie_factors.T,
                    scipy_fit.factors.user_factors @ scipy_fit.factors.movie_factors.T,
                    atol=1e-3)


def test_fit_scipy_leaves_start_unchanged():
    ratings = low_rank_ratings(1)
    start = LatentFactors.random(15, 15, 2, seed=1)
    before = snapshot(start)

    fit_scipy(ratings, start, with_bias=True, max_iter=20)

    for name in BLOCKS:
        assert_array_equal(getattr(start, name), before[name], err_msg=name)
