"""What vLLM, PEFT and transformers do with a LoRA adapter folder, from its config and tensor shapes (no GPU, no vLLM).

vLLM's rules, as read from its loader (vllm-project/vllm):
- ``vllm/lora/peft_helper.py`` ``PEFTHelper.__post_init__``: one scaling ``vllm_lora_scaling_factor = lora_alpha / r``
  (rsLoRA: ``/ sqrt(r)``) from the top-level r and alpha; ``lora_weights.py`` ``LoRALayerWeights.from_config`` gives
  every module that scaling and ``optimize()`` multiplies each lora_B by it. ``PEFTHelper.from_dict`` keeps only its
  own fields, so released versions drop ``rank_pattern``/``alpha_pattern`` (recent main reads them in
  ``get_rank_and_scaling``; an adapter without patterns is served alike by both).
- ``PEFTHelper.validate_legal``: refuses r > ``--max-lora-rank`` (``vllm/config/lora.py``: default 16, allowed
  1, 8, 16, 32, 64, 128, 256, 320, 512), bias != "none", DoRA, modules_to_save, and ``_validate_features`` inits that
  move the base (PiSSA, OLoRA, CorDA, LoftQ strings in ``init_lora_weights``).
- ``vllm/lora/layers/base_linear.py`` ``BaseLinearLayerWithLoRA.set_lora`` copies lora_A into a slot max_lora_rank
  rows high (``lora_a_stacked[0][index, 0, :lora_a.shape[0], ...].copy_``): a layer of rank < r is zero-padded
  (exact), a layer above the max rank fails there, after validation, with a shape error.
PEFT (``peft/tuners/lora/config.py`` and ``tuners_utils.get_pattern_key``): each module's rank and alpha are the first
``rank_pattern``/``alpha_pattern`` key matching the end of its name, else r and lora_alpha; a tensor of another rank
fails ``load_state_dict`` with a size mismatch. transformers' ``model.load_adapter`` goes through PEFT and needs
``transformers.integrations.peft.MIN_PEFT_VERSION``.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_INITS_OK = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # string inits that leave the base alone


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(adapter_config.json, {tensor name: shape}) without loading the tensors."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (cfg_path, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: an adapter folder holds adapter_config.json and "
                                    f"adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: line {e.lineno}: not JSON ({e.msg})") from e
    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return cfg, shapes


def module_ranks(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Each module's rank (rows of lora_A), by its name without PEFT's prefix."""
    out = {}
    for k, shape in shapes.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_A(?:\.[^.]+)?\.weight", k)
        if m:
            out[m.group(1)] = int(shape[0])
    return out


def pattern_value(pattern: dict | None, name: str) -> Any:
    """PEFT's get_pattern_key rule: the first key that matches the end of the name at a '.' boundary."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def peft_view(cfg: dict, shapes: dict) -> tuple[dict[str, tuple[int, float]], list[str]]:
    """({module: (rank PEFT builds, scaling PEFT applies)}, problems PEFT would raise)."""
    r, alpha, rs = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    view, problems = {}, []
    for name, k in module_ranks(shapes).items():
        rank = pattern_value(cfg.get("rank_pattern"), name) or r
        a = pattern_value(cfg.get("alpha_pattern"), name)
        view[name] = (int(rank), scaling(alpha if a is None else float(a), int(rank), rs))
        if k != rank:
            problems.append(f"{name}: tensors of rank {k} but the config gives rank {rank}: load_state_dict fails "
                            f"with a size mismatch")
    return view, problems


def smallest_vllm_max_rank(r: int) -> int | None:
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= r), None)


def vllm_problems(cfg: dict, shapes: dict, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> list[str]:
    """Why vLLM would refuse the adapter, crash on it or serve it differently from PEFT (empty: it serves it as PEFT
    loads it with ``--max-lora-rank max_lora_rank``)."""
    out = []
    r, alpha, rs = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    # PEFTHelper._validate_features / validate_legal
    if cfg.get("use_dora"):
        out.append("refuses: DoRA (use_dora) is not supported")
    if cfg.get("modules_to_save"):
        out.append(f"refuses: modules_to_save={cfg['modules_to_save']} (only None, or classifier/score heads)")
    if cfg.get("bias", "none") != "none":
        out.append(f"refuses: bias={cfg['bias']!r} (only 'none')")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS_OK:
        out.append(f"refuses (recent versions) or serves on the wrong base: init_lora_weights={init!r} moves the "
                   f"base weights when PEFT loads it")
    ranks = module_ranks(shapes)
    top = max(ranks.values(), default=r)
    if r > max_lora_rank:
        need = smallest_vllm_max_rank(r)
        out.append(f"refuses: r = {r} exceeds --max-lora-rank {max_lora_rank}"
                   + (f"; serve with --max-lora-rank {need}" if need else
                      f"; above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}: cannot be served"))
    if r <= max_lora_rank < top:
        big = sorted(n for n, k in ranks.items() if k > max_lora_rank)
        out.append(f"crashes: layer rank {top} > --max-lora-rank {max_lora_rank} passes the config check on r = {r} "
                   f"and fails in set_lora ({len(big)} layers, e.g. {big[0]})")
    # one scaling for every module vs PEFT's per-module one
    peft, _ = peft_view(cfg, shapes)
    served = scaling(alpha, r, rs)
    wrong = {n: s for n, (_, s) in peft.items() if not math.isclose(s, served, rel_tol=1e-6)}
    if wrong:
        err = max(abs(served / s - 1) for s in wrong.values())
        out.append(f"wrong scaling (released versions drop rank_pattern/alpha_pattern): {len(wrong)} of {len(peft)} "
                   f"modules served with alpha/r = {served:g} instead of PEFT's per-module scaling (relative error up "
                   f"to {err:.3g}, e.g. {next(iter(wrong))})")
    return out


def check(folder: str | Path, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> dict[str, list[str]]:
    """What each tool would do with the adapter folder: {"vllm": [...], "peft": [...], "transformers": [...]}, each a
    list of lines, and "ok": whether vLLM and PEFT load it and compute the same change."""
    cfg, shapes = read_adapter(folder)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type {cfg.get('peft_type')!r}; this check knows LoRA adapters only")
    peft, peft_bad = peft_view(cfg, shapes)
    ranks = module_ranks(shapes)
    vllm_bad = vllm_problems(cfg, shapes, max_lora_rank)
    scalings = sorted({round(s, 8) for _, s in peft.values()})
    report = {
        "peft": peft_bad or [f"loads {len(peft)} modules, ranks {sorted(set(ranks.values()))} (config r = {cfg['r']}), "
                             f"scaling {scalings}"],
        "vllm": vllm_bad or [f"loads with --max-lora-rank {max_lora_rank}: one scaling "
                             f"{scaling(float(cfg['lora_alpha']), int(cfg['r']), bool(cfg.get('use_rslora'))):g} on "
                             f"every module, as PEFT"
                             + (f"; pads layers below rank {cfg['r']} with zeros" if len(set(ranks.values())) > 1
                                else "")],
        "transformers": _transformers_view(peft_bad),
    }
    # the adapter's verdict; a transformers/peft version mismatch is this environment's, shown but not counted
    report["ok"] = not (peft_bad or vllm_bad)
    return report


def _transformers_view(peft_bad: list[str]) -> list[str]:
    from importlib.metadata import version

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except Exception:  # pragma: no cover - older transformers name it elsewhere
        MIN_PEFT_VERSION = "0.0"
    have = version("peft")
    if Version(have) < Version(MIN_PEFT_VERSION):
        return [f"refuses: model.load_adapter in transformers {version('transformers')} needs peft >= "
                f"{MIN_PEFT_VERSION}, installed {have} (PeftModel.from_pretrained works)"]
    return ["load_adapter goes through PEFT: " + ("fails as PEFT does" if peft_bad else "loads as PEFT does")]


def format_report(folder: str | Path, report: dict) -> str:
    lines = [f"{folder}:"]
    for tool in ("vllm", "peft", "transformers"):
        lines += [f"  {tool}: {l}" for l in report[tool]]
    lines.append("  => " + ("vLLM and PEFT apply the same change" if report["ok"] else "NOT safe (see above)"))
    return "\n".join(lines)


def summary_notes(adapter_dir: str | Path) -> dict[str, Any]:
    """For the run's summary: the adapter's r and, when vLLM would not serve it with its defaults, why."""
    cfg, shapes = read_adapter(adapter_dir)
    notes = vllm_problems(cfg, shapes)
    out: dict[str, Any] = {"adapter_r": int(cfg["r"])}
    if notes:
        out["vllm_note"] = "; ".join(notes)
    return out
