"""Benchmark of the data-aware inits on a Llama-shaped model (hidden 512, 4 layers), written to
bench/results/inits.json:

1. Full-batch gradient estimation (peftlab: target weights only, post-accumulate-grad hooks into fp32 accumulators)
   against, on the same batches, (a) one plain forward+backward of the model with every parameter taking its
   gradient and (b) the naive estimator (every parameter's gradient accumulated, as the reference implementations
   do): seconds per sample and peak memory, with peftlab targeting every linear layer of the blocks and only q, v.
   Memory is the peak resident set size (resource.getrusage ru_maxrss) of a fresh subprocess per variant, minus the
   same process's peak after loading the model and batches: the pass's own peak. The subprocesses run with
   MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the OS and the RSS follows live memory (glibc would
   otherwise keep freed heap and blur the peaks). On CUDA they report torch.cuda.max_memory_allocated instead.
2. PiSSA init time with the fast randomized SVD (niter=4) and the full SVD, and PEFT's init_lora_weights=
   "pissa_niter_4" / "pissa" on the same model (PEFT's time is get_peft_model minus get_peft_model with the default
   init, so both count the SVD work only), with the fast SVD's error against the full one.

Medians over repeats, one torch thread (the CPU is shared; one thread keeps timings steadier), the PiSSA variants
interleaved in each repeat so that load changes hit all alike. Run: python bench/bench_inits.py [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8, vocab_size=8192, max_position_embeddings=256)
SEQ, BSZ, N_SAMPLES, REPEATS, GRAD_REPEATS = 128, 4, 8, 3, 5
PEFT_CFG = {"target_set": "all", "lora_target_modules": None, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
            "use_rslora": False}


def make_model(device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).to(device).eval()


def make_samples(n):
    from peftlab.data.datasets import Example

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, CONFIG["vocab_size"], (SEQ,), generator=g).tolist()
        out.append(Example(ids, [-100] * (SEQ // 4) + ids[SEQ // 4:]))
    return out


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- gradient estimation variants ----------------------------------------------------------------------------------
VARIANTS = ("plain", "peftlab_all", "peftlab_qv", "naive")


def make_variant(variant: str, dev: torch.device):
    """A function running one pass of the variant on its own model; returns the number of samples it covered."""
    from omegaconf import OmegaConf

    from peftlab.adapters import apply_adapters
    from peftlab.data.datasets import collate
    from peftlab.init.gradient import estimate_gradient
    from peftlab.loss import token_loss_sum

    model = make_model(dev)
    samples = make_samples(N_SAMPLES)
    batches = [{k: v.to(dev) for k, v in collate(samples[i:i + BSZ], 0).items()} for i in range(0, N_SAMPLES, BSZ)]
    total = sum(e.n_targets for e in samples)
    targets = {"peftlab_all": "all", "peftlab_qv": "qv"}.get(variant)
    layers = apply_adapters(model, OmegaConf.create({**PEFT_CFG, "target_set": targets})) if targets else None

    def loss_of(b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        return token_loss_sum(logits, b["labels"])

    def run_once() -> int:
        if layers is not None:
            estimate_gradient(model, layers, samples, 0, BSZ, progress=False)
            return N_SAMPLES
        for p in model.parameters():
            p.requires_grad_(True)
        if variant == "plain":  # one forward+backward of one batch, every parameter taking its gradient
            loss_of(batches[0]).backward()
            model.zero_grad(set_to_none=True)
            return BSZ
        acc = {p: torch.zeros_like(p) for p in model.parameters()}  # naive: every gradient, in the model dtype
        for b in batches:
            loss_of(b).backward()
            for p in model.parameters():
                acc[p].add_(p.grad)
            model.zero_grad(set_to_none=True)
        for a in acc.values():
            a.div_(total)
        return N_SAMPLES

    return run_once


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def memory_worker(variant: str, device: str) -> dict:
    """In a fresh process: the variant's peak during one pass, above the peak after loading everything."""
    dev = torch.device(device)
    run_once = make_variant(variant, dev)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base = peak_mb(dev)
    run_once()
    sync(dev)
    return {"peak_mb": peak_mb(dev) - base, "base_mb": base}


def gradient_bench(device: str) -> dict:
    out = {v: {} for v in VARIANTS}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--worker", variant, "--device", device]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        out[variant].update(json.loads(res.stdout.strip().splitlines()[-1]))
    dev = torch.device(device)
    runs = {v: make_variant(v, dev) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for i in range(GRAD_REPEATS + 1):  # interleaved; the first round warms up
        for v, run_once in runs.items():
            sync(dev)
            t = time.perf_counter()
            n = run_once()
            sync(dev)
            if i:
                times[v].append((time.perf_counter() - t) / n)
    for v in VARIANTS:
        out[v]["s_per_sample"] = statistics.median(times[v])
        print(v, out[v], flush=True)
    p, naive = out["plain"], out["naive"]
    out["ratios"] = {"naive_time_vs_plain_fwd_bwd": naive["s_per_sample"] / p["s_per_sample"]}
    for v in ("peftlab_all", "peftlab_qv"):
        out["ratios"][f"{v}_time_vs_plain_fwd_bwd"] = out[v]["s_per_sample"] / p["s_per_sample"]
        out["ratios"][f"{v}_peak_vs_naive"] = out[v]["peak_mb"] / naive["peak_mb"]
        out["ratios"][f"{v}_peak_vs_plain_fwd_bwd"] = out[v]["peak_mb"] / p["peak_mb"]
    return out


# ---- PiSSA ----------------------------------------------------------------------------------------------------------
def pissa_bench(device: str) -> dict:
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model

    from peftlab.adapters import apply_adapters
    from peftlab.init import InitContext, get_init

    dev = torch.device(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def ours(niter):
        model = make_model(dev)
        layers = apply_adapters(model, OmegaConf.create(PEFT_CFG))
        sync(dev)
        t = time.perf_counter()
        get_init("pissa").run(InitContext(model, layers, OmegaConf.create({"init": {"name": "pissa", "niter": niter}})))
        sync(dev)
        return time.perf_counter() - t, {n: l.delta_weight().detach() for n, l in layers.items()}

    def peft(init):
        model = make_model(dev)
        sync(dev)
        t = time.perf_counter()
        pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=init))
        sync(dev)
        t = time.perf_counter() - t
        with torch.no_grad():
            return t, {n: m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
                       for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}

    times = {k: [] for k in ("peftlab_full", "peftlab_niter_4", "peft_pissa", "peft_pissa_niter_4", "peft_wrap")}
    deltas = {}
    for _ in range(REPEATS):  # interleaved: a load change on the shared machine hits every variant
        for name, niter in (("peftlab_full", None), ("peftlab_niter_4", 4)):
            t, deltas[name] = ours(niter)
            times[name].append(t)
        for name, init in (("peft_pissa", "pissa"), ("peft_pissa_niter_4", "pissa_niter_4"), ("peft_wrap", True)):
            t, deltas[name] = peft(init)
            times[name].append(t)
    res = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    for k in ("peft_pissa_s", "peft_pissa_niter_4_s"):  # the SVD work only
        res[k] -= res["peft_wrap_s"]
    full = deltas["peftlab_full"]
    for name in ("peftlab_niter_4", "peft_pissa_niter_4", "peft_pissa"):  # random weights: a flat spectrum
        res[f"{name}_rel_error_of_sBA_vs_full_median"] = statistics.median(
            float((deltas[name][n] - d).norm() / d.norm()) for n, d in full.items())
    res["speedup_niter_4_vs_full"] = res["peftlab_full_s"] / res["peftlab_niter_4_s"]
    res["peftlab_niter_4_vs_peft_pissa_niter_4"] = res["peftlab_niter_4_s"] / res["peft_pissa_niter_4_s"]
    res["peftlab_full_vs_peft_pissa"] = res["peftlab_full_s"] / res["peft_pissa_s"]
    res["n_matrices"] = len(deltas["peftlab_full"])
    print("pissa", res, flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "inits.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.device)))
        return
    t0 = time.time()
    result = {"model": CONFIG, "seq_len": SEQ, "bsz": BSZ, "calibration_samples": N_SAMPLES, "repeats": {"gradient": GRAD_REPEATS, "pissa": REPEATS},
              "lora_r": PEFT_CFG["lora_r"], "targets": "all linear layers of the blocks", "device": args.device,
              "torch_threads": torch.get_num_threads(),
              "memory_measure": ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else
                                 "resource.getrusage ru_maxrss of a fresh subprocess, minus its peak before the pass"),
              "gradient_estimation": gradient_bench(args.device), "pissa_init": pissa_bench(args.device)}
    result["wall_s"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['wall_s']} s")


if __name__ == "__main__":
    main()
