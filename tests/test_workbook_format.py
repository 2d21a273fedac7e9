"""What lands in the files: Solver names as Excel writes them, formulas every engine
evaluates, text that stays text, cached values, and byte-for-byte reproducible builds."""

import re
import zipfile
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest

from sheets.build import COLLAB_FILE, ENTROPY_FILE, build
from tests.conftest import write_movielens

REPO = Path(__file__).resolve().parents[1]
SOLVER_SHEETS = {"dotprod": ("V41", 150), "movielens_emb": ("AA3", 150), "bias": ("V42", 180)}


def _workbook_names(path):
    """(sheet index, name) -> (text, hidden) of every defined name, read from the raw XML."""
    with zipfile.ZipFile(path) as package:
        xml = package.read("xl/workbook.xml").decode()
    sheets = re.findall(r'<sheet [^>]*name="([^"]+)"', xml)
    names = {}
    for attrs, text in re.findall(r"<definedName ([^>]*)>([^<]*)</definedName>", xml):
        attr = dict(re.findall(r'(\w+)="([^"]*)"', attrs))
        names[(sheets[int(attr["localSheetId"])], attr["name"])] = (text, attr.get("hidden"))
    return names


def _cells_in(ref):
    total = 0
    for part in ref.split(","):
        min_col, min_row, max_col, max_row = openpyxl.utils.cell.range_boundaries(
            part.split("!")[1].replace("$", ""))
        total += (max_col - min_col + 1) * (max_row - min_row + 1)
    return total


@pytest.mark.parametrize("sheet", SOLVER_SHEETS)
def test_solver_model_is_stored_as_excel_stores_it(built, sheet):
    names = _workbook_names(built[COLLAB_FILE])
    objective, n_variables = SOLVER_SHEETS[sheet]

    assert all(hidden == "1" for (owner, _), (_, hidden) in names.items() if owner == sheet)
    text = {name: value for (owner, name), (value, _) in names.items() if owner == sheet}
    assert text["solver_opt"].replace("$", "") == f"{sheet}!{objective}"
    assert (text["solver_typ"], text["solver_eng"], text["solver_neg"], text["solver_ver"]) == \
        ("2", "1", "2", "3")
    assert _cells_in(text["solver_adj"]) == n_variables

    wb = openpyxl.load_workbook(built[COLLAB_FILE])
    for part in text["solver_adj"].split(","):
        for row in wb[sheet][part.split("!")[1].replace("$", "")]:
            assert all(isinstance(cell.value, float) for cell in row)  # inputs, not formulas
    assert str(wb[sheet][objective].value).startswith("=SQRT(")


def test_word_sheet_has_no_solver_model(built):
    assert not [key for key in _workbook_names(built[COLLAB_FILE]) if key[0] == "word_emb"]


def test_formulas_avoid_offset_approximate_match_and_new_functions(built):
    for name in (ENTROPY_FILE, COLLAB_FILE):
        with zipfile.ZipFile(built[name]) as package:
            sheets = [package.read(n).decode() for n in package.namelist()
                      if n.startswith("xl/worksheets/")]
        formulas = [f for xml in sheets for f in re.findall(r"<f>([^<]*)</f>", xml)]
        assert formulas
        assert not [f for f in formulas if "OFFSET" in f or "_xlfn" in f or "SINGLE" in f]
        for match in re.findall(r"MATCH\(([^)]*)\)", " ".join(formulas)):
            assert match.endswith(",0"), match
        assert not [f for f in formulas if re.search(r"\bLOG\(", f)]  # natural log only


def test_formula_cells_show_numbers_without_recalculation(built):
    for name in (ENTROPY_FILE, COLLAB_FILE):
        formulas_wb = openpyxl.load_workbook(built[name])
        values_wb = openpyxl.load_workbook(built[name], data_only=True)
        for ws in formulas_wb:
            for row in ws.iter_rows():
                for cell in row:
                    if cell.data_type == "f":
                        value = values_wb[ws.title][cell.coordinate].value
                        assert isinstance(value, (int, float)), f"{ws.title}!{cell.coordinate}"

    frame = pd.read_excel(built[COLLAB_FILE], sheet_name="dotprod", header=None)
    rmse = frame.iloc[40, 21]  # V41
    assert 0 < rmse < 5


def test_columns_are_wide_enough_for_labels_and_numbers(built):
    # Excel's General format shows a double in at most 11 characters (-0.12345679); a label
    # needs one character of width per letter. Longer text is a note that may run on.
    for name in (ENTROPY_FILE, COLLAB_FILE):
        for ws in openpyxl.load_workbook(built[name]):
            for row in ws.iter_rows():
                for cell in row:
                    if cell.value is None:
                        continue
                    width = ws.column_dimensions[cell.column_letter].width
                    needed = len(cell.value) if cell.data_type == "s" else 11
                    if needed <= 24:
                        assert width >= needed, f"{name} {ws.title}!{cell.coordinate}"


def test_titles_that_look_like_formulas_stay_text(tmp_path):
    tricky = {1: '=HYPERLINK("http://evil","x")', 2: "+1 (1999)", 3: "-minus", 4: "@SUM(A1)"}
    folder = write_movielens(tmp_path / "ml-100k", n_users=20, n_movies=20, density=0.95,
                             titles=tricky)
    paths = build(tmp_path / "out", folder, download=False)

    collab = next(p for p in paths if p.name == COLLAB_FILE)
    wb = openpyxl.load_workbook(collab)
    found = {cell.value for ws in wb for row in ws.iter_rows() for cell in row
             if cell.data_type == "s" and cell.value in tricky.values()}
    assert found == set(tricky.values())
    with zipfile.ZipFile(collab) as package:
        xml = " ".join(package.read(n).decode() for n in package.namelist()
                       if n.startswith("xl/worksheets/"))
    assert "HYPERLINK" in xml
    assert not [f for f in re.findall(r"<f>([^<]*)</f>", xml) if "HYPERLINK" in f]


def test_same_data_and_seed_give_identical_bytes(ml100k, tmp_path):
    first = build(tmp_path / "a", ml100k, seed=7, download=False)
    second = build(tmp_path / "b", ml100k, seed=7, download=False)
    other_seed = build(tmp_path / "c", ml100k, seed=8, download=False)

    for one, two, three in zip(first, second, other_seed):
        assert one.read_bytes() == two.read_bytes()
    assert first[1].read_bytes() != other_seed[1].read_bytes()  # the seed reaches the factors
    assert first[0].read_bytes() == other_seed[0].read_bytes()  # entropy sheets have no seed


def test_committed_workbooks_are_what_build_writes(built):
    # compared part by part, so a different zlib on another machine cannot fail it
    for name, path in built.items():
        committed = REPO / "workbooks" / name
        assert committed.is_file(), f"{committed} is missing: run xlmirror build"
        with zipfile.ZipFile(committed) as old, zipfile.ZipFile(path) as new:
            assert old.namelist() == new.namelist()
            for part in new.namelist():
                assert old.read(part) == new.read(part), (
                    f"workbooks/{name} ({part}) is stale: run xlmirror build and commit"
                )


def test_factors_start_uniform_in_unit_interval(built):
    wb = openpyxl.load_workbook(built[COLLAB_FILE])
    values = np.array([[c.value for c in row] for row in wb["dotprod"]["B25:F39"]])
    assert values.shape == (15, 5)
    assert 0 <= values.min() and values.max() < 1 and values.std() > 0.2
