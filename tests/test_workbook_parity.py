"""Every formula cell of the built workbooks, recalculated by two spreadsheet engines, equals
the numpy reference; the headline cells also equal PyTorch computed straight from the inputs."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from numpy.testing import assert_allclose

from sheets.build import COLLAB_FILE, ENTROPY_FILE
from sheets.cells import numbers
from sheets.references import reference_values

TOLERANCE = 1e-9  # what `xlmirror check` promises
ENGINE_FLOAT64 = 1e-12  # headline cells vs torch; LibreOffice writes 15 significant digits


@pytest.mark.parametrize("name", [ENTROPY_FILE, COLLAB_FILE])
def test_every_formula_cell_matches_numpy_in_both_engines(recalculated, name):
    book = recalculated[name]
    expected = reference_values(book.wb)

    for title, addresses in book.cells.items():
        assert set(addresses) == set(expected[title]), f"{title}: formula without a reference"
        want = np.array([expected[title][a] for a in addresses])
        cached = np.array([book.cached_wb[title][a].value for a in addresses], dtype=float)
        assert_allclose(cached, want, rtol=0, atol=TOLERANCE, err_msg=f"{title} cached")
        for engine, values in book.engines().items():
            got = np.array([values[title][a] for a in addresses], dtype=float)
            assert_allclose(got, want, rtol=0, atol=TOLERANCE, err_msg=f"{title} {engine}")


def _engine_value(recalculated, name, sheet, address):
    book = recalculated[name]
    values = [engine[sheet][address] for engine in book.engines().values()]
    assert values[0] == pytest.approx(values[1], rel=ENGINE_FLOAT64)
    return values[1]


def test_cross_entropy_cell_equals_torch(recalculated):
    ws = recalculated[ENTROPY_FILE].wb["softmax"]
    logits = torch.tensor(numbers(ws, "B2:B6")[:, 0])
    target = torch.tensor([int(np.argmax(numbers(ws, "E2:E6")[:, 0]))])
    expected = F.cross_entropy(logits[None], target).item()

    got = _engine_value(recalculated, ENTROPY_FILE, "cross_entropy", "D7")
    assert got == pytest.approx(expected, rel=ENGINE_FLOAT64)
    assert got == pytest.approx(0.1356600528, abs=1e-10)  # the value the lesson's code prints


def test_softmax_cells_equal_torch_even_with_a_logit_of_1000(recalculated):
    ws = recalculated[ENTROPY_FILE].wb["softmax"]
    for logits_ref, first_row, col in (("B2:B6", 2, "D"), ("B2:B6", 2, "I"),
                                       ("B11:B15", 11, "E")):
        logits = torch.tensor(numbers(ws, logits_ref)[:, 0])
        expected = F.softmax(logits, dim=0).numpy()
        got = [_engine_value(recalculated, ENTROPY_FILE, "softmax", f"{col}{first_row + i}")
               for i in range(5)]
        assert_allclose(got, expected, rtol=ENGINE_FLOAT64, atol=1e-300)
    assert numbers(ws, "B11:B15").max() == 1000.0


def test_binary_cross_entropy_cells_equal_torch(recalculated):
    ws = recalculated[ENTROPY_FILE].wb["binary_cross_entropy"]
    targets = torch.tensor(numbers(ws, "B2:B6")[:, 0])
    probs = torch.tensor(numbers(ws, "D2:D6")[:, 0])
    logits = torch.tensor(numbers(ws, "H2:H6")[:, 0])
    bce = F.binary_cross_entropy(probs, targets).item()
    bce_logits = torch.nn.BCEWithLogitsLoss()(logits, targets).item()

    for address in ("F7", "G7"):
        got = _engine_value(recalculated, ENTROPY_FILE, "binary_cross_entropy", address)
        assert got == pytest.approx(bce, rel=ENGINE_FLOAT64)
    got = _engine_value(recalculated, ENTROPY_FILE, "binary_cross_entropy", "J7")
    assert got == pytest.approx(bce_logits, rel=ENGINE_FLOAT64)
    assert bce == pytest.approx(0.7628885354, abs=1e-10)  # the value the lesson's code prints


def test_ratings_block_is_the_most_active_users_and_most_rated_movies(recalculated, ml100k):
    data = pd.read_csv(ml100k / "u.data", sep="\t", names=["user", "movie", "rating", "ts"])
    top_users = data["user"].value_counts().nlargest(15, keep="all")
    top_movies = data["movie"].value_counts().nlargest(15, keep="all")
    assert len(top_users) == len(top_movies) == 15  # no tie at the cut-off in ml-100k

    ws = recalculated[COLLAB_FILE].wb["dotprod"]
    user_ids = numbers(ws, "G2:G16")[:, 0].astype(int)
    movie_ids = numbers(ws, "H1:V1")[0].astype(int)
    assert sorted(user_ids) == sorted(top_users.index)
    assert sorted(movie_ids) == sorted(top_movies.index)

    crosstab = pd.crosstab(data["user"], data["movie"], values=data["rating"], aggfunc="last")
    expected = crosstab.loc[user_ids, movie_ids].to_numpy(dtype=float)
    assert_allclose(numbers(ws, "H2:V16", blank_ok=True), expected, equal_nan=True)


def _torch_rmse(ratings, user_factors, movie_factors, user_bias=None, movie_bias=None):
    ratings = torch.tensor(ratings)
    rated = ~torch.isnan(ratings)
    scores = torch.tensor(user_factors) @ torch.tensor(movie_factors)
    if user_bias is not None:
        scores = scores + torch.tensor(user_bias) + torch.tensor(movie_bias)
    return torch.sqrt(F.mse_loss(scores[rated], ratings[rated])).item()


def test_dotprod_and_bias_rmse_equal_torch(recalculated):
    wb = recalculated[COLLAB_FILE].wb
    ws = wb["dotprod"]
    expected = _torch_rmse(numbers(ws, "H2:V16", blank_ok=True), numbers(ws, "B25:F39"),
                           numbers(ws, "H19:V23"))
    assert _engine_value(recalculated, COLLAB_FILE, "dotprod", "V41") == pytest.approx(
        expected, rel=ENGINE_FLOAT64)

    ws = wb["bias"]
    expected = _torch_rmse(numbers(ws, "H2:V16", blank_ok=True), numbers(ws, "B26:F40"),
                           numbers(ws, "H20:V24"), numbers(ws, "A26:A40"), numbers(ws, "H19:V19"))
    assert _engine_value(recalculated, COLLAB_FILE, "bias", "V42") == pytest.approx(
        expected, rel=ENGINE_FLOAT64)


def test_embedding_lookups_equal_nn_embedding_and_the_dot_product_sheet(recalculated):
    wb = recalculated[COLLAB_FILE].wb
    ws = wb["movielens_emb"]
    user_ids = list(numbers(ws, "B4:B18")[:, 0])
    movie_ids = list(numbers(ws, "B22:B36")[:, 0])
    n = sum(1 for row in ws.iter_rows(min_row=3, min_col=9, max_col=9) if row[0].value)
    long_form = numbers(ws, f"I3:K{n + 2}")
    users = torch.nn.Embedding.from_pretrained(torch.tensor(numbers(ws, "C4:G18")))
    movies = torch.nn.Embedding.from_pretrained(torch.tensor(numbers(ws, "C22:G36")))

    user_index = torch.tensor([user_ids.index(u) for u in long_form[:, 0]])
    movie_index = torch.tensor([movie_ids.index(m) for m in long_form[:, 1]])
    predictions = (users(user_index) * movies(movie_index)).sum(dim=1).numpy()
    got = [_engine_value(recalculated, COLLAB_FILE, "movielens_emb", f"X{3 + i}")
           for i in range(n)]
    assert_allclose(got, predictions, rtol=ENGINE_FLOAT64)

    # same factors as dotprod, so the look-up form gives the matrix form's loss
    dotprod_rmse = _engine_value(recalculated, COLLAB_FILE, "dotprod", "V41")
    emb_rmse = _engine_value(recalculated, COLLAB_FILE, "movielens_emb", "AA3")
    assert emb_rmse == pytest.approx(dotprod_rmse, rel=ENGINE_FLOAT64)
    assert n == int((~np.isnan(numbers(wb["dotprod"], "H2:V16", blank_ok=True))).sum())


def test_word_lookups_equal_nn_embedding(recalculated):
    ws = recalculated[COLLAB_FILE].wb["word_emb"]
    vocabulary = [ws.cell(row=r, column=1).value for r in range(2, 16)]
    vectors = torch.nn.Embedding.from_pretrained(torch.tensor(numbers(ws, "B2:F15")))
    words = [c.value for c in ws["H"][1:] if c.value]

    expected = vectors(torch.tensor([vocabulary.index(w) for w in words])).numpy()
    got = [[_engine_value(recalculated, COLLAB_FILE, "word_emb", f"{col}{2 + i}")
            for col in "JKLMN"] for i in range(len(words))]
    assert_allclose(got, expected, rtol=0, atol=1e-15)
