"""``entropy_example.xlsx``: the lecture's softmax, cross-entropy and binary cross-entropy sheets.

Every computed cell is a live formula; ``reference_*`` recomputes the same cells with
``engine.entropy`` from the input cells of a workbook, which is what ``check`` compares against.
"""

import numpy as np

from engine import entropy
from sheets.cells import numbers, write_column, write_formula, write_row

CLASSES = ("cat", "dog", "plane", "fish", "building")
LOGITS = (
    -4.8852247804470919, 2.5974728206314666, 0.59166497570264198,
    -2.0689445222722602, -4.5686791738679853,
)
TARGET = "dog"
OVERFLOW_LOGIT = 1000.0  # exp(1000) overflows a double; the shifted softmax does not

IS_CAT = (1, 1, 0, 0, 1)
P_CAT = (0.5, 0.98, 0.9, 0.5, 0.9)

ROWS = range(2, 2 + len(CLASSES))  # one row per class / image
OVERFLOW_ROWS = range(11, 11 + len(CLASSES))


def build_softmax(ws):
    """Sheet ``softmax``: logits, exp, total, softmax, one-hot actuals, index, stable softmax."""
    write_row(ws, "A1", ["class", "output", "exp", "softmax", "actuals", "index",
                         "output - max", "exp(output - max)", "stable softmax"])
    write_column(ws, "A2", CLASSES)
    write_column(ws, "B2", LOGITS)
    write_column(ws, "E2", [int(name == TARGET) for name in CLASSES])
    write_column(ws, "F2", list(range(len(CLASSES))))
    for row in ROWS:
        write_formula(ws, f"C{row}", f"=EXP(B{row})")
        write_formula(ws, f"D{row}", f"=C{row}/$C$7")
        write_formula(ws, f"G{row}", f"=B{row}-MAX($B$2:$B$6)")
        write_formula(ws, f"H{row}", f"=EXP(G{row})")
        write_formula(ws, f"I{row}", f"=H{row}/$H$7")
    ws["A7"] = "total"
    for col in "CDHI":
        write_formula(ws, f"{col}7", f"=SUM({col}2:{col}6)")

    ws["A9"] = "A logit of 1000: EXP(1000) overflows, the shifted softmax still works"
    write_row(ws, "A10", ["class", "output", "output - max", "exp(output - max)",
                          "stable softmax"])
    write_column(ws, "A11", CLASSES)
    write_column(ws, "B11", (OVERFLOW_LOGIT,) + LOGITS[1:])
    for row in OVERFLOW_ROWS:
        write_formula(ws, f"C{row}", f"=B{row}-MAX($B$11:$B$15)")
        write_formula(ws, f"D{row}", f"=EXP(C{row})")
        write_formula(ws, f"E{row}", f"=D{row}/$D$16")
    ws["A16"] = "total"
    write_formula(ws, "D16", "=SUM(D11:D15)")
    write_formula(ws, "E16", "=SUM(E11:E15)")


def reference_softmax(wb):
    """Expected value of every formula cell of ``softmax``, from its logits."""
    ws = wb["softmax"]
    logits = numbers(ws, "B2:B6")[:, 0]
    big_logits = numbers(ws, "B11:B15")[:, 0]
    expected = {}

    exps = np.exp(logits)
    shifted = logits - logits.max()
    _fill(expected, "C", ROWS, exps)
    _fill(expected, "D", ROWS, entropy.softmax(logits))
    _fill(expected, "G", ROWS, shifted)
    _fill(expected, "H", ROWS, np.exp(shifted))
    _fill(expected, "I", ROWS, entropy.stable_softmax(logits))
    expected["C7"] = exps.sum()
    expected["D7"] = entropy.softmax(logits).sum()
    expected["H7"] = np.exp(shifted).sum()
    expected["I7"] = entropy.stable_softmax(logits).sum()

    big_shifted = big_logits - big_logits.max()
    _fill(expected, "C", OVERFLOW_ROWS, big_shifted)
    _fill(expected, "D", OVERFLOW_ROWS, np.exp(big_shifted))
    _fill(expected, "E", OVERFLOW_ROWS, entropy.stable_softmax(big_logits))
    expected["D16"] = np.exp(big_shifted).sum()
    expected["E16"] = entropy.stable_softmax(big_logits).sum()
    return expected


def build_cross_entropy(ws):
    """Sheet ``cross_entropy``: -actual * ln(p) per class (natural log) and the total."""
    write_row(ws, "A1", ["class", "softmax", "actuals", "-actual * ln(p)"])
    write_column(ws, "A2", CLASSES)
    for row in ROWS:
        write_formula(ws, f"B{row}", f"=softmax!D{row}")
        write_formula(ws, f"C{row}", f"=softmax!E{row}")
        write_formula(ws, f"D{row}", f"=-C{row}*LN(B{row})")
    ws["C7"] = "cross-entropy"
    write_formula(ws, "D7", "=SUM(D2:D6)")


def reference_cross_entropy(wb):
    """Expected values of ``cross_entropy``, from the logits and actuals on ``softmax``."""
    source = wb["softmax"]
    probs = entropy.softmax(numbers(source, "B2:B6")[:, 0])
    actuals = numbers(source, "E2:E6")[:, 0]
    expected = {}

    _fill(expected, "B", ROWS, probs)
    _fill(expected, "C", ROWS, actuals)
    _fill(expected, "D", ROWS, entropy.cross_entropy_terms(probs, actuals))
    expected["D7"] = entropy.cross_entropy(probs, actuals)
    return expected


def build_binary_cross_entropy(ws):
    """Sheet ``binary_cross_entropy``: five images, the loss two ways, and from logits."""
    write_row(ws, "A1", ["image", "isCat", "isNotCat", "PredCat", "PredNotCat",
                         "loss (products)", "loss (IF)", "logit", "sigmoid(logit)",
                         "loss from logit"])
    write_column(ws, "A2", [f"image {n}" for n in range(1, len(IS_CAT) + 1)])
    write_column(ws, "B2", IS_CAT)
    write_column(ws, "D2", P_CAT)
    # logits whose sigmoid is P_CAT, so both halves of the sheet score the same predictions
    write_column(ws, "H2", [float(np.log(p / (1 - p))) for p in P_CAT])
    for row in ROWS:
        write_formula(ws, f"C{row}", f"=1-B{row}")
        write_formula(ws, f"E{row}", f"=1-D{row}")
        write_formula(ws, f"F{row}", f"=-(B{row}*LN(D{row})+C{row}*LN(E{row}))")
        write_formula(ws, f"G{row}", f"=IF(B{row}=1,-LN(D{row}),-LN(1-D{row}))")
        write_formula(ws, f"I{row}", f"=1/(1+EXP(-H{row}))")
        write_formula(
            ws, f"J{row}", f"=MAX(H{row},0)-H{row}*B{row}+LN(1+EXP(-ABS(H{row})))"
        )
    ws["A7"] = "mean"
    for col in "FGJ":
        write_formula(ws, f"{col}7", f"=AVERAGE({col}2:{col}6)")


def reference_binary_cross_entropy(wb):
    """Expected values of ``binary_cross_entropy``, from targets, probabilities and logits."""
    ws = wb["binary_cross_entropy"]
    targets = numbers(ws, "B2:B6")[:, 0]
    probs = numbers(ws, "D2:D6")[:, 0]
    logits = numbers(ws, "H2:H6")[:, 0]
    expected = {}

    terms = entropy.binary_cross_entropy_terms(targets, probs)
    if_terms = np.where(targets == 1, -np.log(probs), -np.log(1 - probs))
    logit_terms = entropy.bce_with_logits_terms(targets, logits)
    _fill(expected, "C", ROWS, 1 - targets)
    _fill(expected, "E", ROWS, 1 - probs)
    _fill(expected, "F", ROWS, terms)
    _fill(expected, "G", ROWS, if_terms)
    _fill(expected, "I", ROWS, entropy.sigmoid(logits))
    _fill(expected, "J", ROWS, logit_terms)
    expected["F7"] = entropy.binary_cross_entropy(targets, probs)
    expected["G7"] = float(if_terms.mean())
    expected["J7"] = entropy.bce_with_logits(targets, logits)
    return expected


TORCH_SHEETS = ("softmax", "cross_entropy", "binary_cross_entropy")

REFERENCES = {
    "softmax": reference_softmax,
    "cross_entropy": reference_cross_entropy,
    "binary_cross_entropy": reference_binary_cross_entropy,
}


def torch_reference(wb, title, dtype):
    """Expected values of the cells PyTorch can compute on sheet ``title``, in ``dtype``.

    Softmax columns come from ``F.softmax``; the cross-entropy total from ``F.cross_entropy``
    and the target's own term from ``nn.CrossEntropyLoss`` (the two are the same number);
    binary cross-entropy from ``F.binary_cross_entropy`` and ``nn.BCEWithLogitsLoss``.
    """
    from engine import torch_entropy

    expected = {}
    if title == "softmax":
        ws = wb["softmax"]
        logits = numbers(ws, "B2:B6")[:, 0]
        _fill(expected, "D", ROWS, torch_entropy.softmax(logits, dtype))
        _fill(expected, "I", ROWS, torch_entropy.softmax(logits, dtype))
        _fill(expected, "E", OVERFLOW_ROWS,
              torch_entropy.softmax(numbers(ws, "B11:B15")[:, 0], dtype))
    elif title == "cross_entropy":
        source = wb["softmax"]
        actuals = numbers(source, "E2:E6")[:, 0]
        target = int(np.argmax(actuals))
        functional, module = torch_entropy.cross_entropy(
            numbers(source, "B2:B6")[:, 0], target, dtype)
        expected["D7"] = functional
        expected[f"D{ROWS[target]}"] = module
    elif title == "binary_cross_entropy":
        ws = wb["binary_cross_entropy"]
        targets = numbers(ws, "B2:B6")[:, 0]
        rows, mean = torch_entropy.binary_cross_entropy(
            targets, numbers(ws, "D2:D6")[:, 0], dtype)
        sigmoid, logit_rows, logit_mean = torch_entropy.bce_with_logits(
            targets, numbers(ws, "H2:H6")[:, 0], dtype)
        _fill(expected, "F", ROWS, rows)
        _fill(expected, "I", ROWS, sigmoid)
        _fill(expected, "J", ROWS, logit_rows)
        expected["F7"] = expected["G7"] = mean
        expected["J7"] = logit_mean
    return expected


def build_entropy_workbook(wb):
    """Fill ``wb`` with the three sheets."""
    build_softmax(wb.create_sheet("softmax"))
    build_cross_entropy(wb.create_sheet("cross_entropy"))
    build_binary_cross_entropy(wb.create_sheet("binary_cross_entropy"))


def _fill(expected, col, rows, values):
    for row, value in zip(rows, values):
        expected[f"{col}{row}"] = float(value)
