"""Shared fixtures: the real MovieLens 100K, built workbooks, and their recalculations.

Real data comes from ``XLMIRROR_DATA`` (``.ci/run`` points it at the shared copy). Outside CI a
missing dataset or LibreOffice skips the tests that need them; in CI it fails them.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.movielens import find_ml100k
from sheets.build import build
from sheets.reader import formula_cells, open_workbook
from sheets.recalc import (
    formulas_values, libreoffice_path, libreoffice_required, libreoffice_values,
)

IN_CI = os.environ.get("CI", "") not in ("", "false", "0")


def _missing(what, required=False):
    if IN_CI or required:
        pytest.fail(f"{what} is required here but missing")
    pytest.skip(f"{what} is not available")


@pytest.fixture(scope="session")
def ml100k():
    """The real MovieLens 100K folder (holding u.data)."""
    folder = find_ml100k(use_fastai=False)
    if folder is None:
        _missing("MovieLens 100K through XLMIRROR_DATA")
    return folder


@pytest.fixture(scope="session")
def soffice():
    path = libreoffice_path()
    if path is None:
        _missing("LibreOffice (soffice)", required=libreoffice_required())
    return path


@pytest.fixture(scope="session")
def built(ml100k, tmp_path_factory):
    """Both workbooks built from the real data with the default seed: name -> path."""
    out = tmp_path_factory.mktemp("workbooks")
    paths = build(out, ml100k, seed=42, download=False)
    return {path.name: path for path in paths}


class Recalculated:
    """One workbook: its formulas, cached values and both engines' recalculations."""

    def __init__(self, path, with_libreoffice):
        self.path = path
        self.wb = open_workbook(path)
        self.cached_wb = open_workbook(path, data_only=True)
        self.cells = {t: list(c) for t, c in formula_cells(self.wb).items() if c}
        self.formulas = formulas_values(path, self.cells)
        self.libreoffice = libreoffice_values(path, self.cells) if with_libreoffice else None

    def engines(self):
        return {"formulas": self.formulas, "libreoffice": self.libreoffice}


@pytest.fixture(scope="session")
def recalculated(built, soffice):
    """name -> Recalculated for both built workbooks, with both engines."""
    return {name: Recalculated(path, with_libreoffice=True) for name, path in built.items()}


def write_movielens(folder, n_users=20, n_movies=20, density=0.6, seed=0, titles=None):
    """A small synthetic MovieLens 100K folder (u.data, u.item) for tests that need odd data."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, n_users + 1):
        for movie in range(1, n_movies + 1):
            if rng.random() < density:
                lines.append(f"{user}\t{movie}\t{rng.integers(1, 6)}\t{874965758 + user}")
    (folder / "u.data").write_text("\n".join(lines) + "\n")

    titles = titles or {}
    items = [
        f"{movie}|{titles.get(movie, f'Movie {movie} (1995)')}|01-Jan-1995||http://x|0|0"
        for movie in range(1, n_movies + 1)
    ]
    (folder / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    return folder


@pytest.fixture
def tiny_movielens(tmp_path):
    return write_movielens(tmp_path / "ml-100k")


def copy_of(path, folder):
    """A copy of ``path`` inside ``folder`` (tests never touch the session's built files)."""
    target = Path(folder) / Path(path).name
    shutil.copyfile(path, target)
    return target
