"""``xlmirror build``: the lecture's two workbooks, from MovieLens 100K and a seed."""

import logging
from pathlib import Path

import openpyxl

from engine import movielens
from engine.errors import InputError
from sheets.cells import fit_column_widths
from sheets.collab_book import N_MOVIES, N_USERS, build_collab_workbook
from sheets.entropy_book import build_entropy_workbook
from sheets.references import reference_values
from sheets.solver import EXCEL_SOLVER_VARIABLE_LIMIT, read_solver
from sheets.writer import is_pristine_build, workbook_bytes, write_all_atomically

log = logging.getLogger("xlmirror")

ENTROPY_FILE = "entropy_example.xlsx"
COLLAB_FILE = "collab_filter.xlsx"


def locate_ratings(ratings_dir=None, download=True):
    """The MovieLens 100K folder: explicit, ``XLMIRROR_DATA``, fastai's folder, or download."""
    folder = movielens.find_ml100k(ratings_dir)
    if folder is None:
        if not download:
            raise InputError(f"MovieLens 100K was not found; {movielens.HOW_TO_PROVIDE}")
        log.info("MovieLens 100K not found locally; downloading it with fastai")
        folder = movielens.download_ml100k()
    log.info("MovieLens 100K: %s", folder)
    return folder


def entropy_workbook():
    """The ``entropy_example`` workbook, as an openpyxl Workbook."""
    wb = _empty_workbook()
    build_entropy_workbook(wb)
    return wb


def collab_workbook(ratings_folder, seed=42, n_users=N_USERS, n_movies=N_MOVIES):
    """The ``collab_filter`` workbook from the ratings in ``ratings_folder``."""
    ratings = movielens.load_ratings(ratings_folder)
    titles = movielens.load_titles(ratings_folder)
    block = movielens.densest_block(ratings, n_users, n_movies)

    wb = _empty_workbook()
    build_collab_workbook(wb, block, titles, seed)
    return wb


def build(out_dir="workbooks", ratings_dir=None, seed=42, force=False, download=True,
          n_users=N_USERS, n_movies=N_MOVIES):
    """Write both workbooks into ``out_dir``; returns their paths.

    ``n_users`` x ``n_movies`` sizes the ratings block (the lecture's is 15 x 15). A workbook
    that was edited after xlmirror wrote it is not overwritten unless ``force``.
    """
    if min(n_users, n_movies) < 1:
        raise InputError(f"--users and --movies must be at least 1, got {n_users}, {n_movies}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file, not a folder; choose a folder")
    folder = locate_ratings(ratings_dir, download)

    books = {
        ENTROPY_FILE: entropy_workbook(),
        COLLAB_FILE: collab_workbook(folder, seed, n_users, n_movies),
    }
    contents = {}
    for name, wb in books.items():
        _warn_on_large_solver_models(name, wb)
        for ws in wb:
            fit_column_widths(ws)
        contents[out_dir / name] = workbook_bytes(wb, reference_values(wb))

    for path in contents:
        if path.exists() and not force and not is_pristine_build(path):
            raise InputError(
                f"{path} was changed after xlmirror wrote it (or was not written by it); "
                "move it away or pass --force to overwrite it"
            )
    write_all_atomically(contents)  # both or neither: the pair always belongs together
    for path in contents:
        log.info("wrote %s", path)
    return list(contents)


def _empty_workbook():
    wb = openpyxl.Workbook()
    wb.remove(wb.active)
    return wb


def _warn_on_large_solver_models(name, wb):
    for ws in wb:
        model = read_solver(ws)
        if model is not None and model.n_variables > EXCEL_SOLVER_VARIABLE_LIMIT:
            log.warning(
                "%s: sheet %s has %d Solver variable cells; Excel's Solver accepts at most %d "
                "(xlmirror fit still solves it)",
                name, ws.title, model.n_variables, EXCEL_SOLVER_VARIABLE_LIMIT,
            )
