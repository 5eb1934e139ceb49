"""Rotational PiSSA: W = W_res + U R_U diag(S) R_V^T V^T with (U, S, V) the top singular triplets of W, the residual
W_res frozen (optionally NF4), and trainable rotations of the singular vectors.

way0: free R (init I) with the penalty w * (||R_U^T R_U - I||^2 + ||R_V^T R_V - I||^2), added to the loss.
way1: layers of disjoint Givens rotations (angles trainable), merged into U and V and restarted every merge_every steps.
way2: Cayley map (I - K)^-1 (I + K) of a low-rank skew-symmetric K = B C^T - C B^T ("I + K" alone is not orthogonal).
way3: exp(K) for the same K, through the exponential of a small block matrix: with Z = [B C] and J = [[0, I], [-I, 0]],
      K = Z J Z^T and exp(K) = I + Z phi(J Z^T Z) J Z^T, phi(M) = (e^M - I) M^-1 read off exp([[M, I], [0, 0]]).
With r x r rotations the change stays inside span(U_r) x span(V_r); ``extra_principal_dims`` p rotates in the
(r + p)-dimensional principal space (S padded with p zeros) so the adapted rank-r subspace itself can move.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import register_method
from .base import AdapterLayer, MethodSpec, adapter_layers, base_weight_out_in, find_targets, set_module
from ..init.svd import top_r_svd

WAYS = ("way0", "way1", "way2", "way3")


@dataclass
class RotationalPiSSAConfig:
    r: int = 8
    way: str = "way2"
    low_rank_r: int = 2                 # k of the skew-symmetric generator (way2, way3)
    givens_layers: int = 2              # way1
    merge_every: int = 50               # way1: merge the rotations into U, V and restart
    orthogonality_reg_weight: float = 1e-2  # way0
    init_identity: bool = True
    freeze_singular_values: bool = True
    extra_principal_dims: int = 0       # p
    quantize_residual: bool = False     # NF4 residual through bitsandbytes
    quantize_base_components: bool = False
    svd_niter: int | None = None        # None: full SVD

    def __post_init__(self):
        if self.way not in WAYS:
            raise ValueError(f"unknown rotational PiSSA way {self.way!r}; allowed: {list(WAYS)}")
        if self.r < 1 or self.extra_principal_dims < 0 or self.low_rank_r < 1:
            raise ValueError("rotational PiSSA needs r >= 1, low_rank_r >= 1 and extra_principal_dims >= 0")


def expm_low_rank(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """exp(B C^T - C B^T) through a (4k x 4k) exponential instead of an (n x n) one."""
    n, k = B.shape
    Z = torch.cat([B, C], 1)
    eye_k = torch.eye(k, dtype=B.dtype, device=B.device)
    zero = torch.zeros_like(eye_k)
    J = torch.cat([torch.cat([zero, eye_k], 1), torch.cat([-eye_k, zero], 1)], 0)
    M = J @ Z.T @ Z
    m = M.shape[0]
    big = torch.zeros(2 * m, 2 * m, dtype=B.dtype, device=B.device)
    big[:m, :m] = M
    big[:m, m:] = torch.eye(m, dtype=B.dtype, device=B.device)
    phi = torch.linalg.matrix_exp(big)[:m, m:]
    return torch.eye(n, dtype=B.dtype, device=B.device) + Z @ phi @ J @ Z.T


def cayley(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    n = B.shape[0]
    K = B @ C.T - C @ B.T
    eye = torch.eye(n, dtype=B.dtype, device=B.device)
    return torch.linalg.solve(eye - K, eye + K)


def givens_pairs(n: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint coordinate pairs: (0,1),(2,3),... on even layers, (1,2),(3,4),... on odd ones."""
    start = layer % 2
    i = torch.arange(start, n - 1, 2)
    return i, i + 1


def givens(theta: torch.Tensor, n: int, layer: int) -> torch.Tensor:
    i, j = givens_pairs(n, layer)
    c, s = torch.cos(theta), torch.sin(theta)
    G = torch.eye(n, dtype=theta.dtype, device=theta.device)
    G = G.index_put((i, i), c).index_put((j, j), c).index_put((i, j), -s).index_put((j, i), s)
    return G


class Rotation(nn.Module):
    """One k x k rotation parametrised by a way; R() returns the matrix (fp32)."""

    def __init__(self, k: int, cfg: RotationalPiSSAConfig, device):
        super().__init__()
        self.k, self.way = k, cfg.way
        if cfg.way == "way0":
            self.R = nn.Parameter(torch.eye(k, device=device) if cfg.init_identity
                                  else torch.linalg.qr(torch.randn(k, k, device=device))[0])
        elif cfg.way == "way1":
            n_pairs = [len(givens_pairs(k, l)[0]) for l in range(cfg.givens_layers)]
            self.theta = nn.ParameterList([nn.Parameter(torch.zeros(n, device=device) if cfg.init_identity
                                                        else 0.1 * torch.randn(n, device=device)) for n in n_pairs])
        else:
            q = min(cfg.low_rank_r, k)
            self.B = nn.Parameter(0.1 * torch.randn(k, q, device=device) / q ** 0.5)
            # C = 0 gives K = 0 (R = I) with a non-zero gradient for C
            self.C = nn.Parameter(torch.zeros(k, q, device=device) if cfg.init_identity
                                  else 0.1 * torch.randn(k, q, device=device))

    def forward(self) -> torch.Tensor:
        if self.way == "way0":
            return self.R
        if self.way == "way1":
            R = torch.eye(self.k, device=self.theta[0].device)
            for l, th in enumerate(self.theta):
                R = R @ givens(th, self.k, l)
            return R
        if self.way == "way2":
            return cayley(self.B, self.C)
        return expm_low_rank(self.B, self.C)


class RotationalPiSSALinear(AdapterLayer):
    def __init__(self, base: nn.Module, cfg: RotationalPiSSAConfig):
        super().__init__(base)
        self.cfg = cfg
        r, k = cfg.r, cfg.r + cfg.extra_principal_dims
        if k > min(self.in_features, self.out_features):
            raise ValueError(f"r + extra_principal_dims = {k} exceeds the layer's min dimension")
        W = base_weight_out_in(base).detach()
        U, S, Vh = top_r_svd(W, k, cfg.svd_niter)
        S0 = S.clone()
        S0[r:] = 0  # only the top r are taken out of the residual; the p extra directions start empty
        self.register_buffer("U", U)
        self.register_buffer("V", Vh.T.contiguous())
        if cfg.freeze_singular_values:
            self.register_buffer("S", S0)
        else:
            self.S = nn.Parameter(S0)  # fp32 whatever the model dtype
        self.set_offset(S0[:, None] * Vh, U, 1.0)  # base <- W_res = W - U_r S_r V_r^T
        self.rot_U = Rotation(k, cfg, W.device)
        self.rot_V = Rotation(k, cfg, W.device)
        if cfg.quantize_residual:
            self._quantize_residual()

    def _quantize_residual(self) -> None:
        import bitsandbytes as bnb

        if self.cfg.quantize_base_components:
            warnings.warn("quantize_base_components: U and V are kept in fp32 here; quantising the principal "
                          "factors would break the exact rotation algebra", stacklevel=2)
        base = self.base
        q = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=base.bias is not None,
                              quant_type="nf4", compute_dtype=torch.float32)
        q.weight = bnb.nn.Params4bit(base_weight_out_in(base).detach().float().cpu(), requires_grad=False,
                                     quant_type="nf4")
        if base.bias is not None:
            q.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
        q = q.to(base.weight.device)  # quantises on the move
        self.base = q

    def rotations(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rot_U(), self.rot_V()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        R_U, R_V = self.rotations()
        h = (x.to(self.U.dtype) @ self.V) @ R_V
        return ((h * self.S) @ R_U.T) @ self.U.T

    def principal_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with B @ A = U R_U diag(S) R_V^T V^T."""
        R_U, R_V = self.rotations()
        return (R_V.T @ self.V.T).float(), (self.U @ R_U * self.S).float()

    def delta_weight(self) -> torch.Tensor:
        A, B = self.principal_factors()
        return B @ A

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.principal_factors()
        return A.detach().clone(), B.detach().clone()

    def _add_to_base(self, delta_out_in: torch.Tensor) -> None:
        if self.cfg.quantize_residual and hasattr(self, "rot_U"):
            raise RuntimeError("merging into an NF4 residual would lose the change to quantisation; export the "
                               "adapter and merge it into the full-precision base instead")
        super()._add_to_base(delta_out_in)

    def orthogonality_penalty(self) -> torch.Tensor:
        R_U, R_V = self.rotations()
        eye = torch.eye(R_U.shape[0], device=R_U.device)
        return ((R_U.T @ R_U - eye) ** 2).sum() + ((R_V.T @ R_V - eye) ** 2).sum()

    @torch.no_grad()
    def merge_rotations_(self, optimizer=None) -> None:
        """way1: fold the current rotations into U and V and restart the angles at 0 (and their moments)."""
        R_U, R_V = self.rotations()
        self.U.copy_(self.U @ R_U)
        self.V.copy_(self.V @ R_V)
        for rot in (self.rot_U, self.rot_V):
            for p in rot.parameters():
                p.zero_()
                if optimizer is not None:
                    optimizer.state.pop(p, None)


def config_from(method_cfg, r: int) -> RotationalPiSSAConfig:
    keys = RotationalPiSSAConfig.__dataclass_fields__
    return RotationalPiSSAConfig(r=r, **{k: v for k, v in (method_cfg or {}).items() if k in keys and k != "r"})


class RotationalPiSSA(MethodSpec):
    def extra_loss(self, model, method_cfg):
        if method_cfg.way != "way0" or not method_cfg.orthogonality_reg_weight:
            return None
        return method_cfg.orthogonality_reg_weight * sum(
            l.orthogonality_penalty() for l in adapter_layers(model).values())

    def after_step(self, model, optimizer, step, method_cfg):
        if method_cfg.way == "way1" and step % int(method_cfg.merge_every) == 0:
            for l in adapter_layers(model).values():
                l.merge_rotations_(optimizer)
        return {}


def make_layer(base, peft_cfg, method_cfg):
    return RotationalPiSSALinear(base, config_from(method_cfg, int(peft_cfg.lora_r)))


register_method(RotationalPiSSA(name="rotational_pissa", make_layer=make_layer))


def replace_linear_with_rotational_pissa(model: nn.Module, pissa_config: RotationalPiSSAConfig, target_modules,
                                         adapter_name: str = "default", freeze_base_model: bool = True
                                         ) -> dict[str, RotationalPiSSALinear]:
    """The seed's API: replace the target Linear layers; returns the adapters by module name."""
    if freeze_base_model:
        for p in model.parameters():
            p.requires_grad_(False)
    layers = {}
    for name in find_targets(model, target_modules):
        layer = RotationalPiSSALinear(model.get_submodule(name), pissa_config)
        layer.adapter_name = adapter_name
        set_module(model, name, layer)
        layers[name] = layer
    return layers
