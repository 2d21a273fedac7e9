"""The xlmirror command: build and check end to end, and one clear line for every bad input."""

import io
import json
import os
import zipfile
from pathlib import Path

import openpyxl
import pytest

from engine import movielens
from sheets import recalc
from sheets.build import COLLAB_FILE, ENTROPY_FILE
from cli.main import main
from tests.conftest import copy_of, write_movielens


def run(capsys, *argv):
    """Run the command in-process: (exit code, stdout, stderr)."""
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("xlmirror: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_build_then_check_passes_with_both_engines(capsys, ml100k, tmp_path, soffice):
    code, _, err = run(capsys, "build", "--ratings", ml100k, "--out", tmp_path)
    assert code == 0
    assert str(ml100k) in err and "wrote" in err

    code, out, _ = run(capsys, "check", "--json", tmp_path / ENTROPY_FILE, tmp_path / COLLAB_FILE)
    assert code == 0
    reports = json.loads(out)
    assert [r["ok"] for r in reports] == [True, True]
    for report in reports:
        assert report["engines"] == ["formulas", "libreoffice"]
        sources = {(c["sheet"], c["source"]) for c in report["comparisons"]}
        for sheet in {c["sheet"] for c in report["comparisons"]}:
            assert {(sheet, "cached"), (sheet, "formulas"), (sheet, "libreoffice")} <= sources
        assert all(c["max_abs_diff"] <= c["tolerance"] for c in report["comparisons"])
    against = {(c["sheet"], c["against"]): c["tolerance"] for c in reports[0]["comparisons"]}
    for sheet in ("softmax", "cross_entropy", "binary_cross_entropy"):
        assert against[(sheet, "numpy")] == 1e-9
        assert against[(sheet, "torch float64")] == 1e-12
        assert against[(sheet, "torch float32")] == 1e-6
    assert {c["against"] for c in reports[1]["comparisons"]} == {"numpy"}


def test_check_names_a_changed_formula(capsys, built, tmp_path, soffice):
    edited = copy_of(built[ENTROPY_FILE], tmp_path)
    wb = openpyxl.load_workbook(edited)
    wb["softmax"]["D3"] = "=C3/$C$7*1.001"
    wb.save(edited)

    code, out, _ = run(capsys, "check", edited)
    assert code == 1
    assert "FAIL" in out

    code, out, _ = run(capsys, "check", "--json", edited)
    assert code == 1
    failing = {(c["sheet"], c["source"], c["against"]): c["failing_cells"]
               for c in json.loads(out)[0]["comparisons"]}
    for engine in ("formulas", "libreoffice"):
        # D3 itself, and the total and the cross-entropy cells that depend on it
        assert failing[("softmax", engine, "numpy")] == ["D3", "D7"]
        assert failing[("softmax", engine, "torch float64")] == ["D3"]
        assert failing[("cross_entropy", engine, "numpy")] == ["B3", "D3", "D7"]
        assert failing[("binary_cross_entropy", engine, "numpy")] == []


def test_check_without_libreoffice(capsys, built, monkeypatch):
    monkeypatch.setattr(recalc, "libreoffice_path", lambda: None)
    monkeypatch.delenv(recalc.REQUIRE_LIBREOFFICE_ENV, raising=False)
    code, out, _ = run(capsys, "check", built[ENTROPY_FILE])
    assert code == 0
    assert "LibreOffice not found" in out and "libreoffice " not in out

    monkeypatch.setenv(recalc.REQUIRE_LIBREOFFICE_ENV, "1")
    code, _, err = run(capsys, "check", built[ENTROPY_FILE])
    assert_user_error(code, err, "LibreOffice", "libreoffice-calc-nogui")


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "build" in out and "check" in out and "fit" in out and "paddy" in out


# --- bad input: one line, exit 2, nothing written ---------------------------------------------

def test_missing_ratings_folder(capsys, tmp_path):
    code, _, err = run(capsys, "build", "--ratings", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert_user_error(code, err, "nowhere", "--ratings")
    assert not (tmp_path / "o").exists()


@pytest.fixture
def fastai_home(tmp_path, monkeypatch):
    """An empty fastai home folder; fastai caches its config, so the cache is reset around."""
    from fastai.data.external import fastai_cfg

    monkeypatch.setenv("FASTAI_HOME", str(tmp_path / "fastai"))
    fastai_cfg.cache_clear()
    yield tmp_path / "fastai"
    fastai_cfg.cache_clear()


def test_no_data_anywhere_and_no_download(capsys, tmp_path, monkeypatch, fastai_home):
    monkeypatch.delenv(movielens.DATA_ENV, raising=False)
    code, _, err = run(capsys, "build", "--no-download", "--out", tmp_path / "o")
    assert_user_error(code, err, "--ratings", movielens.DATA_ENV)


def test_failed_download_says_how_to_provide_the_data(capsys, tmp_path, monkeypatch,
                                                      fastai_home):
    import fastai.data.external

    def offline(*args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.delenv(movielens.DATA_ENV, raising=False)
    monkeypatch.setattr(fastai.data.external, "untar_data", offline)
    code, _, err = run(capsys, "build", "--out", tmp_path / "o")
    assert_user_error(code, err, "could not be downloaded", "network unreachable", "--ratings")
    assert not (tmp_path / "o").exists()


def test_data_found_in_fastai_folder(fastai_home):
    folder = write_movielens(fastai_home / "data" / "ml-100k")
    assert movielens.find_ml100k(environ={}) == folder


def test_data_found_through_environment(tmp_path):
    folder = write_movielens(tmp_path / "data" / "ml-100k")
    environ = {movielens.DATA_ENV: str(tmp_path / "data")}
    assert movielens.find_ml100k(environ=environ, use_fastai=False) == folder


@pytest.mark.parametrize("content, fragments", [
    ("1,2,3,4\n5,6,7,8\n", ["u.data", "1 tab-separated columns", "expected 4"]),
    ("1\t2\t3\t4\n1\t2\tfive\t4\n", ["u.data line 2", "whole numbers"]),
    ("1\t2\t3\t4\n1\t2\t9\t4\n", ["u.data line 2", "outside 1..5"]),
    ("", ["u.data is empty"]),
])
def test_ratings_in_the_wrong_format(capsys, tmp_path, content, fragments):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text(content)
    code, _, err = run(capsys, "build", "--ratings", folder, "--out", tmp_path / "o")
    assert_user_error(code, err, *fragments)
    assert not (tmp_path / "o").exists()


def test_negative_seed(capsys, tiny_movielens, tmp_path):
    code, _, err = run(capsys, "build", "--ratings", tiny_movielens, "--out", tmp_path / "o",
                       "--seed", -1)
    assert_user_error(code, err, "--seed")


def test_check_scales_its_tolerance_above_one(capsys, built, tmp_path, soffice):
    edited = copy_of(built[ENTROPY_FILE], tmp_path)
    wb = openpyxl.load_workbook(edited)
    wb["softmax"]["B11"] = 1e7  # LibreOffice keeps 15 significant digits of -1e7 - 4.57
    wb.save(edited)
    code, out, _ = run(capsys, "check", "--json", edited)
    comparisons = json.loads(out)[0]["comparisons"]
    softmax = [c for c in comparisons if c["sheet"] == "softmax" and c["source"] != "cached"]
    assert softmax and all(c["ok"] for c in softmax)


def test_nan_never_passes_a_comparison():
    from sheets.check import _compare

    result = _compare("s", "formulas", "numpy", {"A1": 1.0, "A2": float("nan")},
                      {"A1": 1.0, "A2": 1.0})
    assert not result.ok and result.failing_cells == ["A2"]


def test_too_few_users(capsys, tmp_path):
    folder = write_movielens(tmp_path / "ml-100k", n_users=10, n_movies=30)
    code, _, err = run(capsys, "build", "--ratings", folder, "--out", tmp_path / "o")
    assert_user_error(code, err, "10 users", "at least 15")


def test_output_folder_that_is_a_file(capsys, tiny_movielens, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("keep me")
    code, _, err = run(capsys, "build", "--ratings", tiny_movielens, "--out", blocker)
    assert_user_error(code, err, "is a file")
    assert blocker.read_text() == "keep me"


def test_write_failure_leaves_no_partial_file(capsys, tiny_movielens, tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    code, _, err = run(capsys, "build", "--ratings", tiny_movielens, "--out", tmp_path / "o")
    assert_user_error(code, err, "No space left")
    assert list((tmp_path / "o").iterdir()) == []


def test_build_writes_both_workbooks_or_neither(capsys, tiny_movielens, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert run(capsys, "build", "--ratings", tiny_movielens, "--out", out)[0] == 0
    before = {name: (out / name).read_bytes() for name in (ENTROPY_FILE, COLLAB_FILE)}

    real_fdopen, opened = os.fdopen, []

    def disk_full_on_the_second_file(handle, mode):
        opened.append(handle)
        if len(opened) == 2:
            os.close(handle)
            raise OSError(28, "No space left on device")
        return real_fdopen(handle, mode)

    monkeypatch.setattr(os, "fdopen", disk_full_on_the_second_file)
    code, _, err = run(capsys, "build", "--ratings", tiny_movielens, "--out", out, "--seed", 3)
    assert_user_error(code, err, "No space left")
    # the first workbook was staged in full, yet neither changed, and no temporary file is left
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(path.name for path in out.iterdir()) == sorted(before)


def test_edited_workbook_is_not_overwritten(capsys, tiny_movielens, tmp_path):
    out = tmp_path / "o"
    assert run(capsys, "build", "--ratings", tiny_movielens, "--out", out)[0] == 0
    assert run(capsys, "build", "--ratings", tiny_movielens, "--out", out)[0] == 0

    wb = openpyxl.load_workbook(out / COLLAB_FILE)
    wb["dotprod"]["A1"] = "my notes"
    wb.save(out / COLLAB_FILE)
    edited = (out / COLLAB_FILE).read_bytes()

    code, _, err = run(capsys, "build", "--ratings", tiny_movielens, "--out", out, "--seed", 3)
    assert_user_error(code, err, COLLAB_FILE, "--force")
    assert (out / COLLAB_FILE).read_bytes() == edited
    code, _, _ = run(capsys, "build", "--ratings", tiny_movielens, "--out", out, "--force")
    assert code == 0 and (out / COLLAB_FILE).read_bytes() != edited


def _xlsx_with_part(tmp_path, source, part, data):
    target = tmp_path / "tampered.xlsx"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            new.writestr(name, data if name == part else old.read(name))
    return target


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">&lol3;</workbook>"""


@pytest.mark.parametrize("make, fragments", [
    (lambda tmp, src: tmp / "missing.xlsx", ["does not exist"]),
    (lambda tmp, src: _write(tmp / "notes.xlsx", b"just text"), ["not an .xlsx"]),
    (lambda tmp, src: _write(tmp / "cut.xlsx", src.read_bytes()[:3000]), ["not a zip package"]),
    (lambda tmp, src: _flip_a_byte(tmp / "flipped.xlsx", src), ["corrupt .xlsx"]),
    (lambda tmp, src: _write(tmp / "locked.xlsx", bytes.fromhex("d0cf11e0a1b11ae1") + b"\0" * 600),
     ["password-protected"]),
    (lambda tmp, src: _xlsx_with_part(tmp, src, "xl/workbook.xml", BILLION_LAUGHS),
     ["declares a DTD"]),
])
def test_check_rejects_files_that_are_not_readable_workbooks(capsys, built, tmp_path, make,
                                                             fragments):
    path = make(tmp_path, built[ENTROPY_FILE])
    code, _, err = run(capsys, "check", path)
    assert_user_error(code, err, *fragments)


def test_check_reports_the_readable_files_when_one_is_not(capsys, built, tmp_path, soffice):
    missing = tmp_path / "missing.xlsx"
    code, out, err = run(capsys, "check", missing, built[ENTROPY_FILE])
    assert_user_error(code, err, "missing.xlsx", "does not exist")
    assert str(built[ENTROPY_FILE]) in out  # the readable file was still checked and reported

    code, out, _ = run(capsys, "check", "--json", built[ENTROPY_FILE], missing)
    reports = json.loads(out)
    assert code == 2 and len(reports) == 2
    assert reports[1]["path"] == str(missing) and not reports[1]["ok"]
    assert "does not exist" in reports[1]["error"]


def test_xml_entities_are_never_expanded(built, tmp_path):
    import openpyxl.xml
    from defusedxml import EntitiesForbidden

    # the DTD check comes first; behind it, openpyxl itself parses through defusedxml
    assert openpyxl.xml.DEFUSEDXML
    path = _xlsx_with_part(tmp_path, built[ENTROPY_FILE], "xl/workbook.xml", BILLION_LAUGHS)
    with pytest.raises(ValueError) as error:
        openpyxl.load_workbook(path)
    assert isinstance(error.value.__context__, EntitiesForbidden)


def _flip_a_byte(path, source):
    data = bytearray(Path(source).read_bytes())
    with zipfile.ZipFile(source) as package:
        entry = package.getinfo("xl/worksheets/sheet1.xml")
    data[entry.header_offset + 30 + len(entry.filename) + 40] ^= 0xFF  # inside the deflate data
    return _write(path, bytes(data))


def _write(path, data):
    Path(path).write_bytes(data)
    return path
