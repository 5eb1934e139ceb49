"""The lab's outputs: per-cell 95% intervals, the claims table, CSVs, plots with error bars, lab.md and lab.json.

Files in the output folder: lab.md (everything, readable), cells.csv (one row per part x cell x metric: mean and
95% t-interval over the final seeds), claims.csv, language.csv / regression.csv (every run, both stages), lab.json
(when, where, which command: the README's generated block names them), language.png / regression.png.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics

from .lab_claims import Claims
from .stats import t_interval
from .utils import atomic_write_json, atomic_write_text, save_figure, write_csv

LANG_METRICS = (("final_eval_loss", "eval loss"), ("accuracy_strict", "accuracy (strict)"),
                ("accuracy_flexible", "accuracy (flexible)"), ("train_s", "train s"))
REG_METRICS = (("steps", "steps to target"), ("final_loss", "final loss / L(W0)"), ("adapter_rank", "adapter rank"),
               ("params", "parameters"), ("col_alignment", "init col align"), ("row_alignment", "init row align"))


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def cell_groups(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["label"], r["init"]), []).append(r)
    return out


def metric_value(r: dict, key: str, steps: int):
    if key == "steps":
        return r["steps_to_target"] or steps + 1
    return r.get(key)


def cell_stats(part: str, rows: list[dict], rates: dict, metrics, steps: int) -> list[dict]:
    out = []
    for (label, init), rs in cell_groups(rows).items():
        for key, name in metrics:
            iv = t_interval(metric_value(r, key, steps) for r in rs)
            out.append({"part": part, "method": label, "init": init, "lr": rates.get((part, label, init), rs[0]["lr"]),
                        "metric": key, "name": name, "n": iv.n, "mean": iv.mean, "lo": iv.lo, "hi": iv.hi})
    return out


def table(stats: list[dict], metrics, extra=None) -> list[str]:
    """Markdown: one row per cell, one column per metric: mean [95% CI]."""
    head = ["method", "init", "lr", "n"] + [n for _, n in metrics] + ([extra[0]] if extra else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    by: dict = {}
    for st in stats:
        by.setdefault((st["method"], st["init"]), {})[st["metric"]] = st
    for (m, i), d in by.items():
        first = next(iter(d.values()))
        cols = [m, i, f"{first['lr']:.3g}", str(first["n"])]
        for key, _ in metrics:
            st = d[key]
            digits = 4 if key.endswith("loss") else 3
            cols.append(fmt(st, digits))
        if extra:
            cols.append(extra[1](m, i))
        lines.append("| " + " | ".join(cols) + " |")
    return lines


def fmt(st: dict, digits: int) -> str:
    if st["n"] == 0 or st["mean"] != st["mean"]:
        return "n/a"
    if st["n"] < 2 or st["lo"] != st["lo"]:
        return f"{st['mean']:.{digits}g}"
    return f"{st['mean']:.{digits}g} [{st['lo']:.{digits}g}, {st['hi']:.{digits}g}]"


def invocations(path, meta: dict, now: dict) -> list[dict]:
    """The invocations that made this lab's runs: the earlier ones recorded in path's lab.json when it holds a lab of
    the same settings (a resumed lab), then this one unless it ran nothing (it only rewrote the report). A lab.json
    from before the list had one invocation's date, ran_now, wall_s and jobs."""
    same = ("command", "final_seeds", "select_seeds", "lr_factors", "widen", "reg_steps", "lm_steps", "score_limit",
            "eval_samples", "target", "dataset")
    if path.exists():
        old = json.loads(path.read_text())
        if all(old.get(k) == meta[k] for k in same):
            earlier = old.get("invocations") or [{"date": old["date"], "ran": old["ran_now"],
                                                  "wall_s": old["wall_s"], "jobs": old["jobs"]}]
            return earlier + ([now] if now["ran"] else [])
    return [now]


def select_metric(row: dict, s) -> tuple:
    """What a rate is chosen by (lower is better): eval loss; regression: steps to target (a miss counts as
    steps + 1), then the log final loss."""
    if row["part"] == "regression":
        return (row["steps_to_target"] or s.reg_steps + 1, math.log(max(row["final_loss"], 1e-30)))
    return (row["final_eval_loss"],)


def selection_lines(sel: list[dict], rates: dict, s) -> list[str]:
    lines = ["| part | method | init | mean selection metric per rate (chosen in bold) |", "| --- | --- | --- | --- |"]
    by: dict = {}
    for r in sel:
        by.setdefault((r["part"], r["label"], r["init"]), {}).setdefault(r["lr"], []).append(select_metric(r, s)[0])
    for k, per in by.items():
        cells = [(f"**{lr:.3g}: {statistics.fmean(v):.4g}**" if lr == rates.get(k) else f"{lr:.3g}: "
                  f"{statistics.fmean(v):.4g}") for lr, v in sorted(per.items())]
        edge = rates.get(k) in (min(per), max(per)) and len(per) > 1  # the optimum may lie outside the grid
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {', '.join(cells)}{' (edge of the grid)' if edge else ''} |")
    return lines


def write_report(s, sel_rows, fin_rows, base, rates, skipped, errors, work: dict) -> dict:
    """work: {"runs": planned, "ran_now": run by this invocation (the rest were stored), "wall_s": its wall time,
    "dataset": the language task's name}."""
    out = s.out
    lang = [r for r in fin_rows if r["part"] == "language"]
    reg = [r for r in fin_rows if r["part"] == "regression"]
    stats = cell_stats("regression", reg, rates, REG_METRICS, s.reg_steps) + \
        cell_stats("language", ([base] if base else []) + lang, rates, LANG_METRICS, s.reg_steps)
    claims = Claims(lang, reg, s.reg_steps, s.target).all()
    cmd = "python -m peftlab.lab" + (" --quick" if s.quick else "")
    meta = {"command": cmd, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
            "final_seeds": s.final_seeds, "select_seeds": s.select_seeds, "lr_factors": list(s.lr_factors),
            "widen": s.widen, "reg_steps": s.reg_steps, "lm_steps": s.lm_steps, "score_limit": s.score_limit,
            "eval_samples": s.eval_samples, "target": s.target, "dataset": work["dataset"], "runs": work["runs"]}
    meta["invocations"] = invocations(out / "lab.json", meta, {"date": meta["date"], "ran": work["ran_now"],
                                                               "wall_s": work["wall_s"], "jobs": s.jobs})
    ran = sum(i["ran"] for i in meta["invocations"])
    md = ["# peftlab method lab", "", f"`{cmd}`, {meta['date']}, {meta['machine']}. {work['runs']} runs: {ran} run by "
          "the invocations " + "; ".join(f"{i['date']} ({i['ran']} runs, {i['wall_s'] / 60:.1f} min wall, --jobs "
                                          f"{i['jobs']})" for i in meta["invocations"])
          + (f", {work['runs'] - ran} stored in the folder before (e.g. by a quick lab) and read back." if
             work["runs"] > ran else "."), "",
          f"Each cell (method variant x init) ran at every rate of {', '.join(f'{f:.3g}' for f in s.lr_factors)} x "
          f"its base rate on {s.select_seeds} selection seed(s), a grid widened by the next half-decade rate where its "
          f"best lay on an edge (up to {s.widen} times; each cell's grid is under Rate selection); the rate with the "
          f"lowest mean selection metric (eval loss; regression: steps to target) then ran on {s.final_seeds} fresh "
          f"seeds (0..{s.final_seeds - 1}, shared by every cell). Figures: mean [95% t-interval] over those seeds.",
          ""]
    if reg:
        md += ["## Planted low-rank regression", "",
               f"d = 64, planted rank 4, anisotropic inputs, adapter rank 8, {s.reg_steps} steps; target: loss <= "
               f"{s.target:g} x L(W0) (a miss counts as {s.reg_steps + 1} steps). Parameters: those the adapter uses "
               f"at the end. Plot: regression.png.", ""]
        reached = {c: f"{sum(r['steps_to_target'] is not None for r in rs)}/{len(rs)}"
                   for c, rs in cell_groups(reg).items()}
        md += table([x for x in stats if x["part"] == "regression"], REG_METRICS,
                    ("reached target", lambda m, i: reached[(m, i)])) + [""]
    if lang:
        md += ["## Embedded language task", "",
               f"Dataset {meta['dataset']}, the default run config (tiny Llama, qv r 8) but for the rate, "
               f"{s.lm_steps or 'the default number of'} optimizer steps; eval loss on {s.eval_samples} validation "
               f"examples (the selection metric); accuracy: greedy, strict and flexible extraction, first "
               f"{s.score_limit} test examples. Plot: language.png.", ""]
        md += table([x for x in stats if x["part"] == "language"], LANG_METRICS) + [""]
    md += ["## Claims", "", "| claim | evidence | test | estimate | verdict |", "| --- | --- | --- | --- | --- |"]
    md += [f"| {c['claim']} | {c['evidence']} | {c['test']} | {c['estimate']} | **{c['verdict']}** |" for c in claims]
    md += ["", "## Rate selection", ""] + selection_lines(sel_rows, rates, s) + [""]
    if skipped or errors:
        md += ["## Not run", ""] + [f"- {m} x {', '.join(i)}: {why}" for (m, why), i in skipped.items()]
        md += [f"- failed: {e}" for e in errors] + [""]
    plots = plot(out, stats)
    if plots:
        md += [plots, ""]
    write_csv(out / "cells.csv", stats)
    if claims:
        write_csv(out / "claims.csv", claims)
    for part, rows in (("language", sel_rows + ([base] if base else []) + lang), ("regression", sel_rows + reg)):
        rows = [r for r in rows if r["part"] == part]
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r if k != "curve"))
            write_csv(out / f"{part}.csv", sorted(rows, key=lambda r: (r["stage"], r["label"], r["init"], r["lr"],
                                                                        r["seed"])), keys)
    atomic_write_json(out / "lab.json", meta)
    atomic_write_text(out / "lab.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return {"stats": stats, "claims": claims, "meta": meta}


def plot(out, stats: list[dict]) -> str | None:
    """Bars with 95% error bars per cell; None when done, else a one-line note (matplotlib is optional)."""
    from .plots import pyplot

    plt = pyplot("the lab's plots")
    if plt is None:
        return "Plots skipped: matplotlib is not installed (pip install 'peftlab[plots]')."
    panels = {"language": ("final_eval_loss", "accuracy_strict"), "regression": ("steps", "adapter_rank")}
    for part, keys in panels.items():
        rows = [x for x in stats if x["part"] == part]
        if not rows:
            continue
        cells = len({(x["method"], x["init"]) for x in rows})
        fig, axes = plt.subplots(1, len(keys), figsize=(12, 1.5 + 0.28 * cells), sharey=True)
        for ax, key in zip(axes, keys):  # one horizontal bar per cell, top to bottom in the tables' order
            sel = [x for x in rows if x["metric"] == key and x["n"] > 0]
            # a t-interval can reach below 0; the bar's whisker stops at the axis on a log scale
            err = [[0 if x["lo"] != x["lo"] else x["mean"] - max(x["lo"], x["mean"] * 1e-3 if key.endswith("loss")
                                                                  else x["lo"]) for x in sel],
                   [0 if x["hi"] != x["hi"] else x["hi"] - x["mean"] for x in sel]]
            y = list(range(len(sel)))[::-1]
            ax.barh(y, [x["mean"] for x in sel], xerr=err, capsize=2, height=0.7)
            ax.set_yticks(y, [x["method"] if x["init"] == "-" else f"{x['method']} x {x['init']}" for x in sel],
                          fontsize=7)
            if key.endswith("loss"):  # the base model's loss is ~100x the adapted ones'
                ax.set_xscale("log")
            ax.set_title(f"{sel[0]['name'] if sel else key} (mean, 95% CI)", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        save_figure(fig, out / f"{part}.png", dpi=110)
        plt.close(fig)
    return None
