"""End to end on the embedded default: the loss falls, the run folder is complete, PEFT and AutoModel reload the
results with the same logits, resume equals uninterrupted, two processes equal one, non-finite losses stop."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.train import NonFiniteLoss, train
from test_config import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
FAST = ["wandb.mode=disabled", "model.epochs=1", "train.max_steps=24", "++dataset.eval_samples=64"]


def run_inproc(tmp_path, overrides=()):
    cfg = compose_cfg([*FAST, *overrides])
    cfg.run_dir = str(tmp_path)
    return train(cfg)


def run_cli(run_dir, overrides=(), nproc=1, **popen):
    env = {**os.environ, "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, str(ROOT / "run_exp.py"), *FAST, f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def wait_for_checkpoint(proc, run_dir, step) -> Path:
    """Wait while ``proc`` runs until run_dir's checkpoint has reached ``step``; its trainer_state.json."""
    state = Path(run_dir) / "checkpoint/trainer_state.json"
    deadline = time.time() + 300
    while not (state.exists() and json.loads(state.read_text())["step"] >= step) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    return state


def adapter_tensors(run_dir):
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def test_default_run_trains_and_leaves_a_complete_run_folder(tmp_path):
    s = run_inproc(tmp_path, ["train.max_steps=40", "model.saving=true"])
    assert s["steps"] == 40 and s["final_eval_loss"] < 0.6 * s["initial_eval_loss"]
    for f in ("metrics.jsonl", "summary.json", "summary.txt", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors", "checkpoint/trainer_state.json", "merged/config.json"):
        assert (tmp_path / f).exists(), f
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 41))
    assert rows[-1]["eval/loss"] == pytest.approx(s["final_eval_loss"])
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 40
    assert (tmp_path / "summary.txt").read_text().startswith("peftlab: method=lora init=default")

    # PEFT on the untouched base, the merged model through AutoModel, and peftlab's own model agree
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.adapters import apply_adapters
    from peftlab.config import resolve_config
    from peftlab.train import load_adapters

    cfg = resolve_config(compose_cfg(FAST))
    base_path = json.loads((tmp_path / "adapter/adapter_config.json").read_text())["base_model_name_or_path"]
    ours = AutoModelForCausalLM.from_pretrained(base_path)
    apply_adapters(ours, cfg.peft, cfg.method)
    load_adapters(ours, tmp_path / "checkpoint")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    x = torch.randint(3, 500, (2, 12))
    ref = ours.eval()(x).logits
    torch.testing.assert_close(peft_model.eval()(x).logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.eval()(x).logits, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(AutoModelForCausalLM.from_pretrained(base_path)(x).logits, ref, atol=1e-3)


def test_same_seed_same_result_and_global_batch_split_does_not_matter(tmp_path):
    """The gradient is that of the mean token loss over the global batch, whatever the micro-batch size."""
    a = run_inproc(tmp_path / "a", ["model.per_device_batch_size=16", "+peft=qv", "++peft.lora_dropout=0"])
    b = run_inproc(tmp_path / "b", ["model.per_device_batch_size=4", "+peft=qv", "++peft.lora_dropout=0"])
    ta, tb = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6)
    assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], rel=1e-5)


def test_dataset_smaller_than_one_global_batch_fails_clearly(tmp_path):
    f = tmp_path / "small.jsonl"
    f.write_text("".join(json.dumps({"question": f"q{i}", "answer": "#### 1"}) + "\n" for i in range(20)))
    with pytest.raises(ValueError, match=r"has 10 usable training examples .*, fewer than one global batch"):
        run_inproc(tmp_path / "run", ["dataset_name=gsm8k", f"++dataset.path={f}", "++dataset.eval_samples=10"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"(train loss is (nan|inf) at step \d+; stopped before the update|parameters became non-finite in the update of step \d+)"):
        run_inproc(tmp_path, ["model.lr=1e12", "train.max_grad_norm=0", "train.save_every=1", "model.warmup=0",
                              "model.eval_epochs=0"])
    state = json.loads((tmp_path / "checkpoint/trainer_state.json").read_text())
    assert state["step"] >= 1
    good = torch.load(tmp_path / "checkpoint/adapters.pt")
    assert all(torch.isfinite(t).all() for layer in good.values() for k, t in layer.items() if torch.is_tensor(t))


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    over = ["train.max_steps=60", "train.save_every=10"]
    full = run_cli(tmp_path / "full", over)
    assert full.wait(300) == 0, full.stdout.read()
    p = run_cli(tmp_path / "killed", over)
    state = wait_for_checkpoint(p, tmp_path / "killed", 20)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < 60 and not (tmp_path / "killed/summary.json").exists()
    r = run_cli(tmp_path / "killed", [*over, "resume=true"])
    out = r.communicate(timeout=300)[0]
    assert r.returncode == 0, out
    ta, tb = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "killed")
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6)
    rows = [json.loads(l) for l in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 61))  # no step lost or repeated
    full_rows = [json.loads(l) for l in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/loss"] == pytest.approx(full_rows[-1]["train/loss"], rel=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    over = ["+peft=qv", "++peft.lora_dropout=0", "model.per_device_batch_size=8", "train.max_steps=12"]
    one, two = run_cli(tmp_path / "one", over), run_cli(tmp_path / "two", over, nproc=2)
    out1, out2 = one.communicate(timeout=400)[0], two.communicate(timeout=400)[0]
    assert one.returncode == 0, out1
    assert two.returncode == 0, out2
    assert json.loads((tmp_path / "two/summary.json").read_text())["processes"] == 2
    t1, t2 = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    for k in t1:
        torch.testing.assert_close(t1[k], t2[k], rtol=1e-4, atol=1e-6)
    # and the updates really are synchronised: a run without the rank-1 data would differ
    assert any(not torch.allclose(v, torch.zeros_like(v)) for k, v in t1.items() if "lora_B" in k)


@pytest.mark.slow
def test_multirun_writes_one_folder_per_job_and_wandb_offline(tmp_path):
    cmd = [sys.executable, str(ROOT / "run_exp.py"), "-m", "seed=1,2", "train.max_steps=3", "wandb.mode=offline",
           "model.epochs=1", f"hydra.sweep.dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for job, seed in (("0", 1), ("1", 2)):
        s = json.loads((tmp_path / job / "summary.json").read_text())
        assert s["seed"] == seed and s["steps"] == 3
        assert list((tmp_path / job / "wandb").glob("offline-run-*"))  # synced later with `wandb sync`
