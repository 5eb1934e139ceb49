"""Sweep report from run folders alone (no wandb): a markdown and CSV table and PNG plots.

    python -m peftlab.report multirun/2026-01-01/12-00-00 [more folders or run folders] [-o outdir]

A run folder is one holding summary.json or .hydra/config.yaml (a multirun or array folder is searched for them).
Columns: method, init, the overrides that differ between runs (seed, wandb.*, hydra.*, resume and run_dir left out),
final train loss (the trainer's mean of the last 10 steps), final eval loss, GSM8K accuracy when an eval results json
is in the run folder, wall time (summed over requeue segments), trainable parameters. Runs identical but for the seed
form a group: mean and sample std over its seeds; a seed that occurs twice in a group (a copied or re-run folder) is
counted once (the first finished run of it) and flagged. Plots: train and eval loss per group, the mean over seeds
with a band of +- 1 sample std, labelled by what differs between the groups; GeoLoRA ranks over time when logged.
Runs without summary.json (unfinished or failed) are listed with what their metrics.jsonl and checkpoint hold.
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
    duplicate_of: Path | None = None  # another run of the same group and seed, the one counted


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

    from .config import load_run_config

    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    cfg = load_run_config(path)  # the resolved config (config.yaml): fallback groups filled in
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
        "wall_time_s": wall_time(path, summary),
        "trainable_params": summary.get("trainable_params"),
        "steps": summary.get("steps", max((r.get("step", 0) for r in metrics), default=None)),
    }
    seed = summary.get("seed", from_cfg("seed"))
    return Run(path, str(summary.get("method") or from_cfg("method.name", "?")),
               str(summary.get("init") or from_cfg("init.name", "default")), seed, overrides, numbers,
               bool(summary), metrics)


def wall_time(path: Path, summary: dict) -> float | None:
    """The run's time over all its requeue segments. A summary with "segments" has it summed by the trainer; an older
    one holds only its last segment's wall time, while train_time_s (the loop's time) was always summed: take the
    larger. An unfinished run: its checkpoint's times."""
    if summary:
        if "segments" in summary or summary.get("train_time_s") is None:
            return summary.get("wall_time_s")
        return max(summary.get("wall_time_s") or 0.0, summary["train_time_s"])
    state = path / "checkpoint" / "trainer_state.json"
    if state.is_file():
        st = json.loads(state.read_text())
        return st.get("setup_time_s", 0.0) + st.get("wall_time_s", 0.0)
    return None


# ---- tables ----------------------------------------------------------------------------------------------------------
def varying_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value (or absence) differs between runs, in first-seen order."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    keys = [k for k in keys if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)]
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def group_runs(runs: list[Run], keys: list[str]) -> dict[tuple, list[Run]]:
    """Runs by (method, init, varying overrides), each seed once: a second run of a seed already in its group is
    marked duplicate_of the counted one (a finished run is preferred) and left out of the group."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.method, r.init, *(r.overrides.get(k, "") for k in keys)), []).append(r)
    for gkey, members in groups.items():
        kept: dict = {}
        for r in sorted(members, key=lambda m: not m.finished):  # stable: finished first, else folder order
            if r.seed is None:  # an unknown seed cannot be matched; keep it
                kept[("path", r.path)] = r
            elif ("seed", r.seed) in kept:
                r.duplicate_of = kept["seed", r.seed].path
            else:
                kept["seed", r.seed] = r
        groups[gkey] = [m for m in members if m.duplicate_of is None]
    return groups


def group_key(r: Run, keys: list[str]) -> tuple:
    return (r.method, r.init, *(r.overrides.get(k, "") for k in keys))


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
    groups = group_runs(runs, keys)  # marks duplicate seeds first
    run_rows = []
    for r in runs:
        status = "done" if r.finished else "unfinished"
        row = {"run_dir": str(r.path), "method": r.method, "init": r.init,
               **{k: r.overrides.get(k, "") for k in keys}, "seed": r.seed,
               "status": f"duplicate seed of {r.duplicate_of} (not counted)" if r.duplicate_of else status,
               **r.numbers}
        run_rows.append(row)
    group_rows = []
    for gkey, members in groups.items():
        row = {"method": gkey[0], "init": gkey[1], **dict(zip(keys, gkey[2:])), "n": len(members),
               "seeds": " ".join(str(m.seed) for m in members),
               "unfinished": sum(not m.finished for m in members),
               "duplicate_seeds": sum(r.duplicate_of is not None and group_key(r, keys) == gkey for r in runs)}
        for n in NUMBERS:
            row[f"{n}_mean"], row[f"{n}_std"] = mean_std([m.numbers[n] for m in members])
        group_rows.append(row)
    return keys, run_rows, group_rows


def markdown(keys: list[str], run_rows: list[dict], group_rows: list[dict], plots: list[str]) -> str:
    shown = [n for n in NUMBERS if any(g[f"{n}_mean"] is not None for g in group_rows)]
    head = ["method", "init", *keys, "n", *shown]
    dups = sum(g["duplicate_seeds"] for g in group_rows)
    lines = ["# Sweep report", "", f"{len(run_rows)} runs in {len(group_rows)} groups (runs identical but for the "
             f"seed); numbers are mean ± sample std over seeds; wall time is summed over requeue segments."
             + (f" {dups} run(s) repeat a seed of their group and are not counted (see Runs)." if dups else ""), "",
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
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
BAND = "± 1 sample std"


def group_labels(gkeys: list[tuple], keys: list[str]) -> list[str]:
    """Short legend labels: only the fields (method, init, the varying overrides) that differ between the groups."""
    names = ["method", "init", *keys]
    differ = [i for i in range(len(names)) if len({g[i] for g in gkeys}) > 1]
    if not differ:  # one group, or groups alike in every field: name it by method/init
        return [f"{g[0]}/{g[1]}" for g in gkeys]
    return [" ".join(f"{names[i]}={g[i] if g[i] != '' else '-'}" for i in differ) for g in gkeys]


def group_style(i: int) -> dict:
    """Colour, line style and marker of the i-th group: tab10's 10 colours, then the next line style (40 distinct
    colour/line pairs), with markers cycling on a different period so neighbours differ too."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab10"](i % 10), "linestyle": LINESTYLES[(i // 10) % len(LINESTYLES)],
            "marker": MARKERS[i % len(MARKERS)]}


def curve_stats(members: list[Run], key: str) -> tuple[list[int], list[float], list[float | None], list[int]]:
    """Per logged step: the mean over the group's seeds, the sample std (None with one value) and how many seeds."""
    by_step: dict[int, list[float]] = {}
    for m in members:
        for row in m.metrics:
            if row.get(key) is not None and math.isfinite(float(row[key])):
                by_step.setdefault(int(row["step"]), []).append(float(row[key]))
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps],
            [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else None for s in steps],
            [len(by_step[s]) for s in steps])


def _plot_group(ax, steps, mean, std, style: dict, label: str, markevery) -> None:
    import numpy as np

    ax.plot(steps, mean, label=label, color=style["color"], linestyle=style["linestyle"], marker=style["marker"],
            ms=4, markevery=markevery, lw=1.5)
    band = [(x, m, s) for x, m, s in zip(steps, mean, std) if s is not None]
    if band:
        x, m, sd = (np.array(v, dtype=float) for v in zip(*band))
        ax.fill_between(x, m - sd, m + sd, color=style["color"], alpha=0.18, lw=0)


def loss_figure(runs: list[Run], keys: list[str]):
    """Train and eval loss per group (mean over seeds, band ± 1 sample std), one legend outside, right of the
    panels; None without any logged loss."""
    import matplotlib.pyplot as plt

    groups = group_runs(runs, keys)
    labels = group_labels(list(groups), keys)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    handles = {}
    for i, ((gkey, members), label) in enumerate(zip(groups.items(), labels)):
        style = group_style(i)
        for ax, key in zip(axes, ("train/loss", "eval/loss")):
            steps, mean, std, _ = curve_stats(members, key)
            if steps:
                _plot_group(ax, steps, mean, std, style, f"{label} (n={len(members)})",
                            markevery=max(1, len(steps) // 8))
                handles.setdefault(i, ax.lines[-1])
    if not handles:
        plt.close(fig)
        return None
    for ax, what in zip(axes, ("train loss", "eval loss")):
        ax.set_title(f"{what}: mean over seeds, band {BAND}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{what} (mean token cross-entropy)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.legend([handles[i] for i in sorted(handles)], [handles[i].get_label() for i in sorted(handles)],
               loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8, frameon=False,
               title="group (n = seeds)")
    return fig


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
    from .plots import pyplot

    plt = pyplot("the report's plots")  # an optional extra
    if plt is None:
        return []
    made = []
    fig = loss_figure(runs, keys)
    if fig is not None:
        save_figure(fig, outdir / "loss_curves.png", dpi=150, bbox_inches="tight")  # tight: keeps the outside legend
        made.append("loss_curves.png")
        plt.close(fig)

    rank_runs = [(r, *geolora_rank_curve(r)) for r in runs if r.duplicate_of is None]
    rank_runs = [t for t in rank_runs if t[1]]
    if rank_runs:
        groups = list(group_runs(runs, keys))
        labels = dict(zip(groups, group_labels(groups, keys)))
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for j, (r, steps, ranks) in enumerate(rank_runs):
            g = groups.index(group_key(r, keys))  # colour: the group (as in the loss plot); line style: the run
            ax.plot(steps, ranks, label=f"{labels[groups[g]]} seed={r.seed}", color=group_style(g)["color"],
                    linestyle=LINESTYLES[j % len(LINESTYLES)])
        ax.set_title("GeoLoRA total rank over training (one line per run)", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("sum of layer ranks")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        save_figure(fig, outdir / "geolora_ranks.png", dpi=150, bbox_inches="tight")
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
