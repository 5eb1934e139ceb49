"""What a run folder records about its run, for the tools that read it later (eval_gsm8k.py, the report).

The run's config is read with ``peftlab.config.load_run_config`` (``config.yaml``, the resolved config the trainer
writes, with the wandb name and group run_exp.py chose); this adds the wandb identity.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


WANDB_ID = "wandb_id.txt"


def wandb_identity(run_dir: str | Path, cfg: DictConfig | None) -> dict:
    """project / entity / group / name / id of the run's wandb run (values None where unknown)."""
    id_file = Path(run_dir) / WANDB_ID
    w = (cfg.get("wandb") if cfg is not None else None) or {}
    ident = {k: w.get(k) for k in ("project", "entity", "group", "name", "mode")}
    ident["id"] = id_file.read_text().strip() if id_file.is_file() else None
    return ident
