"""The method lab: every registered method x applicable init, each at its own tuned learning rate, over seeds.

    python -m peftlab.lab [--quick] [-o bench/results/lab] [--jobs N] [--slurm] [--methods lora dora]
                          [--inits default LoRA-One] [--parts regression language] [--dataset NAME]

Two tasks: (a) the planted low-rank regression (peftlab/lab_regression.py), (b) the embedded language task (the
default dataset, or --dataset): one run = one composed config through peftlab.train.train, then peftlab.eval.gsm8k
scoring (greedy, strict and flexible extraction) on the dataset's test split.
Stages, each resumable (a run's result is one JSON under <out>/runs/<part>/, written atomically; a rerun does only
what is missing):
  1. select: each cell (method variant x init) at every rate of a small grid around its base rate, on the selection
     seeds (1000, 1001, ...); the cell's rate = the lowest mean eval loss (regression: fewest steps to target). A cell
     whose best rate lies on an edge of its grid gets the next rate beyond that edge (half-decade steps), up to
     --widen times, so a chosen rate is a minimum inside the grid wherever the budget allows.
     Selection runs are not scored (the metric is the eval loss).
  2. final: each cell at its chosen rate on fresh seeds (0, 1, ...), shared by all cells so comparisons pair by seed;
     language runs are scored.
  3. report: 95% t-intervals per cell, a claims table (peftlab/lab_claims.py: paired differences over shared seeds,
     a verdict per claim), Markdown + CSV + plots with error bars in <out>.
Cells: every registered method x every init that applies to it; the optimizer variants (LoRA + precond_adamw,
LoRA+, GP-LoRA's transport) at the default init. --quick: the plain methods and LoRA+ at the default init, plain LoRA at
every init (the init claims need them), a 4-rate grid, 1 selection and 3 final seeds; its runs are a subset of the full
lab's (same budget, rates, seeds and result folder keys), so a full lab in the same folder reuses them.
Fan-out: --jobs N local processes; or --slurm: the language runs a stage still lacks go to a sweep file
(peftlab.sweep's format, run_exp.py overrides) for slurm/array.sbatch; rerun the lab when the array has finished and
it scores them and goes on to the next stage. Methods and inits are read from the registries, so new ones join by
name (claims about methods not registered yet are listed as "not run").
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .adapters import METHODS
from .config import default_dataset_name, load_group
from .lab_claims import default_rotational
from .lab_report import select_metric, write_report
from .lab_regression import (GRADIENT_DIRECTIONS, Variant, alignment, init_overrides, make_regression,  # noqa: F401
                             principal_angles, run_regression)
from .utils import atomic_write_json, atomic_write_text, stable_hash

SELECT_SEED0 = 1000  # selection seeds never coincide with the final seeds 0, 1, ...
# Base learning rate per method where the trainer's model.lr does not suit it (full fine-tuning moves every weight).
LR_SCALE = {"full": 0.1}
# quick: the plain methods (Rotational PiSSA: its default way) and LoRA+, at the default init; plain LoRA at every init
QUICK_VARIANTS = ("lora+loraplus16",)


@dataclass
class Settings:
    out: Path
    quick: bool = False
    parts: tuple = ("regression", "language")
    dataset: str | None = None  # conf/dataset/<name>.yaml (None: conf/config.yaml's dataset_name)
    lr_factors: tuple = (0.1, 1 / 3, 1.0, 10 / 3, 10.0)
    widen: int = 2  # a cell whose best rate is at an edge of its grid gets the next rate beyond it, up to this often
    select_seeds: int = 2
    final_seeds: int = 5
    reg_steps: int = 400
    reg_lr: float = 1e-2
    target: float = 0.01
    lm_steps: int | None = None  # None: the default run's budget (model.epochs)
    eval_samples: int = 256
    score_limit: int = 256
    jobs: int = 1
    threads: int = 1
    slurm: bool = False


# ---- the plan ----------------------------------------------------------------------------------------------------------
def variants(methods: list[str] | None, quick: bool = False) -> list[Variant]:
    out = []
    for name in METHODS.names():
        if name == "rotational_pissa":
            out += [Variant(name, {"way": w}) for w in ("way0", "way1", "way2", "way3")]
        else:
            out.append(Variant(name))
        if name == "lora":
            out.append(Variant("lora", optimizer="precond_adamw"))
            out.append(Variant("lora", train={"loraplus_lr_ratio": 16}, train_tag="loraplus16"))  # LoRA+
        if name == "gplora":  # besides its default (every step, moments keep): DESIGN's transport, every step
            out.append(Variant(name, {"moments": "transport", "every": 1}, tag="transport-every1"))
    if quick and not methods:
        out = [v for v in out if v.label in QUICK_VARIANTS or v.label in (v.method, default_rotational())]
    if methods:  # "rotational_pissa:way2" or "lora+precond_adamw" pick one variant, "lora" its plain one
        exact = [v for v in out if v.label in methods]
        out = exact + [v for v in out if v.method in methods and v.label not in methods
                       and not any(e.method == v.method for e in exact)]
    return out


def init_names(inits: list[str] | None) -> list[str]:
    from .init import INITS

    order = ["default", "gaussian", "pissa", "gradient"]
    names = []
    for n in sorted(INITS.names(), key=lambda k: (order.index(k) if k in order else len(order), k)):
        names += list(GRADIENT_DIRECTIONS) if n == "gradient" else [n]
    if inits:
        unknown = set(inits) - set(names)
        if unknown:
            raise ValueError(f"unknown init(s) {sorted(unknown)}; allowed: {names}")
        names = [n for n in names if n in inits]
    return names


def applicable(v: Variant, init: str) -> str | None:
    """None when the init applies to the method, else why not (probed on a 1-step regression: the init raises
    ValueError for a method without LoRA factors, as it would in a real run)."""
    try:
        run_regression(v, init, seed=0, steps=0, target=0.0, d_in=16, d_out=16, n=64)
    except Exception as e:  # noqa: BLE001 (any refusal, named in the report's "not run" list)
        return ("the init sets LoRA factors (lora_A, lora_B), which the method has none of"
                if "sets LoRA factors" in str(e) else f"{type(e).__name__}: {str(e)[:200]}")
    return None


def default_init_only(v: Variant, s: Settings, methods) -> bool:
    """The optimizer variants (another optimizer, LoRA+, GP-LoRA's transport) run at the default init only; with
    --quick (and no --methods) every cell but plain LoRA does."""
    if s.quick and not methods:
        return v.label != "lora"
    return v.optimizer != "adamw" or bool(v.train) or v.tag is not None


def cells(s: Settings, methods, inits) -> tuple[list[tuple[Variant, str]], dict]:
    """(variant, init) pairs to run, and {(label, reason): [inits]} of those that do not apply."""
    run, skipped = [], {}
    for v in variants(methods, s.quick):
        for init in init_names(inits):
            if init != "default" and not inits and default_init_only(v, s, methods):
                continue
            why = applicable(v, init)
            if why:
                skipped.setdefault((v.label, why), []).append(init)
            else:
                run.append((v, init))
    return run, skipped


@dataclass(frozen=True)
class Run:
    part: str  # regression | language
    label: str
    init: str
    lr: float
    seed: int
    stage: str  # select | final

    @property
    def key(self) -> str:
        return f"{self.label}-{self.init}-lr{self.lr:.3g}-s{self.seed}".replace(":", "_").replace("+", "_")


def base_lr(s: Settings, part: str, v: Variant) -> float:
    lr = s.reg_lr if part == "regression" else float(load_group("model", "tiny").lr)
    return lr * LR_SCALE.get(v.method, 1.0)


def rate(s: Settings, part: str, v: Variant, factor: float) -> float:
    return float(f"{base_lr(s, part, v) * factor:.3g}")


def widen(factors: list[float], side: str) -> list[float]:
    """The grid one step beyond its top or bottom edge, keeping its spacing (half decades: ... 1, 10/3, 10, 100/3)."""
    if side == "up":
        return factors + [factors[-2] * 10]
    return [factors[1] / 10] + factors


# ---- one run -----------------------------------------------------------------------------------------------------------
def fingerprint(s: Settings, part: str) -> str:
    """The settings a run's result depends on besides its key: a changed budget, dataset (the resolved group: a new
    default dataset counts) or model recipe gets a new folder, so a rerun never mixes results of different settings."""
    if part == "regression":
        return stable_hash({k: getattr(s, k) for k in ("reg_steps", "target")}, 8)
    return language_fingerprint(s.lm_steps, s.eval_samples, s.score_limit, s.dataset)


@functools.lru_cache(maxsize=None)  # every result path asks; the config files it reads do not change during a lab
def language_fingerprint(lm_steps, eval_samples, score_limit, dataset) -> str:
    from omegaconf import OmegaConf

    ds, name = dataset_cfg(Settings(out=None, dataset=dataset))
    return stable_hash({"lm_steps": lm_steps, "eval_samples": eval_samples, "score_limit": score_limit,
                        "dataset": name, "dataset_cfg": OmegaConf.to_container(ds),
                        "model": OmegaConf.to_container(load_group("model", "tiny"))}, 8)


def result_path(s: Settings, run: Run) -> Path:
    return s.out / "runs" / run.part / fingerprint(s, run.part) / f"{run.key}.json"


def work_dir(s: Settings, run: Run) -> Path:
    return s.out / "runs" / "work" / fingerprint(s, "language") / run.key


def dataset_cfg(s: Settings):
    name = s.dataset or default_dataset_name()
    return load_group("dataset", name), name


def language_overrides(s: Settings, v: Variant, run: Run) -> list[str]:
    o = [f"method={v.method}", f"model.lr={run.lr}", "train.save_every=0", "wandb.mode=disabled", "resume=true",
         f"run_dir={work_dir(s, run)}", f"seed={run.seed}", f"train.optimizer={v.optimizer}",
         f"++dataset.eval_samples={s.eval_samples}"]
    if s.lm_steps:
        o.append(f"train.max_steps={s.lm_steps}")
    if s.dataset:
        o.append(f"dataset_name={s.dataset}")
    o += [f"++method.{k}={val}" for k, val in v.overrides.items()] + [f"train.{k}={val}" for k, val in v.train.items()]
    return o + init_overrides(run.init)


def score(s: Settings, source: list[str], out: Path) -> dict:
    """peftlab.eval.gsm8k on the first score_limit examples of the dataset's test split (its printout silenced)."""
    import contextlib
    import io

    from .data.datasets import _source
    from .eval.gsm8k import main as gsm8k

    ds, _ = dataset_cfg(s)
    test_file = _source(ds, "test")[1]
    data = ["--data", str(test_file)] if test_file is not None else []
    with contextlib.redirect_stdout(io.StringIO()):
        return gsm8k(source + data + ["--limit", str(s.score_limit), "--batch_size", "32", "--max_new_tokens", "40",
                                      "--wandb_mode", "disabled", "--output_dir", str(out)])


def language_result(s: Settings, run: Run, summary: dict) -> dict:
    """The run's summary figures, and (final stage only: selection ranks by eval loss) its test accuracy."""
    row = {"steps": summary["steps"], "initial_eval_loss": summary["initial_eval_loss"],
           "final_eval_loss": summary["final_eval_loss"], "final_train_loss": summary["final_train_loss"],
           "trainable_params": summary["trainable_params"], "train_s": summary["train_time_s"]}
    if run.stage == "final":
        acc = score(s, ["--run_dir", str(work_dir(s, run))], work_dir(s, run) / "eval")
        row.update(accuracy_strict=acc["accuracy_strict"], accuracy_flexible=acc["accuracy_flexible"],
                   n_scored=acc["n"])
    shutil.rmtree(work_dir(s, run) / "checkpoint", ignore_errors=True)  # the result is stored; the state is not needed
    return row


def execute(s: Settings, run: Run, v: Variant) -> dict:
    """Run one lab run in this process and store its result (atomically)."""
    torch.set_num_threads(s.threads)
    row = {f.name: getattr(run, f.name) for f in fields(run)}
    if run.part == "regression":
        r = run_regression(v, run.init, run.seed, s.reg_steps, s.target, lr=run.lr)
        row.update({k: val for k, val in r.items() if k not in ("method", "init", "seed", "lr")})
    else:
        from .config import compose_config
        from .train import train

        done = work_dir(s, run) / "summary.json"  # written last by train(): the run finished (e.g. a SLURM task)
        if done.exists():
            summary = json.loads(done.read_text())
        else:
            summary = train(compose_config(language_overrides(s, v, run)))
        row.update(language_result(s, run, summary))
    atomic_write_json(result_path(s, run), row)
    return row


def base_model_row(s: Settings) -> dict:
    """The reference: the model without any adapter (eval loss as the trainer computes it; scored as runs are)."""
    path = s.out / "runs" / "language" / fingerprint(s, "language") / "base.json"
    if path.exists():
        return json.loads(path.read_text())
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from .data.datasets import train_eval_examples
    from .models import load_model_and_tokenizer
    from .train import evaluate

    m = load_group("model", "tiny")
    model, tok, _ = load_model_and_tokenizer(m)
    ds = OmegaConf.merge(dataset_cfg(s)[0], {"eval_samples": s.eval_samples})
    _, eval_ex = train_eval_examples(ds, tok, m.max_length)
    loss = evaluate(model, eval_ex, tok.pad_token_id, m.per_device_batch_size, Accelerator(cpu=True))
    acc = score(s, ["--model", str(m.name)], path.parent / "base-eval")
    row = {"part": "language", "label": "base model (no adapter)", "init": "-", "lr": 0.0, "seed": 0,
           "stage": "final", "steps": 0, "initial_eval_loss": loss, "final_eval_loss": loss,
           "accuracy_strict": acc["accuracy_strict"], "accuracy_flexible": acc["accuracy_flexible"],
           "n_scored": acc["n"], "trainable_params": 0, "train_s": 0.0}
    atomic_write_json(path, row)
    return row


# ---- running a stage ---------------------------------------------------------------------------------------------------
def _worker(args):
    s, run, v = args
    try:
        return execute(s, run, v)
    except Exception as e:  # a method still being written must not stop the lab; the report says why
        return {"error": f"{type(e).__name__}: {str(e)[:300]}", "label": run.label, "init": run.init}


def run_stage(s: Settings, todo: list[tuple[Run, Variant]]) -> tuple[list[dict], list[str], int]:
    """Results of every run in todo (stored ones read back), the failures, and how many ran now. --jobs > 1: spawned
    processes."""
    have, missing = [], []
    for run, v in todo:
        p = result_path(s, run)
        if p.exists():
            have.append(json.loads(p.read_text()))
        elif run.part == "language" and (work_dir(s, run) / "summary.json").exists():
            missing.append((run, v, "score"))  # trained (by a SLURM array task or before a kill): score it only
        else:
            missing.append((run, v, "run"))
    if s.slurm:
        train = [(r, v) for r, v, what in missing if what == "run" and r.part == "language"]
        if train:
            write_sweep(s, train)
        missing = [m for m in missing if not (m[2] == "run" and m[0].part == "language")]
    errors = []
    jobs = [(s, r, v) for r, v, _ in missing]
    print(f"lab: {len(have)} stored, {len(jobs)} to run", flush=True)

    def done(row, i):
        if "error" in row:
            errors.append(f"{row['label']} x {row['init']}: {row['error']}")
        else:
            have.append(row)
        print(f"lab: [{i}/{len(jobs)}] {row.get('label')} {row.get('init')} lr {row.get('lr')} seed {row.get('seed')}"
              f"{' ' + row['error'] if 'error' in row else ''}", flush=True)

    if s.jobs > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(s.jobs, mp_context=mp.get_context("spawn")) as pool:
            for i, row in enumerate(pool.map(_worker, jobs), 1):
                done(row, i)
    else:
        for i, job in enumerate(jobs, 1):
            done(_worker(job), i)
    return have, errors, len(jobs)


def write_sweep(s: Settings, todo: list[tuple[Run, Variant]]) -> None:
    from .sweep import to_line

    path = s.out / f"sweep_{todo[0][0].stage}.txt"
    atomic_write_text(path, "".join(to_line(language_overrides(s, v, r)) + "\n" for r, v in todo))
    print(f"lab: {len(todo)} language runs to train -> {path}; submit, then rerun this command when they finished:\n"
          f"  sbatch --array=0-{len(todo) - 1} slurm/array.sbatch {path}", flush=True)


def choose_rates(s: Settings, rows: list[dict]) -> dict:
    """{(part, label, init): lr} minimising the mean selection metric over the selection seeds."""
    by: dict = {}
    for r in rows:
        by.setdefault((r["part"], r["label"], r["init"]), {}).setdefault(r["lr"], []).append(select_metric(r, s))
    return {k: min(rates, key=lambda lr: tuple(statistics.fmean(m[i] for m in rates[lr])
                                                for i in range(len(rates[lr][0]))))
            for k, rates in by.items()}


def lab(s: Settings, methods=None, inits=None) -> dict:
    start = time.time()
    plan, skipped = cells(s, methods, inits)
    if not plan:
        raise SystemExit(f"no method x init to run for {methods} x {inits}; registered: {METHODS.names()}")
    vmap = {v.label: v for v, _ in plan}
    grids = {(p, v.label, i): sorted(s.lr_factors) for p in s.parts for v, i in plan}
    ran = 0
    for widened in range(s.widen + 1):  # select; then widen the grids whose best rate lies on an edge, and again
        select = [(Run(p, label, i, rate(s, p, vmap[label], f), SELECT_SEED0 + k, "select"), vmap[label])
                  for (p, label, i), factors in grids.items() for f in factors for k in range(s.select_seeds)]
        sel_rows, errors, ran_now = run_stage(s, select)
        ran += ran_now
        if s.slurm and any(not result_path(s, r).exists() for r, _ in select):
            return {"pending": "select"}
        rates = choose_rates(s, sel_rows)
        edges = {}
        for key, factors in grids.items():
            lrs = [rate(s, key[0], vmap[key[1]], f) for f in factors]
            if len(factors) > 1 and key in rates and rates[key] in (lrs[0], lrs[-1]):
                edges[key] = widen(factors, "up" if rates[key] == lrs[-1] else "down")
        if not edges or widened == s.widen:
            break
        print(f"lab: {len(edges)} cell(s) chose a rate at the edge of their grid; widening", flush=True)
        grids.update(edges)
    final = [(Run(p, label, i, lr, k, "final"), vmap[label]) for (p, label, i), lr in rates.items()
             for k in range(s.final_seeds)]
    fin_rows, errors2, ran_now = run_stage(s, final)
    order = {(v.label, i): n for n, (v, i) in enumerate(plan)}  # tables in the plan's order, not the order run
    for rows in (sel_rows, fin_rows):
        rows.sort(key=lambda r: (order.get((r["label"], r["init"]), len(order)), r["part"], r["lr"], r["seed"]))
    if s.slurm and any(not result_path(s, r).exists() for r, _ in final):
        return {"pending": "final"}
    base = base_model_row(s) if "language" in s.parts else None
    work = {"runs": len(select) + len(final), "ran_now": ran + ran_now, "wall_s": round(time.time() - start, 1),
            "dataset": dataset_cfg(s)[1]}
    return write_report(s, sel_rows, fin_rows, base, rates, skipped, errors + errors2, work)


# ---- the command -------------------------------------------------------------------------------------------------------
def settings(a) -> Settings:
    s = Settings(out=a.outdir, quick=a.quick, parts=tuple(a.parts), dataset=a.dataset, jobs=a.jobs,
                 threads=a.threads, slurm=a.slurm)
    if a.quick:  # fewer cells (cells()), 4 of the 5 rates, 1 selection seed, 3 final seeds; the same runs
        s.lr_factors, s.select_seeds, s.final_seeds = (1 / 3, 1.0, 10 / 3, 10.0), 1, 3
    for k in ("select_seeds", "final_seeds", "reg_steps", "lm_steps", "score_limit", "target", "widen"):
        if getattr(a, k) is not None:
            setattr(s, k, getattr(a, k))
    if a.lr_factors:
        s.lr_factors = tuple(a.lr_factors)
    if s.widen < 0:
        raise SystemExit(f"--widen {s.widen}: the times a grid may grow past an edge (allowed: >= 0; 0 keeps the grid)")
    if s.final_seeds < 3 and not a.allow_few_seeds:
        raise SystemExit(f"--final-seeds {s.final_seeds}: intervals need at least 3 seeds (allowed: >= 3; "
                         f"--allow-few-seeds for a smoke test)")
    return s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m peftlab.lab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer cells, 4 rates, 1 selection + 3 final seeds")
    ap.add_argument("-o", "--outdir", type=Path, default=Path("bench/results/lab"))
    ap.add_argument("--methods", nargs="*", help="registered method names or variant labels (default: all)")
    ap.add_argument("--inits", nargs="*", help="default gaussian pissa LoRA-GA LoRA-One LoRA-FA (default: all)")
    ap.add_argument("--parts", nargs="*", default=["regression", "language"], choices=["regression", "language"])
    ap.add_argument("--dataset", help="conf/dataset/<name> for the language task (default: the run default)")
    ap.add_argument("--jobs", type=int, default=1, help="local worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (the lab's models are tiny)")
    ap.add_argument("--slurm", action="store_true", help="language runs go to a sweep file for slurm/array.sbatch")
    ap.add_argument("--lr-factors", type=float, nargs="+", help="the rate grid, x each method's base rate "
                    "(default 0.1 1/3 1 10/3 10; quick 1/3 1 10/3 10)")
    ap.add_argument("--widen", type=int, help="times a cell's grid may grow past an edge its best rate lies on "
                    "(default 2)")
    ap.add_argument("--select-seeds", type=int, help="selection seeds per rate (default 2, quick 1)")
    ap.add_argument("--final-seeds", type=int, help="fresh seeds at the chosen rate (default 5, quick 3)")
    ap.add_argument("--allow-few-seeds", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reg-steps", type=int, help="regression steps (default 400)")
    ap.add_argument("--lm-steps", type=int, help="language optimizer steps (default: the run default)")
    ap.add_argument("--score-limit", type=int, help="test examples scored (default 256)")
    ap.add_argument("--target", type=float, help="regression target: loss <= target x L(W0) (default 0.01)")
    a = ap.parse_args(argv)
    if a.jobs < 1 or a.threads < 1:
        sys.exit("peftlab.lab: --jobs and --threads must be >= 1")
    threads = torch.get_num_threads()
    try:
        return lab(settings(a), a.methods, a.inits)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
