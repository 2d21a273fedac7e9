"""Gradient accumulation written out: k micro-batches that add up to the gradient of one batch.

The mean loss over a batch of B samples split into micro-batches of n_1 + ... + n_k = B
samples is

    L = sum_i (n_i / B) * L_i,        L_i = mean loss over micro-batch i

so calling ``backward()`` on each ``(n_i / B) * L_i`` in turn, without zeroing ``.grad`` in
between, leaves the batch's gradient in ``.grad`` (up to the order of floating-point sums),
and one optimiser step then moves the weights exactly as a step on the whole batch would. This
holds only while every sample's loss depends on that sample alone: batch norm breaks it, since
each micro-batch is normalised with its own mean and variance.

fastai's ``GradientAccumulation(n_acc)`` applies the same weight (it scales each micro-batch's
loss by ``bs / n_acc``) and skips the optimiser step until ``n_acc`` samples have been seen.
"""

import torch

from engine.errors import InputError

SAMPLES_PER_STEP = 64  # the lesson's batch: bs = 64 // accum and one optimiser step per 64


def micro_batch_size(accum, samples_per_step=SAMPLES_PER_STEP):
    """Samples per forward pass when ``accum`` micro-batches make one step of ``samples_per_step``.

    Raises
    ------
    InputError
        When ``accum`` is not a whole divisor of ``samples_per_step``: the last micro-batch
        would then be short and a step would see a different number of samples than asked.
    """
    divisors = [n for n in range(1, samples_per_step + 1) if samples_per_step % n == 0]
    if accum not in divisors:
        raise InputError(
            f"--accum {accum} does not divide the {samples_per_step} samples of one step; "
            f"use one of {', '.join(map(str, divisors))}"
        )
    return samples_per_step // accum


def accumulate_gradients(model, loss_func, x, y, n_micro):
    """Add the gradient of the mean loss over the batch ``(x, y)`` into each ``.grad``.

    Parameters
    ----------
    model : torch.nn.Module
    loss_func : callable
        ``loss_func(model(xb), yb)`` -> the mean loss over the micro-batch (a 0-d tensor).
    x : torch.Tensor, shape (B, ...)
    y : torch.Tensor, shape (B, ...)
    n_micro : int
        How many micro-batches to cut the batch into (``torch.chunk``: sizes differ by at
        most one when ``n_micro`` does not divide B).

    Returns
    -------
    float
        The batch's mean loss, put together from the micro-batches' weighted losses.

    ``.grad`` is added to, not replaced, as ``backward()`` does: zero it first for the gradient
    of this batch alone.
    """
    batch_size = len(x)
    total_loss = 0.0

    for x_micro, y_micro in zip(x.chunk(n_micro), y.chunk(n_micro)):
        # weight n_i / B turns the micro-batch's mean into its share of the batch's mean
        loss = loss_func(model(x_micro), y_micro) * (len(x_micro) / batch_size)
        loss.backward()
        total_loss += loss.item()  # a device sync per micro-batch: fine for a reference
    return total_loss


def accumulated_step(model, loss_func, optimizer, x, y, n_micro):
    """One optimiser step on the batch ``(x, y)`` from ``n_micro`` accumulated micro-batches.

    Returns the batch's mean loss before the step. ``.grad`` is zeroed before and after, so
    the step depends on this batch only, as a step of a training loop would.
    """
    optimizer.zero_grad()
    loss = accumulate_gradients(model, loss_func, x, y, n_micro)
    optimizer.step()
    optimizer.zero_grad()
    return loss


def gradients(model):
    """Copies of every parameter's ``.grad`` (zeros for a parameter without one), in order."""
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for p in model.parameters()
    ]
