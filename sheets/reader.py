"""Opening a user's workbook safely: a clear error for anything that is not a readable xlsx.

XML entity tricks (billion laughs, external entities) are refused because openpyxl parses
through ``defusedxml`` when it is installed, and xlmirror will not run without it; zip bombs are
refused by a limit on the unpacked size before any XML is parsed.
"""

import io
import logging
import re
import zipfile
import zlib
from pathlib import Path

import openpyxl
import openpyxl.xml

from engine.errors import InputError

log = logging.getLogger("xlmirror")

MAX_UNPACKED_BYTES = 512 * 2**20
OLE_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")  # encrypted xlsx and legacy .xls share it
REQUIRED_PARTS = ("[Content_Types].xml", "xl/workbook.xml")

if not openpyxl.xml.DEFUSEDXML:
    raise ImportError(
        "openpyxl is not using defusedxml, so workbooks could carry XML entity attacks: "
        "pip install defusedxml and leave OPENPYXL_DEFUSEDXML unset"
    )


def validate_package(path):
    """Raise ``InputError`` unless ``path`` is an unencrypted, intact, reasonably sized xlsx."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head == OLE_MAGIC:
        raise InputError(
            f"{path} is password-protected or a legacy .xls file; save it from Excel as .xlsx "
            "without a password"
        )
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not an .xlsx workbook (it is not a zip package)")

    try:
        with zipfile.ZipFile(path) as package:
            names = set(package.namelist())
            unpacked = sum(entry.file_size for entry in package.infolist())
            broken = package.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path} is a corrupt .xlsx ({exc}); re-save it from Excel") from None
    if broken is not None:
        raise InputError(f"{path} is a corrupt .xlsx (part {broken} fails its checksum)")
    missing = [part for part in REQUIRED_PARTS if part not in names]
    if missing:
        raise InputError(f"{path} is not an .xlsx workbook (no {', '.join(missing)} inside)")
    if unpacked <= MAX_UNPACKED_BYTES:
        _refuse_dtds(path)
    if unpacked > MAX_UNPACKED_BYTES:
        raise InputError(
            f"{path} unpacks to {unpacked / 2**20:.0f} MiB, over the {MAX_UNPACKED_BYTES // 2**20}"
            " MiB xlmirror reads; is it really one of the lecture's workbooks?"
        )


def _refuse_dtds(path):
    # no part of an Office Open XML package has a DTD; one that does is an entity trick
    with zipfile.ZipFile(path) as package:
        for name in package.namelist():
            if name.endswith((".xml", ".rels", ".vml")):
                with package.open(name) as part:
                    if b"<!DOCTYPE" in part.read(4096).upper():
                        raise InputError(
                            f"{path} part {name} declares a DTD (<!DOCTYPE>), which no Excel "
                            "file has; refusing to read it"
                        )


def open_workbook(path, data_only=False):
    """Load ``path`` with openpyxl after :func:`validate_package`; never modifies the file.

    ``data_only=True`` gives the cached results of formula cells instead of the formulas.
    openpyxl fails on some parts Excel writes (pivot tables, some charts); when it does, the
    workbook is read again from an in-memory copy without those parts, which hold nothing
    xlmirror computes with.
    """
    validate_package(path)
    try:
        return openpyxl.load_workbook(path, data_only=data_only)
    except Exception as exc:  # openpyxl raises many types for parts it does not understand
        first_error = exc

    try:
        wb = openpyxl.load_workbook(without_decorations(path), data_only=data_only)
    except Exception:
        raise InputError(
            f"{path} could not be read as a workbook ({_one_line(first_error)})"
        ) from None
    log.warning("%s: read without its pivot tables, charts and drawings, which openpyxl "
                "could not parse (%s); the file itself is untouched", path,
                _one_line(first_error))
    return wb


# parts that only display or summarise cells: safe to leave out when reading values
DECORATION = re.compile(r"(^|/)xl/(pivotTables|pivotCache|charts|drawings)/")


def without_decorations(path):
    """An in-memory copy of the package without pivot tables, charts and drawings."""
    copy = io.BytesIO()
    with zipfile.ZipFile(path) as package, zipfile.ZipFile(copy, "w") as stripped:
        for name in package.namelist():
            if DECORATION.search("/" + name):
                continue
            data = package.read(name)
            if name.endswith(".rels"):
                data = re.sub(
                    rb"<(\w+:)?Relationship\b[^>]*Target=\"[^\"]*"
                    rb"(pivotTables|pivotCache|charts|drawings)/[^>]*?/>", b"", data)
            elif name == "xl/workbook.xml":
                data = re.sub(rb"<((?:\w+:)?)pivotCaches\b.*?</\1pivotCaches>", b"", data,
                              flags=re.S)
            elif name == "[Content_Types].xml":
                data = re.sub(
                    rb"<Override\b[^>]*PartName=\"/xl/"
                    rb"(pivotTables|pivotCache|charts|drawings)/[^>]*?/>", b"", data)
            elif name.startswith("xl/worksheets/"):
                data = re.sub(rb"<(\w+:)?(drawing|legacyDrawing)\b[^>]*?/>", b"", data)
            stripped.writestr(name, data)
    copy.seek(0)
    return copy


def _one_line(exc):
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else ""
    return f"{exc.__class__.__name__}: {reason}" if reason else exc.__class__.__name__


def formula_cells(wb):
    """Sheet title -> {address -> formula text} for every formula cell (``data_only=False``)."""
    found = {}
    for ws in wb.worksheets:
        cells = {}
        for row in ws.iter_rows():
            for cell in row:
                if cell.data_type == "f":
                    cells[cell.coordinate] = str(cell.value)
        found[ws.title] = cells
    return found
