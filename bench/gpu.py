"""The GPU benchmarks, one command in under 8 minutes on one GPU, in bf16, on a Llama-shaped model of ~1.1B
parameters with random weights (TinyLlama's shape: hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV heads, vocab
32000), written to bench/results/gpu.json:

1. Training throughput (tokens/s), peak memory and the fraction of the GPU's dense bf16 peak (MFU) of full
   fine-tuning, peftlab's LoRA (the trainer's chunked answer-token loss, and the plain loss) and HF PEFT's LoRA
   (targets: every linear layer of the blocks, r 16).
2. With --all-methods: step time of every registered method and of precond_adamw against peftlab's LoRA
   (bench/bench_train.py's variants: the trainer's step under bf16 autocast, adapters in fp32). Off by default: the
   SVD-based inits of Rotational PiSSA at 1B would not fit the time box.
3. Full-batch gradient estimation (peftlab.init.gradient.estimate_gradient, bf16 autocast): time per sample against
   one plain forward+backward (every parameter taking its gradient), and peak memory against the naive estimator
   (every parameter's gradient accumulated across the calibration batches).
4. Evaluation: eval-loss examples/s (peftlab's chunked loss, no grad) and greedy generation examples/s at batch 1
   and 32 (left-padded prompts of 60-200 tokens, a fixed 128 new tokens), as eval_gsm8k.py batches.
Each item is skipped (and named in the results) once --budget-s seconds have passed.

FLOPs per trained token (stated so the fractions can be checked), with N the parameters of the matrix multiplies
(every Linear incl. the LM head; the embedding lookup is no matmul), L layers, d hidden, s sequence length:
- attention scores and values: forward 4 L s d, backward 8 L s d (both inputs of QK^T and AV need gradients in
  LoRA too, since adapters sit in every layer): 12 L s d in all (the causal mask is not discounted, as PaLM's MFU);
- full fine-tuning: 6 N + 12 L s d (forward 2N, backward 2N for activations + 2N for weights);
- LoRA: 4 N_frozen + 6 N_adapter + 12 L s d (frozen weights: forward 2N and activation gradients 2N, no weight
  gradients; adapters, N_adapter = sum over adapted layers of r (in + out): forward, activation and weight
  gradients, 2 N_adapter each).
- the chunked loss applies the LM head to the answer positions only: its FLOPs are counted for those positions
  (per token of the batch: 4 N_head x answer fraction instead of 4 N_head).
Achieved TFLOP/s = FLOPs per token x tokens per second; fraction = that / the GPU's dense bf16 peak (H100 SXM and
H200: 989 TFLOP/s; H100 PCIe: 756; A100: 312; otherwise give --peak-tflops).

Run on a machine with a CUDA GPU: python -m bench.gpu [--seq 1024 --batch 8]; `--allow-cpu --tiny` (or `--dry`) runs
the same code on a small model on the CPU, to check it without a GPU.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

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
CHUNK = 1024  # train.loss_chunk_tokens' default


def peak_mb(fn) -> float | None:
    """Peak GPU memory of one call above what was allocated before it (None on the CPU)."""
    if not torch.cuda.is_available():
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2 ** 20, 1)


def throughput(base, batch, r: int, repeats: int, peak: float | None, all_methods: bool) -> dict:
    from omegaconf import OmegaConf

    from bench.bench_train import make_step, run_cfg, trained_looking_B, variants
    from bench.common import interleaved_times
    from peftlab.adapters import METHODS, apply_adapters

    bsz, seq = batch["input_ids"].shape
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    fns, notes = variants(base, TARGETS, r, batch, n_targets, autocast_dtype=torch.bfloat16, chunk=CHUNK,
                          methods=None if all_methods else ["lora"])
    plain = copy.deepcopy(base)
    apply_adapters(plain, OmegaConf.create({"lora_target_modules": TARGETS, "lora_r": r, "lora_alpha": 2 * r,
                                            "lora_dropout": 0.05}))
    trained_looking_B(plain)
    fns["lora_plain_loss"] = make_step(plain, METHODS["lora"], run_cfg("lora", {}), batch, n_targets, torch.bfloat16)
    full = copy.deepcopy(base)
    for p in full.parameters():
        p.requires_grad_(True)
    fns["full_ft"] = make_step(full, None, run_cfg("lora", {}), batch, n_targets, torch.bfloat16, CHUNK)
    steps = {k: v[0] for k, v in fns.items()}
    times = interleaved_times(steps, repeats=repeats, warmup=2)
    lora = times["lora"]
    rows = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        rows[k] = {"step_s": round(med, 5), "tokens_per_s": round(bsz * seq / med, 1),
                   "vs_lora_step_time": round(statistics.median(a / b for a, b in zip(ts, lora)), 4),
                   "trainable_params": fns[k][1], "peak_mb_above_start": peak_mb(steps[k])}
    n_matmul = matmul_params(base)  # the base's Linear weights: all trained (full) or all frozen (LoRA)
    head = base.get_output_embeddings().weight.numel()
    answer_fraction = n_targets / (bsz * seq)
    for k, kind, chunked in (("full_ft", "full", True), ("lora", "lora", True), ("lora_plain_loss", "lora", False),
                             ("peft_lora", "lora", False)):
        f = flops_per_token(n_matmul, rows[k]["trainable_params"], base.config, seq, kind)
        if chunked:  # the head ran on the answer positions only
            f -= (6.0 if kind == "full" else 4.0) * head * (1 - answer_fraction)
        tflops = f * rows[k]["tokens_per_s"] / 1e12
        rows[k].update(flops_per_token=f, achieved_tflops=round(tflops, 2),
                       mfu=round(tflops / peak, 4) if peak else None)
    ratio = lambda a, b: round(statistics.median(y / x for x, y in zip(times[a], times[b])), 4)
    return {"variants": rows, "notes": notes, "answer_fraction": answer_fraction, "loss_chunk_tokens": CHUNK,
            "peftlab_vs_peft_tokens_per_s": ratio("lora", "peft_lora"),
            "peftlab_plain_loss_vs_peft_tokens_per_s": ratio("lora_plain_loss", "peft_lora"),
            "chunked_vs_plain_loss_peak_memory_ratio": (
                round(rows["lora"]["peak_mb_above_start"] / rows["lora_plain_loss"]["peak_mb_above_start"], 4)
                if rows["lora"]["peak_mb_above_start"] else None)}


# ---- item 3 ------------------------------------------------------------------------------------------------------------
def gradient_estimation(base, seq: int, n_samples: int, bsz: int, repeats: int) -> dict:
    from omegaconf import OmegaConf

    from bench.common import timed
    from peftlab.adapters import apply_adapters
    from peftlab.data.datasets import Example, collate
    from peftlab.init.gradient import estimate_gradient
    from peftlab.loss import token_loss_sum

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


# ---- item 4 ------------------------------------------------------------------------------------------------------------
def evaluation(base, seq: int, n_eval: int, eval_bsz: int, gen_batches: list[int], new_tokens: int) -> dict:
    from omegaconf import OmegaConf

    from bench.common import timed
    from peftlab.adapters import apply_adapters
    from peftlab.loss import loss_sum

    dev = next(base.parameters()).device
    vocab = base.config.vocab_size
    model = copy.deepcopy(base)
    apply_adapters(model, OmegaConf.create({"lora_target_modules": TARGETS, "lora_r": 16, "lora_alpha": 32,
                                            "lora_dropout": 0.0}))
    model.eval()
    batches = [make_batch(eval_bsz, seq, vocab, dev) for _ in range(max(1, n_eval // eval_bsz))]

    @torch.no_grad()
    def eval_loss():
        for b in batches:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss_sum(model, b, CHUNK)

    eval_loss()  # warm-up
    t = timed(eval_loss)
    out = {"eval_loss": {"examples": len(batches) * eval_bsz, "seq": seq, "batch": eval_bsz,
                         "examples_per_s": round(len(batches) * eval_bsz / t, 2)}}
    g = torch.Generator().manual_seed(2)
    n_prompts = max(gen_batches)
    lengths = torch.randint(60, 201, (n_prompts,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    gen = {}
    for bs in gen_batches:
        order = sorted(range(n_prompts), key=lambda i: -lengths[i])[:max(bs, min(n_prompts, 8))]

        @torch.no_grad()
        def run():
            for k in range(0, len(order), bs):
                idx = order[k:k + bs]
                width = max(lengths[i] for i in idx)
                ids = torch.zeros(len(idx), width, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(idx):  # left padding, as eval_gsm8k.py generates
                    ids[row, width - lengths[i]:] = prompts[i]
                    mask[row, width - lengths[i]:] = 1
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        run()  # warm-up
        t = timed(run)
        gen[f"batch_{bs}"] = {"examples": len(order), "examples_per_s": round(len(order) / t, 3),
                              "new_tokens_per_s": round(len(order) * new_tokens / t, 1)}
    out["generation"] = {"new_tokens": new_tokens, "prompt_tokens": "60-200", **gen}
    if len(gen_batches) > 1:
        lo, hi = min(gen_batches), max(gen_batches)
        out["generation"]["batched_vs_batch1_speedup"] = round(gen[f"batch_{hi}"]["examples_per_s"]
                                                               / gen[f"batch_{lo}"]["examples_per_s"], 2)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--grad-samples", type=int, default=32)
    ap.add_argument("--grad-bsz", type=int, default=8)
    ap.add_argument("--eval-examples", type=int, default=64)
    ap.add_argument("--gen-batches", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known here")
    ap.add_argument("--items", nargs="*", type=int, default=[1, 3, 4], help="1 (training), 3 (gradient estimation), "
                    "4 (evaluation); 2 = --all-methods")
    ap.add_argument("--all-methods", action="store_true", help="also time every registered method (item 2)")
    ap.add_argument("--budget-s", type=float, default=420, help="start no item after this many seconds")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU (only to check the code)")
    ap.add_argument("--tiny", action="store_true", help="a small model (only to check the code)")
    ap.add_argument("--dry", action="store_true", help="= --allow-cpu --tiny with small sizes: a code check")
    a = ap.parse_args()
    if a.dry:
        a.allow_cpu = a.tiny = True
        a.seq, a.batch, a.repeats, a.grad_samples, a.grad_bsz = 64, 2, 2, 4, 2
        a.eval_examples, a.gen_batches, a.new_tokens = 4, [1, 4], 4
    if not torch.cuda.is_available() and not a.allow_cpu:
        sys.exit("bench/gpu.py measures GPU throughput in bf16 and needs a CUDA GPU, but torch sees none "
                 f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it on a GPU machine; "
                 "`--dry` only checks the code.")
    from bench.common import llama, write

    t0 = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if a.tiny else ONE_B
    with dev:  # random weights made on the device: seconds, not the minute a CPU init of 1.1B takes
        base = llama(dtype=torch.bfloat16, max_positions=max(4096, a.seq), **shape)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    peak = peak_tflops(name, a.peak_tflops) if dev.type == "cuda" else None
    n_params = sum(p.numel() for p in base.parameters())
    result = {"device": name, "peak_bf16_tflops": peak, "params": n_params,
              "model": f"llama {shape}, bf16 weights, random", "seq": a.seq, "batch": a.batch, "lora_r": a.r,
              "flops_formula": "full: 6N + 12 L s d; LoRA: 4 N_frozen + 6 N_adapter + 12 L s d (per token; N: "
                               "matmul parameters incl. lm_head; with the chunked loss the head counts only on "
                               "answer positions)", "seconds": {}, "skipped": []}
    items = [("throughput", 1, lambda: throughput(base, make_batch(a.batch, a.seq, shape["vocab"], dev), a.r,
                                                  a.repeats, peak, a.all_methods or 2 in a.items)),
             ("gradient_estimation", 3, lambda: gradient_estimation(base, a.seq, a.grad_samples, a.grad_bsz,
                                                                    max(3, a.repeats // 3))),
             ("evaluation", 4, lambda: evaluation(base, a.seq, a.eval_examples, a.batch, a.gen_batches,
                                                  a.new_tokens))]
    for key, number, fn in items:
        if number not in a.items and not (number == 1 and 2 in a.items):
            continue
        if time.perf_counter() - t0 > a.budget_s:
            result["skipped"].append(f"{key}: --budget-s {a.budget_s} spent")
            continue
        t = time.perf_counter()
        result[key] = fn()
        result["seconds"][key] = round(time.perf_counter() - t, 1)
        torch.cuda.empty_cache() if dev.type == "cuda" else None
        print(f"bench.gpu: {key} done in {result['seconds'][key]} s", flush=True)
    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    if a.tiny:  # a code check: nothing for the results folder
        import json

        print(json.dumps(result, indent=2, default=str))
        return
    write("gpu", result)


if __name__ == "__main__":
    main()
