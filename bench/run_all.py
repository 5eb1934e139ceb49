"""Run every bench/bench_*.py (each a subprocess with a time limit; a failure is recorded, not fatal), then write
bench/results/summary.md: the machine, the headline ratios and every figure of every bench/results/*.json.

    python -m bench.run_all [--quick] [--only train e2e]   (`make bench` runs the full version)

--quick passes --quick to the modules that take it and keeps the whole run under ~10 minutes on a 2-core CPU:
each module gets at most --limit seconds and the run stops starting modules when --budget is spent.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from bench.common import RESULTS, machine
from peftlab.utils import atomic_write_text

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FIRST = ("bench_train", "bench_e2e")  # the headline figures run first when time is short
HEADLINE = re.compile(r"(^|_)(vs|ratio|speedup|overhead|fraction|mfu)(_|$)")  # on a figure's last key


def modules(only: list[str] | None) -> list[str]:
    names = sorted(p.stem for p in BENCH.glob("bench_*.py"))
    names = [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]
    if only:
        wanted = {o if o.startswith("bench_") else f"bench_{o}" for o in only}
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"unknown bench module(s) {sorted(unknown)}; allowed: {names}")
        names = [n for n in names if n in wanted]
    return names


def run_module(name: str, quick: bool, limit: float) -> dict:
    cmd = [sys.executable, "-m", f"bench.{name}"]
    if quick and '"--quick"' in (BENCH / f"{name}.py").read_text():
        cmd.append("--quick")
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
        tail = (p.stderr or p.stdout)[-1500:] if p.returncode else ""
    except subprocess.TimeoutExpired:
        status, tail = f"timed out after {limit:.0f} s", ""
    secs = time.perf_counter() - t
    print(f"bench: {name}: {status} in {secs:.0f} s", flush=True)
    if tail:
        print(tail, file=sys.stderr)
    return {"module": name, "command": " ".join(cmd[1:]), "status": status, "seconds": round(secs, 1),
            "error_tail": tail}


# ---- summary ----------------------------------------------------------------------------------------------------------
def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v):
        return ", ".join(fmt(x) for x in v)
    if v is None:
        return "n/a"
    return str(v).replace("|", "\\|").replace("\n", " ")


def flatten(obj, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, scalar or list of scalars) pairs; lists of dicts are indexed by a naming field when they have one."""
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
        out = []
        for i, x in enumerate(obj):
            tag = next((f"{k}={x[k]}" for k in ("name", "method", "r", "batch_size", "hidden", "model")
                        if isinstance(x, dict) and k in x and not isinstance(x[k], (dict, list))), str(i))
            out += flatten(x, f"{prefix}[{tag}]")
        return out
    return [(prefix, obj)]


def machine_line(m: dict) -> str:
    gpu = m.get("gpu") or "none"
    return f"{m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}, {m.get('threads')} threads, GPU: {gpu}"


def train_table(b: dict | None) -> list[str]:
    if not b:
        return []
    out = ["## Training step time (bench_train)", "",
           "| config | variant | step s | tokens/s | time vs peftlab LoRA | trainable params |",
           "| --- | --- | --- | --- | --- | --- |"]
    for c in b["configs"]:
        tag = f"{c.get('name', '')}: {c['model']}, seq {c['seq']}, batch {c['batch']}, r {c['lora_r']}"
        for v, r in c["variants"].items():
            out.append(f"| {tag} | {v} | {fmt(r['step_s'])} | {fmt(r['tokens_per_s'])} | "
                       f"{fmt(r['vs_lora_step_time'])} | {r['trainable_params']} |")
        for v, note in c.get("notes", {}).items():
            out.append(f"| {tag} | {v} | {fmt(note)} | | | |")
    ratios = ", ".join(f"{c.get('name', i)}: {fmt(c['peftlab_vs_peft_tokens_per_s'])} (fastest repeats: "
                       f"{fmt(c.get('peftlab_vs_peft_tokens_per_s_fastest_repeats'))})"
                       for i, c in enumerate(b["configs"]))
    return out + ["", f"peftlab LoRA tokens/s / HF PEFT LoRA tokens/s, median of per-repeat ratios: {ratios} "
                      f"(> 1: peftlab faster).", ""]


def e2e_table(b: dict | None) -> list[str]:
    if not b:
        return []
    m = b["median"]
    out = [f"## End to end (bench_e2e): {b['steps']} steps, {b['repeats']} run(s) each", "",
           "| pipeline | process s | process CPU s | training loop s | final train loss | final eval loss |",
           "| --- | --- | --- | --- | --- | --- |"]
    out += [f"| {n} | {fmt(r['process_s'])} | {fmt(r.get('process_cpu_s'))} | {fmt(r['loop_s'])} | "
            f"{fmt(r['final_train_loss'])} | {fmt(r['final_eval_loss'])} |" for n, r in m.items()]
    return out + ["", f"HF Trainer + PEFT time / peftlab time: process {fmt(b['hf_vs_peftlab_process_time'])}, "
                      f"CPU {fmt(b.get('hf_vs_peftlab_process_cpu_time'))}, loop {fmt(b['hf_vs_peftlab_loop_time'])}.",
                  ""]


def summary(runs: list[dict], quick: bool, started: float) -> str:
    files = sorted(RESULTS.glob("*.json"))
    files = [f for f in files if f.name != "run_all.json"]
    here = machine()
    lines = ["# peftlab benchmarks", "",
             f"Machine: {machine_line(here)}. Written {datetime.now():%Y-%m-%d %H:%M} by `python -m bench.run_all"
             f"{' --quick' if quick else ''}`{' (quick: small sizes, few repeats)' if quick else ''}. "
             "Every figure is a median over repeats; every ratio is measured side by side in one run.", ""]
    if runs:
        lines += ["| module | status | seconds |", "| --- | --- | --- |"]
        lines += [f"| {r['module']} | {r['status']} | {r['seconds']} |" for r in runs]
        lines.append("")
    blobs = {}
    for f in files:
        try:
            blobs[f.stem] = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            lines.append(f"- {f.name}: unreadable ({e})")
    stale = {n for n, _ in blobs.items() if (RESULTS / f"{n}.json").stat().st_mtime < started}
    lines += train_table(blobs.get("train")) + e2e_table(blobs.get("e2e"))
    heads = [(n, k, v) for n, b in blobs.items() for k, v in flatten({x: y for x, y in b.items() if x != "machine"})
             if HEADLINE.search(k.split(".")[-1]) and isinstance(v, (int, float)) and not isinstance(v, bool)]
    if heads:
        lines += ["## Headline ratios", "", "| results | figure | value |", "| --- | --- | --- |"]
        lines += [f"| {n}{' (earlier run)' if n in stale else ''} | {k} | {fmt(v)} |" for n, k, v in heads]
        lines.append("")
    lab = RESULTS / "lab" / "lab.md"
    if lab.exists():
        lines += [f"The method lab's tables (`python -m peftlab.lab`): {lab.relative_to(ROOT)}.", ""]
    lines += ["## All figures", ""]
    for n, b in blobs.items():
        m = b.get("machine")
        when = datetime.fromtimestamp((RESULTS / f"{n}.json").stat().st_mtime)
        lines.append(f"### {n}.json" + (f" (from an earlier run, {when:%Y-%m-%d %H:%M})" if n in stale else ""))
        if isinstance(m, dict) and machine_line(m) != machine_line(here):
            lines.append(f"Machine: {machine_line(m)}")
        lines += ["", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in flatten({x: y for x, y in b.items() if x != "machine"})]
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", help="module names (train, e2e, ... or bench_train, ...)")
    ap.add_argument("--limit", type=float, default=None, help="seconds per module (default 170 quick, 3600 full)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run; later modules are skipped (default 560 quick, none full)")
    ap.add_argument("--summary-only", action="store_true", help="rewrite summary.md from the JSON files")
    a = ap.parse_args()
    limit = a.limit or (170 if a.quick else 3600)
    budget = a.budget or (560 if a.quick else float("inf"))
    started = t0 = time.time()
    runs = []
    if not a.summary_only:
        for name in modules(a.only):
            left = budget - (time.time() - started)
            if left < 30:
                runs.append({"module": name, "status": "skipped: the run's time budget is spent", "seconds": 0})
                continue
            runs.append(run_module(name, a.quick, min(limit, left)))
        atomic_write_text(RESULTS / "run_all.json",
                          json.dumps({"machine": machine(), "quick": a.quick, "runs": runs}, indent=2) + "\n")
    elif (RESULTS / "run_all.json").exists():  # the last run's module table
        last = json.loads((RESULTS / "run_all.json").read_text())
        runs, a.quick = last["runs"], last["quick"]
        started = 0.0
    text = summary(runs, a.quick, started)
    atomic_write_text(RESULTS / "summary.md", text + "\n")
    print(f"bench: wrote {RESULTS / 'summary.md'} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
