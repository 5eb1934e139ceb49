"""GeoLoRA: step time against LoRA at the same initial rank on a Llama-shaped model (goal <= 1.5x), and the parameters
each needs for the same final loss on the planted low-rank regression (GeoLoRA's rank adapts; LoRA's rank is swept).

    python -m bench.bench_geolora [--quick]      -> bench/results/geolora.json
"""
from __future__ import annotations

import argparse
import statistics

import torch
from omegaconf import OmegaConf

from bench.common import interleaved_times, llama, write
from bench.regression import adapted_model, make_task, mse
from peftlab.adapters import adapter_layers, apply_adapters, get_method


def llama_step(method: str, r: int, hidden: int, seq: int, batch: int, target_set: str, method_cfg=None):
    """Closures for a training step (forward, backward, optimizer step) and for forward + backward alone."""
    model = llama(hidden=hidden)
    peft = OmegaConf.create({"target_set": target_set, "lora_r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0})
    apply_adapters(model, peft, method_cfg, method)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "lora":
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:
        opt = get_method("geolora").make_optimizer(model, params, OmegaConf.create({"lr": 1e-4}), method_cfg)
    x = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    def forward_backward():
        model(input_ids=x, labels=x).loss.backward()
        opt.zero_grad()

    return model, step, forward_backward


def step_times(r: int, hidden: int, seq: int, batch: int, target_set: str, repeats: int) -> dict:
    runs = {"lora": llama_step("lora", r, hidden, seq, batch, target_set)}
    for name, cfg in (("geolora", {}), ("geolora_fixed_rank", {"truncation_strategy": "fixed_rank"})):
        runs[name] = llama_step("geolora", r, hidden, seq, batch, target_set, OmegaConf.create(cfg))
        for _ in range(3):  # let the adaptive ranks move off their initial value before timing
            runs[name][1]()
    fns = {n: v[1] for n, v in runs.items()} | {f"{n}/fwd_bwd": v[2] for n, v in runs.items()}
    med = {n: statistics.median(t) for n, t in interleaved_times(fns, repeats=repeats).items()}
    return {"target_set": target_set, "r_init": r,
            "step_s": {n: med[n] for n in runs},
            "ratio_vs_lora": {n: med[n] / med["lora"] for n in runs if n != "lora"},
            "optimizer_share_s": {n: med[n] - med[f"{n}/fwd_bwd"] for n in runs},  # step minus forward/backward
            "ranks_while_timed": {n: sorted({l.rank for l in adapter_layers(v[0]).values()})
                                  for n, v in runs.items() if n != "lora"}}


def regression_run(method: str, r: int, seed: int, steps: int, lr: float, method_cfg=None) -> dict:
    task = make_task(seed=seed)
    torch.manual_seed(seed)
    model, layers = adapted_model(task, method, r=r, alpha=r, method_cfg=method_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if method == "lora" else
           get_method("geolora").make_optimizer(model, params, OmegaConf.create({"lr": lr}), method_cfg))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(task["X"]), (64,), generator=g)
        ((model(task["X"][idx]) - task["Y"][idx]) ** 2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    layer = layers["proj"]
    rank = layer.rank if method == "geolora" else r
    n_params = layer.active_params() if method == "geolora" else r * (layer.in_features + layer.out_features)
    return {"final_mse": mse(model, task), "rank": rank, "params": n_params}


def params_at_equal_loss(seeds, steps: int) -> dict:
    """LoRA's rank swept (AdamW, lr 1e-2); GeoLoRA from rank 8 (tau 1e-3; adam lr 1e-2, sgd lr 50): the smallest LoRA
    whose loss is at most GeoLoRA's, and the parameters each uses."""
    lora = {}
    for r in (1, 2, 3, 4, 6, 8, 16):
        rows = [regression_run("lora", r, s, steps, 1e-2) for s in seeds]
        lora[r] = {"final_mse": statistics.median(x["final_mse"] for x in rows), "params": rows[0]["params"]}
    geo = {}
    for name, cfg, lr in (("geolora_adam", {}, 1e-2), ("geolora_sgd", {"use_small_matrix_optimizer": "sgd"}, 50.0)):
        rows = [regression_run("geolora", 8, s, steps, lr, OmegaConf.create(cfg)) for s in seeds]
        loss = statistics.median(x["final_mse"] for x in rows)
        matching = [r for r in sorted(lora) if lora[r]["final_mse"] <= loss]
        geo[name] = {"final_mse": loss, "final_ranks": [x["rank"] for x in rows],
                     "params": statistics.median(x["params"] for x in rows),
                     "smallest_lora_rank_at_or_below_this_loss": matching[0] if matching else None,
                     "lora_params_at_equal_loss": lora[matching[0]]["params"] if matching else None}
    return {"task": "planted regression 64 -> 64, rank 4, anisotropic inputs (bench/regression.py), batch 64, "
                    f"{steps} steps, linear decay, median over {len(seeds)} seeds",
            "lora_by_rank": lora, "geolora": geo}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="1: steadier medians on a shared CPU")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    hidden, seq, batch, repeats = (512, 128, 1, 3) if a.quick else (512, 256, 1, 9)
    timing = [step_times(8, hidden, seq, batch, ts, repeats) for ts in ("qv", "all")]
    eq = params_at_equal_loss(range(2 if a.quick else 3), 200 if a.quick else 400)
    write("geolora", {"model": f"llama hidden {hidden}, 4 layers, seq {seq}, batch {batch}, fp32, CPU",
                      "step_time": timing, "params_at_equal_loss": eq,
                      "note": "step = forward + backward + optimizer step (LoRA: AdamW), interleaved medians; "
                              "geolora ranks adapt from r_init (tau 1e-3), geolora_fixed_rank keeps r_init; "
                              "GeoLoRA params = r (in + out) + r^2 at the final rank"})


if __name__ == "__main__":
    main()
