"""Softmax, cross-entropy and binary cross-entropy, written out as the lecture's sheets are.

All functions take and return float64 numpy arrays and use the natural log, as every machine
learning library does (the lecture's original sheet used Excel's base-10 ``LOG``).
"""

import numpy as np


def softmax(logits):
    """``exp(x) / sum(exp(x))`` exactly as the sheet computes it; overflows past x ~ 709."""
    exps = np.exp(np.asarray(logits, dtype=np.float64))
    return exps / exps.sum()


def stable_softmax(logits):
    """Softmax of ``x - max(x)``: the same values, finite for any finite logits."""
    logits = np.asarray(logits, dtype=np.float64)
    exps = np.exp(logits - logits.max())
    return exps / exps.sum()


def cross_entropy_terms(probs, actuals):
    """Per-class ``-actual * ln(p)``; a zero actual contributes zero even where p is tiny."""
    probs = np.asarray(probs, dtype=np.float64)
    actuals = np.asarray(actuals, dtype=np.float64)
    return -actuals * np.log(probs)


def cross_entropy(probs, actuals):
    """Cross-entropy of one example: the sum of :func:`cross_entropy_terms`."""
    return float(cross_entropy_terms(probs, actuals).sum())


def binary_cross_entropy_terms(targets, probs):
    """Per-row ``-(y ln p + (1 - y) ln(1 - p))`` for targets y in {0, 1}."""
    targets = np.asarray(targets, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    return -(targets * np.log(probs) + (1 - targets) * np.log(1 - probs))


def binary_cross_entropy(targets, probs):
    """Mean binary cross-entropy, the reduction ``F.binary_cross_entropy`` uses by default."""
    return float(binary_cross_entropy_terms(targets, probs).mean())


def sigmoid(logits):
    """``1 / (1 + exp(-x))``."""
    return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))


def bce_with_logits_terms(targets, logits):
    """Per-row binary cross-entropy from logits, ``max(x, 0) - x y + ln(1 + exp(-|x|))``.

    This form never takes the log of a rounded probability, so it stays finite for large |x|.
    """
    targets = np.asarray(targets, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))


def bce_with_logits(targets, logits):
    """Mean of :func:`bce_with_logits_terms`, as ``nn.BCEWithLogitsLoss`` reports it."""
    return float(bce_with_logits_terms(targets, logits).mean())
