"""Methods: one file each. ``METHODS`` maps a method name to its ``MethodSpec``; other methods register here."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import Registry
from .base import (AdapterLayer, MethodOptions, MethodSpec, adapter_layers, base_weight_out_in, find_targets,
                   resolve_target_patterns, set_module, untie_target, unwrap)
from .lora import LORA, LoRAConfig, LoRALinear, lora_scaling

METHODS: Registry = Registry("method", __name__)
register_method = METHODS.register
get_method = METHODS.lookup
register_method(LORA)


def apply_adapters(model: nn.Module, peft_cfg: Any, method_cfg: Any = None, method: str = "lora",
                   model_type: str | None = None) -> dict[str, AdapterLayer]:
    """The one generic entry: replace every target module with the method's layer; freeze everything else."""
    spec = get_method(method)
    method_cfg = spec.parse(method_cfg)
    own = spec.apply(model, peft_cfg, method_cfg, model_type)  # a method without layers (full) does its own
    if own is not None:
        return own
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


def apply_lora(model: nn.Module, config: Any = None, **fields) -> nn.Module:
    """The LoRA seed's ``model = apply_lora(model, config=config)``: LoRA on the modules the config selects, everything
    else frozen (but the biases ``config.bias`` names); returns the model, adapted in place.

    config: a ``LoRAConfig`` (the seed's names: rank, alpha, dropout, target_modules, bias), a dict of those names, or
    a dict/DictConfig in peftlab's ``peft`` names (lora_r, lora_alpha, ...); keyword fields build a LoRAConfig."""
    from omegaconf import DictConfig, OmegaConf

    if config is None or fields:
        config = LoRAConfig(**{**(dict(config) if config is not None else {}), **fields})
    elif isinstance(config, dict) and not any(k.startswith("lora_") for k in config):
        config = LoRAConfig(**config)
    if isinstance(config, LoRAConfig):
        cfg, bias = config.peft_cfg(), config.bias
    else:
        cfg, bias = (config if isinstance(config, DictConfig) else OmegaConf.create(dict(config))), "none"
    layers = apply_adapters(model, cfg, None, "lora")
    if bias == "all":
        for name, p in model.named_parameters():
            if name.split(".")[-1] == "bias":
                p.requires_grad_(True)
    elif bias == "lora_only":
        for layer in layers.values():
            if getattr(layer.base, "bias", None) is not None:
                layer.base.bias.requires_grad_(True)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base modules back (in place)."""
    root = unwrap(model)
    for name, layer in adapter_layers(root).items():
        layer.merge()
        set_module(root, name, layer.base)
    return root


merge_lora = merge_adapters


class ParameterList(list):
    """A list of parameters whose ``in`` compares by identity: the seed's ``[p for p in model.parameters() if p not in
    lora_params]`` would otherwise compare tensors elementwise and raise."""

    def __contains__(self, item) -> bool:
        return any(item is p for p in self)


def get_adapter_parameters(model: nn.Module) -> ParameterList:
    """The trainable adapter parameters (not a base bias that LoRAConfig.bias made trainable)."""
    return ParameterList(p for layer in adapter_layers(model).values() for n, p in layer.named_parameters()
                         if p.requires_grad and not n.startswith("base."))


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


__all__ = ["AdapterLayer", "MethodOptions", "MethodSpec", "METHODS", "LoRAConfig", "LoRALinear", "ParameterList",
           "apply_adapters", "apply_lora", "merge_adapters", "merge_lora", "get_adapter_parameters",
           "get_lora_parameters", "adapter_layers", "register_method", "get_method", "lora_scaling", "unwrap",
           "trainable_state", "load_trainable_state"]
