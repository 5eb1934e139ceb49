"""Gauge projection for LoRA factors (GP-LoRA).

B A is unchanged by (A, B) -> (R A, B R^-1) for any invertible r x r R. After an optimizer step we pick the
symmetric positive R that balances the factors: R A A^T R = mu R^-1 B^T B R^-1, i.e. with S = R^2,
S G_A S = mu G_B, G_A = A A^T + eps I, G_B = B^T B + eps I. Its SPD solution is the geometric mean
S = G_A^-1/2 (G_A^1/2 (mu G_B) G_A^1/2)^1/2 G_A^-1/2 (check: S G_A S = G_A^-1/2 (G_A^1/2 mu G_B G_A^1/2) G_A^-1/2
= mu G_B), and R = S^1/2. At eps = 0 the new factors satisfy A A^T = mu B^T B exactly; otherwise up to
eps (R^-2 - R^2). Everything is fp32 through symmetric eigendecompositions with a relative eigenvalue floor; the
r x r work of all layers of one rank is one batched computation (a batched Cholesky and two batched eigh calls per
rank, not a loop over layers), the Grams and the products with R are batched over the layers that share a shape.

Two traps (DESIGN.md):
- At B = 0 (LoRA's init) the balanced factors are both ~0: projecting shrinks A ~30x and starves B's gradient. The
  guard projects a layer only while rho = mu ||B||_F^2 / ||A||_F^2 (1 when balanced) lies in [guard, 1/guard].
- After a gauge change Adam's moments no longer match the parameters. The loss depends on B A only, so the gradient
  at the re-gauged point is exactly dL/dA' = R^-1 dL/dA, dL/dB' = dL/dB R (R symmetric), and so are the gradients at
  every re-gauged past iterate. ``moments="transport"`` maps the moments as the averages of gradients they are:
  first moments m_A -> R^-1 m_A, m_B -> m_B R (exact), elementwise second moments through the squared entries,
  v_A -> (R^-1)^2 v_A, v_B -> v_B R^2 (exact for diagonal R and permutations, cross terms dropped otherwise).
  ``"reset"`` gives the factors a fresh optimizer state (moments zeroed AND the step counter restarted, so that Adam's
  bias correction starts over: zeroing the moments alone makes the next steps up to ~6x larger). ``"keep"`` leaves
  the state alone. The default is "keep", as the seed's ``GaugeProjectedOptimizer`` (it projects the factors in place
  and never touches the optimizer state). "reset" with every = 1 makes each factor update Adam's first step,
  lr * sign(g): sign descent in the balanced gauge, another optimizer; on the embedded default its figures differ
  from keep's and LoRA's by about one seed sd (bench/results/gplora_embedded.json), so it is no longer the default.

Seed API (loralib's names): ``GaugeProjectedOptimizer(base_optimizer, model, mu="auto", eps=1e-4, eig_floor=1e-12,
cast_fp32=True)`` and ``gauge_project_model(model, mu, eps, eig_floor, cast_fp32)``. The math is always fp32
(``cast_fp32=False`` is accepted and changes nothing: eigh has no bf16/fp16 kernels). The model's LoRA layers are
peftlab's, loralib-style modules with ``lora_A``/``lora_B`` parameters, or HF PEFT's LoRA Linear layers; any other
adapter or LoRA parameter is refused by name, never skipped.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import nn

from ..adapters import AdapterLayer, unwrap

MOMENTS = ("transport", "reset", "keep")
# Optimizer state entries that average gradients (first moments) or squared gradients (second moments).
FIRST_MOMENTS = ("exp_avg", "momentum_buffer", "grad_avg")
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")


def resolve_mu(mu: Any, rank: int, out_features: int) -> float:
    """mu = "auto" is r / m (m = out_features), else a positive number."""
    if isinstance(mu, str):
        if mu != "auto":
            raise ValueError(f"gauge mu must be 'auto' (r/m) or a positive number, got {mu!r}")
        return rank / out_features
    mu = float(mu)
    if not mu > 0:
        raise ValueError(f"gauge mu must be 'auto' (r/m) or a positive number, got {mu}")
    return mu


def check_options(mu: Any = "auto", eps: float = 1e-4, eig_floor: float = 1e-12, guard: float = 0.0,
                  moments: str = "keep", every: int = 1, warmup_steps: int = 0) -> None:
    """Clear early errors for bad options."""
    resolve_mu(mu, 1, 1)
    if moments not in MOMENTS:
        raise ValueError(f"unknown gauge moments {moments!r}; allowed: {list(MOMENTS)}")
    if not float(eps) >= 0 or not 0 <= float(eig_floor) < 1:
        raise ValueError(f"gauge eps must be >= 0 and eig_floor in [0, 1), got eps={eps}, eig_floor={eig_floor}")
    if not 0 <= float(guard) <= 1:
        raise ValueError(f"gauge guard must be in [0, 1] (0: always project), got {guard}")
    if int(every) < 1 or int(warmup_steps) < 0:
        raise ValueError(f"gauge every must be >= 1 and warmup_steps >= 0, got every={every}, "
                         f"warmup_steps={warmup_steps}")


def _eig_floored(M: torch.Tensor, eig_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (floored at eig_floor times the largest, and above 0) and eigenvectors of symmetric matrices."""
    evals, evecs = torch.linalg.eigh((M + M.transpose(-1, -2)) / 2)
    top = evals.amax(-1, keepdim=True).clamp(min=torch.finfo(M.dtype).tiny)
    return torch.maximum(evals, top * max(eig_floor, 1e-30)), evecs


def _from_eig(evals: torch.Tensor, evecs: torch.Tensor) -> torch.Tensor:
    return (evecs * evals.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def gauge_from_grams(GA: torch.Tensor, GB: torch.Tensor, mu: torch.Tensor | float, eps: float = 1e-4,
                     eig_floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R^-1) from batches of Grams A A^T and B^T B, (L, r, r) fp32; mu a scalar or an (L,) tensor."""
    eye = torch.eye(GA.shape[-1], device=GA.device, dtype=GA.dtype)
    mu = torch.as_tensor(mu, dtype=GA.dtype, device=GA.device)
    mu = mu.reshape(-1, 1, 1) if mu.dim() else mu
    GA, muGB = GA + eps * eye, mu * (GB + eps * eye)
    # S = G_A^-1/2 (G_A^1/2 mu G_B G_A^1/2)^1/2 G_A^-1/2 equals L^-T (L^T mu G_B L)^1/2 L^-1 for G_A = L L^T (both
    # are the SPD solution of S G_A S = mu G_B); the Cholesky factor is ~10x cheaper than an eigh.
    L, info = torch.linalg.cholesky_ex(GA)
    if bool(info.any()):  # G_A not numerically positive definite (eps = 0, rank-deficient A): floored eigh
        ev, V = _eig_floored(GA, eig_floor)
        GA_h, GA_ih = _from_eig(ev.sqrt(), V), _from_eig(ev.rsqrt(), V)
        ev, V = _eig_floored(GA_h @ muGB @ GA_h, eig_floor)
        S = GA_ih @ _from_eig(ev.sqrt(), V) @ GA_ih
    else:
        ev, V = _eig_floored(L.transpose(-1, -2) @ muGB @ L, eig_floor)
        X = torch.linalg.solve_triangular(L, _from_eig(ev.sqrt(), V), upper=False, left=False)  # M^1/2 L^-1
        S = torch.linalg.solve_triangular(L.transpose(-1, -2), X, upper=True)  # L^-T M^1/2 L^-1
    ev, V = _eig_floored(S, eig_floor)
    return _from_eig(ev.sqrt(), V), _from_eig(ev.rsqrt(), V)


def gauge_matrices(A: torch.Tensor, B: torch.Tensor, mu: torch.Tensor | float, eps: float = 1e-4,
                   eig_floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R^-1) in fp32 for factors A (r, n), B (m, r), or batches of them (L, r, n), (L, m, r)."""
    A, B = A.float(), B.float()
    return gauge_from_grams(A @ A.transpose(-1, -2), B.transpose(-1, -2) @ B, mu, eps, eig_floor)


def imbalance(A: torch.Tensor, B: torch.Tensor, mu: torch.Tensor | float) -> torch.Tensor:
    """||A A^T - mu B^T B||_F / ||A A^T||_F (batched or not), fp32."""
    A, B = A.float(), B.float()
    GA = A @ A.transpose(-1, -2)
    mu = torch.as_tensor(mu, dtype=GA.dtype, device=GA.device)
    mu = mu.reshape(-1, 1, 1) if mu.dim() else mu
    return torch.linalg.matrix_norm(GA - mu * (B.transpose(-1, -2) @ B)) / torch.linalg.matrix_norm(GA).clamp(
        min=1e-30)


def _check_transportable(optimizer, params: Iterable[torch.Tensor]) -> None:
    """Before anything changes: transport must know every state entry shaped like its parameter."""
    for p in params:
        for key, val in (optimizer.state.get(p) or {}).items():
            if torch.is_tensor(val) and val.shape == p.shape and key not in FIRST_MOMENTS + SECOND_MOMENTS:
                raise ValueError(f"moments='transport' does not know the optimizer state {key!r}; it knows "
                                 f"{list(FIRST_MOMENTS + SECOND_MOMENTS)}; use moments='reset' or 'keep'")


@torch.no_grad()
def transport_moments_(optimizer, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor | None,
                       R_inv: torch.Tensor | None, moments: str) -> None:
    """The optimizer state of A and B after the gauge change (A, B) -> (R A, B R^-1); see the module notes.
    (R may be None for moments="reset" or "keep".)"""
    if optimizer is None or moments == "keep":
        return
    if moments == "transport":
        _check_transportable(optimizer, (A, B))
    for p, is_A in ((A, True), (B, False)):
        st = optimizer.state.get(p) or {}
        for key, val in st.items():
            if moments == "reset":
                if key == "step":  # restart the bias correction: a fresh state, not only zeroed moments
                    st[key] = val.zero_() if torch.is_tensor(val) else 0
                elif torch.is_tensor(val) and val.shape == p.shape:
                    val.zero_()
            elif torch.is_tensor(val) and val.shape == p.shape:
                if key in FIRST_MOMENTS:  # like the gradient: dL/dA' = R^-1 dL/dA, dL/dB' = dL/dB R
                    new = R_inv @ val.float() if is_A else val.float() @ R
                else:  # second moments, E[g'^2] with independent coordinates
                    new = (R_inv * R_inv) @ val.float() if is_A else val.float() @ (R * R)
                val.copy_(new)


def _lora_layers(model: nn.Module | None, layers: Iterable | None) -> list:
    """Every LoRA factor pair of the model: peftlab's LoRA layers, loralib-style modules (``lora_A`` (r, in) and
    ``lora_B`` (out, r) parameters) and HF PEFT's LoRA Linear layers (one pair per adapter). Anything else that
    adapts a layer or holds a LoRA parameter is refused by name: a silently unprojected layer is a wrong GP-LoRA."""
    if layers is not None:
        return list(layers)
    found, covered, refused = [], set(), []
    for name, m in unwrap(model).named_modules():
        A, B = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
        if isinstance(m, AdapterLayer) and not (torch.is_tensor(A) and torch.is_tensor(B)):
            refused.append(f"{name} ({type(m).__name__})")
        elif isinstance(A, nn.ModuleDict) and isinstance(B, nn.ModuleDict):  # HF PEFT
            for key, a in A.items():
                b = B[key] if key in B else None
                if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
                    found.append(_Factors(a.weight, b.weight))
                else:
                    refused.append(f"{name}.lora_A.{key} ({type(a).__name__})")
        elif isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter) and A.dim() == B.dim() == 2:
            found.append(m if isinstance(m, AdapterLayer) else _Factors(A, B))
        else:
            continue
        covered.update(id(p) for p in m.parameters())
    stray = [n for n, p in unwrap(model).named_parameters() if "lora" in n.lower() and id(p) not in covered]
    if refused or stray:
        raise ValueError(f"GP-LoRA projects LoRA factor pairs (lora_A (r, in), lora_B (out, r)); it cannot project "
                         f"{refused + stray[:8]}: use peftlab's LoRA layers (apply_lora, method=gplora), loralib-style "
                         f"layers or HF PEFT LoRA Linear layers")
    if not found:
        raise ValueError(f"GP-LoRA found no LoRA layers to project in {type(unwrap(model)).__name__}")
    return found


@torch.no_grad()
def gauge_project_model(model: nn.Module | None, mu: Any = "auto", eps: float = 1e-4, eig_floor: float = 1e-12,
                        cast_fp32: bool = True, guard: float = 0.01, optimizer: torch.optim.Optimizer | None = None,
                        moments: str = "keep", layers: Iterable | None = None) -> dict[str, float]:
    """Project every LoRA layer of the model in place (B A unchanged, parameters keep their dtype, math in fp32 for
    any cast_fp32). The seed's signature first; guard, optimizer, moments and layers are peftlab's.

    guard: a layer is projected only while rho = mu ||B||^2 / ||A||^2 lies in [guard, 1 / guard] (0: always).
    optimizer/moments: what happens to the factors' optimizer state (transport | reset | keep).
    Returns the metrics to log: imbalance before projection and ||R - I||_F (means over layers), the fraction of
    layers projected and the wall time in ms."""
    check_options(mu, eps, eig_floor, guard, moments)
    t0 = time.perf_counter()
    layers = _lora_layers(model, layers)
    if optimizer is not None and moments == "transport":
        _check_transportable(optimizer, [t for l in layers for t in (l.lora_A, l.lora_B)])
    shapes = defaultdict(list)  # layers that share a shape share the Gram and product batches
    for l in layers:
        shapes[(tuple(l.lora_A.shape), tuple(l.lora_B.shape), l.lora_A.device)].append(l)
    by_rank = defaultdict(list)  # the r x r math of all layers of one rank is one batch
    for (shape_A, shape_B, device), group in shapes.items():
        A = torch.stack([l.lora_A.detach() for l in group]).float()
        B = torch.stack([l.lora_B.detach() for l in group]).float()
        GA, GB = A @ A.transpose(-1, -2), B.transpose(-1, -2) @ B
        mu_l = torch.full((len(group),), resolve_mu(mu, shape_A[0], shape_B[0]), device=device)
        by_rank[(shape_A[0], device)].append((group, A, B, GA, GB, mu_l))
    imb, rdev, n_proj, n_all = [], [], 0, 0
    for parts in by_rank.values():
        GA, GB, mu_l = (torch.cat([p[k] for p in parts]) for k in (3, 4, 5))
        nA = GA.diagonal(dim1=-2, dim2=-1).sum(-1)  # ||A||_F^2
        nB = mu_l * GB.diagonal(dim1=-2, dim2=-1).sum(-1)  # mu ||B||_F^2
        imb.append(torch.linalg.matrix_norm(GA - mu_l[:, None, None] * GB) / torch.linalg.matrix_norm(GA).clamp(
            min=1e-30))
        # the guard: a factor near 0 against the other would drag both to ~0 and starve the gradients. At eps = 0 a
        # zero factor has no balancing gauge at all (S = 0, R^-1 infinite: NaN factors), so it is skipped even
        # unguarded; with eps > 0 the eps I terms keep R finite.
        nonzero = (nA > 0) & (nB > 0) if not eps else (nA + nB > 0)
        active = ((nB >= guard * nA) & (nA >= guard * nB) & nonzero).tolist()
        n_all += len(active)
        if not any(active):
            continue
        idx = [i for i, a in enumerate(active) if a]
        sel = slice(None) if len(idx) == len(active) else torch.tensor(idx, device=GA.device)
        R, R_inv = gauge_from_grams(GA[sel], GB[sel], mu_l[sel], eps, eig_floor)
        rdev.append(torch.linalg.matrix_norm(R - torch.eye(R.shape[-1], device=R.device)))
        n_proj += len(idx)
        if len(idx) < len(active):  # skipped layers get R = I (an exact no-op) and are not written back
            R_all = torch.eye(R.shape[-1], device=R.device).repeat(len(active), 1, 1)
            R_inv_all = R_all.clone()
            R_all[sel], R_inv_all[sel] = R, R_inv
            R, R_inv = R_all, R_inv_all
        hi = 0
        for group, A, B, *_ in parts:
            lo, hi = hi, hi + len(group)
            R_g, R_inv_g, act = R[lo:hi], R_inv[lo:hi], active[lo:hi]
            if not any(act):
                continue
            new_A, new_B = R_g @ A, B @ R_inv_g
            for j, l in enumerate(group):
                if act[j]:
                    l.lora_A.copy_(new_A[j])
                    l.lora_B.copy_(new_B[j])
                    transport_moments_(optimizer, l.lora_A, l.lora_B, R_g[j], R_inv_g[j], moments)
    return {"gplora/imbalance": float(torch.cat(imb).mean()) if imb else 0.0,
            "gplora/R_minus_I": float(torch.cat(rdev).mean()) if rdev else 0.0,
            "gplora/projected_layers": n_proj / max(n_all, 1),
            "gplora/project_ms": (time.perf_counter() - t0) * 1e3}


class _Factors:  # a stand-in layer for a bare (A, B) pair (or another library's LoRA parameters)
    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"factors must be A (r, in) and B (out, r), got {tuple(A.shape)} and {tuple(B.shape)}")
        self.lora_A, self.lora_B = A, B


def gauge_project_(layer_or_factors, mu: Any = "auto", eps: float = 1e-4, eig_floor: float = 1e-12,
                   optimizer: torch.optim.Optimizer | None = None, moments: str = "keep") -> dict[str, float]:
    """Project one LoRA layer, or an (A, B) pair of tensors, in place and unguarded; returns the metrics."""
    layer = _Factors(*layer_or_factors) if isinstance(layer_or_factors, (tuple, list)) else layer_or_factors
    return gauge_project_model(None, mu, eps, eig_floor, guard=0.0, optimizer=optimizer, moments=moments,
                               layers=[layer])


class GaugeProjectedOptimizer(torch.optim.Optimizer):
    """Any torch optimizer whose ``step()`` is followed by the gauge projection of every LoRA layer of ``model``
    (every ``every`` steps, after ``warmup_steps``). The seed's signature (loralib) first: base_optimizer, model, mu,
    eps, eig_floor, cast_fp32; then peftlab's guard (departure: 0.01, the seed has none), moments (keep, as the seed),
    every, warmup_steps. param_groups, state, defaults, zero_grad and add_param_group are the base optimizer's;
    state_dict is the base's plus this wrapper's step count (the base optimizer loads it too)."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, mu: Any = "auto", eps: float = 1e-4,
                 eig_floor: float = 1e-12, cast_fp32: bool = True, guard: float = 0.01, moments: str = "keep",
                 every: int = 1, warmup_steps: int = 0):
        # deliberately no super().__init__: every piece of optimizer state is the base optimizer's
        check_options(mu, eps, eig_floor, guard, moments, every, warmup_steps)
        _lora_layers(model, None)  # a model without LoRA layers, or with layers it cannot project, fails here
        self.base_opt, self.model = base_optimizer, model
        self.kwargs = dict(mu=mu, eps=eps, eig_floor=eig_floor, cast_fp32=cast_fp32, guard=guard, moments=moments)
        self.every, self.warmup_steps, self.steps, self.last_metrics = int(every), int(warmup_steps), 0, {}

    base_optimizer = property(lambda self: self.base_opt)  # the seed's attribute name
    param_groups = property(lambda self: self.base_opt.param_groups)
    state = property(lambda self: self.base_opt.state)
    defaults = property(lambda self: self.base_opt.defaults)

    def step(self, closure=None):
        loss = self.base_opt.step(closure)
        self.steps += 1
        if self.steps > self.warmup_steps and self.steps % self.every == 0:
            self.last_metrics = gauge_project_model(self.model, optimizer=self.base_opt, **self.kwargs)
        return loss

    def zero_grad(self, set_to_none: bool = True):
        self.base_opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {**self.base_opt.state_dict(), "gauge_steps": self.steps}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.steps = int(state_dict.pop("gauge_steps", 0))
        self.base_opt.load_state_dict(state_dict)

    def add_param_group(self, param_group):
        self.base_opt.add_param_group(param_group)

    def __repr__(self):
        return f"GaugeProjectedOptimizer({self.base_opt!r}, {self.kwargs}, every={self.every})"
