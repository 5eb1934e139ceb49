"""FSDP against DDP (bench/results/fsdp.json): the same LoRA training step on a Llama-shaped random model (fp32, q/v
targets, r 8) over 2 processes, once replicated by DDP (accelerate, as the trainer does) and once with the frozen base
sharded by peftlab.fsdp.shard_frozen_base (adapters whole, gradients all-reduced as the trainer does).

Per process: step_s (median over steps; the arms alternate over repeats), the parameter bytes it holds after
wrapping (base shards + adapters), and its resident memory after wrapping and after the steps (bench.common.held_mb:
RSS once freed heap is given back to the OS), against DDP's.
On CPU (gloo) the all-gathers are memory copies, so step_s says what sharding costs in bookkeeping, not on a
network; on a GPU the same script measures CUDA memory too. Run: python -m bench.bench_fsdp [--quick]
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

ROOT = Path(__file__).resolve().parents[1]


def worker(arm: str, out: Path, hidden: int, layers: int, steps: int, batch: int, seq: int) -> None:
    import torch
    from omegaconf import OmegaConf

    from bench.common import held_mb, llama, timed
    from peftlab.adapters import apply_adapters
    from peftlab.fsdp import average_gradients, shard_frozen_base
    from peftlab.loss import token_loss_sum
    from peftlab.train import make_accelerator

    acc = make_accelerator(OmegaConf.create({"model": {"bf16": False}}))
    rank, world = acc.process_index, acc.num_processes
    model = llama(hidden=hidden, layers=layers, vocab=8192)
    peft = OmegaConf.create({"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "use_rslora": False,
                             "lora_target_modules": ["q_proj", "v_proj"]})
    apply_adapters(model, peft, OmegaConf.create({"name": "lora"}), "lora")
    model.to(acc.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    wrapped = shard_frozen_base(model, "full_shard", acc.device) if arm == "fsdp" else acc.prepare(model)
    held = sum(p.numel() * p.element_size() for p in wrapped.parameters())
    rss_wrapped = held_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 8192, (batch, seq), generator=g).to(acc.device)

    def step():
        loss = token_loss_sum(wrapped(input_ids=ids).logits, ids) * (world / ids.numel())
        loss.backward()
        if arm == "fsdp":
            average_gradients(params, world)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    times = [timed(step) for _ in range(steps)]
    res = {"step_s": statistics.median(times), "param_bytes_per_process": held, "rss_after_wrap_mb": rss_wrapped,
           "rss_after_steps_mb": held_mb(),
           "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
    if rank == 0:
        out.write_text(json.dumps(res))
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


def launch(arm: str, out: Path, args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    if not __import__("torch").cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "bench.bench_fsdp", "--worker", arm, "--out", str(out), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{arm} worker failed:\n{p.stderr[-3000:]}")
    return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args()
    hidden, layers = a.hidden or (256 if a.quick else 768), a.layers or (4 if a.quick else 8)
    steps, batch, seq = a.steps or (5 if a.quick else 10), 4, 128
    if a.worker:
        return worker(a.worker, a.out, hidden, layers, steps, batch, seq)
    from bench.common import write

    sizes = ["--hidden", str(hidden), "--layers", str(layers), "--steps", str(steps)]
    runs = {"ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(1 if a.quick else 3):  # alternating arms: a change of load hits both
            for arm in (("ddp", "fsdp") if rep % 2 == 0 else ("fsdp", "ddp")):
                runs[arm].append(launch(arm, Path(tmp) / f"{arm}{rep}.json", sizes, a.threads))
    med = {arm: {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None for k in rs[0]}
           for arm, rs in runs.items()}
    d, f = med["ddp"], med["fsdp"]
    write("fsdp", {
        "quick": a.quick, "processes": 2, "model": f"llama hidden {hidden}, {layers} layers, vocab 8192, fp32",
        "batch_per_process": batch, "seq": seq, "steps": steps, "repeats": len(runs["ddp"]), "median": med,
        "fsdp_vs_ddp_step_time": f["step_s"] / d["step_s"],
        "fsdp_vs_ddp_param_bytes": f["param_bytes_per_process"] / d["param_bytes_per_process"],
        "fsdp_vs_ddp_rss_after_wrap": f["rss_after_wrap_mb"] / d["rss_after_wrap_mb"],
        "fsdp_vs_ddp_rss_after_steps": f["rss_after_steps_mb"] / d["rss_after_steps_mb"],
    })


if __name__ == "__main__":
    main()
