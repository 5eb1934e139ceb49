"""Run folders: the resolved config is recorded, one run at a time holds a folder, a resume never silently starts
over (incomplete or damaged checkpoints and changed configs are refused, naming the file or the keys), and files
are created with the user's umask."""
import json
import os
import shutil
import stat

import pytest
import torch
from omegaconf import OmegaConf

from peftlab.schema import ConfigError
from peftlab.train import RunFolderLock, train
from test_config import compose_cfg

FAST = ["wandb.mode=disabled", "model.epochs=1", "train.max_steps=4", "train.save_every=2",
        "++dataset.eval_samples=16", "model.eval_epochs=0"]


def run(run_dir, overrides=()):
    return train(compose_cfg([*FAST, *overrides], run_dir=run_dir))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A short finished run (4 steps, checkpoints at 2 and 4), made with umask 022."""
    old = os.umask(0o022)
    try:
        d = tmp_path_factory.mktemp("finished") / "run"
        run(d)
    finally:
        os.umask(old)
    return d


def copy_of(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    return d


def test_resolved_config_is_in_the_run_folder_with_the_fallbacks_filled_in(finished):
    cfg = OmegaConf.load(finished / "config.yaml")
    assert cfg.init.name == "default" and cfg.peft.target_set == "qv" and cfg.align.name == "none"
    assert cfg.peft.lora_r == 8 and cfg.train.max_steps == 4
    assert OmegaConf.load(finished / "checkpoint" / "config.yaml") == cfg


def test_files_and_folders_follow_the_umask(finished):
    for rel in ("config.yaml", "summary.json", "adapter/adapter_config.json", "checkpoint/trainer_state.json"):
        assert stat.S_IMODE((finished / rel).stat().st_mode) == 0o644, rel
    for rel in ("adapter", "checkpoint"):
        assert stat.S_IMODE((finished / rel).stat().st_mode) == 0o755, rel


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    holder = RunFolderLock(d)
    try:
        with pytest.raises(ConfigError, match=rf"run folder {d} is in use by pid {os.getpid()}"):
            run(d)
    finally:
        holder.release()
    assert not (d / "metrics.jsonl").exists()


def test_a_new_run_into_a_folder_with_a_checkpoint_is_refused(finished, tmp_path):
    d = copy_of(finished, tmp_path)
    before = (d / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run's checkpoint; continue it with resume=true"):
        run(d)
    assert (d / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("name", ["trainer_state.json", "optimizer.pt", "adapters.pt", "rng_0.pt", "config.yaml"])
def test_resume_refuses_an_incomplete_checkpoint_naming_the_file(finished, tmp_path, name):
    d = copy_of(finished, tmp_path)
    (d / "checkpoint" / name).unlink()
    with pytest.raises(ConfigError, match=rf"checkpoint file {d / 'checkpoint' / name} is missing"):
        run(d, ["resume=true"])
    assert (d / "checkpoint" / "adapters.pt").exists() or name == "adapters.pt"


@pytest.mark.parametrize("name", ["trainer_state.json", "optimizer.pt", "scheduler.pt"])
def test_resume_refuses_a_damaged_checkpoint_naming_the_file(finished, tmp_path, name):
    d = copy_of(finished, tmp_path)
    f = d / "checkpoint" / name
    f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    with pytest.raises(ConfigError, match=rf"checkpoint file {f} is damaged"):
        run(d, ["resume=true"])


def test_resume_refuses_a_changed_config_listing_the_keys(finished, tmp_path):
    d = copy_of(finished, tmp_path)
    with pytest.raises(ConfigError, match=r"model.lr: 0.003 -> 0.01; peft.lora_r: 8 -> 4"):
        run(d, ["resume=true", "+peft=qv", "++peft.lora_r=4", "model.lr=1e-2"])


def test_resume_accepts_changes_that_do_not_change_the_result(finished, tmp_path):
    d = copy_of(finished, tmp_path)
    s = run(d, ["resume=true", "train.save_every=1", "train.log_every=2", "wandb.mode=disabled"])
    assert s["steps"] == 4
    steps = [json.loads(l)["step"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the earlier rows are kept, no step repeated


def test_resume_without_a_checkpoint_says_it_starts_at_step_zero(tmp_path, capsys):
    s = run(tmp_path / "run", ["resume=true"])
    assert s["steps"] == 4 and "has no checkpoint yet: starting at step 0" in capsys.readouterr().out


def test_resume_continues_from_the_checkpoint(finished, tmp_path):
    d = copy_of(finished, tmp_path)
    state = json.loads((d / "checkpoint" / "trainer_state.json").read_text())
    state_4 = torch.load(d / "checkpoint" / "adapters.pt")
    s = run(d, ["resume=true", "train.max_steps=4"])
    assert s["steps"] == state["step"] == 4
    after = torch.load(d / "checkpoint" / "adapters.pt")
    for n in state_4:
        torch.testing.assert_close(after[n]["lora_A"], state_4[n]["lora_A"])
