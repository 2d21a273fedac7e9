"""Writing and reading cells: text that stays text, formulas, and numeric ranges.

Addresses are Excel's A1 strings throughout, so a layout reads like the sheet it builds.
"""

import numpy as np
from openpyxl.utils.cell import column_index_from_string, get_column_letter, range_boundaries

from engine.errors import InputError

FORMULA_PREFIXES = ("=", "+", "-", "@")


def write_text(ws, address, text):
    """Store ``text`` as a string cell, even when it starts like a formula (``=``, ``+``, ...).

    A movie title such as ``=HYPERLINK(...)`` must never become a live formula.
    """
    cell = ws[address]
    cell.value = str(text)
    cell.data_type = "s"
    return cell


def write_formula(ws, address, formula):
    """Store a formula; ``formula`` must start with ``=``."""
    if not formula.startswith("="):
        raise ValueError(f"formula for {ws.title}!{address} must start with '=', got {formula!r}")
    ws[address] = formula
    return ws[address]


def write_number(ws, address, value):
    """Store a Python or numpy number as a plain float or int."""
    ws[address] = value.item() if isinstance(value, np.generic) else value
    return ws[address]


def write_row(ws, first_address, values):
    """Write values left to right from ``first_address``: numbers as numbers, str as text."""
    _write_line(ws, first_address, values, across=True)


def write_column(ws, first_address, values):
    """Write values top to bottom from ``first_address``: numbers as numbers, str as text."""
    _write_line(ws, first_address, values, across=False)


def _write_line(ws, first_address, values, across):
    col, row = split_address(first_address)
    for offset, value in enumerate(values):
        address = cell_address(col + offset, row) if across else cell_address(col, row + offset)
        if isinstance(value, str):
            write_text(ws, address, value)
        else:
            write_number(ws, address, value)


def write_block(ws, first_address, matrix):
    """Write a 2-D array of numbers with its top-left cell at ``first_address``; NaN -> blank."""
    col, row = split_address(first_address)
    for i, values in enumerate(np.asarray(matrix, dtype=np.float64)):
        for j, value in enumerate(values):
            if not np.isnan(value):
                address = f"{get_column_letter(col + j)}{row + i}"
                number = float(value)
                ws[address] = int(number) if number.is_integer() else number
    return block_address(first_address, *np.shape(matrix))


def block_address(first_address, n_rows, n_cols):
    """``"H2"``, 15, 15 -> ``"H2:V16"``."""
    col, row = split_address(first_address)
    return f"{first_address}:{get_column_letter(col + n_cols - 1)}{row + n_rows - 1}"


def cell_address(col, row):
    """1-based column and row -> ``"A1"``."""
    return f"{get_column_letter(col)}{row}"


def column_letter(col):
    """1-based column -> ``"A"``."""
    return get_column_letter(col)


def absolute(ref):
    """``"B4:B18"`` -> ``"$B$4:$B$18"``."""
    parts = []
    for address in ref.split(":"):
        col, row = split_address(address)
        parts.append(f"${get_column_letter(col)}${row}")
    return ":".join(parts)


def cells_of(ref, values):
    """Map each cell of range ``ref`` to the matching entry of the 2-D array ``values``."""
    min_col, min_row, _, _ = range_boundaries(ref)
    return {
        cell_address(min_col + j, min_row + i): float(values[i, j])
        for i in range(values.shape[0]) for j in range(values.shape[1])
    }


def numbers(ws, ref, blank_ok=False):
    """The numbers in a range as a 2-D float64 array; blanks become NaN when ``blank_ok``.

    Anything else (text, a bool, an error value, a formula where a number belongs) is a user's
    edit the sheet cannot compute with: ``InputError`` names the cell.
    """
    min_col, min_row, max_col, max_row = range_boundaries(ref)
    values = np.empty((max_row - min_row + 1, max_col - min_col + 1))
    for i, row in enumerate(range(min_row, max_row + 1)):
        for j, col in enumerate(range(min_col, max_col + 1)):
            values[i, j] = _number_at(ws, col, row, blank_ok)
    return values


def _number_at(ws, col, row, blank_ok):
    value = ws.cell(row=row, column=col).value
    if value is None and blank_ok:
        return np.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise InputError(
        f"{ws.title}!{cell_address(col, row)} holds {value!r}; a number is expected there"
    )


def column_values(ws, first_address, across=False):
    """Values down a column (or ``across`` a row) from ``first_address`` to the first blank."""
    col, row = split_address(first_address)
    values = []
    while ws.cell(row=row, column=col).value is not None:
        values.append(ws.cell(row=row, column=col).value)
        if across:
            col += 1
        else:
            row += 1
    return values


def split_address(address):
    """``"H19"`` -> (8, 19): 1-based column and row."""
    letters = address.rstrip("0123456789")
    return column_index_from_string(letters), int(address[len(letters):])


LABEL_WIDTH = 24  # longer text is a note, left to run on over the empty cells to its right
NUMBER_WIDTH = 12  # what Excel's General format needs for a number such as -0.123456789
MIN_WIDTH = 9  # a little over Excel's default of 8.43, so that short numbers are not cut


def fit_column_widths(ws):
    """Widen each column of ``ws`` to show its labels and numbers whole.

    A column is as wide as its longest label (text of at most ``LABEL_WIDTH`` characters),
    plus a margin, and at least ``NUMBER_WIDTH`` when it holds numbers or formulas. Longer text
    (a sheet's notes) does not widen its column; it runs on into the empty cells beside it.
    """
    widths = {}
    for row in ws.iter_rows():
        for cell in row:
            if cell.value is None:
                continue
            if cell.data_type == "s":
                if len(cell.value) > LABEL_WIDTH:
                    continue
                width = len(cell.value) + 2
            else:
                width = NUMBER_WIDTH
            widths[cell.column_letter] = max(widths.get(cell.column_letter, MIN_WIDTH), width)
    for letter, width in widths.items():
        ws.column_dimensions[letter].width = width
