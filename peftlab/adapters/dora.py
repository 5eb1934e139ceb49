"""DoRA (Liu et al. 2024), as HF PEFT's ``LoraConfig(use_dora=True)``: the weight is split into a magnitude and a
direction, W' = m * V / ||V||_row with V = W + s B A (the LoRA direction), m a trainable vector with one entry per
output feature (PEFT's ``lora_magnitude_vector``), initialised to ||W||_row so the model starts equal to the base.

Forward (PEFT's): y = W x + b + (m / ||V|| - 1) * (W x) + (m / ||V||) * s B A dropout(x), with ||V|| detached (DoRA's
section 4.3: the norm gets no gradient). With dropout active in training, W x in the DoRA terms is computed on the
dropped-out input, as PEFT does. Merge: W <- m / ||V|| * V (PEFT's merge). Export: PEFT's DoRA adapter, the LoRA
factors on the original base (an init's offset included, as for LoRA) plus ``lora_magnitude_vector``.

Inits: the magnitude is set from the base weight when the layer is made; the inits that keep W_base + s B A = W
(default, gaussian: B = 0; pissa: base moved by -s B A) leave it equal to PEFT's ||W_base + s B A||. The gradient
inits are refused (LoRA-One changes the output at init, and the estimation is LoRA's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_method
from .base import MethodSpec, base_weight_out_in
from .lora import LoRALinear

DORA_INITS = ("default", "gaussian", "pissa")


class DoRALinear(LoRALinear):
    """LoRA factors plus a magnitude. ``lora_factors``/``to_lora`` (inherited) give the direction's factors, not
    factors of ``delta_weight``: export writes them with the magnitude as a PEFT DoRA adapter."""

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base, rank, alpha, dropout, use_rslora)
        with torch.no_grad():
            norm = torch.linalg.norm(base_weight_out_in(base).float(), dim=1)
        self.lora_magnitude_vector = nn.Parameter(norm)
        self._merged_delta = None

    def direction_norm(self) -> torch.Tensor:
        """||W_base + s B A|| per output row, fp32, detached (DoRA gives the norm no gradient)."""
        with torch.no_grad():
            V = base_weight_out_in(self.base).float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())
            return torch.linalg.norm(V, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.disabled:
            return y
        xa = x if isinstance(self.dropout, nn.Identity) or not self.training else self.dropout(x)
        if xa is x:  # as PEFT: reuse the base output without its bias
            wx = y if getattr(self.base, "bias", None) is None else y - self.base.bias
        else:
            wx = F.linear(xa, base_weight_out_in(self.base))
        scale = (self.lora_magnitude_vector / self.direction_norm()).to(y.dtype)
        if not torch.is_autocast_enabled(x.device.type):
            xa = xa.to(self.lora_A.dtype)
        lora = ((xa @ self.lora_A.T) * self.scaling) @ self.lora_B.T
        return y + (scale - 1) * wx + scale * lora.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """m / ||V|| * V - W_base: the merged weight's change (not low rank)."""
        W = base_weight_out_in(self.base).float()
        V = W + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        return (self.lora_magnitude_vector.float() / self.direction_norm())[:, None] * V - W

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:  # the delta depends on the base: keep it to undo the merge exactly
            self._merged_delta = self.delta_weight()
            self._add_to_base(self._merged_delta)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_base(-self._merged_delta)
            self._merged_delta, self.merged = None, False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


def make_dora_layer(base: nn.Module, peft_cfg, method_cfg=None) -> DoRALinear:
    return DoRALinear(base, peft_cfg.lora_r, peft_cfg.lora_alpha, peft_cfg.get("lora_dropout", 0.0),
                      peft_cfg.get("use_rslora", False))


register_method(MethodSpec(name="dora", make_layer=make_dora_layer, inits=DORA_INITS))
