"""Target selection: named target sets per model family, pattern matching, and what ``all`` cannot cover.

``qv``/``qkvo`` name the attention projections of each family, as HF PEFT's per-model-type defaults do
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``; our ``qv`` agrees with it wherever
PEFT has an entry, tested). Families with a fused q/k/v projection (GPT-2 ``c_attn``, GPT-NeoX and Falcon
``query_key_value``, Phi-3 ``qkv_proj``) can only target the fused layer: there ``qv`` adapts k as well.
``all`` is every Linear/Conv1D but the output head; routed experts stored as 3-D parameters (Mixtral, Qwen2-MoE in
transformers 5) are no Linear, so ``all`` refuses such a model rather than silently leaving the experts frozen.
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment]

ADAPTABLE = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
EXCLUDED_FROM_ALL = ("lm_head", "embed_out", "output_layer", "score", "classifier")

_LLAMA_LIKE = {"qv": ["q_proj", "v_proj"], "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# Names are suffixes of module names (PEFT's list rule). The o projection is named with its parent where a bare
# name would also hit an MLP layer (GPT-2's mlp.c_proj, NeoX's mlp.dense_*: "dense" alone is safe there).
TARGET_SETS: dict[str, dict[str, list[str]]] = {
    "default": _LLAMA_LIKE,  # llama, mistral, qwen2, qwen3, gemma, gemma2, mixtral, qwen2_moe, ...
    "gpt2": {"qv": ["c_attn"], "qkvo": ["c_attn", "attn.c_proj"]},
    "gpt_neox": {"qv": ["query_key_value"], "qkvo": ["query_key_value", "attention.dense"]},
    "falcon": {"qv": ["query_key_value"], "qkvo": ["query_key_value", "self_attention.dense"]},
    "phi3": {"qv": ["qkv_proj"], "qkvo": ["qkv_proj", "o_proj"]},
    "opt": {"qv": ["q_proj", "v_proj"], "qkvo": ["q_proj", "k_proj", "v_proj", "out_proj"]},
}
FUSED_QKV = {"gpt2": "c_attn", "gpt_neox": "query_key_value", "falcon": "query_key_value", "phi3": "qkv_proj"}


def resolve_target_patterns(target_set: str | None, patterns: Any, model_type: str | None) -> Any:
    """Turn a named target set into module-name patterns; explicit patterns win."""
    if patterns is not None and patterns != [] and patterns != "":
        return patterns
    if target_set is None:
        raise ValueError("peft needs lora_target_modules or a target_set (qv, qkvo, all)")
    if target_set == "all":
        return "all"
    table = TARGET_SETS.get(model_type or "default", TARGET_SETS["default"])
    if target_set not in table:
        raise ValueError(f"unknown peft.target_set {target_set!r}; allowed: {sorted(table) + ['all']}")
    return table[target_set]


REGEX_CHARS = set("*+?[](){}|^$\\")


def name_matches(name: str, patterns: Any) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches exact names or name suffixes.
    A list entry with regex characters (the LoRA seed's ``['.*q_proj', '.*v_proj']``) is also tried as a full match."""
    if isinstance(patterns, str) and patterns == "all":
        return not any(name == e or name.endswith("." + e) for e in EXCLUDED_FROM_ALL)
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) or (REGEX_CHARS & set(p) and re.fullmatch(p, name))
               for p in map(str, patterns))


def find_targets(model: nn.Module, patterns: Any, what: str | None = None) -> list[str]:
    """Names of the adaptable modules that the patterns select; a pattern that selects nothing is an error.
    ``what`` names the selection in errors (e.g. "peft.target_set=qkvo on gpt_neox")."""
    what = what or f"target patterns {patterns!r}"
    candidates = [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE)]
    if not isinstance(patterns, str):  # any sequence (a ListConfig too) is a list: every entry must match
        patterns = [str(p) for p in patterns]
    chosen = [n for n in candidates if name_matches(n, patterns)]
    if isinstance(patterns, list):
        missing = [p for p in patterns if not any(name_matches(n, [p]) for n in candidates)]
    else:
        missing = [] if chosen else [patterns]
    if missing:
        leaves = sorted({n.split(".")[-1] for n in candidates})
        raise ValueError(
            f"{what}: pattern(s) {missing} match no Linear/Conv1D module; module names that could match: {leaves} "
            f"(e.g. {candidates[:3]})"
        )
    if patterns == "all":
        refuse_uncovered_experts(model, what)
    return chosen


def refuse_uncovered_experts(model: nn.Module, what: str) -> None:
    """``all`` promises every projection; routed experts held as 3-D parameters are none, so say so."""
    experts = [n for n, p in model.named_parameters() if p.dim() == 3]
    if experts:
        leaves = sorted({n.split(".")[-1] for n, m in model.named_modules()
                         if isinstance(m, ADAPTABLE) and name_matches(n, "all")})
        raise ValueError(
            f"{what}: this model keeps routed experts as 3-D parameters ({experts[:2]}{' ...' if len(experts) > 2 else ''}"
            f", {len(experts)} in all), which peftlab's adapters (Linear/Conv1D only) cannot adapt, so `all` would "
            f"silently leave them frozen. Use +peft=qkvo, or name the layers to adapt with "
            f"peft.lora_target_modules={leaves} (the experts then stay frozen by your choice)")


def untie_target(model: nn.Module, name: str) -> bool:
    """Give the module ``name`` its own weight if it shares it with another module (a tied lm_head and input
    embedding: GPT-2, Gemma, OPT, Falcon), and mark the config untied so that save_pretrained writes both and
    from_pretrained does not tie them again. Without this, an init that moves the base weight (PiSSA, LoRA-GA) or
    a merge writes the head's change into the embedding too. Returns whether it untied."""
    module = model.get_submodule(name)
    weight = getattr(module, "weight", None)
    if weight is None:
        return False
    shared = [n for n, m in model.named_modules() if m is not module and getattr(m, "weight", None) is weight]
    if not shared:
        return False
    module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    for cfg in _configs(model):
        cfg.tie_word_embeddings = False
    return True


def _configs(model: nn.Module):
    # transformers 5 reads tie_word_embeddings from the top config and, for some families, from the text config
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return [cfg] if text is cfg else [cfg, text]
