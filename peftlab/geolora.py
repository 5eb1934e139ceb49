"""The seed's GeoLoRA API: ``GeoLoRAConfig``, ``GeoLoRAModel(base_model, config, target_modules=[...])`` on any
nn.Module with Linear layers (an MLP as well as an HF model), ``GeoLoRATrainer(model, config).train(train_loader,
val_loader, num_epochs)`` returning the history, ``get_dataloaders`` and ``plot_rank_evolution``; the seed's CLI
``geolora_main.py`` is ``python -m peftlab.geolora`` (same flags). The method itself lives in
peftlab/adapters/geolora.py; this is a thin layer over it.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from .adapters import apply_adapters
from .adapters.base import ADAPTABLE
from .adapters.geolora import GEOLORA, DEFAULTS, GeoLoRALinear, geolora_options, make_geolora_optimizer
from .optim.step import NonFiniteError, optimizer_step
from .plots import plot_rank_evolution
from .utils import atomic_write_text


@dataclass
class GeoLoRAConfig:
    rank_init: int = 8                  # initial rank of every adapted layer
    rmax: int | None = None             # per-layer rank cap (None: 4 * rank_init)
    rmin: int = 1
    tau: float = 1e-3                   # local_threshold: relative norm of the discarded singular values
    alpha: float = 1e-4                 # init S = alpha I
    lora_alpha: float | None = None     # s = lora_alpha / rank_init (None: s = 1)
    lora_dropout: float = 0.0
    truncation_strategy: str = "local_threshold"  # local_threshold | fixed_rank | global_budget
    budget: int | None = None           # global_budget: total rank over all layers
    epsilon_resid: float = 1e-6        # gradient directions below this x ||G_K||_2 (relative) are not added
    use_small_matrix_optimizer: str | bool = "adam"  # adam (one second moment per layer) | adam_entrywise | sgd;
    #                                                   the seed's True / False: adam / sgd
    orthogonal_regularization: float = 0.0
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if isinstance(self.use_small_matrix_optimizer, bool):  # the seed's on/off switch: Adam, or plain steps
            self.use_small_matrix_optimizer = "adam" if self.use_small_matrix_optimizer else "sgd"
        geolora_options(self.method_cfg())  # fail early, naming what is allowed
        if self.rank_init < 1 or self.learning_rate <= 0:
            raise ValueError(f"GeoLoRAConfig needs rank_init >= 1 and learning_rate > 0, got {self.rank_init}, "
                             f"{self.learning_rate}")

    def method_cfg(self) -> dict:
        """The same options as conf/method/geolora.yaml."""
        d = asdict(self)
        cfg = {k: d[k] for k in DEFAULTS if k in d}
        cfg.update(name="geolora", lr=self.learning_rate)
        return cfg

    def peft_cfg(self, target_modules: Any) -> Any:
        alpha = self.lora_alpha if self.lora_alpha is not None else self.rank_init  # None: s = 1
        return OmegaConf.create({"lora_target_modules": target_modules, "lora_r": self.rank_init,
                                 "lora_alpha": float(alpha), "lora_dropout": self.lora_dropout, "use_rslora": False})


class GeoLoRAModel(nn.Module):
    """``base_model`` with its target Linear layers replaced by GeoLoRA layers (everything else frozen).

    target_modules: a list of module names (suffix match, as PEFT) or module class names (the seed's ["Linear"]), or
    a regex; None: every Linear except an output head named lm_head/classifier/score. An entry that matches nothing
    is an error.
    """

    def __init__(self, base_model: nn.Module, config: GeoLoRAConfig, target_modules: Iterable[str] | str | None = None):
        super().__init__()
        self.config = config
        patterns = "all" if target_modules is None else (
            target_modules if isinstance(target_modules, str) else class_names_to_modules(base_model, target_modules))
        layers = apply_adapters(base_model, config.peft_cfg(patterns), config.method_cfg(), "geolora")
        self.base_model = base_model
        self.geolora_layers: dict[str, GeoLoRALinear] = layers

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def ranks(self) -> dict[str, int]:
        return {n: l.rank for n, l in self.geolora_layers.items()}

    def trainable_parameters(self) -> int:
        """Live parameters (U, S, V at the current ranks), not the rmax storage."""
        return sum(l.active_params() for l in self.geolora_layers.values())

    def make_optimizer(self):
        c = self.config
        return make_geolora_optimizer(self.base_model, c.learning_rate, c.method_cfg(), betas=c.betas, eps=c.eps)

    def save_adapter(self, folder: str | Path) -> Path:
        """A PEFT LoRA adapter (r = the largest layer rank, smaller layers zero-padded) that PEFT and vLLM load."""
        from .export import save_peft_adapter

        return save_peft_adapter(self.base_model, folder)


class GeoLoRATrainer:
    """A small loop: one GeoLoRA step per batch. Batches are (inputs, targets) tuples (cross-entropy for integer
    targets, else MSE) or dicts for HF models (their .loss). ``loss_fn(model, batch) -> loss`` overrides both."""

    def __init__(self, model: GeoLoRAModel, config: GeoLoRAConfig | None = None,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, output_dir: str | Path | None = None,
                 log_every: int = 0):
        self.model, self.config = model, config or model.config
        self.loss_fn = loss_fn or default_loss
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.log_every = log_every
        self.optimizer = model.make_optimizer()
        self.options = GEOLORA.parse(self.config.method_cfg())

    def train(self, train_loader, val_loader=None, num_epochs: int = 1) -> dict:
        h = {"step": [], "train_loss": [], "total_rank": [], "trainable_params": [],
             "ranks": {n: [] for n in self.model.geolora_layers}, "epoch": [], "epoch_train_loss": [],
             "val_loss": [], "val_accuracy": []}
        step = 0
        for epoch in range(1, num_epochs + 1):
            self.model.train()
            losses = []
            for batch in train_loader:
                loss = self.loss_fn(self.model, batch)
                extra = GEOLORA.extra_loss(self.model, self.options)  # as the run_exp trainer
                if extra is not None:
                    loss = loss + extra
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteError(f"loss is {value} at step {step + 1}; lower learning_rate")
                loss.backward()
                step += 1
                _, m = optimizer_step(self.optimizer, spec=GEOLORA, model=self.model, options=self.options,
                                      step=step)
                h["step"].append(step)
                h["train_loss"].append(value)
                h["total_rank"].append(m["geolora/total_rank"])
                h["trainable_params"].append(m["geolora/trainable_params"])
                for n, layer in self.model.geolora_layers.items():
                    h["ranks"][n].append(layer.rank)
                losses.append(value)
                if self.log_every and step % self.log_every == 0:
                    print(f"step {step} loss {value:.4f} total rank {m['geolora/total_rank']}", flush=True)
            h["epoch"].append(epoch)
            h["epoch_train_loss"].append(sum(losses) / max(1, len(losses)))
            if val_loader is not None:
                vl, va = self.evaluate(val_loader)
                h["val_loss"].append(vl)
                h["val_accuracy"].append(va)
        if self.output_dir is not None:
            atomic_write_text(self.output_dir / "history.json", json.dumps(h) + "\n")
            plot_rank_evolution(h, self.output_dir / "rank_evolution.png")  # skipped with a note without matplotlib
        return h

    @torch.no_grad()
    def evaluate(self, loader) -> tuple[float, float | None]:
        """Mean loss over batches and, for (inputs, integer targets) batches, the accuracy."""
        self.model.eval()
        total, n, correct, counted = 0.0, 0, 0, 0
        for batch in loader:
            total += float(self.loss_fn(self.model, batch).detach())
            n += 1
            if isinstance(batch, (tuple, list)) and not torch.is_floating_point(batch[1]):
                correct += int((self.model(batch[0]).argmax(-1) == batch[1]).sum())
                counted += batch[1].numel()
        self.model.train()
        return total / max(1, n), (correct / counted if counted else None)


def class_names_to_modules(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The seed targets modules by class name ("Linear") as well as by module name: an entry naming the class of
    adaptable modules becomes their names; any other entry stays a name pattern (checked by find_targets)."""
    out = []
    for t in map(str, targets):
        by_class = [n for n, m in model.named_modules() if n and isinstance(m, ADAPTABLE) and type(m).__name__ == t]
        out += by_class or [t]
    return out


def _digits(side: int, channels: int, seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8) in [0, 1]
    if side != 8:
        X = F.interpolate(X, size=(side, side), mode="bilinear", align_corners=False)
    X, y = X.repeat(1, channels, 1, 1).flatten(1), torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return X[perm], y[perm]


# input side and channels of each dataset the seed names; the offline stand-in keeps the input width
STAND_INS = {"mnist": (28, 1), "cifar10": (32, 3), "digits": (8, 1)}


def get_dataloaders(dataset: str = "mnist", batch_size: int = 128, val_fraction: float = 0.2, seed: int = 0):
    """The seed's ``get_dataloaders(name, batch_size)`` -> (train_loader, val_loader) of (flat inputs, labels).

    peftlab downloads nothing: "mnist" and "cifar10" give an OFFLINE STAND-IN with their input width and 10 classes
    (scikit-learn's 8x8 digits upsampled to 28x28, or to 32x32 x 3 channels), with a warning; "digits" is the 8x8
    set itself. For the real datasets, build your own loaders of (inputs, labels) and pass them to the trainer."""
    if dataset not in STAND_INS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {sorted(STAND_INS)}")
    if dataset != "digits":
        warnings.warn(f"get_dataloaders({dataset!r}): peftlab has no {dataset} (no downloads); this is an offline "
                      f"stand-in, scikit-learn's digits at {dataset}'s input size {STAND_INS[dataset]}", stacklevel=2)
    X, y = _digits(*STAND_INS[dataset], seed=seed)
    n_val = int(len(y) * val_fraction)
    g = torch.Generator().manual_seed(seed)
    train = torch.utils.data.TensorDataset(X[n_val:], y[n_val:])
    val = torch.utils.data.TensorDataset(X[:n_val], y[:n_val])
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            torch.utils.data.DataLoader(val, batch_size=batch_size))


def main(argv=None) -> dict:
    """The seed's CLI: ``python -m peftlab.geolora --dataset mnist --epochs 10 --rank 8 --lr 1e-3`` trains GeoLoRA on
    the seed's MLP (input -> 512 -> 256 -> 10, every Linear adapted) and writes history.json and rank_evolution.png."""
    ap = argparse.ArgumentParser(prog="python -m peftlab.geolora", description=main.__doc__)
    ap.add_argument("--dataset", default="mnist", choices=sorted(STAND_INS))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8, help="rank_init")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tau", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=1e-4, help="init S = alpha I")
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output_dir", default="outputs/geolora_cli")
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    train_loader, val_loader = get_dataloaders(a.dataset, batch_size=a.batch_size, seed=a.seed)
    width = train_loader.dataset.tensors[0].shape[1]
    base = nn.Sequential(nn.Linear(width, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    config = GeoLoRAConfig(rank_init=a.rank, learning_rate=a.lr, tau=a.tau, alpha=a.alpha)
    model = GeoLoRAModel(base, config, target_modules=["Linear"])
    history = GeoLoRATrainer(model, config, output_dir=a.output_dir).train(train_loader, val_loader, a.epochs)
    print(f"geolora: dataset={a.dataset} epochs={a.epochs} val_loss={history['val_loss'][-1]:.4f} "
          f"val_accuracy={history['val_accuracy'][-1]:.4f} ranks={model.ranks()} output_dir={a.output_dir}")
    return history


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    x, y = batch[0], batch[1]
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(out, y) if not torch.is_floating_point(y) else F.mse_loss(out, y)


__all__ = ["GeoLoRAConfig", "GeoLoRAModel", "GeoLoRATrainer", "get_dataloaders", "plot_rank_evolution", "main"]

if __name__ == "__main__":
    main()
