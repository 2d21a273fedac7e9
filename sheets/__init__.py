"""Workbooks: build the lecture's sheets, read them back safely, and check every formula.

``sheets`` knows spreadsheets and borrows its numbers from ``engine``.
"""
