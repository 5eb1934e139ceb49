"""GP-LoRA: plain LoRA layers whose factors are re-balanced, (A, B) -> (R A, B R^-1) with A A^T = mu B^T B, after
optimizer steps (the math, the guard at B = 0 and the optimizer moments: peftlab.optim.gauge).

The seed's loralib API lives here too: ``import peftlab.adapters.gplora as lora`` gives ``lora.Linear``,
``GaugeProjectedOptimizer`` and ``gauge_project_model`` (README, "Coming from ...")."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..optim.gauge import MOMENTS, GaugeProjectedOptimizer, gauge_project_, gauge_project_model
from ..schema import defaults_of, fail, option
from . import register_method
from .base import MethodOptions, MethodSpec
from .lora import LoRALinear, make_lora_layer


@dataclass
class GPLoRAOptions(MethodOptions):
    """conf/method/gplora.yaml documents each option. The seed's defaults, but for the guard (a departure: README,
    "Departures from the seeds and references")."""
    name: str = "gplora"
    mu: float | str = "auto"
    eps: float = option(1e-4, ge=0)
    eig_floor: float = option(1e-12, ge=0, lt=1)
    every: int = option(1, ge=1)
    warmup_steps: int = option(0, ge=0)
    guard: float = option(0.01, ge=0, le=1)
    moments: str = option("keep", choices=MOMENTS)

    def check(self, prefix: str) -> None:
        if self.mu != "auto" and (isinstance(self.mu, str) or self.mu <= 0):
            fail(f"{prefix}.mu", self.mu, "must be 'auto' (r / m) or a number > 0")


DEFAULTS = {k: v for k, v in defaults_of(GPLoRAOptions).items() if k != "name"}


class Linear(LoRALinear):
    """loralib's ``lora.Linear(in_features, out_features, r=0, lora_alpha=1, lora_dropout=0.0, fan_in_fan_out=False,
    merge_weights=True)``: a fresh frozen nn.Linear plus s B A with s = lora_alpha / r (loralib's defaults), and the
    GP-LoRA seed's ``gauge_project_()``. merge_weights (loralib merges on eval()) changes no output and is ignored."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True, **linear_kwargs):
        if int(r) < 1:
            raise ValueError(f"lora.Linear needs r >= 1 here, got r={r} (loralib's r=0 is a plain nn.Linear: use one)")
        if fan_in_fan_out:
            raise ValueError("lora.Linear(fan_in_fan_out=True) (a transposed weight) is not supported: peftlab adapts "
                             "GPT-2's Conv1D through apply_lora instead")
        super().__init__(nn.Linear(in_features, out_features, **linear_kwargs), int(r), float(lora_alpha),
                         float(lora_dropout))

    weight = property(lambda self: self.base.weight)  # loralib's Linear is an nn.Linear
    bias = property(lambda self: self.base.bias)

    def gauge_project_(self, mu="auto", eps: float = 1e-4, eig_floor: float = 1e-12, cast_fp32: bool = True):
        """The seed layer's in-place projection (unguarded, as the seed's); the math is fp32 for any cast_fp32."""
        return gauge_project_(self, mu, eps, eig_floor)


class GPLoRA(MethodSpec):
    def after_step(self, model, optimizer, step: int, o: GPLoRAOptions) -> dict[str, float]:
        o = self.parse(o)  # the trainer's typed options as they are; a mapping (tests, scripts) is checked
        if step <= o.warmup_steps or step % o.every:
            return {}
        return gauge_project_model(model, mu=o.mu, eps=o.eps, eig_floor=o.eig_floor, guard=o.guard,
                                   optimizer=optimizer, moments=o.moments)


register_method(GPLoRA(name="gplora", make_layer=make_lora_layer, options=GPLoRAOptions))

# the seed's loralib names (``import peftlab.adapters.gplora as lora``)
__all__ = ["Linear", "GaugeProjectedOptimizer", "gauge_project_model", "DEFAULTS", "GPLoRA"]
