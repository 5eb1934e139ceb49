"""Items 1-3 of the benchmarks on a GPU, in bf16, on a Llama-shaped model of ~1.1B parameters with random weights
(TinyLlama's shape: hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV heads, vocab 32000), written to
bench/results/gpu.json:

1. Training throughput (tokens/s) of full fine-tuning, peftlab's LoRA and HF PEFT's LoRA (targets: every linear
   layer of the blocks, r 16), and the fraction of the GPU's dense bf16 peak that each reaches.
2. Step time of every registered method and of precond_adamw against peftlab's LoRA (bench/bench_train.py's
   variants: the trainer's step under bf16 autocast, adapters in fp32).
3. Full-batch gradient estimation (peftlab.init.gradient.estimate_gradient, bf16 autocast): time per sample against
   one plain forward+backward (every parameter taking its gradient), and peak memory against the naive estimator
   (every parameter's gradient accumulated across the calibration batches).

FLOPs per trained token (stated so the fractions can be checked), with N the parameters of the matrix multiplies
(every Linear incl. the LM head; the embedding lookup is no matmul), L layers, d hidden, s sequence length:
- attention scores and values: forward 4 L s d, backward 8 L s d (both inputs of QK^T and AV need gradients in
  LoRA too, since adapters sit in every layer): 12 L s d in all (the causal mask is not discounted, as PaLM's MFU);
- full fine-tuning: 6 N + 12 L s d (forward 2N, backward 2N for activations + 2N for weights);
- LoRA: 4 N_frozen + 6 N_adapter + 12 L s d (frozen weights: forward 2N and activation gradients 2N, no weight
  gradients; adapters, N_adapter = sum over adapted layers of r (in + out): forward, activation and weight
  gradients, 2 N_adapter each).
Achieved TFLOP/s = FLOPs per token x tokens per second; fraction = that / the GPU's dense bf16 peak (H100 SXM and
H200: 989 TFLOP/s; H100 PCIe: 756; A100: 312; otherwise give --peak-tflops).

Run on a machine with a CUDA GPU: python -m bench.gpu [--seq 1024 --batch 8]; `--allow-cpu --tiny` runs the same
code on a small model on the CPU, to check it without a GPU.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch

PEAK_BF16_TFLOPS = [("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0)]
ONE_B = dict(hidden=2048, layers=22, vocab=32000, intermediate=5632, heads=32, kv_heads=4)
TINY = dict(hidden=256, layers=2, vocab=1024, intermediate=688, heads=4, kv_heads=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((p for key, p in PEAK_BF16_TFLOPS if key in name), None)


def matmul_params(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def attention_flops_per_token(cfg, seq: int) -> float:
    return 12.0 * cfg.num_hidden_layers * seq * cfg.hidden_size


def flops_per_token(n_matmul: int, n_adapter: int, cfg, seq: int, kind: str) -> float:
    """kind 'full': 6 N + attention; 'lora': 4 N_frozen + 6 N_adapter + attention (the module docstring)."""
    attn = attention_flops_per_token(cfg, seq)
    return 6.0 * n_matmul + attn if kind == "full" else 4.0 * n_matmul + 6.0 * n_adapter + attn


def make_batch(bsz: int, seq: int, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (bsz, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 8] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


# ---- items 1 and 2 ------------------------------------------------------------------------------------------------------
def throughput(base, batch, r: int, repeats: int, peak: float | None) -> dict:
    from bench.bench_train import make_step, run_cfg, variants
    from bench.common import interleaved_times

    bsz, seq = batch["input_ids"].shape
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    fns, notes = variants(base, TARGETS, r, batch, n_targets, autocast_dtype=torch.bfloat16)
    full = copy.deepcopy(base)
    for p in full.parameters():
        p.requires_grad_(True)
    fns["full_ft"] = make_step(full, None, run_cfg("lora", {}), batch, n_targets, torch.bfloat16)
    steps = {k: v[0] for k, v in fns.items()}
    times = interleaved_times(steps, repeats=repeats, warmup=2)
    lora = times["lora"]
    rows = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        rows[k] = {"step_s": round(med, 5), "tokens_per_s": round(bsz * seq / med, 1),
                   "vs_lora_step_time": round(statistics.median(a / b for a, b in zip(ts, lora)), 4),
                   "trainable_params": fns[k][1]}
    n_matmul = matmul_params(base)  # the base's Linear weights: all trained (full) or all frozen (LoRA)
    for k, kind in (("full_ft", "full"), ("lora", "lora"), ("peft_lora", "lora")):
        f = flops_per_token(n_matmul, rows[k]["trainable_params"], base.config, seq, kind)
        tflops = f * rows[k]["tokens_per_s"] / 1e12
        rows[k].update(flops_per_token=f, achieved_tflops=round(tflops, 2),
                       fraction_of_peak=round(tflops / peak, 4) if peak else None)
    return {"variants": rows, "notes": notes,
            "peftlab_vs_peft_tokens_per_s": round(statistics.median(b / a for a, b in zip(lora, times["peft_lora"])), 4)}


# ---- item 3 ------------------------------------------------------------------------------------------------------------
def gradient_estimation(base, seq: int, n_samples: int, bsz: int, repeats: int) -> dict:
    from omegaconf import OmegaConf

    from bench.common import timed
    from peftlab.adapters import apply_adapters
    from peftlab.data.datasets import Example, collate
    from peftlab.init.gradient import estimate_gradient
    from peftlab.train import token_loss_sum

    dev = next(base.parameters()).device
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(n_samples):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        samples.append(Example(ids, [-100] * (seq // 4) + ids[seq // 4:]))
    batches = [{k: v.to(dev) for k, v in collate(samples[i:i + bsz], 0).items()} for i in range(0, n_samples, bsz)]
    total = sum(e.n_targets for e in samples)
    model = copy.deepcopy(base)
    layers = apply_adapters(model, OmegaConf.create({"lora_target_modules": TARGETS, "lora_r": 16, "lora_alpha": 32,
                                                     "lora_dropout": 0.0}))

    def loss_of(m, b):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            return token_loss_sum(logits, b["labels"])

    def peftlab_pass():
        estimate_gradient(model, layers, samples, 0, bsz, autocast_dtype=torch.bfloat16, progress=False)

    def plain_pass():  # one forward+backward of one batch, every parameter taking its gradient
        for p in base.parameters():
            p.requires_grad_(True)
        loss_of(base, batches[0]).backward()
        base.zero_grad(set_to_none=True)

    def naive_pass():  # every parameter's gradient accumulated in the model dtype, as reference code does
        for p in base.parameters():
            p.requires_grad_(True)
        acc = {p: torch.zeros_like(p) for p in base.parameters()}
        for b in batches:
            loss_of(base, b).backward()
            for p in base.parameters():
                acc[p].add_(p.grad)
            base.zero_grad(set_to_none=True)
        for a in acc.values():
            a.div_(total)

    per = {"plain_fwd_bwd": (plain_pass, bsz), "peftlab": (peftlab_pass, n_samples), "naive": (naive_pass, n_samples)}
    out = {}
    for name, (fn, n) in per.items():
        fn()  # warm-up
        peak = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
        ts = [timed(fn) / n for _ in range(repeats)]
        out[name] = {"s_per_sample": statistics.median(ts), "peak_mb_above_start": peak}
    p, naive = out["plain_fwd_bwd"], out["naive"]
    ratios = {"peftlab_time_per_sample_vs_plain_fwd_bwd": out["peftlab"]["s_per_sample"] / p["s_per_sample"],
              "naive_time_per_sample_vs_plain_fwd_bwd": naive["s_per_sample"] / p["s_per_sample"]}
    if naive["peak_mb_above_start"]:
        ratios["peftlab_peak_vs_naive"] = out["peftlab"]["peak_mb_above_start"] / naive["peak_mb_above_start"]
    return {"samples": n_samples, "bsz": bsz, "seq": seq, "targets": "every linear layer of the blocks",
            "variants": out, "ratios": ratios}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--grad-samples", type=int, default=32)
    ap.add_argument("--grad-bsz", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known here")
    ap.add_argument("--items", nargs="*", type=int, default=[1, 3], help="1 (with 2) and 3")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU (only to check the code)")
    ap.add_argument("--tiny", action="store_true", help="a small model (only to check the code)")
    a = ap.parse_args()
    if not torch.cuda.is_available() and not a.allow_cpu:
        sys.exit("bench/gpu.py measures GPU throughput in bf16 and needs a CUDA GPU, but torch sees none "
                 f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it on a GPU machine; "
                 "`--allow-cpu --tiny` only checks the code.")
    from bench.common import llama, write

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if a.tiny else ONE_B
    base = llama(dtype=torch.bfloat16, max_positions=max(4096, a.seq), **shape).to(dev)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    peak = peak_tflops(name, a.peak_tflops) if dev.type == "cuda" else None
    n_params = sum(p.numel() for p in base.parameters())
    result = {"device": name, "peak_bf16_tflops": peak, "params": n_params,
              "model": f"llama {shape}, bf16 weights, random", "seq": a.seq, "batch": a.batch, "lora_r": a.r,
              "flops_formula": "full: 6N + 12 L s d; LoRA: 4 N_frozen + 6 N_adapter + 12 L s d (per token; N: "
                               "matmul parameters incl. lm_head)"}
    if 1 in a.items or 2 in a.items:
        result["throughput"] = throughput(base, make_batch(a.batch, a.seq, shape["vocab"], dev), a.r, a.repeats, peak)
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    if 3 in a.items:
        result["gradient_estimation"] = gradient_estimation(base, a.seq, a.grad_samples, a.grad_bsz,
                                                            max(3, a.repeats // 3))
    if a.tiny:  # a code check: nothing for the results folder
        import json

        print(json.dumps(result, indent=2, default=str))
        return
    write("gpu", result)


if __name__ == "__main__":
    main()
