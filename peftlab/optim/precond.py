"""Scaled (Riemannian) AdamW for LoRA factors, LoRA-One's optimizer "with pre-conditioners":
g_A <- (B^T B + lam I)^-1 g_A and g_B <- g_B (A A^T + lam I)^-1 (lam = model.prec_reg), then torch's AdamW update.
Parameters that are not LoRA factors are updated by plain AdamW.

Differences from LoRA-One's own ``AdamWr``, on purpose: both preconditioners come from the factors before the step
(theirs updates A first and preconditions B with the new A, which depends on the parameter order); the factors are
found by layer, not by pairing consecutive parameters; Adam keeps torch's bias correction (theirs has none by
default). The trainer clips gradients (train.max_grad_norm) before this preconditioning.

Only LoRA factor pairs are preconditioned. A model with other adapters (Rotational PiSSA's R_U/R_V/B_U/...,
GeoLoRA's U S V^T) is refused, never trained by plain AdamW behind the name (``check_preconditionable``)."""
from __future__ import annotations

import torch

from ..adapters import adapter_layers


class PrecondAdamW(torch.optim.AdamW):
    def __init__(self, model: torch.nn.Module, params, prec_reg: float = 1e-6, **adamw_kwargs):
        super().__init__(params, **adamw_kwargs)
        self.prec_reg = float(prec_reg)
        check_preconditionable(model)
        self.pairs = [(l.lora_A, l.lora_B) for l in adapter_layers(model).values()
                      if hasattr(l, "lora_A") and hasattr(l, "lora_B")]

    @torch.no_grad()
    def precondition_(self) -> None:
        """Both preconditioners from the factors before either gradient is changed, in fp32."""
        for A, B in self.pairs:
            if A.grad is None or B.grad is None:
                continue
            a, b = A.float(), B.float()
            eye = torch.eye(a.shape[0], device=a.device)
            gA = torch.linalg.solve(b.T @ b + self.prec_reg * eye, A.grad.float())
            gB = torch.linalg.solve(a @ a.T + self.prec_reg * eye, B.grad.float().T).T  # (A A^T + lam I) symmetric
            A.grad.copy_(gA)
            B.grad.copy_(gB)

    def step(self, closure=None):
        self.precondition_()
        return super().step(closure)


def check_preconditionable(model: torch.nn.Module, method: str | None = None) -> None:
    """Refuse train.optimizer=precond_adamw where it would not precondition: a method with its own optimizer, or
    adapter layers without LoRA factors (lora_A, lora_B)."""
    if method is not None:
        raise ValueError(f"train.optimizer=precond_adamw cannot be combined with method={method}, which brings its own "
                         f"optimizer; allowed with precond_adamw: lora, gplora (train.optimizer=adamw for the rest)")
    other = sorted({type(l).__name__ for l in adapter_layers(model).values()
                    if not (hasattr(l, "lora_A") and hasattr(l, "lora_B"))})
    if other:
        raise ValueError(f"train.optimizer=precond_adamw preconditions LoRA factors (lora_A, lora_B); {other} layers "
                         f"have none (their rotations or bases would get plain AdamW): use train.optimizer=adamw, or "
                         f"method=lora / gplora")
