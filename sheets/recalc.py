"""Two independent spreadsheet engines that recalculate every formula of a workbook.

* ``formulas``: a pure-Python Excel formula interpreter, run in this process.
* LibreOffice Calc, headless, in a subprocess with a throw-away user profile that forces a full
  recalculation on load, so the cached values in the file are never trusted.

Both work on a private copy of the file and return sheet title -> {address -> value}, where a
value is a float, a str (text or an error such as ``#NUM!``), or None (empty).
"""

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from engine.errors import InputError

LIBREOFFICE_TIMEOUT_S = 600
REQUIRE_LIBREOFFICE_ENV = "XLMIRROR_REQUIRE_LIBREOFFICE"

# OOXMLRecalcMode 0 = "always recalculate" on load, instead of trusting cached values
PROFILE_SETTINGS = """<?xml version="1.0" encoding="UTF-8"?>
<oor:items xmlns:oor="http://openoffice.org/2001/registry"
 xmlns:xs="http://www.w3.org/2001/XMLSchema"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<item oor:path="/org.openoffice.Office.Calc/Formula/Load">
<prop oor:name="OOXMLRecalcMode" oor:op="fuse"><value>0</value></prop></item>
<item oor:path="/org.openoffice.Office.Calc/Formula/Load">
<prop oor:name="ODFRecalcMode" oor:op="fuse"><value>0</value></prop></item>
</oor:items>
"""


def formulas_values(path, cells):
    """Recalculate with the ``formulas`` package; ``cells`` is title -> addresses to report."""
    import formulas  # slow to import (schedula, numpy-financial): only when checking

    from sheets.reader import without_decorations

    with tempfile.TemporaryDirectory(prefix="xlmirror-formulas-") as work:
        copy = Path(work) / "book.xlsx"
        # formulas loads through openpyxl, which fails on some pivot tables and charts; they
        # hold no formula this check compares, so the engine reads a copy without them
        copy.write_bytes(without_decorations(path).getvalue())
        # formulas draws progress bars on stderr; they are noise inside ``check``'s report
        with contextlib.redirect_stderr(io.StringIO()):
            model = formulas.ExcelModel().loads(str(copy)).finish()
            solution = model.calculate()

    by_key = {key.upper(): value for key, value in solution.items()}
    values = {}
    for title, addresses in cells.items():
        sheet_key = f"'[BOOK.XLSX]{title.upper()}'"
        values[title] = {
            address: _plain(by_key.get(f"{sheet_key}!{address.upper()}")) for address in addresses
        }
    return values


def libreoffice_path():
    """The ``soffice`` executable, or None when LibreOffice is not installed."""
    return shutil.which("soffice") or shutil.which("libreoffice")


def libreoffice_required():
    """True when ``XLMIRROR_REQUIRE_LIBREOFFICE=1``: a missing LibreOffice is then an error."""
    return os.environ.get(REQUIRE_LIBREOFFICE_ENV, "") not in ("", "0")


def libreoffice_values(path, cells):
    """Recalculate with headless LibreOffice Calc; same contract as :func:`formulas_values`."""
    soffice = libreoffice_path()
    if soffice is None:
        raise InputError(
            "LibreOffice is not installed: apt-get install libreoffice-calc-nogui "
            f"(or unset {REQUIRE_LIBREOFFICE_ENV} to check with formulas alone)"
        )

    from sheets.reader import open_workbook

    with tempfile.TemporaryDirectory(prefix="xlmirror-lo-") as work:
        work = Path(work)
        profile = work / "profile"
        (profile / "user").mkdir(parents=True)
        (profile / "user" / "registrymodifications.xcu").write_text(PROFILE_SETTINGS)
        source = work / "book.xlsx"
        shutil.copyfile(path, source)
        converted = work / "out"

        command = [
            soffice, "--headless", "--norestore", "--nologo", "--nodefault",
            f"-env:UserInstallation={profile.as_uri()}",
            "--convert-to", "xlsx:Calc MS Excel 2007 XML", "--outdir", str(converted),
            str(source),
        ]
        try:
            run = subprocess.run(
                command, capture_output=True, text=True, timeout=LIBREOFFICE_TIMEOUT_S,
                env={**os.environ, "HOME": str(work)},
            )
        except subprocess.TimeoutExpired:
            raise InputError(
                f"LibreOffice did not finish recalculating {path} within "
                f"{LIBREOFFICE_TIMEOUT_S} s"
            ) from None
        result = converted / "book.xlsx"
        if not result.is_file():
            raise InputError(
                f"LibreOffice could not recalculate {path}: {(run.stderr or run.stdout).strip()}"
            )
        wb = open_workbook(result, data_only=True)

    values = {}
    for title, addresses in cells.items():
        ws = wb[title] if title in wb.sheetnames else None
        values[title] = {
            address: _plain(ws[address].value if ws is not None else None)
            for address in addresses
        }
    return values


def _plain(value):
    """A spreadsheet result as float, str or None, whichever engine produced it."""
    if value is None:
        return None
    if hasattr(value, "value"):  # formulas wraps results in Ranges / arrays of one cell
        value = value.value
    if isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size else None
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if value is None or str(value) in ("", "empty"):
        return None
    return str(value)
