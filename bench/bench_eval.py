"""GSM8K evaluation throughput on the embedded model: examples per second of peftlab's batched, length-sorted,
left-padded generation against batch size 1 (one generate call per question, the peer's way), same prompts, greedy.

    python -m bench.bench_eval [--n 64] [--batch_sizes 1 8 16 32] [--repeats 3]   -> bench/results/eval.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.common import write
from peftlab.data.embedded import ensure_dataset, ensure_model
from peftlab.eval.extract import extract_flexible, gold_answer, same_number
from peftlab.eval.gsm8k import STOPS, generate, parse_args, plan_batches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 1 keeps a shared CPU from thrashing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from peftlab.models import load_tokenizer

    rows = [json.loads(l) for l in (ensure_dataset() / "test.jsonl").read_text().splitlines()[:args.n]]
    model = AutoModelForCausalLM.from_pretrained(ensure_model()).eval()
    tok = load_tokenizer(str(ensure_model()))
    tok.padding_side = "left"
    prompts = [f"Q: {r['question']}\nA: " for r in rows]
    lengths = [len(ids) for ids in tok(prompts)["input_ids"]]
    golds = [gold_answer(r["answer"]) for r in rows]
    configs = {bs: (parse_args(["--model", "embedded:tiny-llama", "--batch_size", str(bs), "--max_new_tokens",
                                str(args.max_new_tokens)]), plan_batches(lengths, bs)) for bs in args.batch_sizes}
    outs = {bs: generate(model, tok, prompts, plan, a, STOPS["lora_one"], False)  # also the warm-up
            for bs, (a, plan) in configs.items()}
    times = {bs: [] for bs in configs}
    for _ in range(args.repeats):  # interleaved, so load drift on a shared machine hits every batch size alike
        for bs, (a, plan) in configs.items():
            t = time.perf_counter()
            generate(model, tok, prompts, plan, a, STOPS["lora_one"], False)
            times[bs].append(time.perf_counter() - t)
    reference = [outs[args.batch_sizes[0]][i]["generation"] for i in range(len(prompts))]
    runs = []
    for bs, out in outs.items():
        t = statistics.median(times[bs])
        gens = [out[i]["generation"] for i in range(len(prompts))]
        runs.append({"batch_size": bs, "seconds": t, "examples_per_s": len(prompts) / t,
                     "new_tokens_per_s": sum(o["num_tokens"] for o in out.values()) / t,
                     "accuracy_flexible": sum(same_number(extract_flexible(g), y) for g, y in zip(gens, golds))
                     / len(gens),
                     "same_generations_as_first": sum(g == r for g, r in zip(gens, reference)) / len(gens)})
        print(runs[-1], flush=True)
    base = next((r for r in runs if r["batch_size"] == 1), runs[0])
    for r in runs:
        r["speedup_vs_batch_size_1"] = r["examples_per_s"] / base["examples_per_s"]
    write("eval", {"what": "examples/s of batched greedy GSM8K-style generation vs batch size 1, embedded tiny Llama",
                   "n_examples": len(prompts), "threads": args.threads,
                   "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                   "statistic": "median seconds over repeats, batch sizes interleaved, after a warm-up", "runs": runs,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")})


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
