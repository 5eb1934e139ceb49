"""Interoperability: every method's trained change saved as an HF PEFT LoRA adapter on the ORIGINAL base weights,
and the merged model through ``save_pretrained``.

Each adapter layer gives (A, B) with B @ A = W_final - W_original exactly (``AdapterLayer.to_lora``; DoRA: the
direction's change, written with its magnitude vector as a ``use_dora`` adapter). PEFT computes
scaling * B @ A, so per layer we store A and B / scaling with a rank and an alpha (``rank_pattern``/``alpha_pattern``
where a layer differs from the most common values) chosen so that PEFT's scaling is the layer's own.
"""
from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import AdapterLayer, adapter_layers, merge_adapters, unwrap
from .adapters.base import Conv1D
from .utils import atomic_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _layer_rank_alpha(layer: AdapterLayer, rank: int) -> tuple[float, bool]:
    """(alpha, use_rslora) such that PEFT's scaling for this exported rank equals the layer's own scaling."""
    use_rslora = bool(getattr(layer, "use_rslora", False))
    scaling = float(getattr(layer, "scaling", 1.0))
    alpha = scaling * (rank ** 0.5 if use_rslora else rank)
    return alpha, use_rslora


def lora_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]], bool]:
    """PEFT-named tensors, each layer's (rank, alpha) and whether rsLoRA scaling applies."""
    tensors, ranks = {}, {}
    rslora_flags = set()
    for name, layer in adapter_layers(model).items():
        A, B = layer.to_lora()
        r = A.shape[0]
        alpha, rs = _layer_rank_alpha(layer, r)
        scaling = float(getattr(layer, "scaling", 1.0))
        rslora_flags.add(rs)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (B / scaling).contiguous()
        if hasattr(layer, "lora_magnitude_vector"):  # DoRA: PEFT's key has no ".weight"
            tensors[f"base_model.model.{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach().float()
        ranks[name] = (r, alpha)
    if len(rslora_flags) > 1:
        raise ValueError("cannot export a model that mixes rsLoRA and plain LoRA scaling in one adapter")
    return tensors, ranks, bool(rslora_flags and rslora_flags.pop())


def save_peft_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None,
                      extra: dict[str, Any] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that ``PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    root = unwrap(model)
    tensors, ranks, use_rslora = lora_state(root)
    if not tensors:
        raise ValueError("the model has no adapter layers to export")
    r, alpha = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {_re_escape(n): rr for n, (rr, _) in ranks.items() if rr != r}
    alpha_pattern = {_re_escape(n): aa for n, (_, aa) in ranks.items() if aa != alpha}
    layers = adapter_layers(root)
    fan_in_fan_out = any(getattr(l, "fan_in_fan_out", isinstance(l.base, Conv1D)) for l in layers.values())
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(root, "generate") else None,
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(root, "config", None),
                                                                      "_name_or_path", None),
        "r": int(r),
        "lora_alpha": float(alpha),
        "use_rslora": use_rslora,
        "use_dora": any(hasattr(l, "lora_magnitude_vector") for l in layers.values()),
        "target_modules": sorted(layers),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": float(getattr(getattr(next(iter(layers.values())), "dropout", None), "p", 0.0)),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        if extra:  # peftlab's own notes (method, init); PEFT warns about unknown keys in its config
            (tmp / "peftlab.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
    return folder


def _re_escape(name: str) -> str:
    # PEFT matches pattern keys as regexes against module names; dots in names must be literal.
    return name.replace(".", r"\.")


def save_merged(model: nn.Module, tokenizer: Any, folder: str | Path, in_place: bool = False) -> Path:
    """Save the merged model (every adapter folded into its base weight) and tokenizer, loadable by AutoModel.
    ``in_place``: merge ``model`` itself (a throwaway copy) instead of a deep copy of it."""
    merged = merge_adapters(unwrap(model) if in_place else copy.deepcopy(unwrap(model)))
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder
