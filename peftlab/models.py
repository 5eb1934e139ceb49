"""Loading a causal LM and its tokenizer: a hub name, a local folder, or the embedded tiny default."""
from __future__ import annotations

from typing import Any

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_model_path(name: str) -> str:
    """``embedded:tiny-llama`` is peftlab's own model (built and cached on first use); anything else goes to HF."""
    if name.startswith("embedded:"):
        from .data.embedded import ensure_model

        if name != "embedded:tiny-llama":
            raise ValueError(f"unknown embedded model {name!r}; allowed: ['embedded:tiny-llama']")
        return str(ensure_model())
    return name


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # Llama/Mistral/GPT-2 ship without one; padding is masked out of the loss anyway
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(model_cfg: Any, device: torch.device | str | None = None):
    """(model, tokenizer, resolved path) from model.name (hub name, local path or embedded:...)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(str(model_cfg.name))
    kwargs = dict(dtype=torch_dtype(model_cfg.get("dtype", "float32")),
                  trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
    if model_cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None:
        model.to(device)
    return model, load_tokenizer(path, kwargs["trust_remote_code"]), path
