"""``xlmirror fit``: what Data > Solver > Solve does, done by scipy and by PyTorch.

The problem is read from the workbook itself: a sheet's ``solver_opt`` / ``solver_adj`` names
say which cell to minimise and which cells may change, and the sheet's layout says which of
those cells are factors and which are biases. The solution is written into a copy of the file
by editing cell values in place, so formulas stay live and nothing else in the file changes.
"""

import io
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.collab import LatentFactors
from engine.errors import InputError
from sheets.cells import cells_of, numbers
from sheets.collab_book import (
    EMB_FIRST_ROW, EmbeddingLayout, GridLayout, check_no_gap, reference_embeddings,
    reference_grid,
)
from sheets.patch import request_full_recalculation, set_cell_values
from sheets.reader import open_workbook
from sheets.solver import read_solver
from sheets.writer import sheet_parts, write_atomically

log = logging.getLogger("xlmirror")


@dataclass
class SheetProblem:
    """One sheet's Solver model as numbers: the ratings, the starting values, where they live."""

    sheet: str
    layout: object  # GridLayout or EmbeddingLayout
    ratings: np.ndarray  # (n_users, n_movies), NaN where not rated
    start: LatentFactors

    @property
    def with_bias(self):
        return getattr(self.layout, "with_bias", False)

    def variable_cells(self, factors):
        """Cell address -> value for every Solver variable cell, from ``factors``."""
        layout = self.layout
        if isinstance(layout, EmbeddingLayout):
            return {**cells_of(layout.user_factors, factors.user_factors),
                    **cells_of(layout.movie_factors, factors.movie_factors)}

        values = {**cells_of(layout.movie_factors, factors.movie_factors.T),
                  **cells_of(layout.user_factors, factors.user_factors)}
        if layout.with_bias:
            values.update(cells_of(layout.movie_bias, factors.movie_bias[None, :]))
            values.update(cells_of(layout.user_bias, factors.user_bias[:, None]))
        return values

    def reference(self, ws):
        """Expected value of every formula cell of the sheet as it now stands in ``ws``."""
        if isinstance(self.layout, EmbeddingLayout):
            return reference_embeddings(ws)
        return reference_grid(ws, self.layout.with_bias)


def solver_sheets(wb):
    """Titles of the sheets that carry a Solver model."""
    return [ws.title for ws in wb.worksheets if read_solver(ws) is not None]


def read_problem(wb, title):
    """The ``SheetProblem`` of sheet ``title``; ``InputError`` says why a sheet can't be fitted."""
    if title not in wb.sheetnames:
        raise InputError(f"no sheet named {title!r}; the workbook has {', '.join(wb.sheetnames)}")
    ws = wb[title]
    model = read_solver(ws)
    if model is None:
        with_model = ", ".join(solver_sheets(wb)) or "none"
        raise InputError(
            f"sheet {title!r} has no Solver model (no solver_opt/solver_adj names); "
            f"sheets with one: {with_model}"
        )
    if not re.fullmatch(r"[A-Z]{1,3}[1-9][0-9]*", model.objective):
        raise InputError(
            f"sheet {title!r}: the Solver objective is {model.objective!r}, not a cell (a "
            "deleted cell reads #REF!); set it again in Data > Solver"
        )
    if ws[model.objective].data_type != "f":
        raise InputError(
            f"{title}!{model.objective}, the Solver objective, holds {ws[model.objective].value!r}"
            "; it must be a formula (the RMSE)"
        )

    layout = _matching_layout(ws, model)
    if isinstance(layout, EmbeddingLayout):
        ratings = _dense_ratings(ws, layout)
        start = LatentFactors(
            numbers(ws, layout.user_factors), numbers(ws, layout.movie_factors),
            np.zeros(layout.n_users), np.zeros(layout.n_movies),
        )
    else:
        ratings = numbers(ws, layout.ratings, blank_ok=True)
        user_bias, movie_bias = np.zeros(layout.n_users), np.zeros(layout.n_movies)
        if layout.with_bias:
            user_bias = numbers(ws, layout.user_bias)[:, 0]
            movie_bias = numbers(ws, layout.movie_bias)[0]
        start = LatentFactors(
            numbers(ws, layout.user_factors), numbers(ws, layout.movie_factors).T,
            user_bias, movie_bias,
        )
    if np.isnan(ratings).all():
        raise InputError(f"sheet {title!r} has no ratings to fit")
    return SheetProblem(title, layout, ratings, start)


DEFAULT_WEIGHT_DECAY = 1e-4


def fit_problem(problem, engine="scipy", device="auto", weight_decay=DEFAULT_WEIGHT_DECAY):
    """Run the chosen engine(s) on ``problem``; a list of ``engine.optimize.FitResult``.

    Every engine minimises RMSE + ``weight_decay / 2 * sum(p ** 2)``. The plain RMSE of the
    sheet has directions along which factors can grow without bound while the loss keeps
    creeping down, so different optimisers stop at different points; a small penalty makes the
    minimum well defined and the engines comparable. ``weight_decay=0`` is Solver's objective.
    """
    results = []
    if engine in ("scipy", "all"):
        from engine.optimize import fit_scipy

        log.info("%s: fitting with scipy L-BFGS-B", problem.sheet)
        results.append(fit_scipy(problem.ratings, problem.start, problem.with_bias,
                                 weight_decay=weight_decay))
    if engine in ("torch", "all"):
        from engine.torch_collab import fit_torch  # torch is slow to import: only when asked

        optimizers = ("lbfgs", "adam") if engine == "all" else ("lbfgs",)
        for optimizer in optimizers:
            log.info("%s: fitting with torch %s", problem.sheet, optimizer)
            results.append(fit_torch(problem.ratings, problem.start, problem.with_bias,
                                     optimizer=optimizer, device=device,
                                     weight_decay=weight_decay))
    return results


def write_solution(source, out, wb, solutions):
    """Copy ``source`` to ``out`` with each solved sheet's variable cells set to its solution.

    ``wb`` is ``source`` as loaded (formulas, not values); ``solutions`` maps a sheet title to
    ``(SheetProblem, LatentFactors)``. The solved sheets' formula cells get fresh cached values
    from the numpy reference, and the file asks Excel and LibreOffice to recalculate on open so
    any formula elsewhere that reads these cells is refreshed as well. Returns the sheet RMSE
    now cached in each solved sheet's objective cell.
    """
    with zipfile.ZipFile(source) as package:
        entries = package.infolist()
        parts = {entry.filename: package.read(entry) for entry in entries}
    part_of = sheet_parts(parts)

    cached_rmse = {}
    for title, (problem, factors) in solutions.items():
        variables = problem.variable_cells(factors)
        ws = wb[title]
        for address, value in variables.items():
            ws[address].value = value
        # a cell the user emptied or typed a number into keeps what the user put there
        formulas = {address: value for address, value in problem.reference(ws).items()
                    if ws[address].data_type == "f"}
        parts[part_of[title]] = set_cell_values(parts[part_of[title]], {**variables, **formulas})
        cached_rmse[title] = formulas.get(read_solver(ws).objective)
    parts["xl/workbook.xml"] = request_full_recalculation(parts["xl/workbook.xml"])

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as package:
        for entry in entries:
            package.writestr(entry, parts[entry.filename])
    write_atomically(out, buffer.getvalue())
    return cached_rmse


def default_output(path):
    """``book.xlsx`` -> ``book-solved.xlsx`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}-solved{path.suffix}")


def check_output(source, out, force):
    """Refuse an output that is the input, or an existing file unless ``force``."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve() or (out.exists() and out.samefile(source)):
        raise InputError(
            f"--out {out} is the input workbook; fit never overwrites its input: choose another"
        )
    if out.exists() and not force:
        raise InputError(f"{out} already exists; choose another --out or pass --force")
    if out.suffix.lower() != ".xlsx":
        raise InputError(f"--out {out} must end in .xlsx (openpyxl and Excel's Solver models "
                         "need an .xlsx workbook)")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")


def check_plot_output(plot, taken, force):
    """Refuse a plot path that is one of the workbooks, not a .png, or exists (unless force)."""
    plot = Path(plot)
    for path in map(Path, taken):
        if plot.resolve() == path.resolve():
            raise InputError(f"--plot {plot} is also a workbook path; choose another .png")
    if plot.suffix.lower() != ".png":
        raise InputError(f"--plot {plot} must end in .png")
    if plot.exists() and not force:
        raise InputError(f"{plot} already exists; choose another --plot or pass --force")
    if not plot.parent.is_dir():
        raise InputError(f"--plot {plot}: folder {plot.parent} does not exist")


def _matching_layout(ws, model):
    candidates = []
    for make in (lambda: GridLayout.of(ws, False), lambda: GridLayout.of(ws, True),
                 lambda: EmbeddingLayout.of(ws)):
        try:
            candidates.append(make())
        except InputError:
            continue
    for layout in candidates:
        if (layout.solver.objective == model.objective
                and sorted(layout.solver.variables) == sorted(model.variables)):
            return layout
    raise InputError(
        f"sheet {ws.title!r}: its Solver model (minimise {model.objective} by changing "
        f"{', '.join(model.variables)}) does not have the dotprod, bias or movielens_emb "
        "layout that xlmirror fits"
    )


def _dense_ratings(ws, layout):
    user_ids = list(numbers(ws, layout.user_ids)[:, 0])
    movie_ids = list(numbers(ws, layout.movie_ids)[:, 0])
    ratings = np.full((layout.n_users, layout.n_movies), np.nan)

    row = EMB_FIRST_ROW
    while ws[f"I{row}"].value is not None:
        user_id, movie_id, rating = numbers(ws, f"I{row}:K{row}")[0]
        if user_id not in user_ids or movie_id not in movie_ids:
            raise InputError(
                f"{ws.title}!I{row}:J{row}: user {user_id:g} / movie {movie_id:g} is not in the "
                "factor tables"
            )
        i, j = user_ids.index(user_id), movie_ids.index(movie_id)
        if not np.isnan(ratings[i, j]):
            raise InputError(
                f"{ws.title}!I{row}: user {user_id:g} rates movie {movie_id:g} twice; keep one row"
            )
        ratings[i, j] = rating
        row += 1
    check_no_gap(ws, "I", row)
    return ratings

