"""Numbers only: the reference maths behind every workbook, with no spreadsheet code.

``engine`` never imports ``sheets`` or a spreadsheet library, so the values it computes are an
independent route to the numbers a spreadsheet engine recalculates.
"""
