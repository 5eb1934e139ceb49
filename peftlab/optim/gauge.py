"""Gauge projection for LoRA factors (GP-LoRA).

B A is invariant under (A, B) -> (R A, B R^-1). After an optimizer step we pick the symmetric R that balances the
factors, R A A^T R = mu R^-1 B^T B R^-1: with G_A = A A^T + eps I and G_B = B^T B + eps I,
S = G_A^-1/2 (G_A^1/2 (mu G_B) G_A^1/2)^1/2 G_A^-1/2 (the SPD solution of S G_A S = mu G_B) and R = S^1/2.
Everything is fp32 through symmetric eigendecompositions with an eigenvalue floor, batched over the layers that share
a rank: one batched eigh per step of the formula, not a Python loop over layers.

Two traps (DESIGN.md): at B = 0 the balanced factors are both ~0, so projecting shrinks A (~30x) and starves B's
gradient: the guard leaves a layer alone until mu ||B||_F^2 >= guard * ||A||_F^2 (and for the first warmup steps).
After a gauge change Adam's moments no longer match the parameters: ``moments="transport"`` maps them as the
gradients they average transform (dL/dA' = R^-1 dL/dA, dL/dB' = dL/dB R: m_A -> R^-1 m_A, m_B -> m_B R; the
elementwise second moments through the squared entries, exact for independent coordinates), ``"reset"`` zeroes them
(the default: fastest in bench/bench_gplora.py and on the embedded task), ``"keep"`` leaves them.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import nn

from ..adapters import adapter_layers

MOMENTS = ("transport", "reset", "keep")


def _sym_fn(M: torch.Tensor, fn, floor: float) -> torch.Tensor:
    """fn applied to the eigenvalues of a batch of symmetric matrices (eigenvalues floored relative to the max)."""
    evals, evecs = torch.linalg.eigh((M + M.transpose(-1, -2)) / 2)
    top = evals.amax(-1, keepdim=True).clamp(min=floor)
    evals = torch.maximum(evals, top * floor)
    return (evecs * fn(evals).unsqueeze(-2)) @ evecs.transpose(-1, -2)


def gauge_matrices(A: torch.Tensor, B: torch.Tensor, mu: torch.Tensor | float, eps: float = 1e-4,
                   eig_floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R^-1) for batches A (L, r, n), B (L, m, r), in fp32; mu is a scalar or a (L,) tensor."""
    A, B = A.float(), B.float()
    mu = torch.as_tensor(mu, dtype=torch.float32, device=A.device).expand(A.shape[0])
    return _gauge_from_grams(A @ A.transpose(-1, -2), B.transpose(-1, -2) @ B, mu, eps, eig_floor)


def resolve_mu(mu: Any, rank: int, out_features: int) -> float:
    if mu == "auto":
        return rank / out_features
    mu = float(mu)
    if mu <= 0:
        raise ValueError(f"gauge mu must be 'auto' (r/m) or a positive number, got {mu}")
    return mu


def imbalance(A: torch.Tensor, B: torch.Tensor, mu: torch.Tensor | float) -> torch.Tensor:
    """||A A^T - mu B^T B||_F / ||A A^T||_F per layer (batched)."""
    A, B = A.float(), B.float()
    mu = torch.as_tensor(mu, dtype=torch.float32, device=A.device).reshape(-1, 1, 1)
    GA = A @ A.transpose(-1, -2)
    diff = GA - mu * (B.transpose(-1, -2) @ B)
    return torch.linalg.matrix_norm(diff) / torch.linalg.matrix_norm(GA).clamp(min=1e-30)


def _transport_state(optimizer, A: nn.Parameter, B: nn.Parameter, R: torch.Tensor, R_inv: torch.Tensor,
                     how: str) -> None:
    if optimizer is None or how == "keep":
        return
    for p, left in ((A, True), (B, False)):
        st = optimizer.state.get(p)
        if not st:
            continue
        for key, val in st.items():
            if not torch.is_tensor(val) or val.shape != p.shape:
                continue
            if how == "reset":
                val.zero_()
            elif key.endswith("sq") or key in ("exp_avg_sq", "max_exp_avg_sq", "square_avg"):  # second moments
                M = R_inv * R_inv if left else R * R
                val.copy_((M @ val.float() if left else val.float() @ M).clamp_(min=0).to(val.dtype))
            else:  # first moments, momentum buffers: like the gradients they average
                val.copy_((R_inv @ val.float() if left else val.float() @ R).to(val.dtype))


@torch.no_grad()
def gauge_project_model(model: nn.Module, mu: Any = "auto", eps: float = 1e-4, eig_floor: float = 1e-12,
                        guard: float = 0.1, optimizer: torch.optim.Optimizer | None = None,
                        moments: str = "reset", layers: Iterable | None = None) -> dict[str, float]:
    """Project every LoRA layer of the model (in place, BA unchanged); returns the metrics to log."""
    if moments not in MOMENTS:
        raise ValueError(f"unknown gauge moments {moments!r}; allowed: {list(MOMENTS)}")
    t0 = time.perf_counter()
    layers = list(layers) if layers is not None else [
        l for l in adapter_layers(model).values() if hasattr(l, "lora_A") and hasattr(l, "lora_B")]
    groups = defaultdict(list)
    for l in layers:  # layers that share a shape share one batched computation
        groups[(tuple(l.lora_A.shape), tuple(l.lora_B.shape), l.lora_A.device)].append(l)
    imb, rdev, n_proj, n_all = [], [], 0, 0
    for group in groups.values():
        A = torch.stack([l.lora_A for l in group]).float()
        B = torch.stack([l.lora_B for l in group]).float()
        mus = torch.tensor([resolve_mu(mu, A.shape[1], B.shape[1])] * len(group), device=A.device)
        GA, GB = A @ A.transpose(-1, -2), B.transpose(-1, -2) @ B
        imb_g = torch.linalg.matrix_norm(GA - mus[:, None, None] * GB) / torch.linalg.matrix_norm(GA).clamp(min=1e-30)
        # the guard: at B ~ 0 the balanced factors are both ~ 0, which would starve B's gradient
        active = mus * GB.diagonal(dim1=-2, dim2=-1).sum(-1) >= guard * GA.diagonal(dim1=-2, dim2=-1).sum(-1)
        n_all += len(group)
        imb.append(imb_g)
        if not active.any():
            continue
        R, R_inv = _gauge_from_grams(GA[active], GB[active], mus[active], eps, eig_floor)
        new_A, new_B = R @ A[active], B[active] @ R_inv
        for j, i in enumerate(active.nonzero().flatten().tolist()):
            l = group[i]
            l.lora_A.copy_(new_A[j])
            l.lora_B.copy_(new_B[j])
            _transport_state(optimizer, l.lora_A, l.lora_B, R[j], R_inv[j], moments)
        rdev.append(torch.linalg.matrix_norm(R - torch.eye(R.shape[-1], device=R.device)))
        n_proj += len(R)
    out = {"gplora/imbalance": float(torch.cat(imb).mean()) if imb else 0.0,
           "gplora/R_minus_I": float(torch.cat(rdev).mean()) if rdev else 0.0,
           "gplora/projected_layers": n_proj / max(n_all, 1),
           "gplora/project_ms": (time.perf_counter() - t0) * 1e3}
    return out


def _gauge_from_grams(GA0: torch.Tensor, GB0: torch.Tensor, mu: torch.Tensor, eps: float, eig_floor: float):
    """gauge_matrices from the (unregularised) Grams A A^T and B^T B."""
    r = GA0.shape[-1]
    eye = torch.eye(r, device=GA0.device)
    GA, GB = GA0 + eps * eye, GB0 + eps * eye
    evals, evecs = torch.linalg.eigh(GA)
    evals = torch.maximum(evals, evals.amax(-1, keepdim=True).clamp(min=eig_floor) * eig_floor)
    GA_h = (evecs * evals.sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)
    GA_ih = (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)
    S = GA_ih @ _sym_fn(GA_h @ (mu.reshape(-1, 1, 1) * GB) @ GA_h, torch.sqrt, eig_floor) @ GA_ih
    evals, evecs = torch.linalg.eigh((S + S.transpose(-1, -2)) / 2)
    evals = torch.maximum(evals, evals.amax(-1, keepdim=True).clamp(min=eig_floor) * eig_floor)
    R = (evecs * evals.sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)
    R_inv = (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)
    return R, R_inv


def gauge_project_(layer_or_factors, mu: Any = "auto", eps: float = 1e-4, eig_floor: float = 1e-12,
                   optimizer=None, moments: str = "keep") -> dict[str, float]:
    """Project one layer (or an (A, B) pair of parameters) in place, unguarded."""
    if isinstance(layer_or_factors, tuple):
        A, B = layer_or_factors
        layer = type("Factors", (), {"lora_A": A, "lora_B": B, "out_features": B.shape[0],
                                     "in_features": A.shape[1]})()
    else:
        layer = layer_or_factors
    return gauge_project_model(None, mu, eps, eig_floor, guard=0.0, optimizer=optimizer, moments=moments,
                               layers=[layer])


class GaugeProjectedOptimizer(torch.optim.Optimizer):
    """Wraps any torch optimizer: ``step()`` runs the base step, then projects every LoRA layer of ``model``.
    param_groups, state, state_dict, load_state_dict and zero_grad are the base optimizer's."""

    def __init__(self, base_opt: torch.optim.Optimizer, model: nn.Module, mu: Any = "auto", eps: float = 1e-4,
                 eig_floor: float = 1e-12, guard: float = 0.01, moments: str = "reset", every: int = 1):
        # deliberately no super().__init__: every piece of optimizer state is the base optimizer's
        self.base_opt, self.model = base_opt, model
        self.kwargs = dict(mu=mu, eps=eps, eig_floor=eig_floor, guard=guard, moments=moments)
        self.every, self.steps, self.last_metrics = int(every), 0, {}
        if moments not in MOMENTS:
            raise ValueError(f"unknown gauge moments {moments!r}; allowed: {list(MOMENTS)}")

    param_groups = property(lambda self: self.base_opt.param_groups)
    state = property(lambda self: self.base_opt.state)
    defaults = property(lambda self: self.base_opt.defaults)

    def step(self, closure=None):
        loss = self.base_opt.step(closure)
        self.steps += 1
        if self.steps % self.every == 0:
            self.last_metrics = gauge_project_model(self.model, optimizer=self.base_opt, **self.kwargs)
        return loss

    def zero_grad(self, set_to_none: bool = True):
        self.base_opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.base_opt.state_dict()

    def load_state_dict(self, state_dict):
        self.base_opt.load_state_dict(state_dict)

    def add_param_group(self, group):
        self.base_opt.add_param_group(group)

    def __repr__(self):
        return f"GaugeProjectedOptimizer({self.base_opt!r}, {self.kwargs}, every={self.every})"
