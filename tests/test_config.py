"""Config composition of every group (Hydra's compose API) and early, clear errors."""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from peftlab.config import CONF_DIR, group_options, resolve_config

SEED_OVERRIDES = ["++dataset_name=meta_math", "++model.epochs=1", "++model.eval_epochs=1", "+init=gradient",
                  "++init.direction=LoRA-FA", "++init.weight=stable", "++init.stable_gamma=128", "+peft=qv",
                  "++peft.lora_r=8", "++peft.use_rslora=True", "++peft.lora_alpha=16", "++wandb.name=x",
                  "++wandb.project=lorafa", "++init.iters=8"]


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=False)
    with open_dict(cfg):
        cfg.run_dir = "/tmp/unused"
    return cfg


def test_default_composes_with_fallback_groups():
    cfg = resolve_config(compose_cfg())
    assert cfg.model.name == "embedded:tiny-llama" and cfg.method.name == "lora"
    assert cfg.init.name == "default" and cfg.peft.target_set == "qv" and cfg.dataset.name == "tiny"


@pytest.mark.parametrize("group", ["model", "dataset", "peft", "init", "method"])
def test_every_option_of_every_group_composes(group):
    for option in group_options(group):
        if group == "dataset":
            cfg = resolve_config(compose_cfg([f"dataset_name={option}"]))
            assert cfg.dataset.name == option
        else:
            prefix = "+" if group in ("init", "peft") else ""
            try:
                cfg = resolve_config(compose_cfg([f"{prefix}{group}={option}"]))
            except ValueError as e:  # an option that needs more keys must say so
                pytest.fail(f"{group}={option}: {e}")
            assert cfg[group]


def test_model_recipes_have_the_lora_one_keys():
    keys = {"epochs", "per_device_batch_size", "real_batch_size", "bf16", "eval_epochs", "max_length", "lr",
            "weight_decay", "warmup", "prec_reg", "saving", "name"}
    for option in group_options("model"):
        cfg = compose_cfg([f"model={option}"])
        assert keys <= set(cfg.model), option


def test_seed_command_composes_and_weight_is_scale():
    pytest.importorskip("peftlab.init.gradient")
    cfg = resolve_config(compose_cfg(SEED_OVERRIDES))
    assert cfg.dataset.name == "meta_math" and cfg.dataset.query_field == "query"
    assert cfg.init.scale == "stable" and "weight" not in cfg.init and cfg.init.iters == 8
    assert cfg.peft.lora_r == 8 and cfg.peft.use_rslora is True


def test_dataset_field_overrides_apply_on_top_of_the_selected_file():
    cfg = resolve_config(compose_cfg(["dataset_name=gsm8k", "++dataset.path=/data/gsm8k.jsonl"]))
    assert cfg.dataset.path == "/data/gsm8k.jsonl" and cfg.dataset.query_field == "question"


@pytest.mark.parametrize("overrides, message", [
    (["method=nope"], None),  # Hydra itself refuses an unknown group option
    (["++method.name=nope"], r"unknown method 'nope'; allowed: \[.*'lora'"),
    (["+init=default", "++init.name=nope"], r"unknown init 'nope'; allowed: \[.*'default', 'gaussian'"),
    (["dataset_name=nope"], r"unknown dataset 'nope'; allowed: \[.*'gsm8k'"),
    (["+peft=qv", "++peft.target_set=qk"], r"unknown peft 'qk'; allowed: \['all', 'qkvo', 'qv'\]"),
    (["wandb.mode=sometimes"], r"unknown wandb.mode 'sometimes'; allowed"),
    (["train.scheduler=step"], r"unknown train.scheduler 'step'; allowed: \['linear', 'cosine', 'constant'\]"),
    (["model.real_batch_size=30", "model.per_device_batch_size=16"], r"must be a multiple of"),
    (["+peft=qv", "++peft.lora_r=0"], r"lora_r must be >= 1"),
    (["+init=default", "++init.weight=stable", "++init.scale=gd"], r"conflicts with init.scale"),
])
def test_bad_configs_fail_early_naming_allowed_values(overrides, message):
    if message is None:
        with pytest.raises(Exception, match="nope"):
            compose_cfg(overrides)
        return
    with pytest.raises(ValueError, match=message):
        resolve_config(compose_cfg(overrides))
