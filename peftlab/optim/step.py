"""The optimizer step's order, in one place: the trainer, the method lab and the seed-style GeoLoRA trainer call it.

clip (optional) -> optimizer.step -> scheduler.step (optional) -> zero_grad -> finite check -> the method's
after-step hook (e.g. GP-LoRA's gauge projection, Rotational PiSSA's merges). A method hook always sees parameters
that the update left finite, and the optimizer state it changes is the one the next step uses.
"""
from __future__ import annotations

from typing import Any

import torch


class NonFiniteError(FloatingPointError):
    """A loss or an update that is not finite; the run stops (the last checkpoint is the last good one)."""


def params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler=None, *, max_grad_norm: float | None = None,
                   spec: Any = None, model: torch.nn.Module | None = None, options: Any = None, step: int = 0,
                   where: str = "") -> tuple[float | None, dict[str, float]]:
    """One update after the gradients are in place; returns (gradient norm before clipping or None, hook metrics).

    ``step`` is the number of the update being made (1-based), as the method hooks count."""
    params = params_of(optimizer)
    grad_norm = None
    if max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    try:
        optimizer.step()
    except torch.linalg.LinAlgError as e:  # e.g. an SVD of non-finite values inside a method's own optimizer
        raise NonFiniteError(f"the update of step {step} failed ({e}); the parameters or gradients are not finite"
                             f"{where}. Lower the learning rate or enable gradient clipping.") from None
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if params and not torch.isfinite(torch.stack(torch._foreach_norm(params))).all():  # one sync
        raise NonFiniteError(f"parameters became non-finite in the update of step {step}{where}. Lower the "
                             f"learning rate or enable gradient clipping.")
    metrics = spec.after_step(model, optimizer, step, options) if spec is not None else {}
    return grad_norm, metrics
