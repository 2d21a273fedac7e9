"""Shared fixtures: the real MovieLens 100K, built workbooks, and their recalculations.

Real data comes from ``XLMIRROR_DATA`` (``.ci/run`` points it at the shared copy). Outside CI a
missing dataset or LibreOffice skips the tests that need them; in CI it fails them.
"""

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import openpyxl
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


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread: the training tests' models are tiny, and on a shared
    2-core machine a second thread only spins."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def copy_of(path, folder):
    """A copy of ``path`` inside ``folder`` (tests never touch the session's built files)."""
    target = Path(folder) / Path(path).name
    shutil.copyfile(path, target)
    return target


PIVOT_CACHE = b"""<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<pivotCacheDefinition xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"
 recordCount="0"><cacheSource type="worksheet"><worksheetSource ref="G1:H16" sheet="dotprod"/>
</cacheSource><cacheFields count="1"><cacheField name="user" numFmtId="0"><sharedItems/>
</cacheField></cacheFields></pivotCacheDefinition>"""

# a pivot table whose <location> lacks its ref: Excel shrugs, openpyxl's loader raises
PIVOT_TABLE = b"""<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<pivotTableDefinition xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"
 name="PivotTable1" cacheId="7" dataCaption="Values"><location firstHeaderRow="1"
 firstDataRow="1" firstDataCol="1"/><pivotFields count="1"><pivotField showAll="0"/>
</pivotFields></pivotTableDefinition>"""


def excel_edited_copy(source, target):
    """A copy of a built workbook as a user might keep it: a notes sheet with an array formula,
    an ``_xlfn.`` function and a chart, and a pivot table that openpyxl cannot load."""
    from openpyxl.chart import BarChart, Reference
    from openpyxl.worksheet.formula import ArrayFormula

    wb = openpyxl.load_workbook(source)
    notes = wb.create_sheet("notes")
    notes["A1"] = "spread of the movie factors"
    notes["A2"] = "=_xlfn.STDEV.S(dotprod!H19:V23)"
    notes["A3"] = ArrayFormula("A3", "=SUM(dotprod!H19:V19*dotprod!H20:V20)")
    chart = BarChart()
    chart.add_data(Reference(wb["dotprod"], min_col=8, max_col=22, min_row=19), from_rows=True)
    notes.add_chart(chart, "C5")
    plain = Path(target).with_suffix(".plain.xlsx")
    wb.save(plain)

    with zipfile.ZipFile(plain) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        notes_part = f"xl/worksheets/sheet{len(wb.sheetnames)}.xml"
        notes_rels = notes_part.replace("worksheets/", "worksheets/_rels/") + ".rels"
        for name in old.namelist():
            data = old.read(name)
            if name == "xl/workbook.xml":
                data = data.replace(b"</workbook>", b'<pivotCaches><pivotCache cacheId="7" '
                                    b'r:id="rIdPivot"/></pivotCaches></workbook>')
            elif name == "xl/_rels/workbook.xml.rels":
                data = data.replace(b"</Relationships>", b'<Relationship Id="rIdPivot" Type="'
                                    b'http://schemas.openxmlformats.org/officeDocument/2006/'
                                    b'relationships/pivotCacheDefinition" Target="pivotCache/'
                                    b'pivotCacheDefinition1.xml"/></Relationships>')
            elif name == notes_rels:
                data = data.replace(b"</Relationships>", b'<Relationship Id="rIdPT" Type="'
                                    b'http://schemas.openxmlformats.org/officeDocument/2006/'
                                    b'relationships/pivotTable" Target="../pivotTables/'
                                    b'pivotTable1.xml"/></Relationships>')
            elif name == "[Content_Types].xml":
                data = data.replace(b"</Types>", b'<Override PartName="/xl/pivotCache/'
                                    b'pivotCacheDefinition1.xml" ContentType="application/'
                                    b'vnd.openxmlformats-officedocument.spreadsheetml.'
                                    b'pivotCacheDefinition+xml"/><Override PartName="/xl/'
                                    b'pivotTables/pivotTable1.xml" ContentType="application/'
                                    b'vnd.openxmlformats-officedocument.spreadsheetml.'
                                    b'pivotTable+xml"/></Types>')
            new.writestr(name, data)
        new.writestr("xl/pivotCache/pivotCacheDefinition1.xml", PIVOT_CACHE)
        new.writestr("xl/pivotTables/pivotTable1.xml", PIVOT_TABLE)
    plain.unlink()
    return Path(target)
