"""Rotational PiSSA: W = W_res + U R_U diag(S) R_V^T V^T with (U, S, V) the top singular triplets of W, the residual
W_res frozen (optionally NF4), and trainable rotations R_U, R_V of the singular vectors (S frozen or trained, fp32).

Representation: the base module holds W_res (set_offset moves it by -U_r diag(S_r) V_r^T, so export and resume know
the move), and ``adapter_forward`` returns the whole rotated principal part U R_U diag(S) R_V^T V^T x.

way0: free R (init I) with the penalty w * (||R_U^T R_U - I||^2 + ||R_V^T R_V - I||^2), added to the loss.
way1: layers of disjoint Givens rotations (angles trainable; brick-wall pairings (0,1),(2,3).. then (1,2),(3,4)..),
      folded into U and V and restarted at angle 0 every merge_every steps (after_step).
way2: Cayley map (I - K)^-1 (I + K) of a low-rank skew-symmetric K = B C^T - C B^T ("I + K" alone is not orthogonal).
way3: exp(K) for the same K. With Z = [B C] (r x 2k) and J = [[0, I], [-I, 0]], K = Z J Z^T and K^n = Z M^(n-1) J Z^T
      with M = J Z^T Z (2k x 2k), so exp(K) = I + Z phi(M) J Z^T, phi(M) = sum M^j/(j+1)! = (e^M - I) M^-1; phi(M) is
      read off the top-right block of exp([[M, I], [0, 0]]) (4k x 4k), which needs no inverse (M may be singular).

(r + p) option (``extra_principal_dims`` p): U, V hold the top r + p singular vectors, S = (s_1..s_r, 0..0) and only
the top r leave the residual, so the start is unchanged. R_U, R_V act on all r + p coordinates, so an adapted vector
U R_U e_i (i <= r) gains components along u_{r+1}..u_{r+p}: the column (row) space of the rank-r principal part rotates
inside span(U_{r+p}) (span(V_{r+p})) even with S frozen; with S trained the p padded values may grow (rank up to r+p).
With p = 0 the change stays inside span(U_r) x span(V_r).

NF4 (bitsandbytes' quantiser, runs on CPU): ``quantize_residual`` stores W_res as NF4 with double-quantised
statistics, as QLoRA (``NF4Linear``; why not bnb.nn.Linear4bit: see "NF4 storage"). Export (``to_lora``) then gives
the principal change U R_U S R_V^T V^T - U_r S_r V_r^T on the ORIGINAL full-precision weights: PEFT reproduces
W_res(fp) + principal, the trained model without the residual's quantisation error (full-rank, so no low-rank adapter
can carry it), as a QLoRA adapter is used. ``merge`` dequantises the residual into a full-precision layer (exactly the
trained model; ``unmerge`` puts the NF4 one back). ``quantize_base_components`` also stores U, V as NF4 (warned: they
are then only roughly orthonormal, and way1's merges re-quantise them); the residual is taken against the dequantised
U, V so the start stays unchanged.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch
from torch import nn

from . import register_method
from ..init.svd import orthonormalize, top_r_svd
from ..schema import option
from .base import (AdapterLayer, Conv1D, MethodOptions, MethodSpec, adapter_layers, base_weight_out_in, find_targets,
                   set_module)

WAYS = ("way0", "way1", "way2", "way3")


@dataclass
class RotationalPiSSAConfig:
    """The seed's config (rotational_pissa_unified): its field names and defaults, plus peftlab's options.
    ``method`` is the seed's name of ``way``; ``lora_alpha`` is accepted and, as in the seed's layer (scaling = 1),
    scales nothing; ``lora_dropout`` is the seed's name of ``dropout``."""
    r: int = 16
    lora_alpha: float = 16.0            # the seed's; unused there too (its layer's scaling is 1)
    method: str | None = None           # the seed's name of way ("way0" .. "way3"); None: way
    way: str = "way0"                   # the seed's default
    lora_dropout: float | None = None   # the seed's name of dropout; None: dropout
    low_rank_r: int = 4                 # k of the skew-symmetric generator (way2, way3); the seed's default
    givens_layers: int = 2              # way1
    merge_every: int = 50               # way1: fold the rotations into U, V and restart every N optimizer steps
    orthogonality_reg_weight: float = 1e-4  # way0; the seed code's default (its document's example passes 1e-3)
    init_identity: bool = True
    freeze_singular_values: bool = False  # the seed's default: S trains
    extra_principal_dims: int = 0       # p
    quantize_residual: bool = False     # NF4 residual through bitsandbytes
    quantize_base_components: bool = False  # NF4 U and V
    svd_niter: int | None = None        # None: full SVD; int: randomized SVD with that many power iterations
    dropout: float = 0.0                # on the principal path's input, as PEFT's PiSSA (trainer: peft.lora_dropout)

    def __post_init__(self):
        if self.method is not None:
            if self.way != "way0" and self.way != self.method:
                raise ValueError(f"RotationalPiSSAConfig got method={self.method!r} and way={self.way!r}; give one")
            self.way = self.method
        self.method = self.way
        if self.lora_dropout is not None:
            self.dropout = float(self.lora_dropout)
        self.lora_dropout = self.dropout
        if self.way not in WAYS:
            raise ValueError(f"unknown rotational PiSSA way {self.way!r}; allowed: {list(WAYS)}")
        checks = {"r >= 1": self.r >= 1, "low_rank_r >= 1": self.low_rank_r >= 1,
                  "givens_layers >= 1": self.givens_layers >= 1, "merge_every >= 1": self.merge_every >= 1,
                  "extra_principal_dims >= 0": self.extra_principal_dims >= 0,
                  "orthogonality_reg_weight >= 0": self.orthogonality_reg_weight >= 0,
                  "0 <= dropout < 1": 0 <= self.dropout < 1,
                  "svd_niter null or >= 0": self.svd_niter is None or self.svd_niter >= 0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"rotational PiSSA needs {', '.join(bad)} (got {self})")


# the seed saves this config with torch.save and loads it back with torch.load (weights_only by default since torch 2.6)
torch.serialization.add_safe_globals([RotationalPiSSAConfig])


# ---- rotations ------------------------------------------------------------------------------------------------------
def expm_low_rank(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """exp(B C^T - C B^T) (n x n) through a 4k x 4k exponential instead of an n x n one."""
    n, k = B.shape
    Z = torch.cat([B, C], 1)
    eye_k = torch.eye(k, dtype=B.dtype, device=B.device)
    zero = torch.zeros_like(eye_k)
    J = torch.cat([torch.cat([zero, eye_k], 1), torch.cat([-eye_k, zero], 1)], 0)
    M = J @ (Z.T @ Z)
    m = M.shape[0]
    big = torch.cat([torch.cat([M, torch.eye(m, dtype=B.dtype, device=B.device)], 1),
                     torch.zeros(m, 2 * m, dtype=B.dtype, device=B.device)], 0)
    phi = torch.linalg.matrix_exp(big)[:m, m:]
    return torch.eye(n, dtype=B.dtype, device=B.device) + Z @ phi @ J @ Z.T


def cayley(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """(I - K)^-1 (I + K) for K = B C^T - C B^T: orthogonal because K is skew-symmetric."""
    n = B.shape[0]
    K = B @ C.T - C @ B.T
    eye = torch.eye(n, dtype=B.dtype, device=B.device)
    return torch.linalg.solve(eye - K, eye + K)


def givens_pairs(n: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint coordinate pairs: (0,1),(2,3),... on even layers, (1,2),(3,4),... on odd ones (a brick wall)."""
    i = torch.arange(layer % 2, n - 1, 2)
    return i, i + 1


def givens(theta: torch.Tensor, n: int, layer: int) -> torch.Tensor:
    """The n x n product of the layer's disjoint plane rotations (they commute)."""
    i, j = givens_pairs(n, layer)
    c, s = torch.cos(theta), torch.sin(theta)
    G = torch.eye(n, dtype=theta.dtype, device=theta.device)
    return G.index_put((i, i), c).index_put((j, j), c).index_put((i, j), -s).index_put((j, i), s)


class Rotation(nn.Module):
    """One n x n rotation parametrised by a way; calling it returns the matrix (fp32). Its parameters carry the side
    ("U" or "V") in their names as the seed's layer does (R_U, B_U, C_U, theta_U; R_V, ...), so the seed's trainer,
    which finds them by the substrings R_U/B_U and R_V/B_V, finds them here; ``R``, ``B``, ``C``, ``theta`` read
    them."""

    def __init__(self, n: int, cfg: RotationalPiSSAConfig, device, side: str = "U"):
        super().__init__()
        self.n, self.way, self.side = n, cfg.way, side
        if cfg.way == "way0":
            setattr(self, f"R_{side}", nn.Parameter(torch.eye(n, device=device) if cfg.init_identity
                                                   else torch.linalg.qr(torch.randn(n, n, device=device))[0]))
        elif cfg.way == "way1":
            sizes = [len(givens_pairs(n, l)[0]) for l in range(cfg.givens_layers)]
            setattr(self, f"theta_{side}", nn.ParameterList([
                nn.Parameter(torch.zeros(m, device=device) if cfg.init_identity
                             else 0.1 * torch.randn(m, device=device)) for m in sizes]))
        else:
            q = min(cfg.low_rank_r, n)
            setattr(self, f"B_{side}", nn.Parameter(0.1 * torch.randn(n, q, device=device) / q ** 0.5))
            # C = 0 gives K = 0 (R = I) with a non-zero gradient for C, as LoRA's B = 0
            setattr(self, f"C_{side}", nn.Parameter(torch.zeros(n, q, device=device) if cfg.init_identity
                                                   else 0.1 * torch.randn(n, q, device=device)))

    R = property(lambda self: getattr(self, f"R_{self.side}"))
    B = property(lambda self: getattr(self, f"B_{self.side}"))
    C = property(lambda self: getattr(self, f"C_{self.side}"))
    theta = property(lambda self: getattr(self, f"theta_{self.side}"))

    def forward(self) -> torch.Tensor:
        if self.way == "way0":
            return self.R
        if self.way == "way1":
            R = torch.eye(self.n, device=self.theta[0].device)
            for l, th in enumerate(self.theta):
                R = R @ givens(th, self.n, l)
            return R
        if self.way == "way2":
            return cayley(self.B, self.C)
        return expm_low_rank(self.B, self.C)

    @torch.no_grad()
    def restart_(self) -> list[nn.Parameter]:
        """Back to R = I; returns the parameters whose optimizer state no longer applies."""
        if self.way == "way0":
            self.R.copy_(torch.eye(self.n, device=self.R.device))
            return [self.R]
        if self.way == "way1":
            for th in self.theta:
                th.zero_()
            return list(self.theta)
        self.C.zero_()
        return [self.C]


# ---- NF4 storage ----------------------------------------------------------------------------------------------------
# bitsandbytes' quantize_4bit/dequantize_4bit (NF4, blocks of 64) on the FLAT data, kept in our own buffers. Not
# bnb.nn.Linear4bit: in bitsandbytes 0.50 on CPU its dequantize is wrong for rows 16/32/48/96 wide, and in eval mode on
# AVX512-BF16 CPUs it repacks its weight (bf16 statistics, fails unless in_features % 64 == 0). The flat 1-D path is
# right everywhere, and on GPU dequantize-then-matmul is what Linear4bit does for training anyway.
NF4_BLOCK = 64


class NF4Matrix(nn.Module):
    """A frozen matrix as NF4: 4 bits per entry plus an absmax per block of 64 (fp32, or 8-bit with an fp32 absmax
    per 256 of them when ``double_quant``, QLoRA's double quantisation). Calling it returns the fp32 matrix."""

    def __init__(self, M: torch.Tensor, double_quant: bool = False):
        super().__init__()
        self.shape, self.double_quant = tuple(M.shape), double_quant
        for name in ("packed", "absmax", "code", "offset", "absmax2", "code2"):
            self.register_buffer(name, None)
        self.set_(M)

    @torch.no_grad()
    def set_(self, M: torch.Tensor) -> None:
        import bitsandbytes.functional as F

        q, st = F.quantize_4bit(M.detach().float().reshape(-1).contiguous(), blocksize=NF4_BLOCK,
                                compress_statistics=self.double_quant, quant_type="nf4")
        self.packed, self.absmax, self.code = q, st.absmax, st.code.to(q.device)
        if self.double_quant:
            self.offset, self.absmax2, self.code2 = st.offset, st.state2.absmax, st.state2.code
            self.block2 = st.state2.blocksize

    def forward(self) -> torch.Tensor:
        import bitsandbytes.functional as F

        st2 = (F.QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.block2, dtype=torch.float32)
               if self.double_quant else None)
        st = F.QuantState(absmax=self.absmax, shape=torch.Size([self.shape[0] * self.shape[1]]), code=self.code,
                          blocksize=NF4_BLOCK, quant_type="nf4", dtype=torch.float32, offset=self.offset, state2=st2)
        return F.dequantize_4bit(self.packed, st).reshape(self.shape)


class _NF4MatMul(torch.autograd.Function):
    """x @ W^T, dequantising W in forward and again in backward: no full-precision W is kept for the backward."""

    @staticmethod
    def forward(ctx, x, w: NF4Matrix):
        ctx.w = w
        return x @ w().to(x.dtype).T

    @staticmethod
    def backward(ctx, g):
        return g @ ctx.w().to(g.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear map (out x in) with its weight in NF4 (double-quantised statistics, as QLoRA)."""

    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = W.shape
        self.dtype = dtype  # the compute dtype when not under autocast: the original layer's
        self.qweight = NF4Matrix(W, double_quant=True)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (out x in), read-only."""
        return self.qweight().to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.dtype
        y = _NF4MatMul.apply(x.to(dt), self.qweight)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, bias={self.bias is not None}"


# ---- the layer ------------------------------------------------------------------------------------------------------
class RotationalPiSSALinear(AdapterLayer):
    """base = W_res (frozen, optionally NF4); adapter = U R_U diag(S) R_V^T V^T."""

    def __init__(self, base: nn.Module, cfg: RotationalPiSSAConfig):
        super().__init__(base)
        self.cfg = cfg
        r, k = cfg.r, cfg.r + cfg.extra_principal_dims
        if k > min(self.in_features, self.out_features):
            raise ValueError(f"r + extra_principal_dims = {k} exceeds the layer's smaller dimension "
                             f"{min(self.in_features, self.out_features)}")
        W = base_weight_out_in(base).detach()
        U, S, Vh = top_r_svd(W, k, cfg.svd_niter)
        V = Vh.T.contiguous()
        if cfg.quantize_base_components:
            warnings.warn("quantize_base_components: U and V are stored in NF4, so the rotated singular vectors are "
                          "only roughly orthonormal (the residual absorbs their error, so the start is unchanged), "
                          "and way1's merges re-quantise them (each merge adds quantisation error)", stacklevel=3)
            self.U_nf4, self.V_nf4 = NF4Matrix(U), NF4Matrix(V)
            U, V = self.U_nf4(), self.V_nf4()  # the residual is taken against what the adapter will use
        else:
            self.register_buffer("U", U)
            self.register_buffer("V", V)
        S0 = S.clone()
        S0[r:] = 0  # only the top r leave the residual; the p extra directions start empty
        if cfg.freeze_singular_values:
            self.register_buffer("S", S0)
        else:
            self.S = nn.Parameter(S0)  # fp32 whatever the model dtype
        off_A, off_B = S0[:r, None] * V[:, :r].T, U[:, :r]
        residual = (W.float() - off_B @ off_A) if cfg.quantize_residual else None  # fp32, before any rounding
        self.set_offset(off_A, off_B, 1.0)  # base <- W_res = W - U_r S_r V_r^T
        self.rot_U = Rotation(k, cfg, W.device, "U")
        self.rot_V = Rotation(k, cfg, W.device, "V")
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._parked: list[nn.Module] = []  # the NF4 residual while merged (a list: not a submodule)
        self.fan_in_fan_out = isinstance(base, Conv1D)  # for export, whatever the base becomes
        if cfg.quantize_residual:
            self.base = NF4Linear(residual, base.bias, base.weight.dtype)

    # ---- the adapter ----------------------------------------------------------------------------------------------
    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) as fp32 (out x k, in x k)."""
        if self.cfg.quantize_base_components:
            return self.U_nf4(), self.V_nf4()
        return self.U, self.V

    def rotations(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rot_U(), self.rot_V()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        U, V = self.bases()
        R_U, R_V = self.rotations()
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(U.dtype)
        return (((x @ V) @ R_V) * self.S) @ (U @ R_U).T

    def principal_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with B @ A = U R_U diag(S) R_V^T V^T; terms with s_i = 0 (the unused padding) are left out."""
        U, V = self.bases()
        R_U, R_V = self.rotations()
        keep = self.S.detach() != 0
        return (R_V.T @ V.T)[keep].float(), (U @ R_U * self.S)[:, keep].float()

    def delta_weight(self) -> torch.Tensor:
        A, B = self.principal_factors()
        return B @ A

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.principal_factors()
        return A.detach().clone(), B.detach().clone()

    def orthogonality_penalty(self) -> torch.Tensor:
        R_U, R_V = self.rotations()
        eye = torch.eye(R_U.shape[0], device=R_U.device)
        return ((R_U.T @ R_U - eye) ** 2).sum() + ((R_V.T @ R_V - eye) ** 2).sum()

    @torch.no_grad()
    def merge_rotations_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Fold the current rotations into U and V, restart them at I and drop their (now stale) optimizer state.
        The function is unchanged (up to NF4 re-quantisation with quantize_base_components)."""
        U, V = self.bases()
        R_U, R_V = self.rotations()
        if self.cfg.quantize_base_components:
            self.U_nf4.set_(U @ R_U)
            self.V_nf4.set_(V @ R_V)
        elif self.cfg.way == "way0":  # a free R is no rotation: U R_U is not orthonormal and must stay as it is
            self.U.copy_(U @ R_U)
            self.V.copy_(V @ R_V)
        else:  # re-orthonormalised: without it U, V drift from orthonormality by rounding at every merge
            self.U.copy_(orthonormalize(U @ R_U))
            self.V.copy_(orthonormalize(V @ R_V))
        for rot in (self.rot_U, self.rot_V):
            for p in rot.restart_():
                if optimizer is not None:
                    optimizer.state.pop(p, None)

    # ---- merge and resume with an NF4 residual ---------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        if not self.cfg.quantize_residual:
            return super().merge()
        if self.merged:
            return
        q = self.base
        W = q.qweight() + self.delta_weight().to(q.qweight.packed.device)
        out_f, in_f = W.shape
        if self.fan_in_fan_out:
            fp = Conv1D(out_f, in_f)
            fp.weight.data = W.T.contiguous().to(q.dtype)
        else:
            fp = nn.Linear(in_f, out_f, bias=q.bias is not None, device=W.device, dtype=q.dtype)
            fp.weight.copy_(W)
        if q.bias is not None:
            fp.bias.data = q.bias.clone()
        fp.requires_grad_(False)
        self._parked.append(q)
        self.base, self.merged = fp, True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.cfg.quantize_residual:
            return super().unmerge()
        if self.merged:
            self.base, self.merged = self._parked.pop(), False

    def _add_to_base(self, delta_out_in: torch.Tensor) -> None:
        if isinstance(self.base, NF4Linear):
            raise RuntimeError("the NF4 residual cannot be moved in place; merge() dequantises it instead")
        super()._add_to_base(delta_out_in)

    @torch.no_grad()
    def load_adapter_state(self, state) -> None:
        """With an NF4 residual the base already holds this layer's own quantised W_res (the same SVD of the same
        original weight); the saved offset must match it, then everything else loads as usual."""
        if not self.cfg.quantize_residual:
            return super().load_adapter_state(state)
        state = dict(state)
        off_A, off_B, s = state.pop("offset_A"), state.pop("offset_B"), state.pop("offset_scaling", 1.0)
        ours = self.offset_scaling * (self.offset_B @ self.offset_A).cpu()
        if not torch.allclose(s * (off_B.float() @ off_A.float()), ours, rtol=1e-4, atol=1e-5):
            raise ValueError("this checkpoint's principal part differs from the one taken out of this layer's NF4 "
                             "residual (other base weights, r or extra_principal_dims?)")
        held = self.offset_A, self.offset_B
        self.offset_A = self.offset_B = None  # the parent would move the base back to the original otherwise
        try:
            super().load_adapter_state(state)
        finally:
            self.offset_A, self.offset_B = held

    def extra_repr(self) -> str:
        c = self.cfg
        return (super().extra_repr() + f", r={c.r}, p={c.extra_principal_dims}, way={c.way}, "
                f"train_S={not c.freeze_singular_values}, nf4_residual={c.quantize_residual}")


# ---- the method -----------------------------------------------------------------------------------------------------
@dataclass
class RotationalPiSSAOptions(MethodOptions):
    """conf/method/rotational_pissa.yaml documents each option; r is peft.lora_r, dropout peft.lora_dropout."""
    name: str = "rotational_pissa"
    way: str = option("way0", choices=WAYS)
    low_rank_r: int = option(4, ge=1)
    givens_layers: int = option(2, ge=1)
    merge_every: int = option(50, ge=1)
    orthogonality_reg_weight: float = option(1e-3, ge=0)
    init_identity: bool = True
    freeze_singular_values: bool = False
    extra_principal_dims: int = option(0, ge=0)
    quantize_residual: bool = False
    quantize_base_components: bool = False
    svd_niter: int | None = option(None, ge=0)


CONFIG_KEYS = tuple(f.name for f in fields(RotationalPiSSAOptions) if f.name != "name")


def config_from(options: RotationalPiSSAOptions | None, r: int, dropout: float = 0.0) -> RotationalPiSSAConfig:
    """The method options as the seed's RotationalPiSSAConfig; r comes from peft.lora_r."""
    options = ROTATIONAL_PISSA.parse(options)
    return RotationalPiSSAConfig(r=r, dropout=dropout, **{k: getattr(options, k) for k in CONFIG_KEYS})


class RotationalPiSSA(MethodSpec):
    def extra_loss(self, model, o: RotationalPiSSAOptions):
        """way0's orthogonality penalty, summed over layers."""
        o = self.parse(o)
        if o.way != "way0" or not o.orthogonality_reg_weight:
            return None
        return o.orthogonality_reg_weight * sum(l.orthogonality_penalty() for l in adapter_layers(model).values())

    @torch.no_grad()
    def after_step(self, model, optimizer, step, o: RotationalPiSSAOptions):
        o = self.parse(o)
        if o.way == "way1" and step % o.merge_every == 0:
            for l in adapter_layers(model).values():
                l.merge_rotations_(optimizer)
            return {"rot/merged": 1.0}
        if o.way == "way0":  # how far the free R are from orthogonal, the worst layer
            return {"rot/orth_err": max(float(l.orthogonality_penalty()) for l in adapter_layers(model).values())
                    ** 0.5}
        return {}


def make_layer(base, peft_cfg, options):
    return RotationalPiSSALinear(base, config_from(options, int(peft_cfg.lora_r),
                                                   float(peft_cfg.get("lora_dropout", 0.0) or 0.0)))


ROTATIONAL_PISSA = register_method(RotationalPiSSA(name="rotational_pissa", make_layer=make_layer,
                                                   options=RotationalPiSSAOptions, lora_factors=False))


def replace_linear_with_rotational_pissa(model: nn.Module, pissa_config: RotationalPiSSAConfig, target_modules,
                                         adapter_name: str = "default", freeze_base_model: bool = True
                                         ) -> dict[str, RotationalPiSSALinear]:
    """The seed's API: replace the target Linear layers (names, suffixes or a regex); returns the adapters by name."""
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
