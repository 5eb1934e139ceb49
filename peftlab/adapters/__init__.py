"""Methods: one file each. ``METHODS`` maps a method name to its ``MethodSpec``; other methods register here."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import Registry
from .base import (AdapterLayer, MethodOptions, MethodSpec, adapter_layers, base_weight_out_in, find_targets,
                   resolve_target_patterns, set_module, untie_target, unwrap)
from .lora import LORA, LoRALinear, lora_scaling

METHODS: Registry = Registry("method", __name__)
register_method = METHODS.register
get_method = METHODS.lookup
register_method(LORA)


def apply_adapters(model: nn.Module, peft_cfg: Any, method_cfg: Any = None, method: str = "lora",
                   model_type: str | None = None) -> dict[str, AdapterLayer]:
    """The one generic entry: replace every target module with the method's layer; freeze everything else."""
    spec = get_method(method)
    method_cfg = spec.parse(method_cfg)
    model_type = model_type or getattr(getattr(model, "config", None), "model_type", None)
    patterns = resolve_target_patterns(peft_cfg.get("target_set"), peft_cfg.get("lora_target_modules"), model_type)
    explicit = peft_cfg.get("lora_target_modules") not in (None, [], "")
    what = (f"peft.lora_target_modules={patterns!r}" if explicit
            else f"peft.target_set={peft_cfg.get('target_set')} on {model_type or 'this model'}")
    names = find_targets(model, patterns, what)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in names:
        untie_target(model, name)  # a tied head: its own weight, so neither an init nor a merge moves the embedding
        base = model.get_submodule(name)
        try:
            layer = spec.make_layer(base, peft_cfg, method_cfg)
        except (ValueError, TypeError) as e:  # name the layer and the selection (e.g. a 1 x 64 gate inside all)
            out_f, in_f = base_weight_out_in(base).shape
            raise ValueError(f"{method} cannot adapt layer {name} ({out_f} x {in_f}) selected by {what}: {e}. "
                             f"Leave it out with peft.lora_target_modules (a list or regex)") from e
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

__all__ = ["AdapterLayer", "MethodSpec", "METHODS", "LoRALinear", "apply_adapters", "apply_lora", "merge_adapters",
           "merge_lora", "get_adapter_parameters", "get_lora_parameters", "adapter_layers", "register_method",
           "get_method", "lora_scaling", "unwrap"]
