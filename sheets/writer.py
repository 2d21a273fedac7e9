"""Saving a workbook: cached formula values, byte-for-byte reproducible files, atomic writes.

openpyxl writes formulas without results, so a viewer that does not recalculate (Protected
View, ``pandas.read_excel``, ``openpyxl`` with ``data_only=True``) would show blanks. After
openpyxl has written the package, each formula cell's ``<v>`` gets the value the numpy
reference computed, the zip entries get fixed timestamps, and the document properties a fixed
date, so the same inputs always give the same bytes.
"""

import io
import os
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree

from defusedxml import ElementTree as SafeElementTree

from engine.errors import InputError
from sheets.patch import set_cell_values

CREATOR = "xlmirror"
BUILD_TIME = datetime(2022, 7, 1)  # the lesson's year; any fixed date keeps builds identical
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold

MAIN_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
PKG_REL_NS = "http://schemas.openxmlformats.org/package/2006/relationships"
DCTERMS_NS = "http://purl.org/dc/terms/"
DC_NS = "http://purl.org/dc/elements/1.1/"


def workbook_bytes(wb, cached_values):
    """The finished .xlsx bytes of ``wb``.

    ``cached_values`` maps sheet title -> {cell address -> value} for formula cells.
    Every number is written with all 17 significant digits a double needs.
    """
    wb.properties.creator = CREATOR
    wb.properties.lastModifiedBy = CREATOR
    wb.properties.created = BUILD_TIME
    raw = io.BytesIO()
    wb.save(raw)

    with zipfile.ZipFile(raw) as package:
        parts = {name: package.read(name) for name in package.namelist()}
    for title, part in sheet_parts(parts).items():
        # openpyxl writes numbers with 16 significant digits, which loses the last bit of some
        # doubles; every number is written again with the 17 that round-trip exactly
        exact = {**_numbers_in(wb[title]), **cached_values.get(title, {})}
        parts[part] = set_cell_values(parts[part], exact)
    parts["docProps/core.xml"] = _with_fixed_dates(parts["docProps/core.xml"])

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as package:
        for name, data in parts.items():
            entry = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            package.writestr(entry, data, compresslevel=6)
    return out.getvalue()


def sheet_parts(parts):
    """Sheet title -> part name (``xl/worksheets/sheet1.xml``) from the workbook's relations."""
    workbook = SafeElementTree.fromstring(parts["xl/workbook.xml"])
    rels = SafeElementTree.fromstring(parts["xl/_rels/workbook.xml.rels"])
    relations = rels.iter(f"{{{PKG_REL_NS}}}Relationship")
    targets = {rel.get("Id"): rel.get("Target") for rel in relations}

    found = {}
    for sheet in workbook.iter(f"{{{MAIN_NS}}}sheet"):
        target = targets[sheet.get(f"{{{REL_NS}}}id")]
        path = target.lstrip("/") if target.startswith("/") else str(PurePosixPath("xl") / target)
        found[sheet.get("name")] = path
    return found


def is_pristine_build(path):
    """True when ``path`` is an xlsx that xlmirror wrote and nobody has saved since."""
    try:
        with zipfile.ZipFile(path) as package:
            core = SafeElementTree.fromstring(package.read("docProps/core.xml"))
    except (OSError, KeyError, zipfile.BadZipFile, ElementTree.ParseError):
        return False
    creator = core.findtext(f"{{{DC_NS}}}creator")
    modified = core.findtext(f"{{{DCTERMS_NS}}}modified")
    return creator == CREATOR and modified == _w3c(BUILD_TIME)


def write_atomically(path, data):
    """Write ``data`` to ``path`` through a temporary file and a rename.

    A crash or a full disk leaves the old file (or none) in place, never half a file.
    """
    write_all_atomically({path: data})


def write_all_atomically(contents):
    """Write several files, each ``{path: data}``, so that either all are written or none.

    Every file is first written in full to a temporary file beside its target; only when all
    of them are on disk are they renamed into place. A full disk or a crash while writing
    leaves every old file as it was.
    """
    staged = {}
    try:
        for path, data in contents.items():
            staged[Path(path)] = _stage(Path(path), data)
        for path, temp_name in staged.items():
            try:
                os.replace(temp_name, path)
            except OSError as exc:
                raise InputError(
                    f"cannot write {path}: {exc.strerror}; choose another --out") from None
    finally:
        for temp_name in staged.values():
            Path(temp_name).unlink(missing_ok=True)  # the renamed ones are gone already


def _stage(path, data):
    """``data`` in a new temporary file beside ``path``; returns its name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise InputError(f"cannot write to {path.parent}: {exc.strerror}; choose another --out")
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
        os.chmod(temp_name, 0o644)
    except BaseException as exc:
        Path(temp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {path}: {exc.strerror}; choose another --out") from None
        raise
    return temp_name


def _numbers_in(ws):
    return {
        cell.coordinate: cell.value
        for row in ws.iter_rows() for cell in row
        if cell.data_type == "n" and isinstance(cell.value, (int, float))
        and not isinstance(cell.value, bool)
    }


def _with_fixed_dates(xml):
    root = _parse_keeping_prefixes(xml)
    for tag in ("created", "modified"):
        element = root.find(f"{{{DCTERMS_NS}}}{tag}")
        if element is not None:
            element.text = _w3c(BUILD_TIME)
    return ElementTree.tostring(root, encoding="UTF-8", xml_declaration=True)


def _parse_keeping_prefixes(xml):
    # ElementTree would rename unknown namespaces ns0, ns1...; register the document's own
    for _, (prefix, uri) in SafeElementTree.iterparse(io.BytesIO(xml), events=("start-ns",)):
        ElementTree.register_namespace(prefix, uri)
    return SafeElementTree.fromstring(xml)


def _w3c(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
