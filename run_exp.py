"""Train one run (or a sweep with -m): `python run_exp.py [overrides]`. All logic lives in peftlab.train."""
import hydra
from omegaconf import DictConfig, open_dict


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from peftlab.train import train

    hc = HydraConfig.get()
    with open_dict(cfg):
        if cfg.wandb.name is None:  # a run is named by its overrides; a sweep's by those that differ between its runs
            cfg.wandb.name = _run_name(list(hc.overrides.task), hc)
        if cfg.wandb.group is None and hc.mode.name == "MULTIRUN":
            cfg.wandb.group = hc.sweep.dir
    summary = train(cfg)
    return summary["final_eval_loss"]


def _run_name(task: list[str], hc) -> str:
    from pathlib import Path

    from peftlab.sweep import expand, run_name

    sweep_file = Path(hc.sweep.dir) / "multirun.yaml"  # the sweep's own overrides, saved by Hydra before any job
    if hc.mode.name != "MULTIRUN" or not sweep_file.is_file():
        return run_name(task, [task])
    from omegaconf import OmegaConf

    sweep = list(OmegaConf.load(sweep_file).hydra.overrides.task)
    try:
        return run_name(task, expand(sweep, check=False, for_array=False))
    except ValueError:  # a name must never stop a run: all of its overrides then
        return run_name(task, [task])


if __name__ == "__main__":
    main()
