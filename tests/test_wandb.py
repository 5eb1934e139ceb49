"""wandb across requeues and sweeps, read back from the offline run files (tests/wandb_files.py): a run stopped by
the SLURM signal finishes its wandb run before `scontrol requeue` (whose SIGTERM would kill wandb-core), the requeued
run appends to the same wandb run with every step, and sweep runs are named by the overrides that differ."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.sweep import run_name, to_line
from wandb_files import run_files, summarize

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.epochs=1", "++dataset.eval_samples=64", "wandb.mode=offline", "wandb.project=p", "wandb.group=g",
        "wandb.name=n"]

# scontrol as SLURM's requeue behaves for the job's processes: it records the call, then SIGTERMs every other child
# of the trainer (wandb-core among them), as the requeue's SIGTERM reaches every process of the job
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$(dirname "$0")/calls"
for p in $(pgrep -P "$PPID"); do [ "$p" != "$$" ] && kill -TERM "$p" 2>/dev/null; done
sleep 2
"""


def test_run_names_keep_only_the_overrides_that_differ():
    jobs = [["+init=gradient", f"init.iters={i}", f"seed={s}", "model.lr=1e-3", "hydra.run.dir=x"]
            for i in (8, 16) for s in (1, 2)]
    assert run_name(jobs[3], jobs) == "init.iters=16,seed=2"
    assert run_name(jobs[0], jobs[:1]) == "+init=gradient,init.iters=8,seed=1,model.lr=1e-3"  # one job: all of it
    assert run_name(["++peft.lora_r=8", "wandb.project=x"], [["++peft.lora_r=8"], ["peft.lora_r=4"]]) == \
        "++peft.lora_r=8"  # '+'/'++' prefixes do not make another key; wandb.* never names a run
    assert run_name([], [[]]) == "default"


def test_sweep_file_names(tmp_path):
    sweep = tmp_path / "sweep.txt"
    jobs = [[f"seed={s}", "model.lr=1e-3", "++dataset.prompt='Q: {query}'"] for s in (1, 2)]
    sweep.write_text("".join(to_line(j) + "\n" for j in jobs))  # as peftlab.sweep writes it
    out = subprocess.run([sys.executable, "-m", "peftlab.sweep", "--name-of", str(sweep), "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "seed=2"


STUB = """import runpy, sys
from pathlib import Path
import peftlab.train as t
def fake(cfg):
    Path(cfg.run_dir, "name.txt").write_text(cfg.wandb.name + "|" + str(cfg.wandb.group))
    return {"final_eval_loss": 0.0}
t.train = fake
sys.argv = ["run_exp.py", *sys.argv[1:]]
runpy.run_path("run_exp.py", run_name="__main__")
"""


@pytest.mark.slow
def test_multirun_names_are_the_differing_overrides(tmp_path):
    cmd = [sys.executable, "-c", STUB, "-m", "hydra/launcher=basic", f"hydra.sweep.dir={tmp_path}", "seed=1,2",
           "model.lr=1e-3", "+peft=qv,qkvo", "resume=true"]  # resume=true: as the submitit README command gives it
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    assert out.returncode == 0, out.stdout + out.stderr
    names = [(tmp_path / str(k) / "name.txt").read_text() for k in range(4)]
    assert names == [f"seed={s},+peft={p}|{tmp_path}" for s in (1, 2) for p in ("qv", "qkvo")]


@pytest.mark.slow
def test_stopped_and_requeued_run_holds_every_step_in_one_wandb_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    over = [*FAST, "train.max_steps=30", "train.save_every=0", f"hydra.run.dir={run_dir}", "resume=true"]
    p = subprocess.Popen([sys.executable, str(ROOT / "run_exp.py"), *over], cwd=ROOT, env={**env, "SLURM_JOB_ID": "77"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("train/loss") >= 5) and time.time() < deadline:
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and "the job requeued" in out, out
    assert (bin_dir / "calls").read_text().split() == ["requeue", "77"]
    stopped_at = json.loads((run_dir / "checkpoint/trainer_state.json").read_text())["step"]
    assert 5 <= stopped_at < 30
    r = subprocess.run([sys.executable, str(ROOT / "run_exp.py"), *over], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    files = run_files(run_dir / "wandb", run_id)
    assert len(files) == 2 and len(run_files(run_dir / "wandb")) == 2  # one wandb run, one file per segment
    first, second = (summarize(f) for f in files)
    for seg in (first, second):
        assert (seg["id"], seg["project"], seg["group"], seg["name"]) == (run_id, "p", "g", "n")
        assert seg["exit_code"] == 0  # finished, not cut off
    logged = {**first["history"], **second["history"]}
    assert max(first["history"]) == stopped_at and min(k for k in second["history"] if k > 0) == stopped_at + 1
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 31))
    for row in rows:  # every step of metrics.jsonl is in the wandb run, with the same values
        for k, v in row.items():
            if k != "step":
                assert logged[row["step"]][k] == pytest.approx(v, rel=1e-12), (row["step"], k)
    assert second["summary"]["steps"] == 30
    # the run's time is both segments': loading and init of each, and the training loop of each
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["segments"] == 2
    assert summary["wall_time_s"] > summary["segment_wall_time_s"] and summary["wall_time_s"] > summary["train_time_s"]
