"""peftlab.sweep expands a sweep into exactly the jobs of `python run_exp.py -m` (Hydra's basic launcher), and
peftlab.report's numbers are the run folders' own (mean and sample std over seeds, recomputed here from the files)."""
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from peftlab.report import report
from peftlab.sweep import expand

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["+init=gradient", "init.iters=8,16", "seed=range(1,3)", "++peft.lora_r=choice(4)", "model.lr=1e-3",
         "++dataset.prompt='Q: {query}, A: '", "+peft=glob(q*)", "init.iters=4,32"]  # the repeat replaces 8,16

# run_exp.py with train() stubbed: Hydra composes, launches and writes each job's .hydra/overrides.yaml as usual
STUB = """import runpy, sys
import peftlab.train as t
t.train = lambda cfg: {"final_eval_loss": 0.0}
sys.argv = ["run_exp.py", *sys.argv[1:]]
runpy.run_path("run_exp.py", run_name="__main__")
"""


def hydra_multirun_jobs(tmp_path, overrides):
    cmd = [sys.executable, "-c", STUB, "-m", "hydra/launcher=basic", f"hydra.sweep.dir={tmp_path}", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = sorted((p for p in tmp_path.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return [yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text()) for j in jobs]


def test_sweep_file_lines_are_the_jobs_of_hydra_multirun(tmp_path):
    out = tmp_path / "sweep.txt"
    r = subprocess.run([sys.executable, "-m", "peftlab.sweep", *SWEEP, "-o", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(l) for l in out.read_text().splitlines()]
    assert len(lines) == 2 * 2 * 2  # init.iters x seed x the peft sets matching q* (qkvo, qv)
    assert {l[6] for l in lines} == {"+peft=qkvo", "+peft=qv"}
    assert f"sbatch --array=0-{len(lines) - 1} slurm/array.sbatch" in r.stderr
    hydra_jobs = hydra_multirun_jobs(tmp_path / "multirun", SWEEP)
    assert lines == hydra_jobs
    assert {l[1] for l in lines} == {"init.iters=4", "init.iters=32"}  # a repeated key: the last sweep wins
    assert "++dataset.prompt='Q: {query}, A: '" in lines[0]  # quoting survives the file round trip


def test_sweep_rejects_what_the_array_script_sets_and_bad_syntax():
    with pytest.raises(ValueError, match="resume is set per task by slurm/array.sbatch"):
        expand(["seed=1,2", "resume=true"])
    with pytest.raises(ValueError, match="hydra.run.dir is set per task"):
        expand(["hydra.run.dir=x"])
    with pytest.raises(ValueError, match="cannot expand the sweep"):
        expand(["seed=1,"])
    with pytest.raises(ValueError, match=r"job 0 \(seed=1 nope=3\): Could not override 'nope'"):
        expand(["seed=1,2", "nope=3"])
    with pytest.raises(ValueError, match="not options"):
        expand(["-m", "seed=1,2"])
    assert expand(["seed=1,2", "nope=3"], check=False) == [["seed=1", "nope=3"], ["seed=2", "nope=3"]]


# ---- report ----------------------------------------------------------------------------------------------------------
def fake_run(folder: Path, overrides: list[str], seed: int, r: int, finished=True, geolora=False, gsm8k=None):
    """A run folder as the trainer leaves it, with numbers that depend on the seed and the rank."""
    rng = np.random.default_rng(seed * 10 + r)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "method": {"name": "lora"}}))
    rows = []
    for step in range(1, 11):
        row = {"step": step, "train/loss": float(3 - 0.1 * step + rng.normal(0, 0.01))}
        if step % 5 == 0:
            row["eval/loss"] = float(3 - 0.1 * step + rng.normal(0, 0.01))
        if geolora:
            row["geolora/rank/layers.0.q_proj"] = 4 + step // 3
            row["geolora/rank/layers.0.v_proj"] = 4
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows) + '{"step": 11, "trai')
    if finished:
        (folder / "summary.json").write_text(json.dumps({
            "method": "geolora" if geolora else "lora", "init": "pissa", "seed": seed, "steps": 10,
            "final_train_loss": float(rng.uniform(1, 2)), "final_eval_loss": float(rng.uniform(1, 2)),
            "wall_time_s": float(rng.uniform(10, 20)), "trainable_params": 1000 * r}))
    if gsm8k is not None:
        (folder / "eval").mkdir()
        (folder / "eval" / "results.json").write_text(json.dumps({"accuracy_strict": gsm8k,
                                                                  "accuracy_flexible": gsm8k + 0.01}))


def test_report_numbers_are_the_run_folders(tmp_path):
    sweep = tmp_path / "multirun"
    k = 0
    for r in (4, 8):
        for seed in (1, 2, 3):
            fake_run(sweep / str(k), ["+init=pissa", f"++peft.lora_r={r}", f"seed={seed}", "wandb.name=x",
                                      "resume=true"], seed, r, gsm8k=0.1 * seed + r / 100)
            k += 1
    fake_run(sweep / str(k), ["+init=pissa", "++peft.lora_r=16", "seed=1", "method=geolora"], 1, 16, geolora=True)
    fake_run(sweep / str(k + 1), ["+init=pissa", "++peft.lora_r=16", "seed=2"], 2, 16, finished=False)
    out = report([sweep], tmp_path / "rep")

    assert out["keys"] == ["peft.lora_r"]  # seed, wandb.*, resume and method (its own column) are not overrides
    with open(tmp_path / "rep" / "groups.csv") as f:
        groups = {(g["method"], g["peft.lora_r"]): g for g in csv.DictReader(f)}
    assert set(groups) == {("lora", "4"), ("lora", "8"), ("geolora", "16"), ("lora", "16")}
    assert groups["lora", "16"]["init"] == "default"  # unfinished: method and init from .hydra/config.yaml
    for r in ("4", "8"):
        g = groups["lora", r]
        runs = [sweep / str(i) for i in range(6)
                if yaml.safe_load((sweep / str(i) / ".hydra/overrides.yaml").read_text())[1] == f"++peft.lora_r={r}"]
        summaries = [json.loads((p / "summary.json").read_text()) for p in runs]
        assert g["n"] == "3" and g["seeds"] == "1 2 3" and g["init"] == "pissa"
        for key in ("final_train_loss", "final_eval_loss", "wall_time_s"):
            vals = np.array([s[key] for s in summaries])
            assert float(g[f"{key}_mean"]) == pytest.approx(vals.mean(), rel=1e-12)
            assert float(g[f"{key}_std"]) == pytest.approx(vals.std(ddof=1), rel=1e-12)
        acc = np.array([json.loads((p / "eval/results.json").read_text())["accuracy_strict"] for p in runs])
        assert float(g["gsm8k_strict_mean"]) == pytest.approx(acc.mean())
        assert float(g["trainable_params_mean"]) == 1000 * int(r)
    # the unfinished run: listed, with the last losses its metrics.jsonl holds (the torn last line ignored)
    with open(tmp_path / "rep" / "runs.csv") as f:
        runs = {Path(x["run_dir"]).name: x for x in csv.DictReader(f)}
    last = [json.loads(l) for l in (sweep / "7/metrics.jsonl").read_text().splitlines()[:-1]]
    assert runs["7"]["status"] == "unfinished" and runs["7"]["steps"] == "10"
    assert float(runs["7"]["final_train_loss"]) == last[-1]["train/loss"]
    assert float(runs["7"]["final_eval_loss"]) == last[-1]["eval/loss"]
    assert groups["geolora", "16"]["gsm8k_strict_mean"] == ""
    assert set(out["plots"]) == {"loss_curves.png", "geolora_ranks.png"}
    for p in out["plots"]:
        assert (tmp_path / "rep" / p).read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "rep" / "report.md").read_text()
    g4 = groups["lora", "4"]
    assert f"| lora | pissa | 4 | 3 | {float(g4['final_train_loss_mean']):.4g} ± " in md


def test_report_fails_clearly_without_run_folders(tmp_path):
    with pytest.raises(ValueError, match="no run folder"):
        report([tmp_path], tmp_path / "rep")


def test_plots_are_paper_ready(tmp_path):
    """Labelled axes, a mean line with a ± 1 sample std band over seeds, the legend outside the panels, labels of
    only what differs between groups, and no two groups drawn alike past 10 groups."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.collections import PolyCollection

    from peftlab.report import group_style, load_run, loss_figure, varying_keys

    sweep = tmp_path / "multirun"
    k = 0
    for r in range(1, 13):  # 12 groups of 2 seeds; method and init the same everywhere
        for seed in (1, 2):
            fake_run(sweep / str(k), ["+init=pissa", f"++peft.lora_r={r}", f"seed={seed}", "model.lr=1e-3"], seed, r)
            k += 1
    runs = [load_run(sweep / str(i)) for i in range(k)]
    keys = varying_keys(runs)
    fig = loss_figure(runs, keys)
    train_ax, eval_ax = fig.axes
    for ax in (train_ax, eval_ax):
        assert ax.get_xlabel() == "optimizer step" and "loss" in ax.get_ylabel() and "std" in ax.get_title()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [f"peft.lora_r={r} (n=2)" for r in range(1, 13)]  # no method/init/lr: they are shared
    fig.canvas.draw()
    legend_box = fig.legends[0].get_window_extent()
    assert legend_box.x0 >= eval_ax.get_window_extent().x1  # outside, right of the eval panel
    styles = {(l.get_color(), l.get_linestyle(), l.get_marker()) for l in train_ax.lines}
    assert len(styles) == 12
    assert len({(group_style(i)["color"], group_style(i)["linestyle"]) for i in range(40)}) == 40
    # the first group's line is the mean of its two seeds and its band the sample std, step by step
    seeds = [[row["train/loss"] for row in runs[i].metrics] for i in (0, 1)]
    np.testing.assert_allclose(train_ax.lines[0].get_ydata(), np.mean(seeds, axis=0), rtol=1e-12)
    band = [c for c in train_ax.collections if isinstance(c, PolyCollection)][0]
    ys = band.get_paths()[0].vertices[:, 1]
    lo, hi = np.mean(seeds, 0) - np.std(seeds, 0, ddof=1), np.mean(seeds, 0) + np.std(seeds, 0, ddof=1)
    assert ys.min() == pytest.approx(lo.min()) and ys.max() == pytest.approx(hi.max())
    matplotlib.pyplot.close(fig)


def test_duplicate_seeds_count_once_and_wall_time_spans_segments(tmp_path):
    sweep = tmp_path / "multirun"
    for k, seed in enumerate((1, 2, 1)):  # job 2 repeats seed 1 (a copied folder, a re-run)
        fake_run(sweep / str(k), ["+init=pissa", f"seed={seed}"], seed, 4)
    fake_run(sweep / "3", ["+init=pissa", "seed=3"], 3, 4, finished=False)
    summaries = {k: json.loads((sweep / str(k) / "summary.json").read_text()) for k in range(3)}
    # job 0 ran in two requeue segments (the trainer sums them: "segments" present); job 1 is an old summary holding
    # only its last segment's wall time, while train_time_s (always summed) is larger
    summaries[0].update(segments=2, wall_time_s=100.0, segment_wall_time_s=40.0, train_time_s=90.0)
    summaries[1].update(wall_time_s=30.0, train_time_s=70.0)
    for k, s in summaries.items():
        (sweep / str(k) / "summary.json").write_text(json.dumps(s))
    (sweep / "3/checkpoint").mkdir()
    (sweep / "3/checkpoint/trainer_state.json").write_text(json.dumps({"setup_time_s": 5.0, "wall_time_s": 20.0}))
    (sweep / "3/.hydra/config.yaml").write_text(yaml.safe_dump({"seed": 3, "method": {"name": "lora"},
                                                                "init": {"name": "pissa"}}))
    out = report([sweep], tmp_path / "rep")
    [g] = out["groups"]
    assert g["n"] == 3 and g["seeds"] == "1 2 3" and g["duplicate_seeds"] == 1 and g["unfinished"] == 1
    runs = {Path(r["run_dir"]).name: r for r in out["runs"]}
    assert runs["2"]["status"] == f"duplicate seed of {sweep / '0'} (not counted)"
    counted = [runs[k]["final_eval_loss"] for k in "013"]
    assert g["final_eval_loss_mean"] == pytest.approx(np.mean(counted), rel=1e-12)
    assert g["final_eval_loss_std"] == pytest.approx(np.std(counted, ddof=1), rel=1e-12)
    assert [runs[k]["wall_time_s"] for k in "0123"] == [100.0, 70.0, summaries[2]["wall_time_s"], 25.0]
    assert g["wall_time_s_mean"] == pytest.approx(np.mean([100.0, 70.0, 25.0]))
    assert "1 run(s) repeat a seed of their group and are not counted" in out["markdown"]
