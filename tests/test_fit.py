"""xlmirror fit: the workbook's own Solver models solved by scipy and torch, cross-checked, and
written back into a copy that two spreadsheet engines recalculate to the engines' RMSE."""

import hashlib
import json
import zipfile

import openpyxl
import pytest

from sheets.build import COLLAB_FILE
from sheets.check import check_workbook
from sheets.recalc import formulas_values, libreoffice_values
from tests.conftest import copy_of, excel_edited_copy
from tests.test_cli import assert_user_error, run

OBJECTIVES = {"dotprod": "V41", "movielens_emb": "AA3", "bias": "V42"}


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fitted(built, tmp_path_factory):
    """``xlmirror fit --engine all --json`` on a copy of the built collab workbook."""
    folder = tmp_path_factory.mktemp("fit")
    source = copy_of(built[COLLAB_FILE], folder)
    before = _digest(source)
    capture = pytest.MonkeyPatch()  # module scope: capsys is per test, so capture by hand
    lines = []
    capture.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    from cli.main import main

    try:
        code = main(["-q", "fit", str(source), "--engine", "all", "--json",
                     "--out", str(folder / "solved.xlsx"), "--plot", str(folder / "rmse.png")])
    finally:
        capture.undo()
    assert code == 0
    report = json.loads("\n".join(lines))
    return {"source": source, "before": before, "out": folder / "solved.xlsx",
            "plot": folder / "rmse.png", "report": report}


@pytest.mark.parametrize("sheet", OBJECTIVES)
def test_scipy_and_torch_agree_within_one_percent(fitted, sheet):
    fits = {f["engine"]: f for f in fitted["report"]["fits"] if f["sheet"] == sheet}
    scipy_rmse = fits["scipy L-BFGS-B"]["final_rmse"]
    torch_rmse = fits["torch L-BFGS"]["final_rmse"]

    assert abs(scipy_rmse - torch_rmse) <= 0.01 * min(scipy_rmse, torch_rmse)
    for fit in fits.values():
        assert fit["final_rmse"] < 0.5 * fit["start_rmse"]
        assert fit["start_rmse"] == fits["scipy L-BFGS-B"]["start_rmse"]


def test_written_back_workbook_recalculates_to_the_engines_rmse(fitted, soffice):
    out = fitted["out"]
    best = {f["sheet"]: f["final_rmse"] for f in fitted["report"]["fits"] if f["written"]}
    cells = {sheet: [address] for sheet, address in OBJECTIVES.items()}

    for values in (formulas_values(out, cells), libreoffice_values(out, cells)):
        for sheet, address in OBJECTIVES.items():
            assert values[sheet][address] == pytest.approx(best[sheet], rel=0, abs=1e-9)
    cached = openpyxl.load_workbook(out, data_only=True)
    for sheet, address in OBJECTIVES.items():
        assert cached[sheet][address].value == pytest.approx(best[sheet], rel=0, abs=1e-9)

    report = check_workbook(out, ["formulas", "libreoffice"])
    assert report.ok, [c for c in report.comparisons if not c.ok]


def test_fit_keeps_formulas_live_and_the_input_untouched(fitted, built):
    assert _digest(fitted["source"]) == fitted["before"]
    original = openpyxl.load_workbook(built[COLLAB_FILE])
    solved = openpyxl.load_workbook(fitted["out"])
    for ws in original:
        for row in ws.iter_rows():
            for cell in row:
                if cell.data_type == "f":
                    assert solved[ws.title][cell.coordinate].value == cell.value
    # the factors moved; the ratings did not
    assert solved["dotprod"]["B25"].value != original["dotprod"]["B25"].value
    assert solved["dotprod"]["H2"].value == original["dotprod"]["H2"].value


@pytest.mark.parametrize("sheet, with_bias", [("dotprod", False), ("bias", True)])
@pytest.mark.parametrize("embedding", [True, False])
def test_torch_modules_predict_what_the_sheet_formulas_compute(recalculated, sheet, with_bias,
                                                               embedding):
    import torch

    from engine.torch_collab import from_factors, rated_cells
    from sheets.fit import read_problem

    book = recalculated[COLLAB_FILE]
    problem = read_problem(book.wb, sheet)
    module = from_factors(problem.start, with_bias, embedding=embedding)
    users, movies, _ = rated_cells(torch.tensor(problem.ratings))
    predictions = module(users, movies).detach().numpy()

    first_col, first_row = 8, problem.layout.user_row  # predictions start at column H
    for engine in ("formulas", "libreoffice"):
        values = book.engines()[engine][sheet]
        sheet_values = [
            values[f"{openpyxl.utils.get_column_letter(first_col + int(m))}{first_row + int(u)}"]
            for u, m in zip(users, movies)
        ]
        assert sheet_values == pytest.approx(list(predictions), rel=1e-12, abs=1e-12)


def test_plot_is_a_png(fitted):
    data = fitted["plot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_fit_reads_a_workbook_openpyxl_cannot_load(capsys, built, tmp_path):
    edited = excel_edited_copy(built[COLLAB_FILE], tmp_path / "edited.xlsx")
    with pytest.raises(TypeError):
        openpyxl.load_workbook(edited)  # the pivot table defeats openpyxl's own loader
    before = _digest(edited)

    code, out, err = run(capsys, "fit", edited, "--sheet", "dotprod", "--engine", "scipy",
                         "--out", tmp_path / "solved.xlsx")
    assert code == 0, err
    assert "read without its pivot tables" in err
    assert _digest(edited) == before
    with zipfile.ZipFile(edited) as old, zipfile.ZipFile(tmp_path / "solved.xlsx") as new:
        for part in ("xl/pivotTables/pivotTable1.xml", "xl/charts/chart1.xml",
                     "xl/pivotCache/pivotCacheDefinition1.xml"):
            assert old.read(part) == new.read(part)
        assert b"_xlfn.STDEV.S" in new.read("xl/worksheets/sheet5.xml")


def test_models_over_excels_200_cell_limit_warn_and_still_fit(capsys, ml100k, tmp_path):
    code, _, err = run(capsys, "build", "--ratings", ml100k, "--out", tmp_path,
                       "--users", 25, "--movies", 20)
    assert code == 0
    assert "dotprod has 225 Solver variable cells" in err and "at most 200" in err

    code, out, err = run(capsys, "fit", tmp_path / COLLAB_FILE, "--sheet", "dotprod",
                         "--engine", "scipy", "--json")
    assert code == 0, err
    fit = json.loads(out)["fits"][0]
    assert fit["final_rmse"] < 0.5 * fit["start_rmse"]


def test_torch_on_cuda_without_a_gpu_is_a_clear_error(capsys, built, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path needs one without")
    source = copy_of(built[COLLAB_FILE], tmp_path)
    code, _, err = run(capsys, "fit", source, "--sheet", "dotprod", "--engine", "torch",
                       "--device", "cuda")
    assert_user_error(code, err, "CUDA")
    assert not (tmp_path / "collab_filter-solved.xlsx").exists()


@pytest.mark.parametrize("argv, edit, fragments", [
    (["--sheet", "word_emb"], None, ["no Solver model", "dotprod, movielens_emb, bias"]),
    (["--sheet", "nope"], None, ["no sheet named 'nope'"]),
    (["--sheet", "dotprod"], lambda wb: wb["dotprod"].__setitem__("V41", 1.5),
     ["dotprod!V41", "must be a formula"]),
    (["--sheet", "bias"], lambda wb: wb["bias"].__setitem__("C27", "oops"),
     ["bias!C27", "'oops'", "a number"]),
])
def test_bad_models_are_refused_and_nothing_written(capsys, built, tmp_path, argv, edit,
                                                    fragments):
    source = copy_of(built[COLLAB_FILE], tmp_path)
    if edit is not None:
        wb = openpyxl.load_workbook(source)
        edit(wb)
        wb.save(source)
    code, _, err = run(capsys, "fit", source, "--engine", "scipy", *argv)
    assert_user_error(code, err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == [COLLAB_FILE]


def test_plot_never_overwrites_a_workbook_or_a_file(capsys, built, tmp_path):
    source = copy_of(built[COLLAB_FILE], tmp_path)
    before = _digest(source)
    code, _, err = run(capsys, "fit", source, "--plot", source, "--force")
    assert_user_error(code, err, "--plot", "workbook")
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"mine")
    code, _, err = run(capsys, "fit", source, "--plot", notes)
    assert_user_error(code, err, "already exists")
    assert _digest(source) == before and notes.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [COLLAB_FILE, "notes.png"]


@pytest.mark.parametrize("wd", ["nan", "inf", "-1"])
def test_weight_decay_must_be_finite_and_not_negative(capsys, built, tmp_path, wd):
    source = copy_of(built[COLLAB_FILE], tmp_path)
    code, _, err = run(capsys, "fit", source, "--wd", wd)
    assert_user_error(code, err, "--wd")


def test_objective_deleted_in_excel_is_a_clear_error(capsys, built, tmp_path):
    from openpyxl.workbook.defined_name import DefinedName

    source = copy_of(built[COLLAB_FILE], tmp_path)
    wb = openpyxl.load_workbook(source)
    wb["dotprod"].defined_names["solver_opt"] = DefinedName(
        "solver_opt", attr_text="dotprod!#REF!", hidden=True)
    wb.save(source)
    code, _, err = run(capsys, "fit", source, "--sheet", "dotprod", "--engine", "scipy")
    assert_user_error(code, err, "#REF!", "Data > Solver")


def test_a_gap_in_the_long_ratings_table_is_refused(capsys, built, tmp_path):
    source = copy_of(built[COLLAB_FILE], tmp_path)
    wb = openpyxl.load_workbook(source)
    for col in "IJK":
        wb["movielens_emb"][f"{col}50"] = None
    wb.save(source)
    code, _, err = run(capsys, "fit", source, "--sheet", "movielens_emb", "--engine", "scipy")
    assert_user_error(code, err, "movielens_emb!I50 is blank", "I51")


def test_cells_the_user_typed_or_emptied_are_kept(capsys, built, tmp_path):
    source = copy_of(built[COLLAB_FILE], tmp_path)
    wb = openpyxl.load_workbook(source)
    wb["dotprod"]["H25"] = 1.5
    wb["dotprod"]["I25"] = None
    wb.save(source)
    code, _, err = run(capsys, "fit", source, "--sheet", "dotprod", "--engine", "scipy",
                       "--out", tmp_path / "solved.xlsx")
    assert code == 0, err
    solved = openpyxl.load_workbook(tmp_path / "solved.xlsx")
    assert solved["dotprod"]["H25"].value == 1.5 and solved["dotprod"]["I25"].value is None


def test_output_equal_to_input_or_existing_is_refused(capsys, built, tmp_path):
    source = copy_of(built[COLLAB_FILE], tmp_path)
    before = _digest(source)
    code, _, err = run(capsys, "fit", source, "--out", source, "--force")
    assert_user_error(code, err, "is the input workbook")
    assert _digest(source) == before

    existing = tmp_path / "mine.xlsx"
    existing.write_bytes(b"my work")
    code, _, err = run(capsys, "fit", source, "--out", existing)
    assert_user_error(code, err, "already exists", "--force")
    assert existing.read_bytes() == b"my work"


@pytest.mark.parametrize("content, fragments", [
    (bytes.fromhex("d0cf11e0a1b11ae1") + b"\0" * 600, ["password-protected"]),
    (b"PK\x03\x04 broken", ["xlsx"]),
])
def test_corrupt_or_locked_workbooks_are_refused(capsys, tmp_path, content, fragments):
    source = tmp_path / "book.xlsx"
    source.write_bytes(content)
    code, _, err = run(capsys, "fit", source)
    assert_user_error(code, err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.xlsx"]
