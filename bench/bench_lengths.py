"""Throughput and memory on a real length distribution (bench/results/lengths.json), side by side in one run:

1. Training tokens/s, padding fraction and peak RSS of peftlab's trainer (micro-batches cut from the length-sorted
   global batch, the default; and in arrival order) against HF Trainer + PEFT without and with ``group_by_length``,
   on synthetic data with MetaMathQA's length shape: prompts of 40-140 tokens, responses log-normal with median 200
   and a tail clipped at max_length (512). Same random Llama (embedded tokenizer, vocabulary 512), same tokenised
   examples, collate function, LoRA (every linear of the blocks, r 16, alpha 32, dropout 0), optimizer, schedule,
   global batch 32 = per_device 4 x 8 accumulation, and the same steps: one epoch, so every pipeline trains on the same
   examples and real tokens. tokens/s = real (non-padding) tokens / seconds from the first collated micro-batch to
   the end of training (wall clock, and CPU time of the 1-thread process: the steadier one on a shared machine);
   padding fraction = padding / computed tokens, counted from every collated micro-batch.
2. The final adapter of the sorted peftlab run against the arrival-order one (the gradient is the same; dropout 0).
3. Peak memory of one training micro-batch (4 x 512, LoRA on every linear) at Llama-3's vocabulary (128,256):
   peftlab's chunked answer-token loss against the plain loss over full fp32 logits (train.loss_chunk_tokens=0),
   each in a fresh process; VmHWM above the RSS before the step.

Every pipeline is a fresh subprocess (OMP_NUM_THREADS=--threads), alternating order over repeats.
Run: python -m bench.bench_lengths [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
MAX_LEN, GLOBAL, PER_DEVICE, R = 512, 32, 4, 16
PIPELINES = ("peftlab_sorted", "peftlab_arrival", "hf_trainer_peft", "hf_trainer_peft_group_by_length")


# ---- data and model -------------------------------------------------------------------------------------------------
def one_token_words(tok) -> list[str]:
    """Words (with their leading space) that the tokenizer reads as exactly one token, so a text's length is set."""
    words = []
    for piece in tok.get_vocab():
        if piece.startswith("Ġ") and piece[1:].isalnum():
            w = " " + piece[1:]
            if len(tok(w, add_special_tokens=False)["input_ids"]) == 1:
                words.append(w)
    return sorted(words)


def write_data(path: Path, n: int, tok, seed: int = 0) -> None:
    """MetaMathQA-like rows (query, response): prompt tokens uniform in 40..140, response tokens log-normal with
    median 200 (sigma 0.6), clipped so the example fits max_length."""
    rng = random.Random(seed)
    words = one_token_words(tok)
    rows = []
    for _ in range(n):
        p = rng.randint(40, 140)
        r = min(int(math.exp(rng.gauss(math.log(200), 0.6))), MAX_LEN - p)
        rows.append({"query": "".join(rng.choice(words) for _ in range(p - 8)).strip(),
                     "response": "".join(rng.choice(words) for _ in range(max(r - 1, 1))).strip()})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_model(folder: Path, hidden: int, layers: int) -> None:
    from transformers import AutoTokenizer

    from bench.common import llama
    from peftlab.data.embedded import ensure_model

    tok = AutoTokenizer.from_pretrained(ensure_model())
    llama(hidden=hidden, layers=layers, vocab=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)


def overrides(work: Path, n: int, order: str, chunk: int | None = None) -> list[str]:
    return ["wandb.mode=disabled", f"model.name={work / 'model'}", "model.dtype=float32", "model.epochs=1",
            f"model.per_device_batch_size={PER_DEVICE}", f"model.real_batch_size={GLOBAL}", f"model.max_length={MAX_LEN}",
            "model.eval_epochs=0", "model.warmup=0", "model.lr=1e-3", "dataset_name=meta_math",
            f"++dataset.path={work / 'data.jsonl'}", "++dataset.eval_samples=0", f"++dataset.max_train_samples={n}",
            "+peft=all", f"++peft.lora_r={R}", f"++peft.lora_alpha={2 * R}", "++peft.lora_dropout=0",
            "train.save_every=0", f"train.micro_batch_order={order}"] + (
        [f"train.loss_chunk_tokens={chunk}"] if chunk is not None else [])


def compose(over: list[str], run_dir: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from peftlab.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=over, return_hydra_config=False)
    with open_dict(cfg):
        cfg.run_dir = run_dir
    return cfg


class Counting:
    """Wraps a collate function: counts real and computed (padded) tokens of every micro-batch, and notes the wall and
    CPU clocks at the first one (the start of the training loop in both pipelines)."""

    def __init__(self, fn):
        self.fn, self.real, self.computed, self.start = fn, 0, 0, None

    def __call__(self, examples, pad_id):
        if self.start is None:
            self.start = (time.perf_counter(), time.process_time())
        b = self.fn(examples, pad_id)
        self.real += int(b["attention_mask"].sum())
        self.computed += b["input_ids"].numel()
        return b


def loop_clocks(counter: Counting) -> dict:
    """Wall and CPU seconds from the first collated micro-batch to now (the end of training, adapter saved)."""
    return {"loop_s": time.perf_counter() - counter.start[0], "loop_cpu_s": time.process_time() - counter.start[1]}


def vm_hwm_mb() -> float:
    from bench.common import status_mb

    return status_mb("VmHWM")


# ---- workers (each a fresh process) ---------------------------------------------------------------------------------
def peftlab_worker(work: Path, n: int, order: str, out: Path) -> dict:
    import peftlab.train as T
    counter = Counting(T.collate)
    T.collate = counter  # the trainer's own micro-batches
    cfg = compose(overrides(work, n, order), str(out))
    s = T.train(cfg)
    return {**loop_clocks(counter), "steps": s["steps"], "real_tokens": counter.real,
            "computed_tokens": counter.computed, "final_train_loss": s["final_train_loss"], "peak_rss_mb": vm_hwm_mb()}


def hf_worker(work: Path, n: int, group_by_length: bool, out: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from peftlab.config import resolve_config
    from peftlab.data.datasets import Example, collate, train_eval_examples
    from peftlab.models import load_tokenizer
    cfg = resolve_config(compose(overrides(work, n, "arrival"), str(out)))
    tok = load_tokenizer(str(work / "model"))
    train_ex, _ = train_eval_examples(cfg.dataset, tok, MAX_LEN)  # peftlab's tokenisation: the same examples
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in train_ex]  # dicts: group_by_length reads lengths
    counter = Counting(collate)
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, bias="none", target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    args = TrainingArguments(
        output_dir=str(out), max_steps=len(rows) // GLOBAL, per_device_train_batch_size=PER_DEVICE,
        gradient_accumulation_steps=GLOBAL // PER_DEVICE, learning_rate=1e-3, weight_decay=0.0, warmup_steps=0,
        lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=True, seed=42, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True, **grouping(group_by_length))
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=lambda xs: counter(
        [Example(x["input_ids"], x["labels"]) for x in xs], tok.pad_token_id))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**loop_clocks(counter), "steps": trainer.state.global_step, "real_tokens": counter.real,
            "computed_tokens": counter.computed, "final_train_loss": statistics.mean(losses[-5:]),
            "peak_rss_mb": vm_hwm_mb()}


def grouping(on: bool) -> dict:
    """HF's length grouping: ``group_by_length`` until transformers 4.x, ``train_sampling_strategy`` since."""
    import dataclasses

    from transformers import TrainingArguments

    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"train_sampling_strategy": "group_by_length" if on else "random"}
    return {"group_by_length": on}


def memory_worker(chunk: int, vocab: int, hidden: int, seq: int) -> dict:
    """Peak RSS of one micro-batch's forward + backward (4 x seq, answer = the last 60%) through peftlab's loss."""
    import torch
    from omegaconf import OmegaConf

    from bench.common import held_mb, llama
    from peftlab.adapters import apply_adapters
    from peftlab.loss import loss_sum

    model = llama(hidden=hidden, layers=2, vocab=vocab)
    apply_adapters(model, OmegaConf.create({"lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                    "up_proj", "down_proj"], "lora_r": R,
                                            "lora_alpha": 2 * R, "lora_dropout": 0.0}))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (PER_DEVICE, seq), generator=g)
    labels = ids.clone()
    labels[:, : int(seq * 0.4)] = -100
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    before = held_mb()
    s, _ = loss_sum(model, b, chunk)
    s.backward()
    return {"chunk": chunk, "rss_before_mb": before, "peak_rss_mb": vm_hwm_mb(),
            "step_peak_above_before_mb": vm_hwm_mb() - before, "loss_sum": float(s.detach())}


# ---- the driver -----------------------------------------------------------------------------------------------------
def run_worker(args: list[str], threads: int) -> dict:
    env = {**ENV, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        p = subprocess.run([sys.executable, "-m", "bench.bench_lengths", "--worker", *args, "--result", f.name],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"worker {args} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        return json.loads(Path(f.name).read_text())


def adapter_difference(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter/adapter_model.safetensors")), load_file(str(b / "adapter/adapter_model.safetensors"))
    rel = max(float((ta[k] - tb[k]).abs().max() / ta[k].abs().max()) for k in ta)
    return {"max_abs_diff_over_tensor_scale": rel, "tensors": len(ta)}


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 global batches, a 2-layer model, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, rest = a.worker[0], a.worker[1:]
        if kind == "peftlab":
            r = peftlab_worker(Path(rest[0]), int(rest[1]), rest[2], Path(rest[3]))
        elif kind == "hf":
            r = hf_worker(Path(rest[0]), int(rest[1]), rest[2] == "1", Path(rest[3]))
        else:
            r = memory_worker(*(int(x) for x in rest))
        Path(a.result).write_text(json.dumps(r))
        return
    from bench.common import write
    from peftlab.models import load_tokenizer

    steps = 4 if a.quick else 12
    hidden, layers = 256, (2 if a.quick else 4)
    repeats = a.repeats or (1 if a.quick else 3)
    n = steps * GLOBAL
    runs = {p: [] for p in PIPELINES}
    with tempfile.TemporaryDirectory(prefix="bench_lengths_") as tmp:
        work = Path(tmp)
        make_model(work / "model", hidden, layers)
        write_data(work / "data.jsonl", n, load_tokenizer(str(work / "model")))
        for rep in range(repeats):
            order = PIPELINES if rep % 2 == 0 else PIPELINES[::-1]
            for p in order:
                out = work / f"{p}-{rep}"
                if p.startswith("peftlab"):
                    args = ["peftlab", str(work), str(n), p.split("_")[1].replace("sorted", "length"), str(out)]
                else:
                    args = ["hf", str(work), str(n), "1" if p.endswith("length") else "0", str(out)]
                r = run_worker(args, a.threads)
                r["tokens_per_s"] = r["real_tokens"] / r["loop_s"]
                r["tokens_per_cpu_s"] = r["real_tokens"] / r["loop_cpu_s"]
                r["padding_fraction"] = 1 - r["real_tokens"] / r["computed_tokens"]
                runs[p].append(r)
                print(f"bench_lengths: {p} rep {rep}: {r['tokens_per_s']:.0f} tokens/s, {r['tokens_per_cpu_s']:.0f} "
                      f"tokens/CPU-s, padding "
                      f"{r['padding_fraction']:.3f}, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        same = adapter_difference(work / "peftlab_arrival-0", work / "peftlab_sorted-0")
        memory = {}
        for chunk in (0, 1024):  # plain first, then chunked, each in its own process
            memory["plain" if chunk == 0 else "chunked"] = run_worker(["memory", str(chunk), "128256", str(hidden),
                                                                        str(MAX_LEN)], a.threads)
    med = {p: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "tokens_per_cpu_s", "padding_fraction",
                                                                "peak_rss_mb", "loop_s", "loop_cpu_s", "real_tokens",
                                                                "computed_tokens")}
           for p, rs in runs.items()}

    def ratio(p, q, key="tokens_per_s"):  # per repeat (side by side), then the spread
        xs = [x[key] / y[key] for x, y in zip(runs[p], runs[q])]
        return spread(xs) if len(xs) > 1 else xs[0]

    pm, cm = memory["plain"], memory["chunked"]
    write("lengths", {
        "quick": a.quick, "steps": steps, "repeats": repeats, "threads": a.threads,
        "setup": f"random Llama hidden {hidden}, {layers} layers, vocab 512 (embedded tokenizer), fp32; LoRA every "
                 f"linear r {R} alpha {2 * R} dropout 0; global batch {GLOBAL} = {PER_DEVICE} x {GLOBAL // PER_DEVICE}; "
                 f"max_length {MAX_LEN}; prompts 40-140 tokens, responses log-normal median 200 clipped; one epoch of "
                 f"{n} examples",
        "median": med, "runs": runs,
        "ratio_meaning": "per repeat (pipelines seconds apart), then median/min/max over repeats; tokens/CPU-s (real "
                         "tokens per CPU second of the loop, 1 thread) is the steadier figure on a shared machine",
        "peftlab_vs_hf_tokens_per_cpu_s": ratio("peftlab_sorted", "hf_trainer_peft", "tokens_per_cpu_s"),
        "peftlab_vs_hf_group_by_length_tokens_per_cpu_s": ratio("peftlab_sorted", "hf_trainer_peft_group_by_length",
                                                                "tokens_per_cpu_s"),
        "sorted_vs_arrival_tokens_per_cpu_s": ratio("peftlab_sorted", "peftlab_arrival", "tokens_per_cpu_s"),
        "peftlab_vs_hf_tokens_per_s": ratio("peftlab_sorted", "hf_trainer_peft"),
        "peftlab_vs_hf_group_by_length_tokens_per_s": ratio("peftlab_sorted", "hf_trainer_peft_group_by_length"),
        "sorted_vs_arrival_tokens_per_s": ratio("peftlab_sorted", "peftlab_arrival"),
        "peftlab_vs_hf_peak_rss_ratio": ratio("peftlab_sorted", "hf_trainer_peft", "peak_rss_mb"),
        "sorted_vs_arrival_adapter": same,
        "memory_128k_vocab": {"setup": f"one micro-batch {PER_DEVICE} x {MAX_LEN}, answer = last 60%, vocab 128256, "
                                       f"hidden {hidden}, 2 layers, LoRA every linear, fp32, chunk 1024",
                              "plain": pm, "chunked": cm,
                              "chunked_vs_plain_step_peak_ratio": cm["step_peak_above_before_mb"] / pm[
                                  "step_peak_above_before_mb"],
                              "chunked_vs_plain_process_peak_ratio": cm["peak_rss_mb"] / pm["peak_rss_mb"],
                              "loss_rel_diff": abs(cm["loss_sum"] - pm["loss_sum"]) / abs(pm["loss_sum"])},
    })


if __name__ == "__main__":
    main()
