"""Methods: one file each. ``METHODS`` maps a method name to its ``MethodSpec``; other methods register here."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import Registry
from .base import (AdapterLayer, MethodSpec, adapter_layers, find_targets, resolve_target_patterns, set_module,
                   unwrap)
from .lora import LORA, LoRALinear, lora_scaling

METHODS: Registry = Registry("method", __name__, ("gplora", "geolora", "rotational_pissa", "dora", "full"))
register_method = METHODS.register
get_method = METHODS.lookup
register_method(LORA)


def apply_adapters(model: nn.Module, peft_cfg: Any, method_cfg: Any = None, method: str = "lora",
                   model_type: str | None = None) -> dict[str, AdapterLayer]:
    """The one generic entry: replace every target module with the method's layer; freeze everything else."""
    spec = get_method(method)
    own = spec.apply(model, peft_cfg, method_cfg, model_type)
    if own is not None:
        return own
    patterns = resolve_target_patterns(peft_cfg.get("target_set"), peft_cfg.get("lora_target_modules"),
                                       model_type or getattr(getattr(model, "config", None), "model_type", None))
    names = find_targets(model, patterns)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in names:
        layer = spec.make_layer(model.get_submodule(name), peft_cfg, method_cfg)
        set_module(model, name, layer)
        layers[name] = layer
    return layers


def apply_lora(model: nn.Module, config: Any) -> dict[str, LoRALinear]:
    """The seed's API: LoRA on the modules the config selects (a dict or DictConfig with PEFT's field names)."""
    from omegaconf import DictConfig, OmegaConf

    cfg = config if isinstance(config, DictConfig) else OmegaConf.create(dict(config))
    return apply_adapters(model, cfg, None, "lora")


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base modules back (in place)."""
    root = unwrap(model)
    for name, layer in adapter_layers(root).items():
        layer.merge()
        set_module(root, name, layer.base)
    return root


merge_lora = merge_adapters


def get_adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in adapter_layers(model).values() for p in layer.parameters() if p.requires_grad]


get_lora_parameters = get_adapter_parameters


def trainable_state(model: nn.Module) -> dict:
    """What a checkpoint holds: each adapter layer's state by name; with method=full, the whole state_dict."""
    from .full import full_state, is_full

    if is_full(model):
        return full_state(model)
    return {n: l.adapter_state() for n, l in adapter_layers(model).items()}


def load_trainable_state(model: nn.Module, states: dict, source: str) -> bool:
    """Load a method=full checkpoint state into the model and return True; False for adapter states."""
    from .full import STATE_KEY, is_full, load_full_state

    if STATE_KEY not in states and not is_full(model):
        return False
    load_full_state(model, states, source)
    return True


__all__ = ["AdapterLayer", "MethodSpec", "METHODS", "LoRALinear", "apply_adapters", "apply_lora", "merge_adapters",
           "merge_lora", "get_adapter_parameters", "get_lora_parameters", "adapter_layers", "register_method",
           "get_method", "lora_scaling", "unwrap", "trainable_state", "load_trainable_state"]
