"""Training step time, side by side in one process (bench/results/train.json):

1. Throughput (tokens/s) of peftlab's LoRA against HF PEFT's LoRA (get_peft_model) on the same Llama-shaped
   random model, batches, dtype (fp32), targets, rank, alpha and dropout.
2. Step time of every registered method (each Rotational PiSSA way; GP-LoRA as configured and projecting every step)
   and of LoRA with train.optimizer=precond_adamw, against LoRA.

Every variant has its own copy of the same base model and runs the trainer's step (peftlab/train.py): forward, the
summed token loss / target tokens + the method's extra_loss, backward, gradient clipping at train.max_grad_norm,
the optimizer the trainer would build (the method's make_optimizer, PrecondAdamW or AdamW), zero_grad, then the
method's after_step. The variants are interleaved in every repeat (rotated order) so load changes on the shared CPU
hit all alike; figures are medians. LoRA-factor variants start from a trained-looking B (N(0, 0.02)) so that GP-LoRA's
guard lets it project. Run: python -m bench.bench_train [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
from omegaconf import OmegaConf

from bench.common import interleaved_times, llama, write
from peftlab.adapters import METHODS, apply_adapters, get_method
from peftlab.config import CONF_DIR, load_group
from peftlab.loss import loss_sum
from peftlab.loss import token_loss_sum
from peftlab.train import build_optimizer

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# extra configurations of a method worth timing apart (name suffix -> method config overrides)
VARIANTS = {
    "gplora": {"": {}, "_every1": {"every": 1, "warmup_steps": 0, "guard": 0.0}},
    "rotational_pissa": {f"_{w}": {"way": w} for w in ("way0", "way1", "way2", "way3")},
}


def run_cfg(method: str, overrides: dict, optimizer: str = "adamw"):
    """The parts of a resolved run config that the step uses: model.* (lr ...), train.*, method.*."""
    base = OmegaConf.load(CONF_DIR / "config.yaml")
    return OmegaConf.create({"model": OmegaConf.to_container(load_group("model", "tiny")),
                             "train": {**OmegaConf.to_container(base.train), "optimizer": optimizer},
                             "method": {**OmegaConf.to_container(load_group("method", method)), **overrides}})


def peft_cfg(targets: list[str], r: int):
    return OmegaConf.create({"lora_target_modules": targets, "lora_r": r, "lora_alpha": 2 * r,
                             "lora_dropout": 0.05, "use_rslora": False})


@torch.no_grad()
def trained_looking_B(model) -> None:
    g = torch.Generator().manual_seed(1)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def make_step(model, spec, cfg, batch, n_targets, autocast_dtype=None, chunk=0):
    """One trainer step (peftlab/train.py) of this model; the step counter feeds after_step. ``autocast_dtype``:
    the forward under torch.autocast, as the trainer's bf16 mixed precision does (bench/gpu.py); ``chunk``: the
    trainer's chunked answer-token loss (peftlab/loss.py) instead of the plain full-logits loss (0)."""
    import contextlib

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, spec, spec.parse(cfg.method), model, params) if spec is not None else torch.optim.AdamW(
        params, lr=cfg.model.lr, weight_decay=cfg.model.weight_decay, betas=tuple(cfg.train.adam_betas),
        eps=cfg.train.adam_eps)
    count = [0]

    device = batch["input_ids"].device.type

    def step():
        with (torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()):
            if chunk:
                loss = loss_sum(model, batch, chunk)[0] / n_targets
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = token_loss_sum(logits, batch["labels"]) / n_targets
            extra = spec.extra_loss(model, cfg.method) if spec is not None else None
            if extra is not None:
                loss = loss + extra
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        count[0] += 1
        if spec is not None:
            spec.after_step(model, optimizer, count[0], cfg.method)

    return step, sum(p.numel() for p in params)


def variants(base, targets: list[str], r: int, batch, n_targets, autocast_dtype=None, chunk=0, methods=None):
    """name -> (step function, trainable params); plus notes on methods that could not be built. ``methods``: the
    peftlab methods to time (default: every registered one, each variant, and LoRA with precond_adamw)."""
    from peft import LoraConfig, get_peft_model

    out, notes = {}, {}
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                                        target_modules=targets, bias="none"))
    trained_looking_B(pm)
    out["peft_lora"] = make_step(pm, None, run_cfg("lora", {}), batch, n_targets, autocast_dtype)
    get_method("lora")  # imports every method module that exists
    for name in methods or METHODS.names():
        for suffix, over in VARIANTS.get(name, {"": {}}).items():
            try:
                cfg = run_cfg(name, over)
                model = copy.deepcopy(base)
                apply_adapters(model, peft_cfg(targets, r), cfg.method, name)
                trained_looking_B(model)
                out[name + suffix] = make_step(model, METHODS[name], cfg, batch, n_targets, autocast_dtype, chunk)
            except Exception as e:  # a method still being written: note it, time the rest
                notes[name + suffix] = f"skipped: {type(e).__name__}: {e}"
    if methods:
        return out, notes
    cfg = run_cfg("lora", {}, optimizer="precond_adamw")
    model = copy.deepcopy(base)
    apply_adapters(model, peft_cfg(targets, r), cfg.method, "lora")
    trained_looking_B(model)
    out["lora_precond_adamw"] = make_step(model, METHODS["lora"], cfg, batch, n_targets, autocast_dtype)
    for name in ("geolora",):
        if name not in METHODS:
            notes[name] = "not registered yet (peftlab/adapters/geolora.py missing): not timed"
    return out, notes


def bench_config(hidden: int, layers: int, seq: int, bsz: int, r: int, targets: list[str], repeats: int) -> dict:
    base = llama(hidden=hidden, layers=layers, vocab=2048, max_positions=max(seq, 256))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2048, (bsz, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a prompt part without loss, as in fine-tuning
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    n_targets = int((labels[:, 1:] != -100).sum())
    fns, notes = variants(base, targets, r, batch, n_targets)
    times = interleaved_times({k: v[0] for k, v in fns.items()}, repeats=repeats, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    # ratios: the median of the per-repeat ratios (both taken in the same repeat, seconds apart), which cancels
    # slow load drifts better than a ratio of medians
    paired = {k: statistics.median(a / b for a, b in zip(times[k], times["lora"])) for k in times}
    rows = {k: {"step_s": round(med[k], 4), "tokens_per_s": round(bsz * seq / med[k], 1),
                "target_tokens_per_s": round(n_targets / med[k], 1), "vs_lora_step_time": round(paired[k], 3),
                "trainable_params": fns[k][1], "fastest_step_s": round(min(times[k]), 4),
                "repeats_s": [round(t, 4) for t in times[k]]} for k in med}
    out = {"name": f"h{hidden}-{'all' if targets == LLAMA_ALL else '+'.join(targets)}",
           "model": f"llama hidden {hidden}, {layers} layers, vocab 2048, fp32, random weights",
           "seq": seq, "batch": bsz, "lora_r": r, "lora_alpha": 2 * r, "lora_dropout": 0.05, "targets": targets,
           "repeats": repeats, "peftlab_vs_peft_tokens_per_s": round(paired["peft_lora"], 3),
           # the fastest repeat of each: the least disturbed by other load on a shared machine
           "peftlab_vs_peft_tokens_per_s_fastest_repeats": round(min(times["peft_lora"]) / min(times["lora"]), 3),
           "variants": rows,
           "notes": notes}
    if "gplora_every1" in med and "gplora" in med:  # the amortised cost of projecting every `every` steps
        every = int(run_cfg("gplora", {}).method.every)
        out["gplora_amortised_vs_lora"] = round(1 + (paired["gplora_every1"] - 1) / every, 3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small configuration (batch 1), 11 repeats")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: steadier on a shared CPU; the ratios are what count)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    configs = ([dict(hidden=512, layers=4, seq=256, bsz=1, r=16, targets=LLAMA_ALL, repeats=11)] if a.quick else
               [dict(hidden=512, layers=4, seq=256, bsz=4, r=16, targets=LLAMA_ALL, repeats=15),
                dict(hidden=1024, layers=4, seq=256, bsz=4, r=16, targets=LLAMA_ALL, repeats=9),
                dict(hidden=1024, layers=4, seq=256, bsz=4, r=16, targets=["q_proj", "v_proj"], repeats=9)])
    results = [bench_config(**c) for c in configs]
    write("train", {"quick": a.quick, "threads": a.threads, "configs": results,
                    "method": "trainer step (forward, token loss + extra_loss, backward, clip 1.0, optimizer, "
                              "after_step); variants interleaved per repeat; medians",
                    "ratio_meaning": "peftlab_vs_peft_tokens_per_s = peftlab tokens/s / PEFT tokens/s (> 1: peftlab "
                                     "faster); vs_lora_step_time = step time / peftlab LoRA step time; both the "
                                     "median of per-repeat ratios"})


if __name__ == "__main__":
    main()
