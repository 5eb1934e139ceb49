"""The lab's planted low-rank regression (part a of peftlab.lab).

y = (W0 + dW*) x with dW* = U* diag(s) V*^T of planted rank r*, inputs x ~ N(0, Sigma) with an anisotropic Sigma
(eigenvalues log-spaced over `anisotropy`^2, random eigenbasis), so that the gradient G = -(2/d_out) dW* Sigma has a
row space tilted away from V*: LoRA-One's rows follow Sigma V*, LoRA-FA's metric P^(-1/2) undoes the tilt. The model
is one nn.Linear(W0) adapted by apply_adapters (method=full: its weight itself trains). The step loop below is the
lab's own small copy of the trainer's step (the method's optimizer, extra_loss, clipping, after_step) on minibatches,
because peftlab.train.train runs language models only; it stays small until the trainer's step is importable on its
own.
Measured per run: steps until the full-data loss is <= target x its value at W0; the alignment of the init with dW*
(mean cos^2 of the principal angles: 1 = the planted subspace is inside, ~k/d = chance); the final relative loss, the
relative weight error, the rank of the learned change and the adapter's own rank at the end (GeoLoRA adapts it).
The gradient inits get G and Sigma from the full regression data and go through peftlab.init.directions (the
registered gradient init estimates G from language-model examples, which this model has none of).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from torch import nn

from .adapters import adapter_layers, apply_adapters, get_method

GRADIENT_DIRECTIONS = ("LoRA-GA", "LoRA-One", "LoRA-FA")


# ---- subspaces ---------------------------------------------------------------------------------------------------------
def orth(M: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis of the column space of M (columns = basis vectors; none when M is 0)."""
    U, S, _ = torch.linalg.svd(M.double(), full_matrices=False)
    if S.numel() == 0 or S[0] <= 0:
        return U[:, :0]
    return U[:, : int((S > rtol * S[0]).sum())]


def principal_angles(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of X and Y; min(rank X, rank Y) of them."""
    Qx, Qy = orth(X), orth(Y)
    if Qx.shape[1] == 0 or Qy.shape[1] == 0:
        return torch.empty(0, dtype=torch.float64)
    cos = torch.linalg.svdvals(Qx.T @ Qy).clamp(max=1.0)
    return torch.arccos(cos)


def alignment(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Mean cos^2 of the principal angles: 1 when the smaller space lies in the other, nan when one is empty."""
    a = principal_angles(X, Y)
    return float(torch.cos(a).pow(2).mean()) if a.numel() else float("nan")


# ---- (a) the planted regression ----------------------------------------------------------------------------------------
@dataclass
class Regression:
    W0: torch.Tensor
    dW: torch.Tensor  # planted change, rank r_star
    U: torch.Tensor  # its column and row bases
    V: torch.Tensor
    X: torch.Tensor
    Y: torch.Tensor
    sigma: torch.Tensor  # the input second moment X^T X / n


def make_regression(d_in: int = 64, d_out: int = 64, r_star: int = 4, n: int = 2048, anisotropy: float = 10.0,
                    seed: int = 0) -> Regression:
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    U = torch.linalg.qr(torch.randn(d_out, r_star, generator=g))[0]
    V = torch.linalg.qr(torch.randn(d_in, r_star, generator=g))[0]
    dW = U @ torch.diag(torch.linspace(1.0, 0.5, r_star)) @ V.T
    Q = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0]
    std = torch.logspace(0, -math.log10(anisotropy), d_in)  # Sigma's eigenvalues from 1 down to 1/anisotropy^2
    X = (torch.randn(n, d_in, generator=g) * std) @ Q.T
    return Regression(W0, dW, U, V, X, X @ (W0 + dW).T, X.T @ X / n)


class OneLinear(nn.Module):
    def __init__(self, W0: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(W0)

    def forward(self, x):
        return self.proj(x)


def mse(model: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return ((model(X) - Y) ** 2).mean()


@torch.no_grad()
def full_loss(model: nn.Module, task: Regression) -> float:
    """The full-data MSE in closed form: mean((E x)^2) = tr(E Sigma E^T) / d_out with E = W_eff - W0 - dW*
    (the targets are noiseless), far cheaper than a pass over the data at every step."""
    E = effective_change(model, task.W0) - task.dW
    return float(((E @ task.sigma) * E).sum() / E.shape[0])


@dataclass
class Variant:
    """A method as the lab runs it: the registered name, method-config overrides, the trainer's optimizer and
    train.* overrides (LoRA+: train.loraplus_lr_ratio)."""
    method: str
    overrides: dict = field(default_factory=dict)
    optimizer: str = "adamw"
    tag: str | None = None  # names the overrides in the label (default: their values)
    train: dict = field(default_factory=dict)
    train_tag: str | None = None  # "+loraplus16" in the label

    @property
    def label(self) -> str:
        extra = f":{self.tag}" if self.tag else "".join(f":{v}" for v in self.overrides.values())
        return (self.method + extra + ("+precond_adamw" if self.optimizer == "precond_adamw" else "")
                + (f"+{self.train_tag}" if self.train_tag else ""))


def init_overrides(init: str) -> list[str]:
    """The overrides that select a lab init (a gradient direction, a named init, or the default)."""
    if init in GRADIENT_DIRECTIONS:
        return ["+init=gradient", f"++init.direction={init}"]
    return [] if init == "default" else [f"+init={init}"]


def run_cfg(v: Variant, init: str, lr: float, seed: int):
    """The resolved run config of a regression run (model.*, train.*, method.*, init.*, seed), as run_exp.py would
    resolve it; an init that does not apply to the method raises here."""
    from .config import compose_config, resolve_config

    o = [f"method={v.method}", f"model.lr={lr}", "model.weight_decay=0", f"seed={seed}",
         f"train.optimizer={v.optimizer}", *init_overrides(init)]
    o += [f"++method.{k}={val}" for k, val in v.overrides.items()] + [f"train.{k}={val}" for k, val in v.train.items()]
    return resolve_config(compose_config(o, run_dir="lab-regression"))


def regression_gradient(model: nn.Module, layer, task: Regression) -> torch.Tensor:
    """G = dL/dW at the base weight (the adapter switched off), on all the data: the full-batch gradient."""
    W = layer.base.weight
    W.requires_grad_(True)
    layer.disabled = True
    try:
        (G,) = torch.autograd.grad(mse(model, task.X, task.Y), W)
    finally:
        layer.disabled = False
        W.requires_grad_(False)
    return G.detach().float()


@torch.no_grad()
def apply_gradient_init(layer, G: torch.Tensor, sigma: torch.Tensor, ic) -> None:
    """The registered gradient init's closed forms (peftlab.init.gradient.run) on this layer's G and Sigma."""
    from .init.directions import lora_fa, lora_ga, lora_one

    r, s, gamma = layer.rank, layer.scaling, float(ic.stable_gamma)
    if ic.direction == "LoRA-GA":
        A, B = lora_ga(G, r, s, ic.scale, gamma, ic.ga_direction, ic.ga_convention)
    elif ic.direction == "LoRA-One":
        A, B = lora_one(G, r, s, ic.scale, gamma)
    else:
        metric = ic.get("metric") in ("on", True)
        A, B = lora_fa(G, r, s, sigma if metric else None, float(ic.damping), ic.scale, gamma)
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B)
    if ic.direction == "LoRA-GA":  # the output stays unchanged: the base moves by -s B A
        layer.set_offset(layer.lora_A, layer.lora_B, layer.scaling)


def init_alignment(layer, task: Regression) -> tuple[float, float]:
    """(column, row) alignment of the init's factors with dW*; a zero B has no column space (nan); nan for full
    fine-tuning (no layer, no factors)."""
    if layer is None:
        return float("nan"), float("nan")
    A, B = layer.lora_factors()
    return alignment(B, task.U), alignment(A.T, task.V)


def adapted_layer(model: nn.Module):
    """The adapter layer on `proj`; None for method=full, which trains proj.weight itself."""
    return adapter_layers(model).get("proj")


@torch.no_grad()
def effective_change(model: nn.Module, W0: torch.Tensor) -> torch.Tensor:
    layer = adapted_layer(model)
    if layer is None:
        return model.proj.weight.float() - W0
    return layer.base.weight.float() + layer.delta_weight() - W0


def run_regression(v: Variant, init: str, seed: int, steps: int, target: float, r: int = 8, alpha: float = 16,
                   lr: float = 1e-2, batch: int = 128, **task_kw) -> dict:
    """One run; raises ValueError when the init does not apply to the method (no LoRA factors)."""
    from .init import InitContext, get_init, lora_factor_layers
    from .optim.step import optimizer_step
    from .train import build_optimizer

    task = make_regression(seed=seed, **task_kw)
    cfg = run_cfg(v, init, lr, seed)
    torch.manual_seed(seed)
    model = OneLinear(task.W0)
    peft = OmegaConf.create({"lora_target_modules": ["proj"], "lora_r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
                             "use_rslora": False})
    spec = get_method(v.method)
    layers = apply_adapters(model, peft, cfg.method, v.method)
    if init in GRADIENT_DIRECTIONS:
        lora_factor_layers(InitContext(model, layers, cfg), init)  # raises as the registered init would
        layer = layers["proj"]
        apply_gradient_init(layer, regression_gradient(model, layer, task), task.sigma, cfg.init)
    else:
        get_init(init).run(InitContext(model, layers, cfg))
    col_align, row_align = init_alignment(adapted_layer(model), task)
    params = [p for p in model.parameters() if p.requires_grad]
    options = spec.parse(cfg.method)
    optimizer = build_optimizer(cfg, spec, options, model, params)
    base_loss = float(((task.dW @ task.sigma) * task.dW).sum() / task.dW.shape[0])  # the loss at W0
    start_loss = full_loss(model, task)
    g = torch.Generator().manual_seed(seed + 1)
    curve, reached = [start_loss / base_loss], None
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(task.X), (batch,), generator=g)
        loss = mse(model, task.X[idx], task.Y[idx])
        extra = spec.extra_loss(model, options)
        if extra is not None:
            loss = loss + extra
        loss.backward()
        optimizer_step(optimizer, max_grad_norm=cfg.train.max_grad_norm, spec=spec, model=model, options=options,
                       step=step)  # the trainer's update order
        curve.append(full_loss(model, task) / base_loss)
        if reached is None and curve[-1] <= target:
            reached = step
    layer = adapted_layer(model)
    change = effective_change(model, task.W0)
    sv = torch.linalg.svdvals(change.double())
    return {"method": v.label, "init": init, "seed": seed, "steps_to_target": reached,
            "init_loss": curve[0], "final_loss": curve[-1],
            "weight_error": float(torch.linalg.norm(change - task.dW) / torch.linalg.norm(task.dW)),
            "col_alignment": col_align, "row_alignment": row_align,
            "learned_rank": int((sv > 1e-2 * sv[0]).sum()) if sv[0] > 0 else 0,
            "adapter_rank": getattr(layer, "rank", None), "params": active_params(model), "lr": lr, "curve": curve}


def active_params(model: nn.Module) -> int:
    """Parameters the adapter uses at the end: GeoLoRA's live U, S, V (not its storage capacity), else the trainable
    ones (LoRA: r (d_in + d_out); full fine-tuning: d_in d_out)."""
    layer = adapted_layer(model)
    if hasattr(layer, "active_params"):
        return int(layer.active_params())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
