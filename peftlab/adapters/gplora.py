"""GP-LoRA: plain LoRA layers whose factors are re-balanced, (A, B) -> (R A, B R^-1) with A A^T = mu B^T B, after
optimizer steps (the math, the guard at B = 0 and the optimizer moments: peftlab.optim.gauge).

The seed's loralib API lives here too: ``import peftlab.adapters.gplora as lora`` gives ``lora.Linear``,
``GaugeProjectedOptimizer`` and ``gauge_project_model`` (README, "Coming from ...")."""
from __future__ import annotations

from torch import nn

from .base import MethodSpec
from .lora import LoRALinear, make_lora_layer
from . import register_method
from ..optim.gauge import GaugeProjectedOptimizer, gauge_project_, gauge_project_model

# conf/method/gplora.yaml holds the defaults; these are for a method_cfg that leaves a key out (or None).
# The seed's, but for the guard (a departure: README, "Departures from the seeds and references").
DEFAULTS = {"mu": "auto", "eps": 1e-4, "eig_floor": 1e-12, "every": 1, "warmup_steps": 0, "guard": 0.01,
            "moments": "keep"}


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


def options(method_cfg) -> dict:
    from ..optim.gauge import check_options

    opts = {k: (method_cfg.get(k, v) if method_cfg is not None else v) for k, v in DEFAULTS.items()}
    check_options(**opts)
    return opts


def make_gplora_layer(base, peft_cfg, method_cfg=None):
    options(method_cfg)  # bad options fail when the model is built, not at the first projection
    return make_lora_layer(base, peft_cfg, method_cfg)


class GPLoRA(MethodSpec):
    def after_step(self, model, optimizer, step: int, method_cfg) -> dict[str, float]:
        o = options(method_cfg)
        if step <= int(o["warmup_steps"]) or step % int(o["every"]):
            return {}
        return gauge_project_model(model, mu=o["mu"], eps=float(o["eps"]), eig_floor=float(o["eig_floor"]),
                                   guard=float(o["guard"]), optimizer=optimizer, moments=o["moments"])


register_method(GPLoRA(name="gplora", make_layer=make_gplora_layer))

# the seed's loralib names (``import peftlab.adapters.gplora as lora``)
__all__ = ["Linear", "GaugeProjectedOptimizer", "gauge_project_model", "DEFAULTS", "GPLoRA"]
