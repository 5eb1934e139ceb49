"""GeoLoRA (Schotthoefer et al., ICLR 2025): W = W0 + s U S V^T with U, V orthonormal; the rank adapts.

One integrator step per optimizer step, from one forward and one backward pass:
1. The backward of the layer gives, in place of dL/dU, dL/dS, dL/dV, the K-, S- and L-gradients of W = U S V^T:
   G_K = G_W V, G_S = U^T G_W V, G_L = G_W^T U (G_W = dL/dW), all from the activations of the same pass; no S^-1.
2. Augment the bases: U_hat = orth([U | G_K]), V_hat = orth([V | G_L]); residual directions (after projecting out U)
   with singular value <= epsilon_resid * ||G_K||_2 (relative, floored at rounding level) are not added. The residual
   is orthonormalised by a thin SVD (rank revealing, which a QR without pivoting is not).
3. Coefficient step on S_hat = U_hat^T U S V^T V_hat with the gradient U_hat^T P_T(G_W) V_hat, P_T the projection on
   the tangent space at U S V^T: its blocks are G_S, G_L^T V_new, U_new^T G_K and 0. The zero (new x new) block is the
   paper's parallel integrator; it is also the only block that would need G_W itself (dense, or a second pass).
   The step is SGD or Adam (decoupled weight decay optional).
4. SVD S_hat = P diag(sigma) Q^T, keep k by the truncation strategy (local_threshold: smallest k with
   ||sigma[k:]|| <= tau ||S_hat||_F; fixed_rank: the initial rank; global_budget: the largest `budget` singular
   values of all layers together), k clamped to [rmin, rmax]; U = U_hat P_k, V = V_hat Q_k, S = diag(sigma_k); a QR
   of the new U and V (signs kept) stops rounding errors from accumulating over the steps.

Storage has a fixed capacity rmax per layer (U: out x rmax, S: rmax x rmax, V: in x rmax, zero beyond the active rank
``rank``), so parameters never change shape: DDP buckets, optimizer state_dicts and checkpoints stay valid as ranks
change. The Adam state lives in the coordinates of S and is carried into the new basis at every step, not reset: the
first moment exactly (P_k^T m Q_k, it is a matrix in those coordinates), the per-entry bias-correction weights (and
adam_entrywise's second moment) through the squared entries of P_k, Q_k (exact for the signed permutations that
dominate near convergence, a convex combination always). A reset would restart the moments every step.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..schema import build, defaults_of, fail, option
from . import register_method
from .base import AdapterLayer, MethodOptions, MethodSpec, adapter_layers
from .lora import lora_scaling
from ..init.svd import orthonormalize  # QR with U's signs kept (also used by rotational PiSSA)

STRATEGIES = ("local_threshold", "fixed_rank", "global_budget")
SMALL_OPTIMIZERS = ("adam", "adam_entrywise", "sgd")


@dataclass
class GeoLoRAOptions(MethodOptions):
    """conf/method/geolora.yaml documents each option."""
    name: str = "geolora"
    rank_init: int | None = option(None, ge=1)   # null: peft.lora_r
    rmax: int | None = option(None, ge=1)        # null: 4 * rank_init
    rmin: int = option(1, ge=1)
    tau: float = option(1e-3, ge=0)
    alpha: float = option(1e-4, ge=0)
    truncation_strategy: str = option("local_threshold", choices=STRATEGIES)
    budget: int | None = option(None, ge=1)
    epsilon_resid: float = option(1e-6, ge=0)
    use_small_matrix_optimizer: str = option("adam", choices=SMALL_OPTIMIZERS)
    orthogonal_regularization: float = option(0.0, ge=0)
    lr: float | None = option(None, gt=0)        # null: the trainer's learning rate
    weight_decay: float = option(0.0, ge=0)

    def check(self, prefix: str) -> None:
        if self.truncation_strategy == "global_budget" and self.budget is None:
            fail(f"{prefix}.budget", None, "truncation_strategy=global_budget needs the total rank over all layers, "
                 "an integer >= 1")
        if self.rank_init is not None:
            self.check_ranks(prefix, self.rank_init)

    def check_ranks(self, prefix: str, rank_init: int) -> None:
        if self.rmin > rank_init:
            fail(f"{prefix}.rmin", self.rmin, f"must be <= the initial rank {rank_init}")
        if self.rmax is not None and self.rmax < rank_init:
            fail(f"{prefix}.rmax", self.rmax, f"must be >= the initial rank {rank_init}")

    def check_run(self, run) -> None:
        if self.rank_init is None:
            self.check_ranks("method", run.peft.lora_r)


DEFAULTS = defaults_of(GeoLoRAOptions)


def geolora_options(method_cfg: Any) -> dict:
    """The method options as a checked dict with every key (None: all defaults)."""
    if isinstance(method_cfg, GeoLoRAOptions):
        return asdict(method_cfg)
    from omegaconf import DictConfig, OmegaConf

    given = {}
    if method_cfg is not None:
        given = OmegaConf.to_container(method_cfg, resolve=True) if isinstance(method_cfg, DictConfig) \
            else dict(method_cfg)
    return asdict(build(GeoLoRAOptions, given, "method", "geolora"))


class _GeoLoRAProduct(torch.autograd.Function):
    """y = s x V S^T U^T on the active columns. Backward returns dL/dx and, as the gradients of (U, S, V), the
    integrator's G_K = G_W V, G_S = U^T G_W V, G_L = G_W^T U of W = U S V^T (zero on inactive columns)."""

    @staticmethod
    def forward(ctx, x, U, S, V, r: int, s: float):
        xV = x @ V[:, :r]
        ctx.save_for_backward(x, xV, U, S, V)
        ctx.r, ctx.s = r, s
        return (xV @ S[:r, :r].T) @ U[:, :r].T * s

    @staticmethod
    def backward(ctx, g):
        x, xV, U, S, V = ctx.saved_tensors
        r, s = ctx.r, ctx.s
        Ur, Sr, Vr = U[:, :r], S[:r, :r], V[:, :r]
        g2 = g.reshape(-1, g.shape[-1]).float()
        gU = g2 @ Ur                                                  # (N, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (s * (gU @ Sr) @ Vr.T).reshape(x.shape).to(x.dtype)
        if not any(ctx.needs_input_grad[1:4]):  # factors frozen (e.g. evaluation with grads on the input only)
            return grad_x, None, None, None, None, None
        GK = s * (g2.T @ xV.reshape(-1, r).float())                  # dL/dW V        (out, r)
        GL = s * (x.reshape(-1, x.shape[-1]).float().T @ gU)         # dL/dW^T U      (in, r)
        return grad_x, _padded(GK, U), _padded(Ur.T @ GK, S), _padded(GL, V), None, None


def _padded(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    out[:g.shape[0], :g.shape[1]] = g
    return out


class GeoLoRALinear(AdapterLayer):
    """A frozen base projection plus s * U S V^T (U: out x r, S: r x r, V: in x r, U and V orthonormal), stored in
    capacity-sized parameters geo_U (out x rmax), geo_S (rmax x rmax), geo_V (in x rmax); ``rank`` columns are live."""

    adapter_param_names = ("geo_U", "geo_S", "geo_V")

    def __init__(self, base: nn.Module, rank_init: int, rmax: int, scaling: float, init_scale: float = 1e-4,
                 dropout: float = 0.0, rmin: int = 1):
        super().__init__(base)
        self.capacity = min(int(rmax), self.in_features, self.out_features)
        if rank_init < 1:
            raise ValueError(f"geolora rank_init must be >= 1, got {rank_init}")
        if rank_init > self.capacity:  # as rmax is capped by the layer; the seed's `--rank 16` adapts a 10-wide head
            warnings.warn(f"geolora rank_init={rank_init} exceeds a {self.out_features} x {self.in_features} layer's "
                          f"capacity min(rmax, in, out) = {self.capacity}: it starts at rank {self.capacity}",
                          stacklevel=3)
            rank_init = self.capacity
        self.rank_init, self.scaling = int(rank_init), float(scaling)
        self.rmin = min(int(rmin), self.capacity)
        device, cap, r = base.weight.device, self.capacity, int(rank_init)
        self.geo_U = nn.Parameter(torch.zeros(self.out_features, cap, device=device))
        self.geo_S = nn.Parameter(torch.zeros(cap, cap, device=device))
        self.geo_V = nn.Parameter(torch.zeros(self.in_features, cap, device=device))
        self.register_buffer("geo_rank", torch.tensor(r))
        self.rank = r
        U = torch.linalg.qr(torch.randn(self.out_features, r, device=device))[0]
        V = torch.linalg.qr(torch.randn(self.in_features, r, device=device))[0]
        self.set_factors(U, torch.full((r,), float(init_scale), device=device), V)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # views of the live factors (autograd flows into the capacity-sized parameters)
    @property
    def U(self) -> torch.Tensor:
        return self.geo_U[:, :self.rank]

    @property
    def S(self) -> torch.Tensor:
        return self.geo_S[:self.rank, :self.rank]

    @property
    def V(self) -> torch.Tensor:
        return self.geo_V[:, :self.rank]

    def active_params(self) -> int:
        return self.rank * (self.in_features + self.out_features + self.rank)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.geo_U.dtype)
        return _GeoLoRAProduct.apply(x, self.geo_U, self.geo_S, self.geo_V, self.rank, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.U.float() @ self.S.float() @ self.V.float().T)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.S.detach().float() @ self.V.detach().float().T).contiguous(), \
            self.scaling * self.U.detach().float().clone()

    @torch.no_grad()
    def set_factors(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        """Make U S V^T the live factors (S a matrix or the vector of its diagonal); the rank is U's width."""
        r = U.shape[1]
        if not 1 <= r <= self.capacity or V.shape[1] != r:
            raise ValueError(f"geolora factors of rank {r} (V: {V.shape[1]}) do not fit capacity {self.capacity}")
        U, S, V = U.clone(), S.clone(), V.clone()  # they may be views of the storage zeroed next
        for p in (self.geo_U, self.geo_S, self.geo_V):
            p.zero_()
        self.geo_U[:, :r] = U
        self.geo_V[:, :r] = V
        self.geo_S[:r, :r] = torch.diag(S) if S.dim() == 1 else S
        self.rank = r
        self.geo_rank.fill_(r)

    def load_adapter_state(self, state) -> None:
        super().load_adapter_state(state)
        self.rank = int(self.geo_rank)

    def orthogonality_error(self) -> torch.Tensor:
        """||U^T U - I||^2 + ||V^T V - I||^2 on the live columns (differentiable)."""
        eye = torch.eye(self.rank, device=self.geo_U.device)
        return ((self.U.T @ self.U - eye) ** 2).sum() + ((self.V.T @ self.V - eye) ** 2).sum()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, capacity={self.capacity}, scaling={self.scaling:g}"


# ---- the integrator --------------------------------------------------------------------------------------------------
def augment_basis(U: torch.Tensor, G: torch.Tensor, eps: float) -> torch.Tensor:
    """[U | new]: new orthonormal, orthogonal to U, spanning the part of G outside span(U) with singular values above
    max(eps, max(n, k) * float eps) * ||G||_2. The threshold is relative: the residual's rounding noise scales with
    ||G||, and when the residual is rank-deficient its SVD pads it with singular vectors of that noise which lie
    anywhere outside range(R), span(U) included; an absolute threshold kept them once the loss was scaled up (the
    step was 20-30% off at loss x 1e2..1e4). The residual is orthonormalised by a thin SVD, which reveals its rank (a
    QR without pivoting does not); the kept directions are projected off U once more and re-orthonormalised."""
    n, r = U.shape
    R = G - U @ (U.T @ G)
    R = R - U @ (U.T @ R)  # a second pass: one leaves errors of the order of rounding times ||G|| / ||R||
    if n == r or not R.shape[1]:
        return U
    Q, sv, _ = torch.linalg.svd(R, full_matrices=False)
    scale = torch.linalg.matrix_norm(G.float(), ord=2)
    tol = max(float(eps), max(n, G.shape[1]) * torch.finfo(R.dtype).eps) * float(scale)
    Q = Q[:, :min(int((sv > tol).sum()), n - r)]
    if not Q.shape[1]:
        return U
    Q = orthonormalize(Q - U @ (U.T @ Q))
    return torch.cat([U, Q], 1)


def local_threshold_rank(sigma: torch.Tensor, tau: float) -> int:
    """Smallest k with ||sigma[k:]|| <= tau * ||sigma|| (sigma sorted descending)."""
    tails = torch.cat([sigma.flip(0).square().cumsum(0).flip(0), sigma.new_zeros(1)])
    return int((tails > tau ** 2 * tails[0]).sum())


class GeoLoRAOptimizer(torch.optim.Optimizer):
    """The whole GeoLoRA step over a model's GeoLoRA layers: augment, coefficient step (adam | sgd), SVD truncation.

    Reads the layers' (G_K, G_S, G_L) from the .grad of (geo_U, geo_S, geo_V); one param group whose ``lr`` a
    scheduler may drive. Adam state (per layer, capacity-sized, in S's coordinates) round-trips through state_dict.
    """

    def __init__(self, layers: dict[str, GeoLoRALinear], lr: float, small_optimizer: str = "adam",
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 truncation_strategy: str = "local_threshold", tau: float = 1e-3, budget: int | None = None,
                 epsilon_resid: float = 1e-6):
        if not layers:
            raise ValueError("GeoLoRAOptimizer needs at least one GeoLoRALinear layer")
        if truncation_strategy not in STRATEGIES or small_optimizer not in SMALL_OPTIMIZERS:
            raise ValueError(f"truncation_strategy must be one of {list(STRATEGIES)} and small_optimizer one of "
                             f"{list(SMALL_OPTIMIZERS)}; got {truncation_strategy!r}, {small_optimizer!r}")
        if truncation_strategy == "global_budget":
            need = sum(l.rmin for l in layers.values())
            if budget is None or int(budget) < need:
                raise ValueError(f"global_budget needs budget >= the sum of the layers' rmin ({need}), got {budget}")
        self.layers = dict(layers)
        params = [p for l in self.layers.values() for p in (l.geo_U, l.geo_S, l.geo_V)]
        super().__init__(params, dict(lr=float(lr), betas=tuple(betas), eps=float(eps),
                                      weight_decay=float(weight_decay)))
        self.small_optimizer, self.truncation_strategy = small_optimizer, truncation_strategy
        self.tau, self.budget, self.epsilon_resid = float(tau), budget, float(epsilon_resid)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        proposals = {n: self.coefficient_step(l) for n, l in self.layers.items() if l.geo_S.grad is not None}
        for name, rank in self.choose_ranks(proposals).items():
            self.truncate(self.layers[name], proposals[name], rank)
        return loss

    def coefficient_step(self, layer: GeoLoRALinear) -> dict:
        """Augmented bases and the stepped augmented coefficient matrix's SVD (and the Adam moments in its basis)."""
        group = self.param_groups[0]
        lr, wd = group["lr"], group["weight_decay"]
        r = layer.rank
        U, S, V = layer.U.detach().float(), layer.S.detach().float(), layer.V.detach().float()
        GK, GS, GL = (layer.geo_U.grad[:, :r].float(), layer.geo_S.grad[:r, :r].float(),
                      layer.geo_V.grad[:, :r].float())
        if not all(bool(torch.isfinite(g).all()) for g in (GK, GS, GL)):
            _diverged(f"the gradient of a GeoLoRA layer ({layer.out_features} x {layer.in_features}, rank {r}) is "
                      f"not finite")
        U_hat, V_hat = augment_basis(U, GK, self.epsilon_resid), augment_basis(V, GL, self.epsilon_resid)
        Au, Av = U_hat.T @ U, V_hat.T @ V  # coordinates of the old bases in the new: [I; 0] up to rounding
        S_hat = Au @ S @ Av.T
        G_hat = U_hat.T @ GK @ Av.T + Au @ (GL.T @ V_hat) - Au @ GS @ Av.T  # U_hat^T P_T(G_W) V_hat
        if wd:
            S_hat.mul_(1 - lr * wd)
        moments = None
        if self.small_optimizer == "sgd":
            S_hat -= lr * G_hat
        else:
            moments = self.adam_update(layer, S_hat, G_hat, Au, Av, group)
        if not bool(torch.isfinite(S_hat).all()):
            _diverged(f"the stepped coefficient matrix of a GeoLoRA layer ({layer.out_features} x "
                      f"{layer.in_features}, rank {r}) is not finite (lr {lr:g})")
        P, sigma, Qh = torch.linalg.svd(S_hat, full_matrices=False)
        return {"U_hat": U_hat, "V_hat": V_hat, "P": P, "sigma": sigma, "Q": Qh.T, "moments": moments}

    def adam_update(self, layer, S_hat, G_hat, Au, Av, group) -> tuple:
        """Adam on S_hat in place; returns the moments in S_hat's coordinates (m, c1[, v, c2]).

        adam: one second moment per layer (the mean over entries). The basis of S is only defined up to rotations
        (degenerate singular values, the residual's SVD), and this update is rotation-invariant: it keeps the
        gradient's low rank and does not depend on rounding (two processes give what one gives).
        adam_entrywise: torch-style elementwise Adam. Its sign-like steps are full rank in the augmented space (the
        rank settles only with a larger tau) and depend on the arbitrary basis, so rounding changes results.
        Bias correction is per entry (c = 1 - b^t of the entry's own age), so directions new to the basis start like a
        fresh Adam parameter instead of taking (1 - b1) of a step."""
        b1, b2 = group["betas"]
        r, scalar = layer.rank, self.small_optimizer == "adam"
        st = self.state[layer.geo_S]
        if not st:
            for k in ("exp_avg", "bias1", "exp_avg_sq", "bias2"):
                st[k] = layer.geo_S.new_zeros(() if scalar and k in ("exp_avg_sq", "bias2") else layer.geo_S.shape)
        Au2, Av2 = Au * Au, Av * Av  # weights that carry the elementwise quantities (exact for permutations)
        m, c1 = Au @ st["exp_avg"][:r, :r] @ Av.T, Au2 @ st["bias1"][:r, :r] @ Av2.T
        if scalar:
            v, c2, g2 = st["exp_avg_sq"], st["bias2"], G_hat.square().mean()
        else:
            v, c2, g2 = Au2 @ st["exp_avg_sq"][:r, :r] @ Av2.T, Au2 @ st["bias2"][:r, :r] @ Av2.T, G_hat.square()
        m.mul_(b1).add_(G_hat, alpha=1 - b1)
        c1.mul_(b1).add_(1 - b1)
        v.mul_(b2).add_(g2 * (1 - b2))
        c2.mul_(b2).add_(1 - b2)
        S_hat -= group["lr"] * (m / c1) / ((v / c2).sqrt() + group["eps"])
        return (m, c1) if scalar else (m, c1, v, c2)

    def choose_ranks(self, proposals: dict[str, dict]) -> dict[str, int]:
        ranks = {}
        if self.truncation_strategy == "global_budget" and proposals:
            # every layer keeps rmin; the rest of the budget goes to the largest remaining singular values
            names = list(proposals)
            lows = {n: min(self.layers[n].rmin, len(proposals[n]["sigma"])) for n in names}
            highs = {n: min(self.layers[n].capacity, len(proposals[n]["sigma"])) for n in names}
            pool = torch.cat([proposals[n]["sigma"][lows[n]:highs[n]] for n in names])
            owner = torch.cat([torch.full((highs[n] - lows[n],), i) for i, n in enumerate(names)])
            spare = max(0, min(int(self.budget) - sum(lows.values()), len(pool)))
            won = torch.bincount(owner[pool.topk(spare).indices.cpu()], minlength=len(names)).tolist()
            return {n: lows[n] + won[i] for i, n in enumerate(names)}
        for name, p in proposals.items():
            layer = self.layers[name]
            k = layer.rank_init if self.truncation_strategy == "fixed_rank" else \
                local_threshold_rank(p["sigma"], self.tau)
            ranks[name] = max(layer.rmin, min(k, layer.capacity, len(p["sigma"])))
        return ranks

    @torch.no_grad()
    def truncate(self, layer: GeoLoRALinear, p: dict, k: int) -> None:
        P, Q = p["P"][:, :k], p["Q"][:, :k]
        layer.set_factors(orthonormalize(p["U_hat"] @ P), p["sigma"][:k], orthonormalize(p["V_hat"] @ Q))
        if p["moments"] is not None:  # m, c1[, v, c2] carried to the truncated basis
            st, P2, Q2 = self.state[layer.geo_S], P * P, Q * Q
            carried = [P.T @ p["moments"][0] @ Q] + [P2.T @ x @ Q2 for x in p["moments"][1:]]
            for key, new in zip(("exp_avg", "bias1", "exp_avg_sq", "bias2"), carried):
                st[key].zero_()
                st[key][:k, :k] = new


def _diverged(what: str) -> None:
    """Divergence as the trainer's non-finite error (its SVDs would raise LinAlgError on non-finite input)."""
    from ..train import NonFiniteLoss  # here, not at the top: peftlab.train imports the adapters

    raise NonFiniteLoss(f"GeoLoRA diverged: {what}; lower the learning rate (method.lr / model.lr) or enable "
                        f"train.max_grad_norm")


def rank_metrics(layers: dict[str, GeoLoRALinear]) -> dict[str, float]:
    m = {f"geolora/rank/{n}": l.rank for n, l in layers.items()}
    m["geolora/total_rank"] = sum(l.rank for l in layers.values())
    m["geolora/trainable_params"] = sum(l.active_params() for l in layers.values())
    return m


# ---- the method ------------------------------------------------------------------------------------------------------
def make_geolora_layer(base: nn.Module, peft_cfg, method_cfg=None) -> GeoLoRALinear:
    """rank_init defaults to peft.lora_r (so sweeps over lora_r compare methods at equal initial rank); s = lora_alpha
    / rank_init (rsLoRA: / sqrt(rank_init)), fixed while the rank changes; rmax defaults to 4 rank_init."""
    o = geolora_options(method_cfg)
    r = int(o["rank_init"] or peft_cfg.lora_r)
    GeoLoRAOptions(**o).check_ranks("method", r)
    return GeoLoRALinear(base, r, int(o["rmax"] or 4 * r),
                         lora_scaling(r, float(peft_cfg.lora_alpha), bool(peft_cfg.get("use_rslora", False))),
                         init_scale=float(o["alpha"]), dropout=float(peft_cfg.get("lora_dropout", 0.0) or 0.0),
                         rmin=int(o["rmin"]))


def geolora_layers(model: nn.Module) -> dict[str, GeoLoRALinear]:
    layers = {n: l for n, l in adapter_layers(model).items() if isinstance(l, GeoLoRALinear)}
    if not layers:
        raise ValueError("the model has no GeoLoRA layers (apply the adapters with method='geolora' first)")
    return layers


def make_geolora_optimizer(model: nn.Module, lr: float, method_cfg=None, betas=(0.9, 0.999), eps: float = 1e-8
                           ) -> GeoLoRAOptimizer:
    o = geolora_options(method_cfg)
    return GeoLoRAOptimizer(geolora_layers(model), lr=float(o["lr"] or lr),
                            small_optimizer=o["use_small_matrix_optimizer"], betas=betas, eps=eps,
                            weight_decay=float(o["weight_decay"]),
                            truncation_strategy=o["truncation_strategy"], tau=float(o["tau"]), budget=o["budget"],
                            epsilon_resid=float(o["epsilon_resid"]))


class GeoLoRA(MethodSpec):
    """The integrator runs in the optimizer's step (so schedulers, clipping and checkpoints work unchanged);
    after_step reports the ranks."""

    def make_optimizer(self, model, params, train_cfg, method_cfg):
        o = geolora_options(method_cfg)
        lr = o["lr"] if o["lr"] is not None else (train_cfg.get("lr") if train_cfg is not None else None)
        if lr is None:
            raise ValueError("geolora needs a learning rate: set method.lr, or let the trainer pass its lr "
                             "(train_cfg.lr)")
        tc = train_cfg if train_cfg is not None else {}
        opt = make_geolora_optimizer(model, float(lr), method_cfg, betas=tuple(tc.get("adam_betas", (0.9, 0.999))),
                                     eps=float(tc.get("adam_eps", 1e-8)))
        ours = {id(p) for g in opt.param_groups for p in g["params"]}
        others = [p.shape for p in params if id(p) not in ours]
        if others:
            raise ValueError(f"geolora trains only its own factors, but {len(others)} other parameter(s) require "
                             f"grad (shapes {others[:3]})")
        return opt

    def after_step(self, model, optimizer, step, method_cfg):
        return rank_metrics(geolora_layers(model))

    def extra_loss(self, model, method_cfg):
        w = float(geolora_options(method_cfg)["orthogonal_regularization"] or 0.0)
        if not w:
            return None
        return w * sum(l.orthogonality_error() for l in geolora_layers(model).values())

    def on_train_end(self, model, run_dir, method_cfg) -> None:
        """The rank-evolution plot from the run's metrics.jsonl (called by the trainer when it supports the hook)."""
        from pathlib import Path

        from ..plots import plot_rank_evolution

        metrics = Path(run_dir) / "metrics.jsonl"
        if metrics.exists():
            plot_rank_evolution(metrics, Path(run_dir) / "rank_evolution.png")


GEOLORA = register_method(GeoLoRA(name="geolora", make_layer=make_geolora_layer, options=GeoLoRAOptions,
                                   lora_factors=False, output_preserved_at_init=False))  # S = alpha I: ~ the base
