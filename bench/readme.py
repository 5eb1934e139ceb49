"""README figures are generated: `python -m bench.readme` rewrites the README's marked blocks from committed results.

    <!-- generated:bench --> ... <!-- /generated -->   the benchmark table, from bench/results/*.json
    <!-- generated:lab --> ... <!-- /generated -->     the method lab's tables, from bench/results/lab/ (lab.json,
                                                       cells.csv, claims.csv)

`python -m bench.readme --check` exits 1 when the README differs from what the results give (tests/test_readme.py
does the same in memory). A figure that varies between repeats or seeds is shown with its spread (the range over
repeats, or the 95% interval over seeds); a figure no results file holds is not in these blocks.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n)(.*?)(<!-- /generated -->)", re.S)


def load(results: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def g(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def spread(xs: list[float], digits: int = 3) -> str:
    """'min-max' of repeats or seeds (the figure's spread)."""
    return f"{g(min(xs), digits)}-{g(max(xs), digits)}"


def bench_rows(d: dict) -> list[tuple[str, str, str]]:
    """(what, figure, source) per row; each figure read from its results file."""
    rows = []
    if "train" in d:
        c = d["train"]["configs"][0]
        v = c["variants"]
        ratios = [p / q for p, q in zip(v["peft_lora"]["repeats_s"], v["lora"]["repeats_s"])]
        rows.append((f"training tokens/s, peftlab LoRA / HF PEFT LoRA ({c['model']}, seq {c['seq']}, "
                     f"{len(c['targets'])} target projections, r {c['lora_r']})",
                     f"{g(c['peftlab_vs_peft_tokens_per_s'])} (per repeat {spread(ratios)})", "train.json"))
        def per_repeat(k):  # the ratio in each interleaved repeat: its range is the figure's spread
            return spread([a / b for a, b in zip(v[k]["repeats_s"], v["lora"]["repeats_s"])])

        rows.append(("step time vs LoRA (per-repeat range): GP-LoRA every 10 / every step / preconditioned AdamW / "
                     "GeoLoRA", " / ".join(f"{g(v[k]['vs_lora_step_time'])} ({per_repeat(k)})"
                                           for k in ("gplora", "gplora_every1", "lora_precond_adamw", "geolora")),
                     "train.json"))
    if "geolora" in d:
        st = {r["target_set"]: r["ratio_vs_lora"] for r in d["geolora"]["step_time"]}
        rows.append(("step time vs LoRA: GeoLoRA rank adapting / fixed rank (qv; all linears)",
                     "; ".join(f"{g(r['geolora'])} / {g(r['geolora_fixed_rank'])}" for r in st.values()),
                     "geolora.json"))
    if "rotational_pissa" in d:
        st = d["rotational_pissa"]["step_time"]
        ways = [k for k in st if k != "lora"]
        rows.append((f"step time vs LoRA: Rotational PiSSA {' / '.join(ways)}",
                     " / ".join(g(st[k]["vs_lora"]) for k in ways), "rotational_pissa.json"))
        rows.append(("NF4 residual: adapted base bytes vs fp32",
                     g(d["rotational_pissa"]["nf4_residual_saving"]["adapted_base_bytes_ratio"], 2),
                     "rotational_pissa.json"))
    if "gplora" in d:
        ov = d["gplora"]["overhead"]["rows"]
        rows.append((f"GP-LoRA projection per step at r = {' / '.join(str(r['r']) for r in ov)}",
                     " / ".join(f"{100 * r['overhead_reset']:.1f}%" for r in ov), "gplora.json"))
        res = d["gplora"]["regression"]["results"]
        lrs = sorted({k.split("@lr=")[1] for k in res}, key=float)
        rows.append((f"planted regression x4, steps to 1% at lr {' / '.join(lrs)}, GP-LoRA (reset) vs LoRA "
                     f"(3 seeds: mean, range)",
                     "; ".join(f"{g(res[f'gplora_reset@lr={lr}']['mean_steps_to_0.01'])} "
                               f"({spread(res[f'gplora_reset@lr={lr}']['steps_to_0.01'])}) vs "
                               f"{g(res[f'lora@lr={lr}']['mean_steps_to_0.01'])} "
                               f"({spread(res[f'lora@lr={lr}']['steps_to_0.01'])})" for lr in lrs), "gplora.json"))
    if "gplora_embedded" in d:
        e = d["gplora_embedded"]["results"]
        dataset = d["gplora_embedded"].get("dataset", "tiny")
        rows.append((f"final eval loss on the embedded default (dataset {dataset}), 128 steps, 3 seeds (mean, "
                     "range): LoRA / GP-LoRA moments keep (default) / reset / transport",
                     " / ".join(f"{g(sum(e[k]['final_eval_loss']) / len(e[k]['final_eval_loss']))} "
                                f"({spread(e[k]['final_eval_loss'])})"
                                for k in ("lora", "gplora", "gplora_reset", "gplora_transport")),
                     "gplora_embedded.json"))
    if "lengths" in d:
        L = d["lengths"]

        def med(r):  # median (min-max over repeats)
            return f"{g(r['median'])} ({spread([r['min'], r['max']])})"

        med_ = L["median"]
        mem = L["memory_128k_vocab"]
        rows.append(("MetaMathQA-like lengths, real tokens per CPU-second (median, range over repeats): peftlab / "
                     "HF Trainer + PEFT; / HF with length grouping; peftlab sorted / arrival order",
                     f"{med(L['peftlab_vs_hf_tokens_per_cpu_s'])}; "
                     f"{med(L['peftlab_vs_hf_group_by_length_tokens_per_cpu_s'])}; "
                     f"{med(L['sorted_vs_arrival_tokens_per_cpu_s'])}", "lengths.json"))
        rows.append(("same run: padding fraction peftlab sorted / arrival / HF / HF grouped; peak RSS peftlab / HF",
                     " / ".join(g(med_[k]["padding_fraction"], 2) for k in
                                ("peftlab_sorted", "peftlab_arrival", "hf_trainer_peft",
                                 "hf_trainer_peft_group_by_length"))
                     + f"; {med(L['peftlab_vs_hf_peak_rss_ratio'])}", "lengths.json"))
        rows.append(("final adapter, sorted vs arrival order: max difference / the tensor's largest entry",
                     g(L["sorted_vs_arrival_adapter"]["max_abs_diff_over_tensor_scale"], 2), "lengths.json"))
        rows.append(("loss memory at vocabulary 128,256 (one micro-batch 4 x 512), chunked / plain, step peak above "
                     "the pre-step RSS", g(mem["chunked"]["step_peak_above_before_mb"]
                                           / mem["plain"]["step_peak_above_before_mb"], 2), "lengths.json"))
    if "inits" in d:
        r, p = d["inits"]["gradient_estimation"]["ratios"], d["inits"]["pissa_init"]
        rows.append(("gradient estimation time per sample vs one plain forward+backward (all linears / qv)",
                     f"{g(r['peftlab_all_time_vs_plain_fwd_bwd'])} / {g(r['peftlab_qv_time_vs_plain_fwd_bwd'])}",
                     "inits.json"))
        rows.append(("gradient estimation peak memory vs naive accumulation (all linears / qv)",
                     f"{g(r['peftlab_all_peak_vs_naive'])} / {g(r['peftlab_qv_peak_vs_naive'])}", "inits.json"))
        rows.append(("PiSSA init: randomized (niter 4) vs full SVD speed-up; full SVD time vs PEFT `pissa`",
                     f"{g(p['speedup_niter_4_vs_full'])}x; {g(p['peftlab_full_vs_peft_pissa'])}", "inits.json"))
    if "eval" in d:
        runs = [r for r in d["eval"]["runs"] if r["batch_size"] > 1]
        rows.append((f"eval_gsm8k examples/s, batch {' / '.join(str(r['batch_size']) for r in runs)} vs batch 1",
                     " / ".join(f"{g(r['speedup_vs_batch_size_1'])}x" for r in runs), "eval.json"))
    if "e2e" in d:
        e = d["e2e"]
        rows.append((f"end to end, {e['steps']} steps of LoRA qv r8 on the embedded tiny Llama and dataset tiny: "
                     f"HF Trainer + PEFT time / peftlab time "
                     f"(process; training loop)", f"{g(e['hf_vs_peftlab_process_time'])}; "
                                                   f"{g(e['hf_vs_peftlab_loop_time'])}", "e2e.json"))
    if "fsdp" in d:
        f = d["fsdp"]
        rows.append((f"FSDP vs DDP, {f['processes']} CPU processes, {f['model']}: parameter bytes / RSS after steps "
                     f"/ step time per process", f"{g(f['fsdp_vs_ddp_param_bytes'], 2)} / "
                                                 f"{g(f['fsdp_vs_ddp_rss_after_steps'], 2)} / "
                                                 f"{g(f['fsdp_vs_ddp_step_time'])}", "fsdp.json"))
    return rows


def bench_block(d: dict) -> str:
    m = d.get("run_all", d.get("train", {})).get("machine", {})
    head = (f"Machine of these results: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch "
            f"{m.get('torch', '?')}, GPU: {m.get('gpu') or 'none'}.\n\n") if m else ""
    lines = ["| what | figure | results file |", "| --- | --- | --- |"]
    lines += [f"| {w} | {f} | `bench/results/{s}` |" for w, f, s in bench_rows(d)]
    return head + "\n".join(lines) + "\n"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ci(row: dict, digits: int) -> str:
    m, lo, hi, n = float(row["mean"]), float(row["lo"]), float(row["hi"]), int(row["n"])
    if n == 0 or m != m:
        return "n/a"
    return f"{m:.{digits}g}" if n < 2 or lo != lo else f"{m:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def lab_block(lab: Path) -> str:
    if not (lab / "lab.json").exists():
        return "No lab results committed yet (`python -m peftlab.lab`).\n"
    meta = json.loads((lab / "lab.json").read_text())
    ran = meta.get("invocations") or [meta]  # the date its runs finished, not when the report was last rewritten
    out = [f"`{meta['command']}` ({ran[-1]['date']}; {meta['machine']}; language task: dataset "
           f"`{meta.get('dataset', 'tiny')}`): each method x init at its own rate (the best of a grid of "
           f"{len(meta['lr_factors'])} rates on {meta['select_seeds']} selection seed(s), widened past an edge where "
           f"the best lay, up to {meta.get('widen', 0)} times), then {meta['final_seeds']} fresh seeds; mean [95% "
           f"t-interval]. Full tables: `bench/results/{lab.name}/lab.md`.", ""]
    quick = lab.parent / f"{lab.name}_quick" / "lab.json"
    if quick.exists():
        q = json.loads(quick.read_text())
        done = [i for i in q["invocations"] if i["ran"]]
        out[0] += (f" Quick mode: `{q['command']}` ran its {sum(i['ran'] for i in done)} runs in "
                   f"{sum(i['wall_s'] for i in done) / 60:.1f} min on the same machine with --jobs "
                   f"{'/'.join(sorted({str(i['jobs']) for i in done}))} (`bench/results/{quick.parent.name}/`).")
    cells = read_csv(lab / "cells.csv")
    metrics = (("final_eval_loss", "eval loss", 4), ("accuracy_strict", "accuracy strict", 3),
               ("accuracy_flexible", "accuracy flexible", 3))
    by: dict = {}
    for r in cells:
        if r["part"] == "language":
            by.setdefault((r["method"], r["init"], r["lr"]), {})[r["metric"]] = r
    if by:
        out += ["| method | init | lr | n | " + " | ".join(n for _, n, _ in metrics) + " |",
                "| --- | --- | --- | --- |" + " --- |" * len(metrics)]
        for (m, i, lr), d in by.items():
            n = next(iter(d.values()))["n"]
            out.append(f"| {m} | {i} | {float(lr):.3g} | {n} | " + " | ".join(ci(d[k], dg) for k, _, dg in metrics)
                       + " |")
        out.append("")
    if (lab / "claims.csv").exists():
        out += ["| claim | evidence | estimate (95% CI) | verdict |", "| --- | --- | --- | --- |"]
        out += [f"| {c['claim']} | {c['evidence']} | {c['estimate']} | {c['verdict']} |"
                for c in read_csv(lab / "claims.csv")]
    return "\n".join(out) + "\n"


def blocks(results: Path = RESULTS) -> dict[str, str]:
    return {"bench": bench_block(load(results)), "lab": lab_block(results / "lab")}


def rewrite(text: str, new: dict[str, str]) -> str:
    found = {m.group(2) for m in BLOCK.finditer(text)}
    missing = set(new) - found
    if missing:
        marks = ", ".join(f"'<!-- generated:{n} -->'" for n in sorted(missing))
        raise ValueError(f"README lacks the marked block(s) {marks}, each closed by '<!-- /generated -->' "
                         f"(allowed names: {sorted(new)})")
    return BLOCK.sub(lambda m: m.group(1) + new[m.group(2)] + m.group(4) if m.group(2) in new else m.group(0), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--check", action="store_true", help="exit 1 when the README differs from the results")
    a = ap.parse_args(argv)
    text = a.readme.read_text()
    new = rewrite(text, blocks(a.results))
    if a.check:
        if new != text:
            print(f"{a.readme}: generated blocks differ from {a.results}; run python -m bench.readme", file=sys.stderr)
            return 1
        return 0
    if new != text:
        from peftlab.utils import atomic_write_text

        atomic_write_text(a.readme, new)
        print(f"rewrote the generated blocks of {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
