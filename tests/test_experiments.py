"""conf/experiment/ presets: each composes with `+experiment=NAME`, passes peftlab's validation, sets only keys its
groups define (a typo would otherwise be silently carried along), and the seed preset equals the seed command."""
import pytest
import yaml
from omegaconf import OmegaConf

from peftlab.config import CONF_DIR, group_options, load_group, resolve_config
from test_config import SEED_OVERRIDES, compose_cfg

PRESETS = group_options("experiment")
GROUPS = ("model", "init", "peft", "method", "dataset")
FALLBACK = {"model": "tiny", "method": "lora", "init": "default", "peft": "qv"}  # conf/config.yaml and config.py


def group_choices(preset: dict) -> dict:
    """The option each group gets: the preset's defaults list (`/init: x`, `override /model: y`), else the fallback."""
    out = dict(FALLBACK)
    for entry in preset.get("defaults", []):
        if isinstance(entry, dict):
            (key, value), = entry.items()
            out[key.replace("override", "").strip().lstrip("/")] = value
    return out


def test_every_paper_recipe_has_a_preset():
    assert set(PRESETS) >= {"lora_ga_table2", "lora_one", "pissa", "lora_fa_seed", "gplora", "geolora",
                            "rotational_pissa"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_validates_and_sets_only_known_keys(name):
    path = CONF_DIR / "experiment" / f"{name}.yaml"
    assert path.read_text().startswith("# @package _global_")
    cfg = resolve_config(compose_cfg([f"+experiment={name}"]))
    preset = yaml.safe_load(path.read_text())
    top = OmegaConf.load(CONF_DIR / "config.yaml")
    choices = dict(group_choices(preset), dataset=cfg.dataset_name)
    for key, value in preset.items():
        if key == "defaults":
            continue
        if key in GROUPS:
            choice = choices[key]
            known = load_group(key, choice)
            unknown = set(value) - set(known)
            assert not unknown, f"{name}: {key}.{sorted(unknown)} not in conf/{key}/{choice}.yaml"
        else:
            assert key in top, f"{name}: {key} is not a key of conf/config.yaml"
            if isinstance(value, dict):
                assert not set(value) - set(top[key]), f"{name}: {key}.{sorted(set(value) - set(top[key]))}"
        # the preset's values are the run's values
        got = OmegaConf.to_container(cfg[key]) if isinstance(value, dict) else cfg[key]
        for k, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            assert (got[k] if k is not None else got) == v, f"{name}: {key}.{k}"


def test_lora_ga_table2_is_the_recipe():
    cfg = resolve_config(compose_cfg(["+experiment=lora_ga_table2"]))
    assert cfg.model.name == "meta-llama/Llama-2-7b-hf" and cfg.dataset.name == "meta_math"
    assert (cfg.init.name, cfg.init.direction, cfg.init.scale, cfg.init.stable_gamma) == ("gradient", "LoRA-GA",
                                                                                          "stable", 16)
    assert (cfg.peft.target_set, cfg.peft.lora_r, cfg.peft.lora_alpha, cfg.peft.use_rslora) == ("all", 8, 16, True)
    assert cfg.method.name == "lora" and cfg.train.scheduler == "cosine" and cfg.model.real_batch_size == 32


def test_seed_preset_is_the_seed_command():
    preset = resolve_config(compose_cfg(["+experiment=lora_fa_seed", "++wandb.name=x"]))
    seed = resolve_config(compose_cfg(SEED_OVERRIDES))
    for key in ("peft", "dataset", "method", "wandb", "train"):
        assert preset[key] == seed[key], key
    # the seed's config block sets init.max_length 1024 (= its model.max_length), which its command leaves implicit
    assert {**preset.init, "max_length": None} == {**seed.init} and preset.init.max_length == 1024
    assert preset.model.epochs == seed.model.epochs and preset.model.eval_epochs == seed.model.eval_epochs


def test_presets_take_overrides_and_group_switches():
    cfg = resolve_config(compose_cfg(["+experiment=lora_one", "++peft.lora_r=16", "++model.lr=1e-4", "peft=qv",
                                      "seed=3"]))
    assert (cfg.peft.target_set, cfg.peft.lora_r, cfg.model.lr, cfg.seed) == ("qv", 16, 1e-4, 3)
    cfg = resolve_config(compose_cfg(["+experiment=gplora", "method=lora"]))
    assert cfg.method.name == "lora"
    with pytest.raises(Exception, match="Multiple values for init"):  # the preset added init: switch with init=...
        compose_cfg(["+experiment=pissa", "+init=gradient"])
