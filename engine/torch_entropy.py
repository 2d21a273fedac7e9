"""The entropy sheets' numbers computed by PyTorch itself: a second route besides numpy.

Each function takes plain sequences and a torch dtype and returns float64 numpy arrays, so a
float32 result can be compared with a spreadsheet at float32's precision.
"""

import numpy as np
import torch
import torch.nn.functional as F


def _tensor(values, dtype):
    return torch.as_tensor(np.asarray(values, dtype=np.float64)).to(dtype)


def _numpy(tensor):
    return tensor.detach().to(torch.float64).cpu().numpy()


def softmax(logits, dtype=torch.float64):
    """``F.softmax`` over one vector of logits."""
    return _numpy(F.softmax(_tensor(logits, dtype), dim=0))


def cross_entropy(logits, target, dtype=torch.float64):
    """(``F.cross_entropy``, ``nn.CrossEntropyLoss``) of one example with class index ``target``."""
    batch = _tensor(logits, dtype)[None]
    targets = torch.tensor([int(target)])
    functional = F.cross_entropy(batch, targets)
    module = torch.nn.CrossEntropyLoss()(batch, targets)
    return float(functional), float(module)


def binary_cross_entropy(targets, probs, dtype=torch.float64):
    """(per-row, mean) ``F.binary_cross_entropy``."""
    probs, targets = _tensor(probs, dtype), _tensor(targets, dtype)
    rows = F.binary_cross_entropy(probs, targets, reduction="none")
    return _numpy(rows), float(F.binary_cross_entropy(probs, targets))


def bce_with_logits(targets, logits, dtype=torch.float64):
    """(sigmoid, per-row loss, mean ``nn.BCEWithLogitsLoss``) for one column of logits."""
    logits, targets = _tensor(logits, dtype), _tensor(targets, dtype)
    rows = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    mean = torch.nn.BCEWithLogitsLoss()(logits, targets)
    return _numpy(torch.sigmoid(logits)), _numpy(rows), float(mean)
