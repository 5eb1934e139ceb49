"""GP-LoRA: plain LoRA layers whose factors are re-balanced, (A, B) -> (R A, B R^-1) with A A^T = mu B^T B, after
optimizer steps (the math, the guard at B = 0 and the optimizer moments: peftlab.optim.gauge)."""
from __future__ import annotations

from .base import MethodSpec
from .lora import make_lora_layer
from . import register_method

# conf/method/gplora.yaml holds the defaults; these are for a method_cfg that leaves a key out (or None)
DEFAULTS = {"mu": "auto", "eps": 1e-4, "eig_floor": 1e-12, "every": 1, "warmup_steps": 0, "guard": 0.01,
            "moments": "reset"}


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
        from ..optim.gauge import gauge_project_model

        o = options(method_cfg)
        if step <= int(o["warmup_steps"]) or step % int(o["every"]):
            return {}
        return gauge_project_model(model, mu=o["mu"], eps=float(o["eps"]), eig_floor=float(o["eig_floor"]),
                                   guard=float(o["guard"]), optimizer=optimizer, moments=o["moments"])


register_method(GPLoRA(name="gplora", make_layer=make_gplora_layer))
