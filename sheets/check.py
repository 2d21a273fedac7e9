"""``xlmirror check``: every formula cell, recalculated twice, compared with numpy and torch.

For each sheet the report has one row per comparison: the value cached in the file, the
``formulas`` recalculation and the LibreOffice recalculation, each against the numpy reference
(or, on a sheet xlmirror does not know, against the cached value). On the softmax and
cross-entropy sheets the same three are also held to PyTorch's own functions in float64 and
float32, each at its precision's tolerance.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.errors import InputError
from sheets import recalc
from sheets.reader import formula_cells, open_workbook
from sheets.entropy_book import TORCH_SHEETS, torch_reference
from sheets.references import REFERENCES

TOLERANCE = 1e-9
# PyTorch's own losses, in each precision, against the spreadsheets: float32 keeps ~7 digits
TORCH_TOLERANCES = {"torch float64": 1e-12, "torch float32": 1e-6}


@dataclass
class Comparison:
    """One source of values against one expectation, over all formula cells of a sheet."""

    sheet: str
    source: str  # "cached", "formulas" or "libreoffice"
    against: str  # "numpy", "cached", "torch float64" or "torch float32"
    cells: int
    max_abs_diff: float
    worst_cell: str
    worst_got: object
    worst_expected: object
    failing_cells: list  # every cell over the tolerance, in sheet order
    tolerance: float = TOLERANCE

    @property
    def ok(self):
        return self.max_abs_diff <= self.tolerance


@dataclass
class WorkbookReport:
    path: str
    engines: list
    comparisons: list
    notes: list

    @property
    def ok(self):
        return all(comparison.ok for comparison in self.comparisons)


def available_engines():
    """The recalculation engines to use, and a note when LibreOffice is missing."""
    if recalc.libreoffice_path() is not None:
        return ["formulas", "libreoffice"], []
    if recalc.libreoffice_required():
        raise InputError(
            f"LibreOffice is not installed and {recalc.REQUIRE_LIBREOFFICE_ENV} is set: "
            "apt-get install libreoffice-calc-nogui"
        )
    return ["formulas"], [
        "LibreOffice not found: checked with the formulas engine alone "
        "(apt-get install libreoffice-calc-nogui for the second engine)"
    ]


def check_workbook(path, engines=("formulas", "libreoffice")):
    """Recalculate ``path`` with ``engines`` and compare every formula cell; a WorkbookReport."""
    path = Path(path)
    formulas_wb = open_workbook(path)
    cached_wb = open_workbook(path, data_only=True)
    cells = {title: list(found) for title, found in formula_cells(formulas_wb).items() if found}

    recalculated = {}
    for engine in engines:
        compute = recalc.formulas_values if engine == "formulas" else recalc.libreoffice_values
        recalculated[engine] = compute(path, cells)

    comparisons = []
    for title, addresses in cells.items():
        cached = {address: cached_wb[title][address].value for address in addresses}
        if title in REFERENCES:
            expected, against = REFERENCES[title](formulas_wb), "numpy"
            # a formula a user added to a known sheet has no numpy twin: hold it to its cache
            expected = {address: expected.get(address, cached[address]) for address in addresses}
            comparisons.append(_compare(title, "cached", against, cached, expected))
        else:
            expected, against = cached, "cached"
        for engine in engines:
            got = recalculated[engine][title]
            comparisons.append(_compare(title, engine, against, got, expected))
        if title in TORCH_SHEETS:
            comparisons.extend(_torch_comparisons(formulas_wb, title, cached, recalculated))
    return WorkbookReport(str(path), list(engines), comparisons, [])


def _torch_comparisons(wb, title, cached, recalculated):
    import torch

    comparisons = []
    for against, dtype in (("torch float64", torch.float64), ("torch float32", torch.float32)):
        expected = torch_reference(wb, title, dtype)
        tolerance = TORCH_TOLERANCES[against]
        sources = {"cached": cached, **{e: values[title] for e, values in recalculated.items()}}
        for source, got in sources.items():
            comparisons.append(_compare(title, source, against, got, expected, tolerance))
    return comparisons


def difference(got, expected):
    """Difference of two cell values, relative to the expected value's size when that is above
    1 (LibreOffice stores 15 significant digits, so 1e7 can't agree to an absolute 1e-9);
    inf when one is missing, not a number, or NaN.
    """
    if _is_number(got) and _is_number(expected):
        diff = abs(float(got) - float(expected)) / max(1.0, abs(float(expected)))
        return math.inf if math.isnan(diff) else diff
    if got == expected:
        return 0.0
    return math.inf


def format_report(report):
    """A plain-text table of one workbook's comparisons."""
    lines = [f"{report.path}  (engines: {', '.join(report.engines)})"]
    lines.extend(f"  note: {note}" for note in report.notes)
    header = (f"  {'sheet':<22}{'source':<13}{'vs':<15}{'cells':>6}  {'max |diff|':>11}"
              f"  {'tolerance':>9}  worst cell")
    lines.append(header)
    for c in report.comparisons:
        worst = c.worst_cell
        if not c.ok:
            worst += f" (got {c.worst_got!r}, expected {c.worst_expected!r})"
            shown = ", ".join(c.failing_cells[:8])
            more = f" and {len(c.failing_cells) - 8} more" if len(c.failing_cells) > 8 else ""
            worst += f"; {len(c.failing_cells)} cells differ: {shown}{more}"
        lines.append(
            f"  {c.sheet:<22}{c.source:<13}{c.against:<15}{c.cells:>6}  {c.max_abs_diff:>11.3g}"
            f"  {c.tolerance:>9.0e}  {worst}{'' if c.ok else '  FAIL'}"
        )
    lines.append(f"  {'ok' if report.ok else 'FAILED'}")
    return "\n".join(lines)


def report_dict(report):
    """The report as JSON-ready data (inf becomes the string "inf")."""
    comparisons = []
    for comparison in report.comparisons:
        entry = asdict(comparison)
        entry["ok"] = comparison.ok
        if math.isinf(entry["max_abs_diff"]):
            entry["max_abs_diff"] = "inf"
        comparisons.append(entry)
    return {
        "path": report.path, "engines": report.engines, "notes": report.notes,
        "tolerance": TOLERANCE, "ok": report.ok, "comparisons": comparisons,
    }


def _compare(sheet, source, against, got, expected, tolerance=TOLERANCE):
    worst_cell, worst_diff, failing = "", 0.0, []
    for address in sorted(expected, key=_sheet_order):
        diff = difference(got.get(address), expected[address])
        if diff > worst_diff or not worst_cell:
            worst_cell, worst_diff = address, diff
        if diff > tolerance:
            failing.append(address)
    return Comparison(
        sheet, source, against, len(expected), worst_diff, worst_cell,
        _json_safe(got.get(worst_cell)), _json_safe(expected.get(worst_cell)), failing,
        tolerance,
    )


def _sheet_order(address):
    letters = address.rstrip("0123456789")
    return int(address[len(letters):]), len(letters), letters


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_safe(value):
    if _is_number(value):
        return float(value)
    return None if value is None else str(value)
