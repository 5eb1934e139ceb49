"""Top-r SVD of a weight, full or fast randomized (Halko et al.), always in fp32, with canonical singular-vector
signs (``canonical_signs``), so PiSSA's and Rotational PiSSA's factors do not depend on the SVD's sign choices."""
from __future__ import annotations

import torch


@torch.no_grad()
def top_r_svd(W: torch.Tensor, r: int, niter: int | None = None, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, Vh_r) of W (out x in) in fp32. ``niter=None``: full SVD; an int: randomized SVD with that many
    subspace (power) iterations and oversampling, as PEFT's ``pissa_niter_k``."""
    W = W.float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, Vh = canonical_signs(U[:, :r], Vh[:r])
        return U.contiguous(), S[:r].contiguous(), Vh.contiguous()
    gen = torch.Generator(device=W.device).manual_seed(seed)
    q = min(r + max(10, r // 2), min(W.shape))  # oversampled sketch width
    omega = torch.randn(W.shape[1], q, generator=gen, device=W.device)
    Q, _ = torch.linalg.qr(W @ omega)
    for _ in range(niter):
        Q, _ = torch.linalg.qr(W.T @ Q)
        Q, _ = torch.linalg.qr(W @ Q)
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    U, Vh = canonical_signs(Q @ Ub[:, :r], Vh[:r])
    return U.contiguous(), S[:r].contiguous(), Vh.contiguous()


def orthonormalize(U: torch.Tensor) -> torch.Tensor:
    """The Q of U's QR with the signs of U's columns kept (diag(T) > 0): for U orthonormal up to rounding this is U
    up to rounding, so calling it after every update stops rounding errors from accumulating over many updates."""
    Q, T = torch.linalg.qr(U)
    return Q * torch.where(torch.diagonal(T) < 0, -1.0, 1.0).to(Q.dtype)


def canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular vectors with a canonical sign: each left singular vector's largest-|.| entry is made positive and its
    right one flipped with it (U S Vh unchanged). An SVD's signs are arbitrary, so a G that differs only by rounding
    (another bsz/iters split, another process count) could flip them; with this the factors then agree to rounding.
    (A tie between two largest entries could still flip with rounding; it needs two equal-magnitude entries.)"""
    idx = U.abs().argmax(0, keepdim=True)
    sign = torch.where(U.gather(0, idx) < 0, -1.0, 1.0).to(U.dtype)  # (1, k)
    return U * sign, Vh * sign.reshape(-1, 1)
