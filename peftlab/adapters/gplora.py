"""GP-LoRA: plain LoRA layers whose factors are re-balanced after optimizer steps (peftlab.optim.gauge)."""
from __future__ import annotations

from .base import MethodSpec
from .lora import make_lora_layer
from . import register_method


class GPLoRA(MethodSpec):
    def after_step(self, model, optimizer, step: int, cfg) -> dict[str, float]:
        from ..optim.gauge import gauge_project_model

        if step <= int(cfg.warmup_steps) or step % int(cfg.every):
            return {}
        return gauge_project_model(model, mu=cfg.mu, eps=float(cfg.eps), eig_floor=float(cfg.eig_floor),
                                   guard=float(cfg.guard), optimizer=optimizer, moments=cfg.moments)


register_method(GPLoRA(name="gplora", make_layer=make_lora_layer))
