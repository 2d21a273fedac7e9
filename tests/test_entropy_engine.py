"""engine.entropy against PyTorch's own losses, and against the numbers the lecture reports."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.testing import assert_allclose

from engine import entropy
from sheets.entropy_book import CLASSES, IS_CAT, LOGITS, P_CAT, TARGET

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_and_cross_entropy_match_torch(dtype):
    logits = torch.tensor(LOGITS, dtype=dtype)
    target = torch.tensor(CLASSES.index(TARGET))
    actuals = np.eye(len(CLASSES))[CLASSES.index(TARGET)]

    assert_allclose(entropy.softmax(LOGITS), F.softmax(logits, 0).double(), rtol=TOL[dtype])
    assert_allclose(entropy.stable_softmax(LOGITS), F.softmax(logits, 0).double(),
                    rtol=TOL[dtype])
    expected = F.cross_entropy(logits[None], target[None]).item()
    assert_allclose(entropy.cross_entropy(entropy.softmax(LOGITS), actuals), expected,
                    rtol=TOL[dtype])


def test_lecture_cross_entropy_value():
    # torch.nn.functional.cross_entropy for the lecture's logits and target "dog"
    actuals = np.eye(len(CLASSES))[CLASSES.index(TARGET)]
    assert_allclose(entropy.cross_entropy(entropy.softmax(LOGITS), actuals), 0.1356600528,
                    atol=1e-10)


def test_stable_softmax_survives_a_logit_of_1000():
    logits = (1000.0,) + LOGITS[1:]
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.isnan(entropy.softmax(logits)).any()
    expected = F.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    assert_allclose(entropy.stable_softmax(logits), expected, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_binary_cross_entropy_matches_torch(dtype):
    targets = torch.tensor(IS_CAT, dtype=dtype)
    probs = torch.tensor(P_CAT, dtype=dtype)
    logits = torch.logit(torch.tensor(P_CAT, dtype=torch.float64)).to(dtype)

    assert_allclose(entropy.binary_cross_entropy(IS_CAT, P_CAT),
                    F.binary_cross_entropy(probs, targets).item(), rtol=TOL[dtype])
    assert_allclose(entropy.bce_with_logits(IS_CAT, logits.double().numpy()),
                    torch.nn.BCEWithLogitsLoss()(logits, targets).item(), rtol=TOL[dtype])
    assert_allclose(entropy.binary_cross_entropy(IS_CAT, P_CAT), 0.7628885354, atol=1e-10)


def test_positions_follow_match_and_take_the_first_duplicate():
    from engine.collab import positions

    assert list(positions(["b", "a"], ["a", "b", "a"])) == [2, 1]


def test_bce_with_logits_is_finite_where_probabilities_round_to_one():
    logits = np.array([40.0, -40.0])
    targets = np.array([0.0, 1.0])
    expected = F.binary_cross_entropy_with_logits(
        torch.tensor(logits), torch.tensor(targets), reduction="none")
    assert_allclose(entropy.bce_with_logits_terms(targets, logits), expected, rtol=1e-12)
