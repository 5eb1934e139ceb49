"""The run contract: a typed schema for every config group, and the one function that turns a composed Hydra config
into the resolved, checked run config before any weight, tokenizer or data file is read.

Mechanism: plain dataclasses whose fields carry their allowed values (``peftlab.schema``); the run-level groups live
here, each method's and init's options beside its code (``MethodSpec.options``, ``InitSpec.options``), the teacher
alignment's in ``align.py``. The resolved config is an OmegaConf config built from those checked dataclasses: attribute
access as before, read-only, and written as ``config.yaml`` into the run folder.

`init`, `peft` and `align` are appended groups (`+init=gradient`), so they may be absent: they fall back to
init=default, peft=qv and align=none. `dataset_name` picks conf/dataset/<name>.yaml; `dataset.*` keys override its
fields. `init.weight` is the seed's old name of `init.scale`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .adapters import get_method
from .align import ALIGNS
from .init import get_init
from .schema import ConfigError, build, fail, option
from .utils import atomic_write_text

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_CHOICES = {"init": "default", "peft": "qv", "align": "none"}
RESOLVED_CONFIG = "config.yaml"
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


# ---- the run-level groups -------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = "embedded:tiny-llama"
    dtype: str = option("float32", choices=DTYPE_NAMES)
    attn_implementation: str | None = None       # null: transformers chooses
    trust_remote_code: bool = False
    epochs: float = option(2.0, gt=0)
    per_device_batch_size: int = option(16, ge=1)
    real_batch_size: int = option(32, ge=1)      # the global batch per optimizer step
    bf16: bool = False
    eval_epochs: float = option(1.0, ge=0)       # 0: no evaluation
    max_length: int = option(128, ge=2)
    lr: float = option(3e-3, gt=0)
    weight_decay: float = option(0.0, ge=0)
    warmup: float = option(0.03, ge=0, integral_above=1)  # a fraction of the steps (< 1) or a number of steps
    prec_reg: float = option(1e-6, ge=0)
    saving: bool = False                         # also save the merged model
    max_tokens_per_micro_batch: int | None = option(None, ge=1)  # pack micro-batches to this padded-token budget

    def check(self, prefix: str) -> None:
        if self.real_batch_size % self.per_device_batch_size:
            fail(f"{prefix}.real_batch_size", self.real_batch_size,
                 f"must be a multiple of {prefix}.per_device_batch_size ({self.per_device_batch_size})")


@dataclass
class DatasetConfig:
    name: str = "tiny"
    path: str = "embedded:arith"                 # hub name, local .json/.jsonl/.parquet file, or embedded:...
    subset: str | None = None
    split: str = "train"
    query_field: str = "question"
    response_field: str = "answer"
    input_field: str | None = None
    prompt: str = "Q: {query}\nA: "
    max_train_samples: int | None = option(None, ge=1)
    eval_samples: int = option(256, ge=0)
    eval_split: str | None = None

    def check(self, prefix: str) -> None:
        try:
            self.prompt.format(query="q")
        except (KeyError, IndexError, ValueError) as e:
            fail(f"{prefix}.prompt", self.prompt, f"must be a format string whose only field is {{query}} ({e!r})")
        if "{query}" not in self.prompt:
            fail(f"{prefix}.prompt", self.prompt, "must contain {query}")


@dataclass
class PeftConfig:
    target_set: str = option("qv", choices=("qv", "qkvo", "all"))
    lora_target_modules: list[str] | str | None = None  # overrides target_set: names (suffix match) or a regex
    lora_r: int = option(8, ge=1)
    lora_alpha: float = option(16.0, gt=0)
    lora_dropout: float = option(0.05, ge=0, lt=1)
    use_rslora: bool = False

    def check(self, prefix: str) -> None:
        t = self.lora_target_modules
        if isinstance(t, list) and (not t or any(not p.strip() for p in t)):
            fail(f"{prefix}.lora_target_modules", t, "must be a non-empty list of module names, a regex or null")
        if isinstance(t, str):
            try:
                re.compile(t)
            except re.error as e:
                fail(f"{prefix}.lora_target_modules", t, f"is not a valid regex ({e})")


@dataclass
class TrainConfig:
    scheduler: str = option("linear", choices=("linear", "cosine", "constant"))
    max_grad_norm: float | None = option(1.0, ge=0)  # 0 or null: no clipping
    max_steps: int | None = option(None, ge=1)
    save_every: int = option(50, ge=0)            # 0: only at the end
    log_every: int = option(1, ge=1)
    gradient_checkpointing: bool = False
    optimizer: str = option("adamw", choices=("adamw", "precond_adamw"))
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = option(1e-8, gt=0)
    fsdp: bool | str = option(False, choices=("full_shard", "shard_grad_op", "hybrid_shard"))
    micro_batch_order: str = option("length", choices=("length", "arrival"))  # data/batching.py
    loss_chunk_tokens: int = option(1024, ge=0)  # answer positions per chunk of the loss (0: the plain loss)
    loraplus_lr_ratio: float | None = option(None, gt=0)  # LoRA+: lora_B (and 1-D adapter params) at lr * ratio

    def check(self, prefix: str) -> None:
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            fail(f"{prefix}.adam_betas", self.adam_betas, "must be two numbers in [0, 1)")


@dataclass
class WandbConfig:
    project: str = "peftlab"
    name: str | None = None
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = option("offline", choices=("online", "offline", "disabled"))


@dataclass
class RunConfig:
    """The resolved run: every group filled in and checked."""
    model: ModelConfig
    dataset: DatasetConfig
    peft: PeftConfig
    init: Any        # the init's options dataclass (InitSpec.options)
    method: Any      # the method's options dataclass (MethodSpec.options)
    align: Any       # align.ALIGNS[name]
    train: TrainConfig
    wandb: WandbConfig
    dataset_name: str = "tiny"
    seed: int = option(42, ge=0)
    resume: bool = False
    run_dir: str = "outputs/run"


# keys that do not change what a run computes: they may differ when a run is resumed
RESUME_FREE_KEYS = ("resume", "run_dir", "wandb.", "train.save_every", "train.log_every", "train.fsdp",
                    "train.gradient_checkpointing", "model.saving", "init.cache", "init.offload")


def compose_config(overrides: list[str] = (), run_dir: str | None = None) -> DictConfig:
    """The config Hydra composes from conf/ for these overrides (as run_exp.py gets it), run_dir set when given."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or an open initialize_config_dir
        cfg = compose("config", overrides=list(overrides))
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return cfg


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def default_dataset_name() -> str:
    """The dataset a run trains on when no override names one (conf/config.yaml's dataset_name)."""
    return OmegaConf.load(CONF_DIR / "config.yaml").dataset_name


def load_group(group: str, name: str) -> DictConfig:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {group} {name!r}; allowed: {group_options(group)} (set it with "
                          f"{'+' if group in DEFAULT_CHOICES else ''}{group}=<name>)")
    return OmegaConf.load(path)


def _group(cfg: dict, group: str, choice: str) -> dict:
    """The group's file merged under whatever keys the user gave for it."""
    given = cfg.get(group) or {}
    return OmegaConf.to_container(OmegaConf.merge(load_group(group, choice), given), resolve=True)


def resolve_config(cfg: DictConfig | dict) -> DictConfig:
    """The resolved, checked, read-only run config; raises ConfigError naming the key, the value and what is allowed.

    Reads only the conf/ files: no model, tokenizer or data."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    known = {f for f in RunConfig.__dataclass_fields__}
    unknown = sorted(set(raw) - known - {"hydra"})
    if unknown:
        raise ConfigError(f"unknown top-level key {unknown[0]} = {raw[unknown[0]]!r}; allowed: {sorted(known)}")

    # datasets: a name selects the file, dataset.* overrides fields (one way to pick a dataset)
    ds_name = raw.get("dataset_name", "tiny")
    if not isinstance(ds_name, str) or ds_name not in group_options("dataset"):
        fail("dataset_name", ds_name, f"allowed: {group_options('dataset')}", "dataset_name=<name>")
    given_name = (raw.get("dataset") or {}).get("name")
    if given_name is not None and given_name != ds_name:
        fail("dataset.name", given_name, f"is set by dataset_name (allowed: {group_options('dataset')})",
             f"dataset_name={given_name}")
    out: dict[str, Any] = {k: raw[k] for k in ("dataset_name", "seed", "resume", "run_dir") if k in raw}
    out["dataset"] = build(DatasetConfig, _group(raw, "dataset", ds_name), "dataset", ds_name)

    init = dict(raw.get("init") or {})
    if "weight" in init:  # the seed's old name
        if "scale" in init and init["scale"] != init["weight"]:
            raise ConfigError(f"init.weight (old name of init.scale) = {init['weight']!r} conflicts with "
                              f"init.scale = {init['scale']!r}; give one")
        init["scale"] = init.pop("weight")
    raw["init"] = init
    init_name = _choice(init.get("name") or DEFAULT_CHOICES["init"], "init", "+init")
    init_spec = get_init(init_name)
    init_given = _group(raw, "init", init_name)
    _refuse_foreign_keys("init", init_name, init_given, init_spec.options, "+init")
    out["init"] = build(init_spec.options, init_given, "init", init_name)

    peft_given = dict(raw.get("peft") or {})
    target_set = peft_given.get("target_set") or DEFAULT_CHOICES["peft"]
    if target_set not in group_options("peft"):
        fail("peft.target_set", target_set, f"allowed: {group_options('peft')}", "+peft=<name>")
    out["peft"] = build(PeftConfig, _group(raw, "peft", target_set), "peft", target_set)

    method = dict(raw.get("method") or {"name": "lora"})
    method_name = _choice(method.get("name"), "method", "method")
    spec = get_method(method_name)
    _refuse_foreign_keys("method", method_name, method, spec.options, "method")
    out["method"] = build(spec.options, method, "method", method_name)

    align = dict(raw.get("align") or {})
    align_name = align.get("name") or DEFAULT_CHOICES["align"]
    if align_name not in ALIGNS:
        fail("align.name", align_name, f"allowed: {sorted(ALIGNS)}", "+align=<name>")
    out["align"] = build(ALIGNS[align_name], _group(raw, "align", align_name), "align", align_name)

    out["model"] = build(ModelConfig, raw.get("model"), "model")
    out["train"] = build(TrainConfig, raw.get("train"), "train")
    out["wandb"] = build(WandbConfig, raw.get("wandb"), "wandb")
    run = build(RunConfig, out, "")
    if run.train.optimizer == "precond_adamw" and not spec.lora_factors:
        fail("train.optimizer", "precond_adamw", f"preconditions LoRA factors (lora_A, lora_B), which method "
             f"{method_name!r} does not have; use train.optimizer=adamw", "train.optimizer=adamw")
    if run.train.loraplus_lr_ratio is not None and not spec.lora_factors:
        fail("train.loraplus_lr_ratio", run.train.loraplus_lr_ratio, f"LoRA+ sets the learning rates of LoRA factors, "
             f"which method {method_name!r} does not have", "train.loraplus_lr_ratio=null")
    for section in (spec, out["init"], out["method"]):  # rules that involve other groups
        if hasattr(section, "check_run"):
            section.check_run(run)
    resolved = OmegaConf.create(asdict(run))
    OmegaConf.set_readonly(resolved, True)
    return resolved


def _choice(name: Any, group: str, override: str) -> str:
    options = group_options(group)
    if name not in options:
        fail(f"{group}.name", name, f"allowed: {options}", f"{override}=<name>")
    return name


def _refuse_foreign_keys(group: str, choice: str, given: dict, options_type: type, override: str) -> None:
    """A key that belongs to another option of the group (e.g. init.direction without +init=gradient) names it."""
    own = set(options_type.__dataclass_fields__)
    foreign = sorted(set(given) - own)
    if not foreign:
        return
    owners = [o for o in group_options(group) if o != choice and foreign[0] in OmegaConf.load(CONF_DIR / group / f"{o}.yaml")]
    where = f"; it is an option of {group}={owners[0]} ({override}={owners[0]})" if owners else ""
    raise ConfigError(f"unknown key {group}.{foreign[0]} = {given[foreign[0]]!r} for {group}={choice} "
                      f"(its keys: {sorted(own)}){where}")


def save_resolved(cfg: DictConfig, run_dir: Path) -> Path:
    path = Path(run_dir) / RESOLVED_CONFIG
    atomic_write_text(path, OmegaConf.to_yaml(cfg))
    return path


def load_run_config(run_dir: str | Path) -> DictConfig | None:
    """The resolved config a run folder ran with (config.yaml; older folders: .hydra/config.yaml, resolved here)."""
    run_dir = Path(run_dir)
    if (run_dir / RESOLVED_CONFIG).is_file():
        return OmegaConf.load(run_dir / RESOLVED_CONFIG)
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if not hydra_cfg.is_file():
        return None
    raw = OmegaConf.load(hydra_cfg)
    raw.run_dir = str(run_dir)  # was ${hydra:runtime.output_dir}, which only Hydra resolves
    try:
        return resolve_config(raw)
    except ValueError:  # an older or partial config (e.g. a key since renamed): read it as it is
        return raw


def config_differences(old: DictConfig | dict, new: DictConfig | dict) -> list[str]:
    """Keys (dotted) whose values differ between two resolved configs, except those that do not change the result."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        d = OmegaConf.to_container(d, resolve=True) if isinstance(d, DictConfig) else d
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    a, b = flat(old), flat(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>")
            and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FREE_KEYS)]
