"""Changing cell values inside a saved package without re-writing anything else.

Files saved by Excel carry parts openpyxl would drop on a round trip (charts, pivot tables,
extension lists). Writing a solution back therefore edits the worksheet XML in place: only the
``<v>`` of the named cells changes, every other byte of the package stays as it was.
"""

import math
import re

# a cell element, with or without a namespace prefix: <c r="H19" s="3"><v>1</v></c> or <c .../>
_CELL = re.compile(
    rb"<(?P<prefix>(?:\w+:)?)c\b(?P<attrs>[^>]*?)(?:/>|>(?P<body>.*?)</(?P=prefix)c>)", re.S
)
_REF = re.compile(rb'\br="([A-Z]+[0-9]+)"')
_TYPE = re.compile(rb'\s+t="[^"]*"')
_VALUE = re.compile(rb"<(?:\w+:)?v\b[^>]*?(?:/>|>.*?</(?:\w+:)?v>)", re.S)
_CALC_PR = re.compile(rb"<(?P<prefix>(?:\w+:)?)calcPr\b(?P<attrs>[^>]*?)(?P<end>/?>)")


def number_text(value):
    """A double as the shortest text that reads back as exactly the same double."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot store a non-finite value ({value}) in a number cell")
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def set_cell_values(sheet_xml, values):
    """Set the numeric value of existing cells; ``values`` maps address -> number.

    Formulas stay as they are (only their cached result changes); a cell typed as text, error
    or bool becomes a number cell. Addresses missing from the sheet raise ``KeyError``, since
    a solution for a cell that does not exist means the caller read the wrong sheet.
    """
    pending = {address.encode(): number_text(value) for address, value in values.items()}

    def patch(match):
        ref = _REF.search(match["attrs"])
        if ref is None or ref[1] not in pending:
            return match[0]
        prefix = match["prefix"]
        text = pending.pop(ref[1]).encode()
        attrs = _TYPE.sub(b"", match["attrs"])
        body = _VALUE.sub(b"", match["body"] or b"")
        body = re.sub(rb"<(?:\w+:)?is\b.*?</(?:\w+:)?is>", b"", body, flags=re.S)
        return b"<%sc%s>%s<%sv>%s</%sv></%sc>" % (prefix, attrs, body, prefix, text, prefix,
                                                    prefix)

    patched = _CELL.sub(patch, sheet_xml)
    if pending:
        missing = ", ".join(sorted(address.decode() for address in pending))
        raise KeyError(f"cells not in the sheet: {missing}")
    return patched


def request_full_recalculation(workbook_xml):
    """Set ``fullCalcOnLoad="1"`` so Excel and LibreOffice recalculate when the file opens."""
    match = _CALC_PR.search(workbook_xml)
    if match is None:
        prefix = re.search(rb"<((?:\w+:)?)workbook\b", workbook_xml)[1]
        closing = b"</%sworkbook>" % prefix
        return workbook_xml.replace(closing, b'<%scalcPr fullCalcOnLoad="1"/>%s' % (prefix, closing))

    attrs = re.sub(rb'\s+fullCalcOnLoad="[^"]*"', b"", match["attrs"])
    element = b'<%scalcPr%s fullCalcOnLoad="1"%s' % (match["prefix"], attrs, match["end"])
    return workbook_xml[:match.start()] + element + workbook_xml[match.end():]
