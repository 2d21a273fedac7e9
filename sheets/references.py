"""Which numpy reference computes which sheet: the link between a workbook and ``engine``."""

from sheets import collab_book, entropy_book

REFERENCES = {**entropy_book.REFERENCES, **collab_book.REFERENCES}


def reference_values(wb):
    """Sheet title -> {cell -> expected value} for every sheet xlmirror knows how to compute.

    Sheets it does not know (a user's own, say) are left out: ``check`` can still compare the
    spreadsheet engines with each other there, but not with numpy.
    """
    return {ws.title: REFERENCES[ws.title](wb) for ws in wb if ws.title in REFERENCES}
