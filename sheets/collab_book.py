"""``collab_filter.xlsx``: latent-factor collaborative filtering on a MovieLens ratings block.

Four sheets, as in the lecture: ``dotprod`` (a factor matrix product), ``movielens_emb`` (the
same model written as embedding look-ups), ``bias`` (plus a bias per user and per movie) and
``word_emb`` (the look-up idea applied to words). The first three carry an Excel Solver model.
"""

from dataclasses import dataclass

import numpy as np

from engine import collab
from engine.errors import InputError
from sheets.cells import (
    absolute, block_address, cell_address, cells_of, column_letter, column_values, numbers,
    split_address, write_block, write_column, write_formula, write_number, write_row, write_text,
)
from sheets.solver import SolverModel, attach_solver

N_USERS = N_MOVIES = 15  # the lecture's block; build --users/--movies change it
N_FACTORS = 5
FACTOR_LABELS = [f"factor {k}" for k in range(1, N_FACTORS + 1)]
FIRST_MOVIE_COL = 8  # H


@dataclass(frozen=True)
class GridLayout:
    """Where ``dotprod`` and ``bias`` keep each block.

    For the lecture's 15 x 15 block: movie ids H1:V1, user ids G2:G16, ratings H2:V16, movie
    factors H19:V23, user factors B25:F39, predictions H25:V39, RMSE V41. ``bias`` inserts a
    movie-bias row (19) above the movie factors and a user-bias column (A) beside the user
    factors, so every later block sits one row lower. Larger blocks move the lower blocks down.
    """

    with_bias: bool
    n_users: int = N_USERS
    n_movies: int = N_MOVIES

    @classmethod
    def of(cls, ws, with_bias):
        """The layout of an existing sheet, sized by its id row and id column."""
        n_movies = len(column_values(ws, "H1", across=True))
        n_users = len(column_values(ws, "G2"))
        if n_users == 0 or n_movies == 0:
            raise InputError(
                f"{ws.title}: no movie ids from H1 rightwards or no user ids from G2 down; "
                "the sheet does not have the dotprod/bias layout"
            )
        return cls(with_bias, n_users, n_movies)

    @property
    def ratings(self):
        return block_address("H2", self.n_users, self.n_movies)

    @property
    def title_row(self):
        return self.n_users + 3

    @property
    def movie_bias(self):
        return block_address(f"H{self.title_row + 1}", 1, self.n_movies)

    @property
    def movie_factor_row(self):
        return self.title_row + (2 if self.with_bias else 1)

    @property
    def user_row(self):
        return self.movie_factor_row + N_FACTORS + 1

    @property
    def movie_factors(self):
        return block_address(f"H{self.movie_factor_row}", N_FACTORS, self.n_movies)

    @property
    def user_factors(self):
        return block_address(f"B{self.user_row}", self.n_users, N_FACTORS)

    @property
    def user_bias(self):
        return block_address(f"A{self.user_row}", self.n_users, 1)

    @property
    def predictions(self):
        return block_address(f"H{self.user_row}", self.n_users, self.n_movies)

    @property
    def loss(self):
        return cell_address(FIRST_MOVIE_COL + self.n_movies - 1, self.user_row + self.n_users + 1)

    @property
    def solver(self):
        variables = (self.movie_factors, self.user_factors)
        if self.with_bias:
            variables = (self.movie_bias, self.movie_factors, self.user_bias, self.user_factors)
        return SolverModel(self.loss, variables)


def build_grid(ws, layout, block, titles, factors):
    """Sheet ``dotprod`` or ``bias``: ratings, factors, prediction formulas, RMSE, Solver."""
    write_text(ws, "G1", "user \\ movie")
    write_row(ws, "H1", block.movie_ids)
    write_column(ws, "G2", block.user_ids)
    write_block(ws, "H2", block.ratings)

    write_text(ws, f"G{layout.title_row}", "title")
    write_row(ws, f"H{layout.title_row}", [titles.get(int(m), "") for m in block.movie_ids])
    write_column(ws, f"G{layout.movie_factor_row}", FACTOR_LABELS)
    write_block(ws, f"H{layout.movie_factor_row}", factors.movie_factors.T)
    write_row(ws, f"B{layout.user_row - 1}", FACTOR_LABELS)
    write_block(ws, f"B{layout.user_row}", factors.user_factors)
    write_row(ws, f"H{layout.user_row - 1}", block.movie_ids)
    write_column(ws, f"G{layout.user_row}", block.user_ids)
    if layout.with_bias:
        write_text(ws, f"G{layout.title_row + 1}", "movie bias")
        write_row(ws, layout.movie_bias.split(":")[0], factors.movie_bias)
        write_text(ws, f"A{layout.user_row - 1}", "user bias")
        write_column(ws, f"A{layout.user_row}", factors.user_bias)

    first_factor = layout.movie_factor_row
    last_factor = first_factor + N_FACTORS - 1
    bias_row = layout.title_row + 1
    for i in range(layout.n_users):
        row = layout.user_row + i
        for j in range(layout.n_movies):
            col = column_letter(FIRST_MOVIE_COL + j)
            product = f"MMULT($B{row}:$F{row},{col}${first_factor}:{col}${last_factor})"
            if layout.with_bias:
                product += f"+{col}${bias_row}+$A{row}"
            write_formula(ws, f"{col}{row}", f'=IF({col}{2 + i}="",0,{product})')

    loss_col, loss_row = split_address(layout.loss)
    write_text(ws, cell_address(loss_col - 1, loss_row), "RMSE")
    write_formula(
        ws, layout.loss,
        f"=SQRT(SUMXMY2({layout.ratings},{layout.predictions})/COUNT({layout.ratings}))",
    )
    attach_solver(ws, layout.solver)


def reference_grid(ws, with_bias):
    """Expected predictions and RMSE of a ``dotprod`` or ``bias`` sheet, from its inputs."""
    layout = GridLayout.of(ws, with_bias)
    ratings = numbers(ws, layout.ratings, blank_ok=True)
    movie_factors = numbers(ws, layout.movie_factors).T
    user_factors = numbers(ws, layout.user_factors)
    user_bias = movie_bias = None
    if layout.with_bias:
        user_bias = numbers(ws, layout.user_bias)[:, 0]
        movie_bias = numbers(ws, layout.movie_bias)[0]

    predictions = collab.predict(ratings, user_factors, movie_factors, user_bias, movie_bias)
    expected = cells_of(layout.predictions, predictions)
    expected[layout.loss] = collab.rmse(ratings, predictions)
    return expected


EMB_FIRST_ROW = 3  # movielens_emb: ratings in long form from I3 down
EMB_LOSS = "AA3"
EMB_USER_COLS, EMB_MOVIE_COLS = "MNOPQ", "STUVW"


@dataclass(frozen=True)
class EmbeddingLayout:
    """Where ``movielens_emb`` keeps its factor tables: users from B4, movies below them.

    For 15 users and 15 movies: user ids B4:B18 and factors C4:G18, movie ids B22:B36 and
    factors C22:G36, ratings in long form from I3, RMSE in AA3.
    """

    n_users: int = N_USERS
    n_movies: int = N_MOVIES

    @classmethod
    def of(cls, ws):
        """The layout of an existing sheet, sized by its two id columns."""
        n_users = len(column_values(ws, "B4"))
        n_movies = len(column_values(ws, f"B{cls(n_users, 0).movie_row}"))
        if n_users == 0 or n_movies == 0:
            raise InputError(
                f"{ws.title}: no user ids from B4 down or no movie ids below them; "
                "the sheet does not have the movielens_emb layout"
            )
        return cls(n_users, n_movies)

    @property
    def user_ids(self):
        return block_address("B4", self.n_users, 1)

    @property
    def user_factors(self):
        return block_address("C4", self.n_users, N_FACTORS)

    @property
    def movie_row(self):
        return 4 + self.n_users + 3

    @property
    def movie_ids(self):
        return block_address(f"B{self.movie_row}", self.n_movies, 1)

    @property
    def movie_factors(self):
        return block_address(f"C{self.movie_row}", self.n_movies, N_FACTORS)

    @property
    def solver(self):
        return SolverModel(EMB_LOSS, (self.user_factors, self.movie_factors))


def build_embeddings(ws, layout, block, titles, factors):
    """Sheet ``movielens_emb``: the dot-product model as MATCH/INDEX look-ups, one row a rating.

    Exact-match ``MATCH(id, ids, 0)`` finds the row and ``INDEX`` fetches each factor: unlike
    the original's ``OFFSET`` with approximate ``MATCH``, this works with unsorted ids and in
    every spreadsheet engine.
    """
    write_row(ws, "B3", ["userId"] + FACTOR_LABELS)
    write_column(ws, "B4", block.user_ids)
    write_block(ws, "C4", factors.user_factors)
    header = layout.movie_row - 1
    write_row(ws, f"A{header}", ["title", "movieId"] + FACTOR_LABELS)
    write_column(ws, f"A{layout.movie_row}", [titles.get(int(m), "") for m in block.movie_ids])
    write_column(ws, f"B{layout.movie_row}", block.movie_ids)
    write_block(ws, f"C{layout.movie_row}", factors.movie_factors)

    write_row(ws, "I2", ["userId", "movieId", "rating", "user idx"]
              + [f"user f{k}" for k in range(1, N_FACTORS + 1)] + ["movie idx"]
              + [f"movie f{k}" for k in range(1, N_FACTORS + 1)]
              + ["prediction", "squared error", "", "RMSE"])
    rows = block.long_form()
    last_row = EMB_FIRST_ROW + len(rows) - 1
    for offset, (user_id, movie_id, rating) in enumerate(rows):
        row = EMB_FIRST_ROW + offset
        write_number(ws, f"I{row}", user_id)
        write_number(ws, f"J{row}", movie_id)
        write_number(ws, f"K{row}", int(rating) if float(rating).is_integer() else rating)
        write_formula(ws, f"L{row}", f"=MATCH(I{row},{absolute(layout.user_ids)},0)")
        for k, col in enumerate(EMB_USER_COLS, start=1):
            write_formula(ws, f"{col}{row}", f"=INDEX({absolute(layout.user_factors)},$L{row},{k})")
        write_formula(ws, f"R{row}", f"=MATCH(J{row},{absolute(layout.movie_ids)},0)")
        for k, col in enumerate(EMB_MOVIE_COLS, start=1):
            write_formula(ws, f"{col}{row}", f"=INDEX({absolute(layout.movie_factors)},$R{row},{k})")
        write_formula(ws, f"X{row}", f"=SUMPRODUCT(M{row}:Q{row},S{row}:W{row})")
        write_formula(ws, f"Y{row}", f"=(X{row}-K{row})^2")

    write_formula(ws, EMB_LOSS, f"=SQRT(AVERAGE(Y{EMB_FIRST_ROW}:Y{last_row}))")
    attach_solver(ws, layout.solver)


def reference_embeddings(ws):
    """Expected look-ups, predictions and RMSE of a ``movielens_emb`` sheet."""
    layout = EmbeddingLayout.of(ws)
    user_ids = numbers(ws, layout.user_ids)[:, 0]
    movie_ids = numbers(ws, layout.movie_ids)[:, 0]
    user_factors = numbers(ws, layout.user_factors)
    movie_factors = numbers(ws, layout.movie_factors)
    n_rows = len(column_values(ws, f"I{EMB_FIRST_ROW}"))
    last_row = EMB_FIRST_ROW + n_rows - 1
    check_no_gap(ws, "I", last_row + 1)
    long_form = numbers(ws, f"I{EMB_FIRST_ROW}:K{last_row}")

    user_pos = _positions(ws, "I", long_form[:, 0], user_ids)
    movie_pos = _positions(ws, "J", long_form[:, 1], movie_ids)
    user_rows = collab.embedding_lookup(user_pos, user_factors)
    movie_rows = collab.embedding_lookup(movie_pos, movie_factors)
    predictions = (user_rows * movie_rows).sum(axis=1)
    squared_errors = (predictions - long_form[:, 2]) ** 2

    expected = {}
    for i in range(n_rows):
        row = EMB_FIRST_ROW + i
        expected[f"L{row}"] = float(user_pos[i])
        expected[f"R{row}"] = float(movie_pos[i])
        for k in range(N_FACTORS):
            expected[f"{EMB_USER_COLS[k]}{row}"] = user_rows[i, k]
            expected[f"{EMB_MOVIE_COLS[k]}{row}"] = movie_rows[i, k]
        expected[f"X{row}"] = predictions[i]
        expected[f"Y{row}"] = squared_errors[i]
    expected[EMB_LOSS] = float(np.sqrt(squared_errors.mean()))
    return expected


# word_emb: a vocabulary from "Green Eggs and Ham", each word with a 5-number embedding.
VOCABULARY = ("i", "am", "sam", "do", "not", "like", "them", "here", "or", "there",
              "green", "eggs", "and", "ham")
TEXT = "i am sam i do not like green eggs and ham i do not like them here or there"
WORD_IDS, WORD_VECTORS = "A2:A15", "B2:F15"
WORD_COLS = "JKLMN"


def build_words(ws, word_vectors):
    """Sheet ``word_emb``: a text column whose words are looked up into their embeddings."""
    write_row(ws, "A1", ["word"] + [f"dim {k}" for k in range(1, N_FACTORS + 1)])
    write_column(ws, "A2", VOCABULARY)
    write_block(ws, "B2", word_vectors)
    write_row(ws, "H1", ["text", "position"] + [f"dim {k}" for k in range(1, N_FACTORS + 1)])

    for offset, word in enumerate(TEXT.split()):
        row = 2 + offset
        write_text(ws, f"H{row}", word)
        write_formula(ws, f"I{row}", f"=MATCH(H{row},{absolute(WORD_IDS)},0)")
        for k, col in enumerate(WORD_COLS, start=1):
            write_formula(ws, f"{col}{row}", f"=INDEX({absolute(WORD_VECTORS)},$I{row},{k})")


def reference_words(ws):
    """Expected positions and embedding rows of a ``word_emb`` sheet."""
    vocabulary = [str(word).lower() for word in column_values(ws, "A2")]
    vectors = numbers(ws, block_address("B2", len(vocabulary), N_FACTORS))
    words = [str(word).lower() for word in column_values(ws, "H2")]

    word_pos = _positions(ws, "H", words, vocabulary, first_row=2)
    rows = collab.embedding_lookup(word_pos, vectors)
    expected = {}
    for i in range(len(words)):
        expected[f"I{2 + i}"] = float(word_pos[i])
        for k in range(N_FACTORS):
            expected[f"{WORD_COLS[k]}{2 + i}"] = rows[i, k]
    return expected


REFERENCES = {
    "dotprod": lambda wb: reference_grid(wb["dotprod"], with_bias=False),
    "movielens_emb": lambda wb: reference_embeddings(wb["movielens_emb"]),
    "bias": lambda wb: reference_grid(wb["bias"], with_bias=True),
    "word_emb": lambda wb: reference_words(wb["word_emb"]),
}


def build_collab_workbook(wb, block, titles, seed):
    """Fill ``wb`` with the four sheets; the same seed gives the same starting factors."""
    n_users, n_movies = block.ratings.shape
    factors = collab.LatentFactors.random(n_users, n_movies, N_FACTORS, seed=seed)
    word_vectors = np.random.default_rng(seed + 1).random((len(VOCABULARY), N_FACTORS))

    build_grid(wb.create_sheet("dotprod"), GridLayout(False, n_users, n_movies), block, titles,
               factors)
    build_embeddings(wb.create_sheet("movielens_emb"), EmbeddingLayout(n_users, n_movies),
                     block, titles, factors)
    build_grid(wb.create_sheet("bias"), GridLayout(True, n_users, n_movies), block, titles,
               factors)
    build_words(wb.create_sheet("word_emb"), word_vectors)


def check_no_gap(ws, column, blank_row):
    """Refuse a table whose column has a blank at ``blank_row`` and values further down.

    The tables are read down to their first blank; rows after a gap would be silently left out
    of the reference while the sheet's own formulas still see them.
    """
    for row in range(blank_row + 1, ws.max_row + 1):
        if ws[f"{column}{row}"].value is not None:
            raise InputError(
                f"{ws.title}!{column}{blank_row} is blank but {column}{row} below it is not; "
                "remove the empty row so the table is one block"
            )


def _positions(ws, column, ids, vocabulary, first_row=EMB_FIRST_ROW):
    try:
        return collab.positions(list(ids), list(vocabulary))
    except KeyError as exc:
        row = first_row + list(ids).index(exc.args[0])
        raise InputError(
            f"{ws.title}!{column}{row} holds {exc.args[0]!r}, which is not in the look-up table"
        ) from None

