"""Full-batch gradient estimation and the gradient inits (LoRA-GA, LoRA-One, LoRA-FA).

G is the gradient of the mean token loss over all bsz x iters calibration samples (a seeded random subset of the
training examples, the same on every process): summed token cross-entropy / the global count of target tokens, so
G is the same whatever the split into micro-batches (bsz) or processes (``init.reduction: token_mean``, the default).
``init.reduction: batch_mean`` is the LoRA-GA and LoRA-One authors' estimate instead: the mean over micro-batches of
each micro-batch's mean token loss (HF's model loss), so a micro-batch's tokens weigh more when it has fewer of them,
and G depends on bsz and the process count (each process's micro-batches are bsz / world samples, as the LoRA-GA
code's per-device batches; micro-batches without target tokens are skipped, where the references would give NaN).
Each process takes a strided shard; per-weight fp32 accumulators are summed over processes once at the end.

Memory: only the target base weights require gradients, and a post-accumulate-grad hook moves each fresh gradient
into its fp32 accumulator (on the CPU with ``offload``) and frees it, so no gradient of every parameter is ever held.
The pass runs in eval mode (no dropout: G is the gradient of the deterministic loss), so gradient checkpointing does
not apply; its peak is one forward+backward of a micro-batch of ``bsz`` samples (lower bsz to bound it; G does not
change) plus the accumulators.

For LoRA-FA, forward pre-hooks collect each target layer's input second moment Sigma = E[x x^T] over ALL non-padding
tokens of the calibration samples (prompt tokens too: the layer processes them and a change of W changes their
features, which later target tokens attend to), once per distinct input tensor (q, k and v read the same one).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..adapters import AdapterLayer
from ..adapters.base import Conv1D, set_module
from ..adapters.lora import LoRALinear
from ..data.datasets import Example, collate
from ..utils import atomic_file, stable_hash
from ..schema import fail, option
from . import InitContext, InitSpec, LoRAFactorInitOptions, lora_factor_layers, register_init
from .directions import (DIRECTIONS, GA_DIRECTIONS, SCALES, inverse_sqrt_metric, lora_fa, lora_ga, lora_one,
                         rank_by_energy, whitened_spectrum)

MODES = ("gradient",)
REDUCTIONS = ("token_mean", "batch_mean")
# the estimation pass's autocast dtype; fp32/bf16/fp16 are the seed's spellings
DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
ESTIMATE_VERSION = 2


def calibration_samples(examples: list[Example], n: int, seed: int, max_length: int | None = None) -> list[Example]:
    """A seeded random subset of n training examples (truncated to max_length), the same on every process."""
    if n > len(examples):
        raise ValueError(f"the gradient init needs bsz x iters = {n} calibration samples but the training set has "
                         f"{len(examples)}; lower init.bsz or init.iters")
    idx = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    L = max_length or None
    return [Example(examples[i].input_ids[:L], examples[i].labels[:L]) for i in idx]


@contextlib.contextmanager
def _estimation_mode(model: torch.nn.Module, layers: dict[str, AdapterLayer]):
    """Adapters off, every parameter frozen but the target base weights, eval mode; all restored afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.base.weight.requires_grad_(True)
        layer.disabled = True  # G is the gradient at the base weights, whatever the adapters hold now
    model.eval()
    try:
        yield
    finally:
        for layer in layers.values():
            layer.disabled = False
            layer.base.weight.grad = None
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)


def _token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from ..loss import loss_sum  # chunked: no full-vocabulary fp32 logits

    return loss_sum(model, batch, use_cache=False)[0]


def estimate_gradient(model: torch.nn.Module, layers: dict[str, AdapterLayer], samples: list[Example], pad_id: int,
                      bsz: int, accelerator=None, second_moments: bool = False, offload: bool = False,
                      autocast_dtype: torch.dtype | None = None,
                      loss_sum: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None, progress: bool = True,
                      reduction: str = "token_mean") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(G per layer as out x in fp32, Sigma per layer as in x in fp32 (empty unless asked), global target tokens).

    ``bsz`` is the global micro-batch: each of the ``world`` processes runs bsz // world samples per pass.
    ``loss_sum(model, batch)`` replaces the summed token cross-entropy (e.g. a teacher-alignment objective); it is
    divided by the global target-token count like the default. ``reduction``: token_mean | batch_mean (module notes)."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        # a sharded base weight has no whole gradient to hook (and ZeRO-3 peers return a silent zero)
        raise ValueError("estimate_gradient needs the whole base weights, but this model is sharded by FSDP; run the "
                         "init before wrapping (the trainer does: every process loads the whole model first)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown gradient reduction {reduction!r}; allowed: {list(REDUCTIONS)}")
    loss_sum = loss_sum or _token_loss_sum
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    device = next(model.parameters()).device
    acc_device = torch.device("cpu") if offload else device
    total_targets = sum(e.n_targets for e in samples)  # every process knows all samples: no communication
    if total_targets == 0:
        raise ValueError("the calibration samples have no target tokens (all labels are -100 after truncation); "
                         "raise init.max_length or model.max_length")
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
    tokens_seen = torch.zeros((), dtype=torch.float64, device=device)
    state: dict[str, Any] = {"mask": None, "inputs": {}}

    def on_input(name: str):
        def hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.dtype)
            if key in state["inputs"]:  # another layer already took this input in this pass
                sigma_of.setdefault(name, state["inputs"][key][0])
                return
            if name not in sigma_of:
                sigma_of[name] = len(sigmas)
                sigmas.append(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=acc_device))
            state["inputs"][key] = (sigma_of[name], x)  # holding x keeps its address unique during the pass
            xs = x.detach().reshape(-1, x.shape[-1])[state["mask"]].float()
            sigmas[sigma_of[name]].add_((xs.T @ xs).to(acc_device))
        return hook

    shard = samples[rank::world]
    micro = max(1, bsz // world)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(shard), desc="gradient estimation", disable=not progress or rank != 0, dynamic_ncols=True)
    handles = []
    try:
        with _estimation_mode(model, layers), torch.enable_grad():
            handles += [l.base.weight.register_post_accumulate_grad_hook(on_grad) for l in layers.values()]
            if second_moments:
                handles += [l.register_forward_pre_hook(on_input(n)) for n, l in layers.items()]
            for i in range(0, len(shard), micro):
                b = {k: v.to(device) for k, v in collate(shard[i:i + micro], pad_id).items()}
                n_b = sum(e.n_targets for e in shard[i:i + micro])
                if reduction == "batch_mean" and not n_b:  # its mean loss is 0/0; left out (and not counted)
                    bar.update(len(shard[i:i + micro]))
                    continue
                state["mask"] = b["attention_mask"].reshape(-1).bool()
                state["inputs"] = {}
                tokens_seen += state["mask"].sum()
                with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                      else contextlib.nullcontext()):
                    loss = loss_sum(model, b)
                (loss / n_b if reduction == "batch_mean" else loss).backward()
                state["inputs"] = {}
                bar.update(len(shard[i:i + micro]))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    denominator = total_targets if reduction == "token_mean" else _count_batches(samples, world, micro)
    for name in grads:
        grads[name] = _sum_over_processes(grads[name], accelerator, device) / denominator
    if second_moments:
        tokens = float(_sum_over_processes(tokens_seen, accelerator, device))
        sigmas = [_sum_over_processes(s, accelerator, device) / tokens for s in sigmas]
    return grads, {n: sigmas[i] for n, i in sigma_of.items()}, total_targets


def _count_batches(samples: list[Example], world: int, micro: int) -> int:
    """The micro-batches with target tokens over all processes (each process knows every sample's shard)."""
    shards = [samples[r::world] for r in range(world)]
    return sum(1 for sh in shards for i in range(0, len(sh), micro) if sum(e.n_targets for e in sh[i:i + micro]))


def _sum_over_processes(t: torch.Tensor, accelerator, device) -> torch.Tensor:
    if accelerator is None or accelerator.num_processes == 1:
        return t
    home = t.device
    return accelerator.reduce(t.to(device), reduction="sum").to(home)


# ---- the init -------------------------------------------------------------------------------------------------------
@dataclass
class GradientOptions(LoRAFactorInitOptions):
    """conf/init/gradient.yaml documents each option (LoRA-One's key names)."""
    name: str = "gradient"
    mode: str = option("gradient", choices=MODES)
    direction: str = option("LoRA-One", choices=DIRECTIONS)
    scale: str = option("stable", choices=SCALES)
    stable_gamma: float = option(16.0, gt=0)
    bsz: int = option(1, ge=1)
    iters: int = option(8, ge=1)
    max_length: int | None = option(None, ge=2)
    dtype: str = option("float32", choices=tuple(DTYPES))
    offload: bool = False
    cache: bool | str | None = None
    ga_direction: str = option("ArB2r", choices=GA_DIRECTIONS)
    ga_convention: str = option("paper", choices=("paper", "peft"))
    metric: str = option("on", choices=("on", "off"))
    damping: float = option(1e-3, ge=0)
    rank: str | None = option(None, choices=("auto",))
    energy: float = option(0.9, gt=0, le=1)
    reduction: str = option("token_mean", choices=REDUCTIONS)

    def check(self, prefix: str) -> None:
        if self.rank == "auto" and self.direction != "LoRA-FA":
            fail(f"{prefix}.rank", self.rank, "auto chooses ranks from LoRA-FA's whitened spectrum: it needs "
                 "init.direction=LoRA-FA", "++init.direction=LoRA-FA")


def _metric_on(init_cfg: Any) -> bool:
    return init_cfg.get("metric") == "on"


def _cache_key(ctx: InitContext, samples: list[Example], with_sigma: bool, aligner: Any) -> str:
    """Everything that determines G: the model (name and a fingerprint of the target weights), the targets, the
    calibration tokens, the estimation dtype, whether Sigma is wanted and the teacher objective, if any."""
    fingerprint = [[n, float(l.base.weight.double().sum()), float(l.base.weight.double().norm())]
                   for n, l in sorted(ctx.layers.items())]
    key = {"model": str(ctx.cfg.model.get("name")), "weights": fingerprint,
           "samples": stable_hash([[e.input_ids, e.labels] for e in samples], 32),
           "dtype": str(DTYPES[ctx.cfg.init.dtype]), "sigma": with_sigma, "v": ESTIMATE_VERSION,
           "align": aligner.cache_key() if aligner is not None else None}
    ic, acc = ctx.cfg.init, ctx.accelerator
    if ic.get("reduction", "token_mean") != "token_mean":  # only then (token_mean caches keep their keys): batch_mean's
        key["reduction"] = [ic.reduction, int(ic.bsz), acc.num_processes if acc is not None else 1]  # G has bsz, world
    return stable_hash(key)


def _cache_path(cache: Any, key: str) -> Path | None:
    """init.cache: null (off), true (the peftlab cache folder), a folder, or one .pt file (rewritten on a new key)."""
    if not cache:
        return None
    from ..data.embedded import cache_root

    if cache is True or cache == "true":
        return cache_root() / "gradients" / f"grad-{key}.pt"
    path = Path(str(cache)).expanduser()
    return path if path.suffix == ".pt" else path / f"grad-{key}.pt"


def gradient_statistics(ctx: InitContext, with_sigma: bool) -> tuple[dict, dict, int, bool]:
    """(G, Sigma, target tokens, cache hit) for the context's layers. With a teacher (``ctx.aligner``, see
    peftlab/align.py) G is the gradient of the dual objective task + beta * D."""
    ic = ctx.cfg.init
    samples = calibration_samples(ctx.train_examples, int(ic.bsz) * int(ic.iters), int(ctx.cfg.get("seed", 0)),
                                  ic.get("max_length"))
    aligner = getattr(ctx, "aligner", None)
    key = _cache_key(ctx, samples, with_sigma, aligner) if ic.get("cache") else None
    path = _cache_path(ic.get("cache"), key)
    acc = ctx.accelerator
    blob = torch.load(path, map_location="cpu") if path is not None and path.exists() else None
    hit = blob is not None and blob.get("key") == key
    if path is not None and acc is not None and acc.num_processes > 1:  # all hit, or all estimate together
        flag = torch.tensor([float(hit)], device=acc.device)
        hit = bool(acc.reduce(flag, reduction="sum").item() == acc.num_processes)
    if hit:
        return blob["grads"], blob["sigmas"], blob["tokens"], True
    grads, sigmas, tokens = estimate_gradient(ctx.model, ctx.layers, samples, ctx.pad_id, int(ic.bsz), acc,
                                              second_moments=with_sigma, offload=bool(ic.get("offload")),
                                              autocast_dtype=DTYPES[ic.dtype],
                                              loss_sum=aligner.objective_sum if aligner is not None else None,
                                              reduction=ic.get("reduction", "token_mean"))
    if path is not None and (acc is None or acc.is_main_process):
        with atomic_file(path) as tmp:
            torch.save({"key": key, "grads": {k: v.cpu() for k, v in grads.items()},
                        "sigmas": {k: v.cpu() for k, v in sigmas.items()}, "tokens": tokens}, tmp)
    return grads, sigmas, tokens, False


@torch.no_grad()
def run(ctx: InitContext) -> dict:
    ic = ctx.cfg.init
    layers = lora_factor_layers(ctx, "gradient")
    t0 = time.perf_counter()
    use_sigma = ic.direction == "LoRA-FA" and _metric_on(ic)
    grads, sigmas, tokens, hit = gradient_statistics(ctx, use_sigma)
    t_estimate = time.perf_counter() - t0
    gamma = float(ic.stable_gamma)
    ranks = {}
    for name, layer in list(layers.items()):
        dev = layer.lora_A.device
        G = grads[name].to(dev)
        if not torch.isfinite(G).all():
            raise FloatingPointError(f"the estimated gradient of {name} is not finite; try init.dtype=float32")
        if not G.abs().max() > 0:
            raise ValueError(f"the estimated gradient of {name} is zero on the calibration data, so it gives no "
                             f"direction; choose other targets or use init=default")
        r = layer.rank
        if ic.direction == "LoRA-GA":
            if 2 * r > min(G.shape):
                raise ValueError(f"LoRA-GA needs 2 x lora_r <= min(out, in); {name} is {tuple(G.shape)}, r={r}")
            A, B = lora_ga(G, r, layer.scaling, ic.scale, gamma, ic.ga_direction, ic.ga_convention)
        elif ic.direction == "LoRA-One":
            A, B = lora_one(G, r, layer.scaling, ic.scale, gamma)
        else:
            p_is = inverse_sqrt_metric(sigmas[name].to(dev), float(ic.damping)) if use_sigma else None
            U, S, Vh = whitened_spectrum(G, p_is)
            if ic.get("rank") == "auto":
                r = rank_by_energy(S, float(ic.energy), layer.rank)
                if r != layer.rank:
                    layer = _with_rank(ctx, name, layer, r)
            A, B = lora_fa(G, r, layer.scaling, scale=ic.scale, gamma=gamma, svd=(p_is, U, S, Vh))
        layer.lora_A.copy_(A.to(layer.lora_A.dtype))
        layer.lora_B.copy_(B.to(layer.lora_B.dtype))
        if ic.direction == "LoRA-GA":  # move the base so the initial output is unchanged
            layer.set_offset(layer.lora_A, layer.lora_B, layer.scaling)
        ranks[name] = r
    return {"init/calibration_samples": int(ic.bsz) * int(ic.iters), "init/calibration_tokens": tokens,
            "init/mean_rank": sum(ranks.values()) / len(ranks), "init/estimate_s": round(t_estimate, 3),
            "init/cache_hit": int(hit)}


def _with_rank(ctx: InitContext, name: str, layer: LoRALinear, r: int) -> LoRALinear:
    """A fresh layer of rank r on the same base (rank: auto); the model and the context's layer map follow.
    A resumed run builds the layer at peft.lora_r and LoRALinear.load_adapter_state restores this rank and scaling."""
    new = LoRALinear(layer.base, r, layer.alpha, getattr(layer.dropout, "p", 0.0), layer.use_rslora,
                     dtype=layer.lora_A.dtype)
    set_module(ctx.model, name, new)
    ctx.layers[name] = new
    return new


register_init(InitSpec("gradient", run, GradientOptions))
