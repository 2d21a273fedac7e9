"""Excel Solver models stored in a workbook, the way Excel itself stores them.

Excel keeps a sheet's Solver model in hidden, sheet-local defined names (``solver_opt``,
``solver_adj``, ...). Writing the same names lets Data > Solver open with the model filled in,
and reading them tells ``fit`` which cell to minimise and which cells it may change.
"""

from dataclasses import dataclass

import re

from openpyxl.utils.cell import range_boundaries
from openpyxl.workbook.defined_name import DefinedName

from sheets.cells import absolute

EXCEL_SOLVER_VARIABLE_LIMIT = 200  # Excel's built-in Solver refuses models with more cells

# Options as Excel's Solver dialog writes them for GRG Nonlinear with its defaults, apart from
# the convergence and iteration settings the lecture's workbook used.
SOLVER_OPTIONS = {
    "solver_typ": "2",  # 1 maximise, 2 minimise, 3 value of
    "solver_eng": "1",  # 1 GRG Nonlinear, 2 Simplex LP, 3 Evolutionary
    "solver_neg": "2",  # 2: variables may go negative
    "solver_ver": "3",
    "solver_num": "0",  # no constraints
    "solver_val": "0",
    "solver_cvg": "0.001",
    "solver_pre": "0.000001",
    "solver_tol": "0.01",
    "solver_mni": "30",
    "solver_ssz": "100",
    "solver_drv": "1",
    "solver_est": "1",
    "solver_itr": "2147483647",
    "solver_tim": "2147483647",
    "solver_lin": "2",
    "solver_mip": "2147483647",
    "solver_nod": "2147483647",
    "solver_msl": "2",
    "solver_mrt": "0.075",
    "solver_nwt": "1",
    "solver_rbv": "2",
    "solver_rlx": "2",
    "solver_rsd": "0",
    "solver_scl": "1",
    "solver_sho": "2",
}


@dataclass
class SolverModel:
    """Minimise ``objective`` by changing the cells in ``variables`` (ranges on one sheet)."""

    objective: str  # "V41"
    variables: tuple  # ("H19:V23", "B25:F39")

    @property
    def n_variables(self):
        """How many cells Solver changes."""
        total = 0
        for ref in self.variables:
            min_col, min_row, max_col, max_row = range_boundaries(ref)
            total += (max_col - min_col + 1) * (max_row - min_row + 1)
        return total


def attach_solver(ws, model):
    """Store ``model`` on ``ws`` as Excel's hidden sheet-local ``solver_*`` names."""
    sheet = sheet_prefix(ws.title)
    names = {
        "solver_opt": f"{sheet}!{absolute(model.objective)}",
        "solver_adj": ",".join(f"{sheet}!{absolute(ref)}" for ref in model.variables),
        **SOLVER_OPTIONS,
    }
    for name in sorted(names):
        ws.defined_names[name] = DefinedName(name, attr_text=names[name], hidden=True)


def read_solver(ws):
    """The ``SolverModel`` stored on ``ws``, or None when the sheet has none."""
    names = ws.defined_names
    if "solver_opt" not in names or "solver_adj" not in names:
        return None
    objective = _strip_sheet(names["solver_opt"].attr_text)
    variables = tuple(_strip_sheet(ref) for ref in names["solver_adj"].attr_text.split(","))
    return SolverModel(objective, variables)


def sheet_prefix(title):
    """A sheet name as a formula refers to it: quoted only when Excel would quote it."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", title) and not re.fullmatch(
        r"[A-Za-z]{1,3}[0-9]+|[RrCc][0-9]*", title
    ):
        return title
    return "'" + title.replace("'", "''") + "'"


def _strip_sheet(ref):
    return ref.rsplit("!", 1)[-1].replace("$", "")
