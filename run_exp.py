"""Train one run (or a sweep with -m): `python run_exp.py [overrides]`. All logic lives in peftlab.train."""
import hydra
from omegaconf import DictConfig, open_dict


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from peftlab.train import train

    hc = HydraConfig.get()
    with open_dict(cfg):
        if cfg.wandb.name is None:  # a sweep's runs are named by their overrides
            cfg.wandb.name = ",".join(hc.overrides.task) or "default"
        if cfg.wandb.group is None and hc.mode.name == "MULTIRUN":
            cfg.wandb.group = hc.sweep.dir
    summary = train(cfg)
    return summary["final_eval_loss"]


if __name__ == "__main__":
    main()
