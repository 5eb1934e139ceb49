"""GP-LoRA bench -> bench/results/gplora.json.

1. Projection overhead as a fraction of a training step (forward, backward, AdamW) on a Llama-shaped model (hidden
   512, 4 layers, seq 256, batch 2, fp32, every Linear adapted) at r = 8, 16, 32, 64, one CPU thread (on a shared
   2-core machine a second thread makes small eigh calls erratic); step and projection timed interleaved, medians.
2. Steps to a target loss, LoRA vs GP-LoRA (moments transport | reset | keep) on the planted low-rank regression of
   bench/regression.py, AdamW with the trainer's linear decay, over seeds and learning rates. The planted change is
   4x the module's so that the factors grow to where the guard lets the projection act. "lora_adam_restart" is a
   control: LoRA whose Adam state is restarted every step (no gauge), i.e. what moments=reset does to the optimizer.
3. The embedded default: `python run_exp.py` against `python run_exp.py method=gplora` (its defaults, and with
   moments=reset and transport) over seeds: final losses (mean and sample std) and steps until the 10-step mean
   train loss reaches thresholds.

    python -m bench.bench_gplora [--quick]
    python -m bench.bench_gplora --embedded-only    # 3 only -> bench/results/gplora_embedded.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.common import interleaved_times, llama, write
from bench.regression import adapted_model, make_task
from peftlab.adapters import adapter_layers, apply_adapters
from peftlab.config import default_dataset_name
from peftlab.optim.gauge import gauge_project_model, transport_moments_

ROOT = Path(__file__).resolve().parents[1]


def overhead(r: int, seq: int = 256, batch: int = 2, repeats: int = 5) -> dict:
    model = llama(hidden=512, layers=4)
    apply_adapters(model, OmegaConf.create({"target_set": "all", "lora_r": r, "lora_alpha": 2 * r,
                                            "lora_dropout": 0.0}))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # a trained-looking state (and guard 0 below): every layer is projected
        p.data.normal_(0, 0.02)
    opt = torch.optim.AdamW(params, lr=1e-6)
    x = torch.randint(0, 2048, (batch, seq))

    def step():
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    fns = {"step": step}
    for moments in ("reset", "transport"):
        fns[moments] = lambda m=moments: gauge_project_model(model, guard=0.0, optimizer=opt, moments=m)
    t = {k: statistics.median(v) for k, v in interleaved_times(fns, repeats=repeats).items()}
    return {"r": r, "layers": len(adapter_layers(model)), "step_s": round(t["step"], 4),
            **{f"project_{m}_s": round(t[m], 5) for m in ("reset", "transport")},
            **{f"overhead_{m}": round(t[m] / t["step"], 4) for m in ("reset", "transport")}}


def regression_run(variant: str, seed: int, lr: float, steps: int = 150, scale: float = 4.0,
                   targets=(0.05, 0.01, 0.002)) -> dict:
    """Steps until the full-data MSE falls to each fraction of its start (steps + 1: not reached)."""
    task = make_task(seed=seed)
    task["dW"] = task["dW"] * scale
    X, Y = task["X"], task["X"] @ (task["W0"] + task["dW"]).T
    torch.manual_seed(seed)
    model, layers = adapted_model(task, "lora", r=8, alpha=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        start = float(((model(X) - Y) ** 2).mean())
    hit, frac = {t: steps + 1 for t in targets}, 1.0
    for s in range(1, steps + 1):
        idx = torch.randint(0, len(X), (64,), generator=g)
        ((model(X[idx]) - Y[idx]) ** 2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if variant.startswith("gplora_"):
            gauge_project_model(model, guard=0.01, optimizer=opt, moments=variant.removeprefix("gplora_"))
        elif variant == "lora_adam_restart":
            for l in layers.values():
                transport_moments_(opt, l.lora_A, l.lora_B, None, None, "reset")
        with torch.no_grad():
            frac = float(((model(X) - Y) ** 2).mean()) / start
        for t in targets:
            hit[t] = s if frac <= t and hit[t] > steps else hit[t]
    return {"hit": hit, "final": frac}


def regression(seeds, lrs) -> dict:
    out = {}
    for lr in lrs:
        for variant in ("lora", "gplora_transport", "gplora_reset", "gplora_keep", "lora_adam_restart"):
            runs = [regression_run(variant, s, lr) for s in seeds]
            out[f"{variant}@lr={lr:g}"] = {
                **{f"steps_to_{t:g}": [r["hit"][t] for r in runs] for t in runs[0]["hit"]},
                **{f"mean_steps_to_{t:g}": statistics.mean(r["hit"][t] for r in runs) for t in runs[0]["hit"]},
                "final_mse_frac_median": statistics.median(r["final"] for r in runs)}
            print(variant, lr, {k: v for k, v in out[f"{variant}@lr={lr:g}"].items() if k.startswith("mean")},
                  flush=True)
    return out


def embedded_run(folder: Path, overrides: list[str], seed: int, thresholds=(0.3, 0.2, 0.12)) -> dict:
    run_dir = folder / f"{'_'.join(overrides) or 'lora'}_{seed}".replace("=", "-").replace("+", "")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, str(ROOT / "run_exp.py"), f"hydra.run.dir={run_dir}", "wandb.mode=disabled",
                    f"seed={seed}", *overrides], check=True, capture_output=True, cwd=ROOT, env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    mean10 = [statistics.mean(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
    return {"final_eval_loss": summary["final_eval_loss"], "final_train_loss": summary["final_train_loss"],
            **{f"steps_to_train_{t:g}": next((i + 1 for i, v in enumerate(mean10) if v <= t), None)
               for t in thresholds}}


def embedded(seeds) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in (("lora", []), ("gplora", ["method=gplora"]),
                                ("gplora_reset", ["method=gplora", "++method.moments=reset"]),
                                ("gplora_transport", ["method=gplora", "++method.moments=transport"])):
            runs = [embedded_run(Path(tmp), overrides, s) for s in seeds]
            out[name] = {k: [r[k] for r in runs] for k in runs[0]}
            out[name]["mean_final_eval_loss"] = statistics.mean(out[name]["final_eval_loss"])
            out[name]["std_final_eval_loss"] = statistics.stdev(out[name]["final_eval_loss"])
            print(name, out[name], flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer seeds and learning rates")
    ap.add_argument("--embedded-only", action="store_true", help="only part 3 -> bench/results/gplora_embedded.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.embedded_only:
        write("gplora_embedded", {"task": "python run_exp.py [method=gplora ...] (embedded default, 128 steps), "
                                          "seeds 42, 1, 2; gplora = its defaults (moments keep, guard 0.01)",
                                  "dataset": default_dataset_name(), "results": embedded([42, 1, 2])})
        return
    rows = [overhead(r, repeats=3 if a.quick else 5) for r in (8, 16, 32, 64)]
    for row in rows:
        print(row, flush=True)
    seeds = range(2 if a.quick else 3)
    write("gplora", {
        "overhead": {"model": "llama hidden 512, 4 layers, vocab 2048, seq 256, batch 2, fp32, target all, "
                              "1 thread; projection with the guard passed by every layer, after AdamW steps",
                     "goal": "<= 0.03 of a step", "rows": rows},
        "regression": {"task": "bench/regression.py make_task, planted change x4, r 8, alpha 16, AdamW, batch 64, "
                               "linear decay over 150 steps; steps until the MSE is 5%, 1%, 0.2% of its start "
                               "(151: not reached); guard 0.01, every 1",
                       "results": regression(seeds, (3e-3, 1e-2) if a.quick else (3e-3, 1e-2, 3e-2))},
        "embedded": {"task": "python run_exp.py [method=gplora ...] (embedded default, 128 steps), seeds 42, 1, 2",
                     "dataset": default_dataset_name(),
                     "results": embedded([42, 1] if a.quick else [42, 1, 2])},
    })


if __name__ == "__main__":
    main()
