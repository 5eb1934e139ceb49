"""Full-batch gradient estimation and the gradient inits (LoRA-GA, LoRA-One, LoRA-FA).

G is the gradient of the mean token loss over all bsz x iters calibration samples: the same G whatever the split
into batches or processes. Each process takes a strided shard of the samples; per-weight fp32 accumulators are summed
over processes once at the end and divided by the global target-token count. Only the target base weights get
gradients, and a post-accumulate-grad hook moves each fresh gradient into its fp32 accumulator (on the CPU with
``offload``) and frees it, so no gradient of every parameter is ever held in the model's dtype.
For LoRA-FA, forward hooks collect each target layer's input second moment Sigma = E[x x^T] over the non-padding
calibration tokens in the same pass, once per distinct input (q, k and v read the same tensor).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ..adapters import AdapterLayer
from ..adapters.base import Conv1D, set_module
from ..adapters.lora import LoRALinear
from ..data.datasets import Example, collate
from ..utils import stable_hash
from . import InitContext, InitSpec, lora_factor_layers, register_init
from .directions import (DIRECTIONS, GA_DIRECTIONS, SCALES, inverse_sqrt_metric, lora_fa, lora_ga, lora_one,
                         rank_by_energy, whitened_spectrum)

MODES = ("gradient",)
DTYPES = ("float32", "bfloat16", "float16")
ESTIMATE_VERSION = 1


def calibration_samples(examples: list[Example], n: int, seed: int, max_length: int | None) -> list[Example]:
    """A seeded random subset of n training examples (truncated to max_length), the same on every process."""
    if n > len(examples):
        raise ValueError(f"init needs bsz x iters = {n} calibration samples but the training set has "
                         f"{len(examples)}; lower init.bsz or init.iters")
    idx = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    L = max_length or None
    return [Example(examples[i].input_ids[:L], examples[i].labels[:L]) for i in idx]


@contextlib.contextmanager
def _estimation_mode(model: torch.nn.Module, layers: dict[str, AdapterLayer]):
    """Adapters off, every parameter frozen but the target base weights; restored afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.base.weight.requires_grad_(True)
        layer.disabled = True
    was_training = model.training
    model.eval()  # no dropout: G is the gradient of the deterministic loss
    try:
        yield
    finally:
        for layer in layers.values():
            layer.disabled = False
            layer.base.weight.grad = None
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)


def estimate_gradient(model: torch.nn.Module, layers: dict[str, AdapterLayer], samples: list[Example], pad_id: int,
                      bsz: int, accelerator=None, second_moments: bool = False, offload: bool = False,
                      autocast_dtype: torch.dtype | None = None, aligner: Any = None, progress: bool = True
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(G per layer as out x in fp32, Sigma per layer as in x in fp32 (empty unless asked), global target tokens)."""
    from ..train import token_loss_sum

    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    device = next(model.parameters()).device
    acc_device = torch.device("cpu") if offload else device
    grads = {n: torch.zeros(l.out_features, l.in_features, dtype=torch.float32, device=acc_device)
             for n, l in layers.items()}
    weight_to_name = {l.base.weight: n for n, l in layers.items()}

    def on_grad(p: torch.Tensor) -> None:
        name = weight_to_name[p]
        g = p.grad.T if isinstance(layers[name].base, Conv1D) else p.grad
        grads[name].add_(g.to(acc_device, torch.float32))
        p.grad = None  # freed right away: only the fp32 accumulators persist

    # second moments: one accumulator per distinct input tensor, shared by the layers that read it
    sigma_of: dict[str, int] = {}
    sigmas: list[torch.Tensor] = []
    tokens_seen = torch.zeros(1, dtype=torch.float64, device=device)
    state: dict[str, Any] = {"mask": None, "inputs": {}}

    def on_input(name: str):
        def hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if key in state["inputs"]:
                sigma_of.setdefault(name, state["inputs"][key])
                return
            if name not in sigma_of:
                sigma_of[name] = len(sigmas)
                sigmas.append(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=acc_device))
            state["inputs"][key] = sigma_of[name]
            xs = x.detach().reshape(-1, x.shape[-1])[state["mask"]].float()
            sigmas[sigma_of[name]].add_((xs.T @ xs).to(acc_device))
        return hook

    handles = []
    shard = samples[rank::world]
    micro = max(1, bsz // world)
    total_targets = sum(e.n_targets for e in samples)  # every process knows all samples: no communication
    from tqdm.auto import tqdm

    bar = tqdm(total=len(shard), desc="gradient estimation", disable=not progress or rank != 0, dynamic_ncols=True)
    try:
        with _estimation_mode(model, layers), torch.enable_grad():
            handles += [l.base.weight.register_post_accumulate_grad_hook(on_grad) for l in layers.values()]
            if second_moments:
                handles += [l.register_forward_pre_hook(on_input(n)) for n, l in layers.items()]
            for i in range(0, len(shard), micro):
                b = {k: v.to(device) for k, v in collate(shard[i:i + micro], pad_id).items()}
                state["mask"] = b["attention_mask"].reshape(-1).bool()
                state["inputs"] = {}
                tokens_seen += state["mask"].sum()
                ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                       else contextlib.nullcontext())
                with ctx:
                    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                output_hidden_states=bool(aligner is not None and aligner.needs_hidden_states))
                    loss = token_loss_sum(out.logits, b["labels"])
                    if aligner is not None:
                        loss = loss + aligner.beta * aligner.loss_sum(out, b)
                loss.backward()
                bar.update(len(shard[i:i + micro]))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    for name in grads:
        grads[name] = _sum_over_processes(grads[name], accelerator, device) / total_targets
    if second_moments:
        tokens = float(_sum_over_processes(tokens_seen, accelerator, device))
        sigmas = [_sum_over_processes(s, accelerator, device) / tokens for s in sigmas]
    return grads, {n: sigmas[i] for n, i in sigma_of.items()}, total_targets


def _sum_over_processes(t: torch.Tensor, accelerator, device) -> torch.Tensor:
    if accelerator is None or accelerator.num_processes == 1:
        return t
    home = t.device
    return accelerator.reduce(t.to(device), reduction="sum").to(home)


# ---- the init -------------------------------------------------------------------------------------------------------
def validate(init_cfg: Any) -> None:
    checks = {"mode": MODES, "direction": DIRECTIONS, "scale": SCALES, "dtype": DTYPES,
              "ga_direction": GA_DIRECTIONS, "ga_convention": ("paper", "peft"), "metric": ("on", "off")}
    for key, allowed in checks.items():
        if init_cfg.get(key) not in allowed:
            raise ValueError(f"unknown init.{key} {init_cfg.get(key)!r}; allowed: {list(allowed)}")
    for key in ("bsz", "iters"):
        if int(init_cfg[key]) < 1:
            raise ValueError(f"init.{key} must be >= 1, got {init_cfg[key]}")
    if init_cfg.get("rank") not in (None, "auto"):
        raise ValueError(f"init.rank must be null (peft.lora_r) or 'auto', got {init_cfg.rank!r}")
    if init_cfg.get("rank") == "auto" and init_cfg.direction != "LoRA-FA":
        raise ValueError("init.rank=auto chooses ranks from LoRA-FA's whitened spectrum; use direction=LoRA-FA")
    if not 0 < float(init_cfg.energy) <= 1:
        raise ValueError(f"init.energy must be in (0, 1], got {init_cfg.energy}")


def _cache_path(ctx: InitContext, n: int, with_sigma: bool) -> Path | None:
    c = ctx.cfg.init.get("cache")
    if not c:
        return None
    from omegaconf import OmegaConf

    from ..data.embedded import cache_root

    key = stable_hash({"model": str(ctx.cfg.model.name), "model_dtype": ctx.cfg.model.get("dtype"),
                       "targets": sorted(ctx.layers), "dataset": OmegaConf.to_container(ctx.cfg.dataset),
                       "max_length": [ctx.cfg.model.max_length, ctx.cfg.init.get("max_length")], "n": n,
                       "seed": ctx.cfg.seed, "dtype": ctx.cfg.init.dtype, "sigma": with_sigma,
                       "align": OmegaConf.to_container(ctx.cfg.get("align") or {}), "v": ESTIMATE_VERSION})
    root = cache_root() / "gradients" if c is True or c == "true" else Path(str(c))
    return root / f"grad-{key}.pt"


def gradient_statistics(ctx: InitContext, with_sigma: bool):
    """(G, Sigma) for the context's layers, from the cache file when one matches."""
    ic = ctx.cfg.init
    n = int(ic.bsz) * int(ic.iters)
    path = _cache_path(ctx, n, with_sigma)
    acc = ctx.accelerator
    if path is not None and path.exists():
        blob = torch.load(path, map_location="cpu")
        return blob["grads"], blob["sigmas"], blob["tokens"]
    samples = calibration_samples(ctx.train_examples, n, int(ctx.cfg.seed), ic.get("max_length"))
    dtype = None if ic.dtype == "float32" else getattr(torch, ic.dtype)
    grads, sigmas, tokens = estimate_gradient(ctx.model, ctx.layers, samples, ctx.pad_id, int(ic.bsz), acc,
                                              second_moments=with_sigma, offload=bool(ic.get("offload")),
                                              autocast_dtype=dtype, aligner=getattr(ctx, "aligner", None))
    if path is not None and (acc is None or acc.is_main_process):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"grads": {k: v.cpu() for k, v in grads.items()},
                    "sigmas": {k: v.cpu() for k, v in sigmas.items()}, "tokens": tokens}, tmp)
        tmp.replace(path)
    return grads, sigmas, tokens


@torch.no_grad()
def run(ctx: InitContext) -> dict:
    ic = ctx.cfg.init
    layers = lora_factor_layers(ctx, "gradient")
    fa = ic.direction == "LoRA-FA"
    use_sigma = fa and ic.metric == "on"
    grads, sigmas, tokens = gradient_statistics(ctx, use_sigma)
    ranks = {}
    for name, layer in list(layers.items()):
        dev = layer.lora_A.device
        G = grads[name].to(dev)
        r = layer.rank
        if ic.direction == "LoRA-GA":
            A, B = lora_ga(G, r, layer.scaling, ic.scale, float(ic.stable_gamma), ic.ga_direction,
                           ic.ga_convention)
        elif ic.direction == "LoRA-One":
            A, B = lora_one(G, r, layer.scaling, ic.scale, float(ic.stable_gamma))
        else:
            p_is = inverse_sqrt_metric(sigmas[name].to(dev), float(ic.damping)) if use_sigma else None
            U, S, Vh = whitened_spectrum(G, p_is)
            if ic.get("rank") == "auto":
                r = rank_by_energy(S, float(ic.energy), layer.rank)
                if r != layer.rank:
                    layer = _with_rank(ctx, name, layer, r)
            A, B = lora_fa(G, r, layer.scaling, scale=ic.scale, gamma=float(ic.stable_gamma), svd=(p_is, U, S, Vh))
        layer.lora_A.copy_(A.to(layer.lora_A.dtype))
        layer.lora_B.copy_(B.to(layer.lora_B.dtype))
        if ic.direction == "LoRA-GA":  # keep the initial output unchanged
            layer.set_offset(A, B, layer.scaling)
        ranks[name] = r
    out = {"init/calibration_tokens": tokens, "init/mean_rank": sum(ranks.values()) / len(ranks)}
    return out


def _with_rank(ctx: InitContext, name: str, layer: LoRALinear, r: int) -> LoRALinear:
    """A fresh layer of rank r on the same base (rank: auto); the context's layer map follows."""
    new = LoRALinear(layer.base, r, layer.alpha, getattr(layer.dropout, "p", 0.0), layer.use_rslora,
                     dtype=layer.lora_A.dtype)
    set_module(ctx.model, name, new)
    ctx.layers[name] = new
    return new


register_init(InitSpec("gradient", run, validate))
