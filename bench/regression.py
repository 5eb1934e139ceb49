"""A planted low-rank regression shared by benchmarks and the lab: y = (W0 + dW*) x, dW* of rank r*, inputs with
an anisotropic covariance; the model is one adapted Linear initialised at W0."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import nn


def make_task(d_in=64, d_out=64, r_star=4, n=2048, seed=0, anisotropy=10.0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    U = torch.linalg.qr(torch.randn(d_out, r_star, generator=g))[0]
    V = torch.linalg.qr(torch.randn(d_in, r_star, generator=g))[0]
    dW = U @ torch.diag(torch.linspace(1.0, 0.5, r_star)) @ V.T
    scales = torch.logspace(0, -torch.log10(torch.tensor(anisotropy)).item(), d_in)  # covariance spectrum 1 .. 1/a^2
    X = torch.randn(n, d_in, generator=g) * scales
    return {"W0": W0, "dW": dW, "X": X, "Y": X @ (W0 + dW).T}


def adapted_model(task, method="lora", r=8, alpha=16, method_cfg=None):
    from peftlab.adapters import apply_adapters

    lin = nn.Linear(task["W0"].shape[1], task["W0"].shape[0], bias=False)
    lin.weight.data.copy_(task["W0"])
    model = nn.Sequential()
    model.add_module("proj", lin)
    peft = OmegaConf.create({"lora_target_modules": ["proj"], "lora_r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
                             "use_rslora": False})
    layers = apply_adapters(model, peft, method_cfg, method)
    return model, layers


def mse(model, task):
    with torch.no_grad():
        return float(((model(task["X"]) - task["Y"]) ** 2).mean())
