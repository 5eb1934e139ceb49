"""LoRA / rsLoRA: h = W0 x + s B A x, s = alpha / r (rsLoRA: alpha / sqrt(r)); A kaiming-uniform, B = 0."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterLayer, MethodOptions, MethodSpec


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(AdapterLayer):
    """A frozen base projection plus s * B @ A, with dropout on the adapter's input (as PEFT)."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"lora_r must be >= 1, got {rank}")
        self.rank, self.alpha, self.use_rslora = int(rank), float(alpha), bool(use_rslora)
        self.scaling = lora_scaling(self.rank, self.alpha, self.use_rslora)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_linear(cls, layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        return cls(layer, rank, alpha, dropout, use_rslora)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmul casts anyway
            x = x.to(self.lora_A.dtype)
        return ((x @ self.lora_A.T) * self.scaling) @ self.lora_B.T  # scale the r-wide intermediate, not the output

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.detach().float().clone(), self.scaling * self.lora_B.detach().float()

    def load_adapter_state(self, state) -> None:
        super().load_adapter_state(state)
        if self.lora_A.shape[0] != self.rank:  # a per-layer rank chosen by an init (rank: auto)
            self.set_rank_scaling(self.lora_A.shape[0])

    def set_rank_scaling(self, rank: int) -> None:
        self.rank = int(rank)
        self.scaling = lora_scaling(self.rank, self.alpha, self.use_rslora)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.rank}, alpha={self.alpha}, rslora={self.use_rslora}"


def make_lora_layer(base: nn.Module, peft_cfg, options=None) -> LoRALinear:
    return LoRALinear(base, peft_cfg.lora_r, peft_cfg.lora_alpha, peft_cfg.get("lora_dropout", 0.0),
                      peft_cfg.get("use_rslora", False))


LORA = MethodSpec(name="lora", make_layer=make_lora_layer, options=MethodOptions)
