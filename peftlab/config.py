"""Config resolution and checking, before any model loads.

`init`, `peft` and `align` are appended groups (`+init=gradient`), so they may be absent: fall back to
init=default, peft=qv and align=none. `dataset_name` picks conf/dataset/<name>.yaml; `dataset.*` keys override its fields. `init.weight` is the
old name of `init.scale`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_CHOICES = {"init": "default", "peft": "qv", "align": "none"}
TARGET_SETS = ("qv", "qkvo", "all")
WANDB_MODES = ("online", "offline", "disabled")
SCHEDULERS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "precond_adamw")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_group(group: str, name: str) -> DictConfig:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown {group} {name!r}; allowed: {group_options(group)}")
    return OmegaConf.load(path)


def _with_group_defaults(cfg: DictConfig, group: str, choice: str) -> DictConfig:
    """The group's file merged under whatever keys the user gave for it."""
    given = cfg.get(group)
    given = OmegaConf.create({}) if given is None else given
    return OmegaConf.merge(load_group(group, choice), given)


def resolve_config(cfg: DictConfig) -> DictConfig:
    """A checked copy of the run config with every group filled in; raises ValueError naming what is allowed."""
    from .adapters import get_method
    from .init import get_init

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(cfg):
        # datasets: a name selects the file, dataset.* overrides fields (one way to pick a dataset)
        given_name = (cfg.get("dataset") or {}).get("name")
        if given_name is not None and given_name != cfg.dataset_name:
            raise ValueError(f"select a dataset with dataset_name={given_name} (dataset.name is set by it); "
                             f"allowed: {group_options('dataset')}")
        cfg.dataset = _with_group_defaults(cfg, "dataset", cfg.dataset_name)

        init = cfg.get("init") or OmegaConf.create({})
        if "weight" in init:  # the seed's old name
            if "scale" in init and init.scale != init.weight:
                raise ValueError(f"init.weight (old name of init.scale) = {init.weight!r} conflicts with "
                                 f"init.scale = {init.scale!r}; give one")
            init.scale = init.pop("weight")
        cfg.init = init
        cfg.init = _with_group_defaults(cfg, "init", init.get("name") or DEFAULT_CHOICES["init"])
        cfg.peft = _with_group_defaults(cfg, "peft", (cfg.get("peft") or {}).get("target_set") or DEFAULT_CHOICES["peft"])
        cfg.align = _with_group_defaults(cfg, "align", (cfg.get("align") or {}).get("name") or DEFAULT_CHOICES["align"])

    get_method(cfg.method.name).check_config(cfg)  # raises listing the methods; a method refuses inits it cannot take
    get_init(cfg.init.name).validate(cfg.init)
    if cfg.align.name != "none":
        from .align import validate_align_cfg

        validate_align_cfg(cfg.align)
    p = cfg.peft
    if not p.get("lora_target_modules") and p.target_set not in TARGET_SETS:
        raise ValueError(f"unknown peft.target_set {p.target_set!r}; allowed: {list(TARGET_SETS)} "
                         f"or give peft.lora_target_modules")
    if int(p.lora_r) < 1:
        raise ValueError(f"peft.lora_r must be >= 1, got {p.lora_r}")
    if not 0 <= float(p.lora_dropout) < 1:
        raise ValueError(f"peft.lora_dropout must be in [0, 1), got {p.lora_dropout}")
    _check_choice("wandb.mode", cfg.wandb.mode, WANDB_MODES)
    _check_choice("train.scheduler", cfg.train.scheduler, SCHEDULERS)
    _check_choice("train.optimizer", cfg.train.optimizer, OPTIMIZERS)
    from .optim.loraplus import check_ratio

    check_ratio(cfg.train.get("loraplus_lr_ratio"))
    m = cfg.model
    for key in ("per_device_batch_size", "real_batch_size", "max_length"):
        if int(m[key]) < 1:
            raise ValueError(f"model.{key} must be >= 1, got {m[key]}")
    if m.real_batch_size % m.per_device_batch_size:
        raise ValueError(f"model.real_batch_size ({m.real_batch_size}) must be a multiple of "
                         f"model.per_device_batch_size ({m.per_device_batch_size})")
    return cfg


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {key} {value!r}; allowed: {list(allowed)}")
