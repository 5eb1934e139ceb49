"""Interoperability: every method's trained change saved as an HF PEFT LoRA adapter on the ORIGINAL base weights,
and the merged model through ``save_pretrained``.

Each adapter layer gives (A, B) with B @ A = W_final - W_original exactly (``AdapterLayer.to_lora``; DoRA: the
direction's change, written with its magnitude vector as a ``use_dora`` adapter). The adapter is
written so that vLLM serves it as PEFT loads it (rules read from vLLM's loader: peftlab/serving.py):
- one scaling for every layer: vLLM applies ``lora_alpha / r`` (or ``/ sqrt(r)``) from the top-level config to every
  module and, in its released versions, ignores ``rank_pattern``/``alpha_pattern``; so the per-layer factor is
  folded into B (B_stored = B_exact / s) and the config has no patterns;
- ``r`` is the largest layer rank; smaller layers are padded with zero rows of A and zero columns of B (exact);
- ``peftlab.json`` keeps each layer's true rank (``layer_ranks``) and the serving notes (``vllm``).
"""
from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import adapter_layers, merge_adapters, unwrap
from .adapters.base import Conv1D
from .utils import atomic_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFTLAB_NOTES = "peftlab.json"


def lora_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT-named tensors at one rank r and one scaling, and the config fields that make PEFT (and vLLM) apply
    exactly each layer's change: r, lora_alpha, use_rslora, and the true per-layer ranks."""
    layers = adapter_layers(model)
    exact = {name: layer.to_lora() for name, layer in layers.items()}
    r = max(A.shape[0] for A, _ in exact.values())
    # rsLoRA or not and the common scaling only decide how B is stored: pick the most common so that a plain LoRA
    # run stores its own B unchanged
    use_rslora = Counter(bool(getattr(l, "use_rslora", False)) for l in layers.values()).most_common(1)[0][0]
    scaling = Counter(float(getattr(l, "scaling", 1.0)) for l in layers.values()).most_common(1)[0][0] or 1.0
    tensors, ranks = {}, {}
    for name, (A, B) in exact.items():
        k = A.shape[0]
        ranks[name] = k
        A = torch.cat([A, A.new_zeros(r - k, A.shape[1])], 0)
        B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], 1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (B / scaling).contiguous()
        if hasattr(layers[name], "lora_magnitude_vector"):  # DoRA: PEFT's key has no ".weight"
            tensors[f"base_model.model.{name}.lora_magnitude_vector"] = \
                layers[name].lora_magnitude_vector.detach().float()
    alpha = scaling * (math.sqrt(r) if use_rslora else r)
    return tensors, {"r": int(r), "lora_alpha": float(alpha), "use_rslora": use_rslora, "layer_ranks": ranks}


def save_peft_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None,
                      extra: dict[str, Any] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that ``PeftModel.from_pretrained`` and vLLM load the
    same way, and peftlab.json (``extra``, the layer ranks, vLLM's notes). Prints what vLLM would refuse."""
    from safetensors.torch import save_file

    from .serving import vllm_problems

    root = unwrap(model)
    layers = adapter_layers(root)
    if not layers:
        raise ValueError("the model has no adapter layers to export")
    tensors, fields = lora_state(root)
    fan_in_fan_out = any(getattr(l, "fan_in_fan_out", isinstance(l.base, Conv1D)) for l in layers.values())
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(root, "generate") else None,
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(root, "config", None),
                                                                      "_name_or_path", None),
        "r": fields["r"],
        "lora_alpha": fields["lora_alpha"],
        "use_rslora": fields["use_rslora"],
        "use_dora": any(hasattr(l, "lora_magnitude_vector") for l in layers.values()),
        "target_modules": sorted(layers),
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": float(getattr(getattr(next(iter(layers.values())), "dropout", None), "p", 0.0)),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    notes = vllm_problems(cfg, shapes)
    peftlab_notes = dict(extra or {}, layer_ranks=fields["layer_ranks"], vllm=notes)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        # peftlab's own notes; PEFT warns about unknown keys in its config, so they live in their own file
        (tmp / PEFTLAB_NOTES).write_text(json.dumps(peftlab_notes, indent=2, default=str) + "\n")
    for note in notes:
        print(f"peftlab: {folder}: vLLM: {note}", flush=True)
    return folder


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


def main(argv: list[str] | None = None) -> int:
    """``python -m peftlab.export --check ADAPTER_DIR [...]``: what vLLM, PEFT and transformers would do with each
    adapter; exit status 1 when one of them would refuse it, crash or compute another change."""
    import argparse

    from .serving import VLLM_DEFAULT_MAX_LORA_RANK, check, format_report

    ap = argparse.ArgumentParser(prog="python -m peftlab.export", description=main.__doc__)
    ap.add_argument("--check", nargs="+", metavar="ADAPTER_DIR", required=True)
    ap.add_argument("--max-lora-rank", type=int, default=VLLM_DEFAULT_MAX_LORA_RANK,
                    help="the --max-lora-rank vLLM will be started with (default: vLLM's, 16)")
    args = ap.parse_args(argv)
    ok = True
    for folder in args.check:
        report = check(folder, args.max_lora_rank)
        print(format_report(folder, report))
        ok &= report["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
