"""GeoLoRA on the seed's MLP (784-512-256-10), offline: scikit-learn's 8x8 digits in place of MNIST.

The base MLP is first trained on digits 0-4 only (a stand-in for a pretrained model); GeoLoRA then adapts it to all ten
digits with the base frozen, and the ranks of its three layers adapt. Digits are upsampled to 28x28 (784 inputs, the
seed's MLP verbatim) unless --width 64.

    python examples/geolora_digits.py [--width 784|64] [--epochs 8] [--out outputs/geolora_digits]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.geolora import GeoLoRAConfig, GeoLoRAModel, GeoLoRATrainer


def digits(width: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8) in [0, 1]
    if width == 784:
        X = F.interpolate(X, size=(28, 28), mode="bilinear", align_corners=False)
    elif width != 64:
        raise ValueError(f"--width must be 784 (upsampled to 28x28) or 64 (8x8), got {width}")
    X, y = X.flatten(1), torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    n_test = len(y) // 5
    return (X[n_test:], y[n_test:]), (X[:n_test], y[:n_test])


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def batches(X, y, size, shuffle=True, seed=0):
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
    return [(X[i], y[i]) for i in idx.split(size)]


@torch.no_grad()
def accuracy(model, X, y) -> float:
    return float((model(X).argmax(1) == y).float().mean())


def pretrain_on_half(model, X, y, epochs=10):
    keep = y < 5
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        for xb, yb in batches(X[keep], y[keep], 64, seed=epoch):
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=784)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--tau", type=float, default=1e-2)
    ap.add_argument("--strategy", default="local_threshold")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--out", default="outputs/geolora_digits")
    a = ap.parse_args()
    torch.manual_seed(0)
    (Xtr, ytr), (Xte, yte) = digits(a.width)
    base = mlp(a.width)
    pretrain_on_half(base, Xtr, ytr)
    before = accuracy(base, Xte, yte)

    config = GeoLoRAConfig(rank_init=a.rank, rmax=4 * a.rank, tau=a.tau, learning_rate=a.lr,
                           truncation_strategy=a.strategy, budget=a.budget)
    model = GeoLoRAModel(base, config, target_modules=["0", "2", "4"])
    trainer = GeoLoRATrainer(model, config, output_dir=a.out)
    history = trainer.train(batches(Xtr, ytr, 64), batches(Xte, yte, 256, shuffle=False), num_epochs=a.epochs)
    after = accuracy(model, Xte, yte)
    full = sum(l.base.weight.numel() for l in model.geolora_layers.values())
    report = {"test_accuracy_base": before, "test_accuracy_geolora": after, "ranks": model.ranks(),
              "trainable_params": model.trainable_parameters(), "full_finetune_params": full,
              "epoch_train_loss": history["epoch_train_loss"], "val_accuracy": history["val_accuracy"]}
    model.save_adapter(Path(a.out) / "adapter")
    (Path(a.out) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"rank evolution: {Path(a.out) / 'rank_evolution.png'}; PEFT adapter: {Path(a.out) / 'adapter'}")


if __name__ == "__main__":
    main()
