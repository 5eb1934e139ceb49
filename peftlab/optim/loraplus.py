"""LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A. The parameter groups are PEFT's
(`peft.optimizers.create_loraplus_optimizer`): A and every other matrix at lr; B, and every 1-D parameter (DoRA's
magnitude vector), at lr * ratio, with the weight decay except on biases and LayerNorm parameters; the groups are
PEFT's order (A, B, B without decay). PEFT's fourth group (LoRA on embeddings) cannot occur here: peftlab adapts
Linear/Conv1D layers only. Empty groups are left out.

Weight decay: PEFT gives every group `loraplus_weight_decay` (default 0), not the optimizer's; here that is
`model.weight_decay`, the run's own.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters LoRA+ does not decay (as PEFT via transformers' get_parameter_names): inside LayerNorm, or biases."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

    out = set()
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, tuple(ALL_LAYERNORM_LAYERS)) or "bias" in full:
                out.add(full)
    return out


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float) -> list[dict]:
    """PEFT's LoRA+ groups over the model's trainable parameters."""
    no_decay = _no_decay_names(model)
    a, b, b_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            (b_no_decay if name in no_decay else b).append(p)
        else:
            a.append(p)
    if not any("lora_B" in n for n, p in model.named_parameters() if p.requires_grad):
        raise ValueError("train.loraplus_lr_ratio applies to methods with LoRA factors (lora_A, lora_B); this model "
                         "has no trainable lora_B (methods with factors: lora, gplora, dora); set it to null")
    groups = [{"params": a, "weight_decay": weight_decay, "lr": lr},
              {"params": b, "weight_decay": weight_decay, "lr": lr * ratio},
              {"params": b_no_decay, "weight_decay": 0.0, "lr": lr * ratio}]
    return [g for g in groups if g["params"]]


def loraplus_optimizer(cfg: Any, model: nn.Module, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The run's optimizer (AdamW or precond_adamw) over LoRA+ groups; `params` are the trainable ones."""
    ratio = float(cfg.train.loraplus_lr_ratio)  # checked by the schema (peftlab/config.py)
    lr, wd = float(cfg.model.lr), float(cfg.model.weight_decay)
    groups = loraplus_param_groups(model, lr, ratio, wd)
    grouped = {id(p) for g in groups for p in g["params"]}
    if grouped != {id(p) for p in params}:  # e.g. a parameter requires grad but is not a module's
        raise ValueError("LoRA+ groups do not cover the run's trainable parameters exactly")
    kwargs = dict(lr=lr, weight_decay=wd, betas=tuple(cfg.train.adam_betas), eps=cfg.train.adam_eps)
    if cfg.train.optimizer == "precond_adamw":
        from .precond import PrecondAdamW

        return PrecondAdamW(model, groups, prec_reg=cfg.model.prec_reg, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
