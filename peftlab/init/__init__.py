"""Inits: functions over the adapted model. ``INITS`` maps a name to an ``InitSpec``; data-aware inits get the
calibration data through ``InitContext``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..adapters import AdapterLayer
from ..registry import Registry
from ..schema import fail


@dataclass
class InitContext:
    """What an init may use: the model (unwrapped, on its device), its adapter layers, the full run config, the
    training examples and the accelerator (for sharded gradient estimation)."""

    model: nn.Module
    layers: dict[str, AdapterLayer]
    cfg: Any
    train_examples: list = field(default_factory=list)
    pad_id: int = 0
    accelerator: Any = None
    run_dir: Any = None
    aligner: Any = None  # a teacher: gradient inits then use the dual objective's gradient


@dataclass
class InitOptions:
    """An init's options (``init.*``): subclass with typed fields (``peftlab.schema.option``); conf/init/<name>.yaml
    holds the same defaults, with comments."""

    name: str = "default"


@dataclass
class LoRAFactorInitOptions(InitOptions):
    """An init that sets (lora_A, lora_B): it applies to methods whose layers hold them."""

    def check_run(self, run) -> None:
        from ..adapters import get_method

        if not get_method(run.method.name).lora_factors:
            fail("init.name", self.name, f"sets LoRA factors (lora_A, lora_B), which method {run.method.name!r} "
                 f"does not have; use init=default with it", "+init=default")


@dataclass
class GaussianOptions(LoRAFactorInitOptions):
    name: str = "gaussian"


@dataclass
class InitSpec:
    name: str
    run: Callable[[InitContext], dict]
    options: type = InitOptions


INITS: Registry = Registry("init", __name__)
register_init = INITS.register
get_init = INITS.lookup


def lora_factor_layers(ctx: InitContext, init_name: str) -> dict[str, AdapterLayer]:
    """Layers with (lora_A, lora_B) factors; other methods have their own parametrisation and fail clearly."""
    bad = [n for n, l in ctx.layers.items() if not (hasattr(l, "lora_A") and hasattr(l, "lora_B"))]
    if bad:
        raise ValueError(f"init {init_name!r} sets LoRA factors (lora_A, lora_B); method "
                         f"{ctx.cfg.method.name!r} has none (layer {bad[0]}); use init=default with it")
    return ctx.layers


def _default(ctx: InitContext) -> dict:
    """Each method's own init, done when its layers were made (LoRA: A kaiming-uniform, B = 0, as PEFT)."""
    return {}


@torch.no_grad()
def _gaussian(ctx: InitContext) -> dict:
    """PEFT's "gaussian": A ~ N(0, 1/r), B = 0."""
    for layer in lora_factor_layers(ctx, "gaussian").values():
        nn.init.normal_(layer.lora_A, std=1 / layer.lora_A.shape[0])
        nn.init.zeros_(layer.lora_B)
    return {}


register_init(InitSpec("default", _default))
register_init(InitSpec("gaussian", _gaussian, GaussianOptions))
