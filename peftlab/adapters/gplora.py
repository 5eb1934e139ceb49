"""GP-LoRA: plain LoRA layers whose factors are re-balanced, (A, B) -> (R A, B R^-1) with A A^T = mu B^T B, after
optimizer steps (the math, the guard at B = 0 and the optimizer moments: peftlab.optim.gauge)."""
from __future__ import annotations

from dataclasses import dataclass

from ..optim.gauge import MOMENTS
from ..schema import fail, option
from . import register_method
from .base import MethodOptions, MethodSpec
from .lora import make_lora_layer


@dataclass
class GPLoRAOptions(MethodOptions):
    """conf/method/gplora.yaml documents each option."""
    name: str = "gplora"
    mu: float | str = "auto"
    eps: float = option(1e-4, ge=0)
    eig_floor: float = option(1e-12, ge=0, lt=1)
    every: int = option(1, ge=1)
    warmup_steps: int = option(0, ge=0)
    guard: float = option(0.01, ge=0, le=1)
    moments: str = option("reset", choices=MOMENTS)

    def check(self, prefix: str) -> None:
        if self.mu != "auto" and (isinstance(self.mu, str) or self.mu <= 0):
            fail(f"{prefix}.mu", self.mu, "must be 'auto' (r / m) or a number > 0")


class GPLoRA(MethodSpec):
    def after_step(self, model, optimizer, step: int, o: GPLoRAOptions) -> dict[str, float]:
        from ..optim.gauge import gauge_project_model

        if step <= o.warmup_steps or step % o.every:
            return {}
        return gauge_project_model(model, mu=o.mu, eps=o.eps, eig_floor=o.eig_floor, guard=o.guard,
                                   optimizer=optimizer, moments=o.moments)


register_method(GPLoRA(name="gplora", make_layer=make_lora_layer, options=GPLoRAOptions))
