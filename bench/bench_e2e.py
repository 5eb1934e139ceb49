"""End to end (bench/results/e2e.json): the default `python run_exp.py` against an HF Trainer + PEFT pipeline with
the same model (the embedded tiny Llama, fp32), data (peftlab.data.datasets.train_eval_examples + collate: the same
tokenised examples, label masking and padding), LoRA (qv, r 8, alpha 16, dropout 0.05) and hyperparameters (lr,
global batch 32 as 2 x 16 accumulated, warmup steps, linear schedule, AdamW betas/eps, weight decay, clipping at 1.0,
the same number of steps, eval on the same 256 examples at step 0, every epoch and at the end, a checkpoint every 50
steps and the adapter saved at the end).

Both run as fresh subprocesses, alternating, with the same OMP_NUM_THREADS (--threads, default 1), so each figure
includes imports and model loading:
- process_s: the subprocess's wall time; process_cpu_s: its CPU time (user + sys, all threads: less sensitive to other
  load on a shared machine); loop_s: the training phase (peftlab: summary.json train_time_s, evals and
  checkpoints included; HF: from the first evaluate to the end of train() incl. its evals and checkpoints);
- the final train loss (mean of the last 10 steps' losses) and the final eval loss, both pipelines' models scored by
  the same token-weighted mean (peftlab.train.evaluate).
Known differences: the data order (peftlab's per-epoch permutation vs HF's sampler) and dropout draws differ, and HF's
warmup starts at lr 0 where peftlab's starts at lr/(warmup+1). Run: python -m bench.bench_e2e [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}  # OMP_NUM_THREADS: --threads


def child_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_peftlab(work: Path, steps: int | None) -> dict:
    run_dir = work / "peftlab"
    cmd = [sys.executable, "run_exp.py", "wandb.mode=disabled", f"hydra.run.dir={run_dir}"]
    if steps:
        cmd.append(f"train.max_steps={steps}")
    t, c = time.perf_counter(), child_cpu_s()
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t, child_cpu_s() - c
    if p.returncode:
        raise RuntimeError(f"run_exp.py failed ({p.returncode}):\n{p.stderr[-3000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    return {"process_s": wall, "process_cpu_s": cpu, "loop_s": s["train_time_s"], "steps": s["steps"],
            "final_train_loss": s["final_train_loss"], "final_eval_loss": s["final_eval_loss"],
            "initial_eval_loss": s["initial_eval_loss"]}


def run_hf(work: Path, steps: int) -> dict:
    out = work / "hf"
    t, c = time.perf_counter(), child_cpu_s()
    p = subprocess.run([sys.executable, "-m", "bench.bench_e2e", "--hf-worker", str(out), "--steps", str(steps)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t, child_cpu_s() - c
    if p.returncode:
        raise RuntimeError(f"the HF Trainer pipeline failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return {"process_s": wall, "process_cpu_s": cpu, **json.loads((out / "result.json").read_text())}


def hf_worker(out: Path, steps: int) -> None:
    """The HF Trainer + PEFT pipeline on peftlab's default run configuration."""
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from peftlab.config import load_group
    from peftlab.data.datasets import collate, train_eval_examples
    from peftlab.models import load_tokenizer, resolve_model_path
    from peftlab.train import evaluate

    m, ds, peft = load_group("model", "tiny"), load_group("dataset", "tiny"), load_group("peft", "qv")
    seed = 42
    path = resolve_model_path(m.name)
    tok = load_tokenizer(path)
    train_ex, eval_ex = train_eval_examples(ds, tok, m.max_length)
    steps_per_epoch = len(train_ex) // m.real_batch_size
    warmup = int(round(m.warmup * steps)) if m.warmup < 1 else int(m.warmup)  # as peftlab.train.lr_lambda
    eval_every = max(1, int(round(m.eval_epochs * steps_per_epoch)))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=m.attn_implementation)
    model = get_peft_model(model, LoraConfig(r=peft.lora_r, lora_alpha=peft.lora_alpha, lora_dropout=peft.lora_dropout,
                                             target_modules=["q_proj", "v_proj"], bias="none"))
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=m.per_device_batch_size,
        gradient_accumulation_steps=m.real_batch_size // m.per_device_batch_size, per_device_eval_batch_size=
        m.per_device_batch_size, learning_rate=m.lr, weight_decay=m.weight_decay, warmup_steps=warmup,
        lr_scheduler_type="linear", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        logging_steps=1, eval_strategy="steps", eval_steps=eval_every, save_strategy="steps", save_steps=50,
        report_to="none", use_cpu=True, seed=seed, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True, prediction_loss_only=True)  # HF's faster eval: no logits kept (peftlab keeps none)
    trainer = Trainer(model=model, args=args, train_dataset=train_ex, eval_dataset=eval_ex,
                      data_collator=lambda exs: collate(exs, tok.pad_token_id))
    t = time.perf_counter()
    trainer.evaluate()  # peftlab evaluates at step 0 too
    trainer.train()
    if steps % eval_every:
        trainer.evaluate()  # peftlab evaluates at the last step
    trainer.save_model(str(out / "adapter"))
    loop = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_loss = evaluate(model, eval_ex, tok.pad_token_id, m.per_device_batch_size, Accelerator(cpu=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({
        "loop_s": loop, "steps": trainer.state.global_step, "final_train_loss": statistics.mean(losses[-10:]),
        "final_eval_loss": eval_loss, "hf_final_eval_loss": trainer.state.log_history[-1].get("eval_loss")}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 steps instead of the default run's")
    ap.add_argument("--repeats", type=int, default=None, help="runs per pipeline (default: 3 quick, 5 full)")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of both pipelines (1: the tiny model's ops are too small to share, and on a "
                         "busy machine a second thread waiting for its core slows every op)")
    ap.add_argument("--hf-worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hf_worker:
        return hf_worker(a.hf_worker, a.steps)
    from bench.common import write

    ENV["OMP_NUM_THREADS"] = str(a.threads)

    steps = 32 if a.quick else None  # None: run_exp.py's own default (model.epochs)
    repeats = a.repeats or (3 if a.quick else 5)
    runs = {"peftlab": [], "hf_trainer_peft": []}
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        for rep in range(repeats):
            order = ["peftlab", "hf_trainer_peft"] if rep % 2 == 0 else ["hf_trainer_peft", "peftlab"]
            for name in order:
                work = Path(tmp) / f"{name}-{rep}"
                if name == "peftlab":
                    runs[name].append(run_peftlab(work, steps))
                else:  # the same number of steps as the peftlab run made
                    n = steps or (runs["peftlab"][-1]["steps"] if runs["peftlab"] else run_peftlab(work, None)["steps"])
                    runs[name].append(run_hf(work, n))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("process_s", "process_cpu_s", "loop_s",
                                                                  "final_train_loss", "final_eval_loss")} for name, rs in runs.items()}
    p, h = med["peftlab"], med["hf_trainer_peft"]
    write("e2e", {
        "quick": a.quick, "steps": runs["peftlab"][0]["steps"], "repeats": repeats, "threads": a.threads,
        "setup": "embedded tiny Llama fp32, dataset tiny, LoRA qv r8 alpha16 dropout0.05, lr 3e-3, batch 32 (2x16), "
                 "linear schedule, warmup 0.03, clip 1.0, eval every epoch on 256 examples",
        "median": med, "runs": runs,
        "hf_vs_peftlab_process_time": round(h["process_s"] / p["process_s"], 3),
        "hf_vs_peftlab_loop_time": round(h["loop_s"] / p["loop_s"], 3),
        "hf_vs_peftlab_process_cpu_time": round(h["process_cpu_s"] / p["process_cpu_s"], 3),
        "ratio_meaning": "HF Trainer time / peftlab time (> 1: peftlab faster)",
    })


if __name__ == "__main__":
    main()
