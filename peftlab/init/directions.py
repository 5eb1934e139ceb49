"""Gradient-init directions as closed forms on tensors (fp32). G is the full-batch gradient dL/dW (out x in).

Each returns (A, B) with A r x in, B out x r; the layer's forward adds s * B @ A (s = its scaling).
- LoRA-GA (Wang et al. 2024): A, B from the SVD G = U S V^T. ``convention="paper"`` follows the authors' code:
  A = V[:, :r]^T, B = U[:, r:2r] (ArB2r), each factor times d_out^(1/4)/sqrt(gamma) (stable), / s (gd) or 1 (unit).
  ``convention="peft"`` follows HF PEFT 0.21's ``lora_ga``: B also carries its singular values and the stable
  factor goes on B alone. The base weight is offset by -s B A so the initial output is unchanged.
- LoRA-One (Zhang et al. 2025): one spectrally normalised rank-r step along -G, no offset. With -G = U S V^T,
  B = U_r sqrt(S_r / s1) c and A = sqrt(S_r / s1) V_r^T c, c = 1/sqrt(gamma) (stable: s B A = (s/gamma) [-G]_r / s1),
  1/s (gd) or 1 (unit), as the authors' code (stable there has no d_out^(1/4) for LoRA-One, unlike LoRA-GA).
- LoRA-FA (peftlab's definition, see DESIGN.md): the same step in the function-space metric P = Sigma + damping
  (tr Sigma / n) I of the layer's input second moment Sigma: with -G P^{-1/2} = U S V^T, B = U_r sqrt(S_r),
  A = sqrt(S_r) V_r^T P^{-1/2}; B A normalised to spectral norm 1, the scalar split so ||B||_F = ||A||_F, then
  LoRA-One's factor c on each. With P = I (or Sigma proportional to I) it is exactly LoRA-One.
"""
from __future__ import annotations

import torch

from .svd import canonical_signs

DIRECTIONS = ("LoRA-GA", "LoRA-One", "LoRA-FA")
GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "gd", "unit")


def _svd(M: torch.Tensor):
    """Thin SVD in fp32 with canonical signs (see canonical_signs): the factors of every direction then depend on G
    only, not on the sign choices of the SVD, which flipped with rounding-level changes of G."""
    U, S, Vh = torch.linalg.svd(M.float(), full_matrices=False)
    U, Vh = canonical_signs(U, Vh)
    return U, S, Vh


def _step_scale(scale: str, scaling: float, gamma: float) -> float:
    """The factor on each of B and A in LoRA-One / LoRA-FA (the authors' code: gd divides each factor by s)."""
    if scale == "stable":
        return gamma ** -0.5
    if scale == "gd":
        return 1.0 / scaling
    if scale == "unit":
        return 1.0
    raise ValueError(f"unknown init.scale {scale!r}; allowed: {list(SCALES)}")


def lora_ga(G: torch.Tensor, r: int, scaling: float, scale: str = "stable", gamma: float = 16.0,
            ga_direction: str = "ArB2r", convention: str = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    if scale not in SCALES:
        raise ValueError(f"unknown init.scale {scale!r}; allowed: {list(SCALES)}")
    if 2 * r > min(G.shape):
        raise ValueError(f"LoRA-GA needs 2r <= min(out, in); r={r}, weight {tuple(G.shape)}")
    U, S, Vh = _svd(G)
    if ga_direction == "ArB2r":
        a_idx, b_idx = torch.arange(r), torch.arange(r, 2 * r)
    elif ga_direction == "A2rBr":
        a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(r)
    elif ga_direction == "ArBr":
        a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    else:
        raise ValueError(f"unknown init.ga_direction {ga_direction!r}; allowed: {list(GA_DIRECTIONS)}")
    A, B = Vh[a_idx].clone(), U[:, b_idx].clone()
    d_out = G.shape[0]
    stable = d_out ** 0.25 / gamma ** 0.5
    if convention == "peft":
        B = B * S[b_idx]
        if scale == "stable":
            B = B * stable
    elif convention == "paper":
        if scale == "stable":
            A, B = A * stable, B * stable
    else:
        raise ValueError(f"unknown init.ga_convention {convention!r}; allowed: ['paper', 'peft']")
    if scale == "gd":
        A, B = A / scaling, B / scaling
    return A.contiguous(), B.contiguous()


def lora_one(G: torch.Tensor, r: int, scaling: float, scale: str = "stable", gamma: float = 16.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = _svd(-G)
    root = (S[:r] / S[0]).sqrt()
    c = _step_scale(scale, scaling, gamma)
    return (root[:, None] * Vh[:r] * c).contiguous(), (U[:, :r] * root * c).contiguous()


def inverse_sqrt_metric(sigma: torch.Tensor, damping: float, floor: float = 1e-12) -> torch.Tensor:
    """P^{-1/2} for P = Sigma + damping * (tr Sigma / n) I, by a symmetric eigendecomposition in fp32 (fp64 inside)."""
    sigma = sigma.double()
    n = sigma.shape[0]
    P = sigma + damping * (torch.trace(sigma) / n) * torch.eye(n, dtype=sigma.dtype, device=sigma.device)
    evals, evecs = torch.linalg.eigh((P + P.T) / 2)
    evals = evals.clamp(min=floor * float(evals.max().clamp(min=floor)))
    return ((evecs * evals.rsqrt()) @ evecs.T).float()


def whitened_spectrum(G: torch.Tensor, p_inv_sqrt: torch.Tensor | None):
    """SVD of -G P^{-1/2} (P = I when p_inv_sqrt is None)."""
    M = -G.float() if p_inv_sqrt is None else -G.float() @ p_inv_sqrt
    return _svd(M)


def rank_by_energy(S: torch.Tensor, energy: float, r_max: int) -> int:
    """The smallest r whose singular values hold ``energy`` of the total squared spectrum, within [1, r_max]."""
    e = S.double() ** 2
    cum = torch.cumsum(e, 0) / e.sum().clamp(min=1e-300)
    return int(min(r_max, max(1, int((cum < energy - 1e-12).sum()) + 1)))


def lora_fa(G: torch.Tensor, r: int, scaling: float, sigma: torch.Tensor | None = None, damping: float = 1e-3,
            scale: str = "stable", gamma: float = 16.0, svd=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sigma=None`` switches the metric off (P = I). ``svd`` reuses a precomputed (P^{-1/2}, U, S, Vh)."""
    if svd is None:
        p_is = None if sigma is None else inverse_sqrt_metric(sigma, damping)
        U, S, Vh = whitened_spectrum(G, p_is)
    else:
        p_is, U, S, Vh = svd
    B = U[:, :r] * S[:r].sqrt()
    A = S[:r].sqrt()[:, None] * Vh[:r]
    if p_is is not None:
        A = A @ p_is
    c = torch.linalg.matrix_norm(B @ A, ord=2)  # spectral norm of the product
    nb, na = torch.linalg.norm(B), torch.linalg.norm(A)
    kb, ka = (na / (nb * c)).sqrt(), (nb / (na * c)).sqrt()  # kb * ka = 1 / c and ||kb B|| = ||ka A||
    step = _step_scale(scale, scaling, gamma)
    return (A * ka * step).contiguous(), (B * kb * step).contiguous()
