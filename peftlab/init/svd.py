"""Top-r SVD of a weight, full or fast randomized (Halko et al.), always in fp32."""
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
        return U[:, :r].contiguous(), S[:r].contiguous(), Vh[:r].contiguous()
    gen = torch.Generator(device=W.device).manual_seed(seed)
    q = min(r + max(10, r // 2), min(W.shape))  # oversampled sketch width
    omega = torch.randn(W.shape[1], q, generator=gen, device=W.device)
    Q, _ = torch.linalg.qr(W @ omega)
    for _ in range(niter):
        Q, _ = torch.linalg.qr(W.T @ Q)
        Q, _ = torch.linalg.qr(W @ Q)
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return (Q @ Ub[:, :r]).contiguous(), S[:r].contiguous(), Vh[:r].contiguous()
