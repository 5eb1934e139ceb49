"""What a run folder records about its run, for the tools that read it later (eval_gsm8k.py, the report).

The trainer writes ``resolved_config.yaml``: the checked config with every group filled in and the wandb name and group
run_exp.py chose (Hydra's ``.hydra/config.yaml`` is written before either is known). Older run folders only have
``.hydra/config.yaml``; it is resolved here with today's conf/ as well as it goes.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .utils import atomic_write_text

RESOLVED = "resolved_config.yaml"
WANDB_ID = "wandb_id.txt"


def save_run_config(run_dir: Path, cfg: DictConfig) -> None:
    atomic_write_text(Path(run_dir) / RESOLVED, OmegaConf.to_yaml(cfg, resolve=True))


def load_run_config(run_dir: str | Path) -> DictConfig | None:
    """The run's resolved config; None when the folder records none."""
    run_dir = Path(run_dir)
    if (run_dir / RESOLVED).is_file():
        return OmegaConf.load(run_dir / RESOLVED)
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if not hydra_cfg.is_file():
        return None
    cfg = OmegaConf.load(hydra_cfg)
    cfg.run_dir = str(run_dir)  # was ${hydra:runtime.output_dir}, which only Hydra resolves
    from .config import resolve_config

    try:
        return resolve_config(cfg)
    except Exception:  # noqa: BLE001 - an old or partial config (e.g. a group since renamed): read it as it is
        return cfg


def wandb_identity(run_dir: str | Path, cfg: DictConfig | None) -> dict:
    """project / entity / group / name / id of the run's wandb run (values None where unknown)."""
    id_file = Path(run_dir) / WANDB_ID
    w = (cfg.get("wandb") if cfg is not None else None) or {}
    ident = {k: w.get(k) for k in ("project", "entity", "group", "name", "mode")}
    ident["id"] = id_file.read_text().strip() if id_file.is_file() else None
    return ident
