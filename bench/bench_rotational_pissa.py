"""Rotational PiSSA: training-step time of each way against LoRA at the same r (interleaved medians, one process), and
memory (parameter + buffer bytes; RSS of a fresh process per config) with and without the NF4 residual.

Llama-shaped random model: hidden 512, 4 layers, fp32, CPU, every projection adapted (target all).
    python -m bench.bench_rotational_pissa            # -> bench/results/rotational_pissa.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys

import torch
from omegaconf import OmegaConf

from bench.common import held_mb, interleaved_times, llama, status_mb, write
from peftlab.adapters import adapter_layers, apply_adapters, get_method

WAY_CONFIGS = {  # name -> (method, method options)
    "lora": ("lora", {}),
    "way0": ("rotational_pissa", {"way": "way0"}),
    "way1": ("rotational_pissa", {"way": "way1"}),
    "way2": ("rotational_pissa", {"way": "way2"}),
    "way3": ("rotational_pissa", {"way": "way3"}),
    "way2_nf4": ("rotational_pissa", {"way": "way2", "quantize_residual": True}),
}
MEMORY_CONFIGS = ("base", "lora", "way2", "way2_nf4", "way2_nf4_uv")


def build(name: str, r: int, hidden: int, layers: int):
    model = llama(hidden=hidden, layers=layers)
    if name == "base":
        return model, None, None
    method, opts = WAY_CONFIGS.get(name) or ("rotational_pissa", {"way": "way2", "quantize_residual": True,
                                                                  "quantize_base_components": True})
    # randomized SVD (4 power iterations): the init is not what is timed, and a full SVD per projection is slow here
    cfg = OmegaConf.create({"name": method, **opts, **({"svd_niter": 4} if method == "rotational_pissa" else {})})
    peft = OmegaConf.create({"target_set": "all", "lora_r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_base_components' warning, once per layer
        apply_adapters(model, peft, cfg, method)
    return model, get_method(method), cfg


def step_fn(model, spec, cfg, x):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    count = [0]

    def step():
        loss = model(input_ids=x, labels=x).loss
        extra = spec.extra_loss(model, cfg)  # way0's penalty, as the trainer adds it
        (loss if extra is None else loss + extra).backward()
        opt.step()
        opt.zero_grad()
        count[0] += 1
        spec.after_step(model, opt, count[0], cfg)

    return step


def tensor_bytes(model) -> dict:
    """Bytes of parameters and buffers: all of them, the adapted layers' frozen base, their adapter state."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    base = adapter = 0
    for l in adapter_layers(model).values():
        for n, t in [*l.named_parameters(), *l.named_buffers()]:
            b = t.numel() * t.element_size()
            if n.startswith("base."):
                base += b
            elif not n.startswith("offset_"):  # the init offset is export bookkeeping, counted apart
                adapter += b
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"param_buffer_bytes": total, "adapted_base_bytes": base, "adapter_bytes": adapter,
            "trainable_params": trainable}


def memory_one(name: str, r: int, hidden: int, layers: int, seq: int, batch: int, steps: int) -> dict:
    """In a fresh process: bytes; RSS over the imports' after building and after some training steps; peak RSS."""
    torch.manual_seed(0)
    start = held_mb()
    model, spec, cfg = build(name, r, hidden, layers)
    row = {"config": name, **tensor_bytes(model), "rss_imports_mb": start, "rss_built_mb": held_mb() - start}
    if spec is not None and steps:
        step = step_fn(model, spec, cfg, torch.randint(0, 2048, (batch, seq)))
        for _ in range(steps):
            step()
        row[f"rss_after_{steps}_steps_mb"] = held_mb() - start
    row["peak_rss_mb"] = status_mb("VmHWM") - start
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--memory-one", default=None, help=argparse.SUPPRESS)  # child process of the memory part
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.memory_one:
        print(json.dumps(memory_one(a.memory_one, a.r, a.hidden, a.layers, a.seq, a.batch, a.steps)))
        return

    x = torch.randint(0, 2048, (a.batch, a.seq))
    steps = {}
    for name in WAY_CONFIGS:
        torch.manual_seed(0)
        model, spec, cfg = build(name, a.r, a.hidden, a.layers)
        steps[name] = step_fn(model, spec, cfg, x)
    times = interleaved_times(steps, repeats=a.repeats, warmup=1)
    med = {n: statistics.median(t) for n, t in times.items()}
    step_rows = {n: {"median_s": med[n], "vs_lora": med[n] / med["lora"], "all_s": times[n]} for n in times}
    del steps
    gc.collect()

    def memory(hidden, layers, steps):
        rows = []
        for name in MEMORY_CONFIGS:
            out = subprocess.run([sys.executable, "-m", "bench.bench_rotational_pissa", "--memory-one", name,
                                  "--r", str(a.r), "--hidden", str(hidden), "--layers", str(layers), "--seq",
                                  str(a.seq), "--batch", str(a.batch), "--threads", str(a.threads), "--steps",
                                  str(steps)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        return rows

    small = memory(a.hidden, a.layers, 2)
    large = memory(2048, 2, 0)  # weights large enough to dominate the RSS; built only
    by = {m["config"]: m for m in small}
    big = {m["config"]: m for m in large}
    load = os.getloadavg()
    write("rotational_pissa", {
        "load_average_1_5_15": load,
        "model": f"llama hidden {a.hidden}, {a.layers} layers, vocab 2048, seq {a.seq}, batch {a.batch}, fp32, CPU, "
                 f"target all (7 projections per layer), r {a.r}, {a.threads} torch thread(s)",
        "step_time": step_rows,
        "memory": small,
        "memory_hidden2048_2layers_built": large,
        "nf4_residual_saving": {
            "adapted_base_bytes_ratio": by["way2_nf4"]["adapted_base_bytes"] / by["way2"]["adapted_base_bytes"],
            "param_buffer_bytes_ratio": by["way2_nf4"]["param_buffer_bytes"] / by["way2"]["param_buffer_bytes"],
            "rss_built_ratio_hidden2048": big["way2_nf4"]["rss_built_mb"] / big["way2"]["rss_built_mb"],
        },
        "note": "step = forward + backward + AdamW step (+ way0's penalty, + after_step); medians over interleaved "
                "repeats in one process. Memory rows come from a fresh process each, RSS in MB above the process "
                "after its imports, freed heap returned first (malloc_trim): rss_built after building (the fp "
                "model is built first, so peak_rss includes it), rss_after_2_steps after two training steps. "
                "adapted_base_bytes = the frozen bases of the adapted layers (W_res); way2_nf4_uv also "
                "stores U, V as NF4. U, V from a randomized SVD (svd_niter 4) to keep the bench short. The machine "
                "is shared (2 cores): compare ratios within this run only.",
    })


if __name__ == "__main__":
    main()
