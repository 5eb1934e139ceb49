"""PiSSA (Meng et al. 2024): A = sqrt(S_r / s) Vh_r, B = U_r sqrt(S_r / s), base <- W - s B A (so the output is
unchanged), exactly PEFT's ``init_lora_weights="pissa"`` convention; ``niter`` picks the randomized SVD."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..adapters.base import base_weight_out_in
from ..schema import option
from . import InitContext, InitSpec, LoRAFactorInitOptions, lora_factor_layers, register_init
from .svd import top_r_svd


@torch.no_grad()
def pissa_factors(W: torch.Tensor, r: int, scaling: float, niter: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if r > min(W.shape):  # the SVD has only min(out, in) triplets; copying fewer rows into r would broadcast
        raise ValueError(f"PiSSA needs lora_r <= min(out, in); the weight is {tuple(W.shape)}, r={r}")
    U, S, Vh = top_r_svd(W, r, niter)
    root = (S / scaling).sqrt()
    return root[:, None] * Vh, U * root


@torch.no_grad()
def run(ctx: InitContext) -> dict:
    niter = ctx.cfg.init.get("niter")
    t0 = time.perf_counter()
    layers = lora_factor_layers(ctx, "pissa")
    for name, layer in layers.items():  # all checked before any layer changes
        if layer.rank > min(layer.out_features, layer.in_features):
            raise ValueError(f"PiSSA needs lora_r <= min(out, in); {name} is "
                             f"{(layer.out_features, layer.in_features)}, r={layer.rank}")
    for layer in layers.values():
        A, B = pissa_factors(base_weight_out_in(layer.base), layer.rank, layer.scaling, niter)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        layer.set_offset(layer.lora_A, layer.lora_B, layer.scaling)  # the stored factors: the output is unchanged
    return {"init/svd_s": round(time.perf_counter() - t0, 3)}


@dataclass
class PiSSAOptions(LoRAFactorInitOptions):
    name: str = "pissa"
    niter: int | None = option(None, ge=0)   # null: full SVD; int: randomized SVD with that many power iterations


register_init(InitSpec("pissa", run, PiSSAOptions))
