"""Sweep report from run folders alone (no wandb): a markdown and CSV table and PNG plots.

    python -m peftlab.report multirun/2026-01-01/12-00-00 [more folders or run folders] [-o outdir]

A run folder is one holding summary.json or .hydra/config.yaml (a multirun or array folder is searched for them).
Columns: method, init, the overrides that differ between runs (seed, wandb.*, hydra.*, resume and run_dir left out),
final train loss (the trainer's mean of the last 10 steps), final eval loss, GSM8K accuracy when an eval results json
is in the run folder, wall time, trainable parameters. Runs identical but for the seed form a group: mean and sample
std over its seeds. Plots: train and eval loss per group (mean over seeds), GeoLoRA ranks over time when logged.
Runs without summary.json (unfinished or failed) are listed with what their metrics.jsonl holds.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .utils import atomic_write_text, save_figure, write_csv

IGNORED_KEYS = ("seed", "resume", "run_dir", "method", "init")  # method/init have their own columns
IGNORED_PREFIXES = ("hydra.", "wandb.")
NUMBERS = ("final_train_loss", "final_eval_loss", "gsm8k_strict", "gsm8k_flexible", "wall_time_s",
           "trainable_params", "steps")


@dataclass
class Run:
    path: Path
    method: str
    init: str
    seed: int | None
    overrides: dict[str, str]
    numbers: dict[str, float | None]
    finished: bool
    metrics: list[dict] = field(default_factory=list)


# ---- reading run folders ---------------------------------------------------------------------------------------------
def find_runs(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise ValueError(f"{p} is not a folder; give run folders or a multirun/array folder holding them")
        if _is_run(p):
            found.append(p)
            continue
        sub = sorted({f.parent for f in p.rglob("summary.json")} | {f.parent.parent for f in p.rglob(".hydra/config.yaml")},
                     key=_natural)
        sub = [s for s in sub if _is_run(s)]
        if not sub:
            raise ValueError(f"no run folder (with summary.json or .hydra/config.yaml) under {p}")
        found += sub
    return list(dict.fromkeys(found))


def _is_run(p: Path) -> bool:
    return (p / "summary.json").is_file() or (p / ".hydra" / "config.yaml").is_file()


def _natural(p: Path):
    return [int(t) if t.isdigit() else t for t in p.as_posix().replace("/", " / ").split()]


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """key -> value as written (`+`/`++` dropped), parsed by Hydra's own override parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = {}
    for o in OverridesParser.create().parse_overrides(list(lines)):
        out[o.key_or_group] = "<deleted>" if o.is_delete() else o.get_value_element_as_str()
    return out


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed run
            break
    return rows


def find_eval_results(run: Path) -> dict | None:
    """The newest GSM8K results json in the run folder (eval_gsm8k.py writes run_dir/eval/results.json)."""
    cands = [run / "eval" / "results.json"] + sorted(run.glob("eval*/**/*.json")) + sorted(run.glob("*results*.json"))
    best = None
    for f in dict.fromkeys(cands):
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(d, dict) and ("accuracy_strict" in d or "accuracy_flexible" in d):
            if best is None or f.stat().st_mtime > best[0]:
                best = (f.stat().st_mtime, d)
    return best[1] if best else None


def load_run(path: Path) -> Run:
    from omegaconf import OmegaConf

    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    cfg = OmegaConf.load(path / ".hydra" / "config.yaml") if (path / ".hydra" / "config.yaml").is_file() else None
    over_file = path / ".hydra" / "overrides.yaml"
    overrides = parse_overrides(OmegaConf.to_container(OmegaConf.load(over_file))) if over_file.is_file() else {}
    metrics = read_metrics(path / "metrics.jsonl")

    def from_cfg(key, default=None):
        return OmegaConf.select(cfg, key, default=default) if cfg is not None else default

    def last(key):
        vals = [r[key] for r in metrics if r.get(key) is not None]
        return vals[-1] if vals else None

    ev = find_eval_results(path) or {}
    numbers = {
        "final_train_loss": summary.get("final_train_loss", last("train/loss")),
        "final_eval_loss": summary.get("final_eval_loss", last("eval/loss")),
        "gsm8k_strict": ev.get("accuracy_strict"),
        "gsm8k_flexible": ev.get("accuracy_flexible"),
        "wall_time_s": summary.get("wall_time_s"),
        "trainable_params": summary.get("trainable_params"),
        "steps": summary.get("steps", max((r.get("step", 0) for r in metrics), default=None)),
    }
    seed = summary.get("seed", from_cfg("seed"))
    return Run(path, str(summary.get("method") or from_cfg("method.name", "?")),
               str(summary.get("init") or from_cfg("init.name", "default")), seed, overrides, numbers,
               bool(summary), metrics)


# ---- tables ----------------------------------------------------------------------------------------------------------
def varying_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value (or absence) differs between runs, in first-seen order."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    keys = [k for k in keys if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)]
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def group_runs(runs: list[Run], keys: list[str]) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.method, r.init, *(r.overrides.get(k, "") for k in keys)), []).append(r)
    return groups


def mean_std(vals: list) -> tuple[float | None, float | None]:
    xs = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _fmt(x, digits=4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return f"{int(x)}" if float(x).is_integer() else str(x)


def build_tables(runs: list[Run]) -> tuple[list[str], list[dict], list[dict]]:
    keys = varying_keys(runs)
    run_rows = []
    for r in runs:
        row = {"run_dir": str(r.path), "method": r.method, "init": r.init,
               **{k: r.overrides.get(k, "") for k in keys}, "seed": r.seed,
               "status": "done" if r.finished else "unfinished", **r.numbers}
        run_rows.append(row)
    group_rows = []
    for gkey, members in group_runs(runs, keys).items():
        row = {"method": gkey[0], "init": gkey[1], **dict(zip(keys, gkey[2:])), "n": len(members),
               "seeds": " ".join(str(m.seed) for m in members),
               "unfinished": sum(not m.finished for m in members)}
        for n in NUMBERS:
            row[f"{n}_mean"], row[f"{n}_std"] = mean_std([m.numbers[n] for m in members])
        group_rows.append(row)
    return keys, run_rows, group_rows


def markdown(keys: list[str], run_rows: list[dict], group_rows: list[dict], plots: list[str]) -> str:
    shown = [n for n in NUMBERS if any(g[f"{n}_mean"] is not None for g in group_rows)]
    head = ["method", "init", *keys, "n", *shown]
    lines = ["# Sweep report", "", f"{len(run_rows)} runs in {len(group_rows)} groups (runs identical but for the "
             f"seed); numbers are mean ± sample std over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in group_rows:
        cells = [g["method"], g["init"], *(g[k] or "-" for k in keys), str(g["n"])]
        for n in shown:
            m, s = g[f"{n}_mean"], g[f"{n}_std"]
            cells.append(_fmt(m) + (f" ± {_fmt(s, 2)}" if s is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "", "| run | " + " | ".join(["method", "init", *keys, "seed", "status", *shown]) + " |",
              "|" + "---|" * (len(keys) + len(shown) + 5)]
    for r in run_rows:
        cells = [r["run_dir"], r["method"], r["init"], *(r[k] or "-" for k in keys), _fmt(r["seed"]), r["status"],
                 *(_fmt(r[n]) for n in shown)]
        lines.append("| " + " | ".join(cells) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# ---- plots -----------------------------------------------------------------------------------------------------------
def _label(gkey: tuple, keys: list[str]) -> str:
    return " ".join([f"{gkey[0]}/{gkey[1]}", *(f"{k}={v}" for k, v in zip(keys, gkey[2:]) if v != "")])


def _mean_curve(members: list[Run], key: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for m in members:
        for row in m.metrics:
            if row.get(key) is not None:
                by_step.setdefault(int(row["step"]), []).append(float(row[key]))
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def geolora_rank_curve(run: Run) -> tuple[list[int], list[float]]:
    steps, ranks = [], []
    for row in run.metrics:
        if "geolora/total_rank" in row:
            total = row["geolora/total_rank"]
        else:
            per_layer = [v for k, v in row.items() if k.startswith("geolora/rank/")]
            if not per_layer:
                continue
            total = sum(per_layer)
        steps.append(int(row["step"]))
        ranks.append(float(total))
    return steps, ranks


def make_plots(runs: list[Run], keys: list[str], outdir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    groups = group_runs(runs, keys)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    any_curve = False
    for gkey, members in groups.items():
        for ax, key in zip(axes, ("train/loss", "eval/loss")):
            steps, vals = _mean_curve(members, key)
            if steps:
                any_curve = True
                ax.plot(steps, vals, marker="o" if key == "eval/loss" else None, ms=3,
                        label=f"{_label(gkey, keys)} (n={len(members)})")
    if any_curve:
        for ax, title in zip(axes, ("train loss (mean over seeds)", "eval loss (mean over seeds)")):
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, outdir / "loss_curves.png", dpi=120)
        made.append("loss_curves.png")
    plt.close(fig)

    rank_runs = [(r, *geolora_rank_curve(r)) for r in runs]
    rank_runs = [t for t in rank_runs if t[1]]
    if rank_runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r, steps, ranks in rank_runs:
            ax.plot(steps, ranks, label=f"{r.path.name} seed={r.seed}")
        ax.set_title("GeoLoRA total rank over training")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("sum of layer ranks")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, outdir / "geolora_ranks.png", dpi=120)
        made.append("geolora_ranks.png")
        plt.close(fig)
    return made


# ---- entry point -----------------------------------------------------------------------------------------------------
def report(paths: list[Path], outdir: Path, plots: bool = True) -> dict:
    runs = [load_run(p) for p in find_runs(paths)]
    keys, run_rows, group_rows = build_tables(runs)
    outdir.mkdir(parents=True, exist_ok=True)
    write_csv(outdir / "runs.csv", run_rows)
    write_csv(outdir / "groups.csv", group_rows)
    made = make_plots(runs, keys, outdir) if plots else []
    md = markdown(keys, run_rows, group_rows, made)
    atomic_write_text(outdir / "report.md", md)
    return {"keys": keys, "runs": run_rows, "groups": group_rows, "plots": made, "markdown": md}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m peftlab.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="multirun/array folders or run folders")
    ap.add_argument("-o", "--outdir", type=Path,
                    help="where report.md, runs.csv, groups.csv and the PNGs go (default: <folder>/report for one "
                         "folder, else ./report)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    outdir = args.outdir or (args.paths[0] / "report" if len(args.paths) == 1 and not _is_run(args.paths[0])
                             else Path("report"))
    try:
        out = report(args.paths, outdir, plots=not args.no_plots)
    except ValueError as e:
        raise SystemExit(f"peftlab.report: {e}")
    print(out["markdown"])
    print(f"peftlab.report: {len(out['runs'])} runs, {len(out['groups'])} groups -> {outdir}")


if __name__ == "__main__":
    main()
