"""LoRA / rsLoRA: h = W0 x + s B A x, s = alpha / r (rsLoRA: alpha / sqrt(r)); A kaiming-uniform, B = 0."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import AdapterLayer, MethodOptions, MethodSpec


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(AdapterLayer):
    """A frozen base projection plus s * B @ A, with dropout on the adapter's input (as PEFT)."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, *args, **kwargs):
        """``LoRALinear(base, rank=8, alpha=16.0, dropout=0.0, use_rslora=False, dtype=fp32)`` wraps a module, or the
        LoRA seed's ``LoRALinear(in_features, out_features, rank=8, alpha=16.0, dropout=0.0, bias=True)`` makes a
        fresh frozen ``nn.Linear`` (the seed's defaults in both)."""
        seed_form = (args and isinstance(args[0], int)) or "in_features" in kwargs
        a = _seed_signature(*args, **kwargs) if seed_form else _signature(*args, **kwargs)
        if seed_form:
            a["base"] = nn.Linear(a["in_features"], a["out_features"], bias=a["bias"])
        base, rank, alpha, dropout = a["base"], a["rank"], a["alpha"], a["dropout"]
        use_rslora, dtype = a.get("use_rslora", False), a.get("dtype", torch.float32)
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
    def from_linear(cls, layer: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    use_rslora: bool = False):
        return cls(layer, rank, alpha, dropout, use_rslora)

    # the LoRA seed's attribute names (its walkthrough's forward and merge_weights run on this layer: test_seeds.py)
    linear = property(lambda self: self.base)
    lora_dropout = property(lambda self: self.dropout)

    def merge_weights(self) -> None:
        self.merge()

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


def _signature(base, rank=8, alpha=16.0, dropout=0.0, use_rslora=False, dtype=torch.float32):
    return dict(locals())


def _seed_signature(in_features, out_features, rank=8, alpha=16.0, dropout=0.0, bias=True):
    return dict(locals())


BIAS = ("none", "all", "lora_only")


@dataclass
class LoRAConfig:
    """The LoRA seed's config (its field names and defaults); ``peft_cfg()`` is the same thing in peftlab's ``peft``
    group names. target_modules: names (exact or suffix, as PEFT), regexes (full match), or one regex string."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Any = field(default_factory=lambda: ["q_proj", "v_proj"])  # the seed's recommended default
    bias: str = "none"  # none | all (every bias trains) | lora_only (the biases of adapted layers train)
    use_rslora: bool = False

    def __post_init__(self):
        if self.bias not in BIAS:
            raise ValueError(f"LoRAConfig.bias must be one of {list(BIAS)}, got {self.bias!r}")
        if int(self.rank) < 1 or not 0 <= float(self.dropout) < 1:
            raise ValueError(f"LoRAConfig needs rank >= 1 and 0 <= dropout < 1, got rank={self.rank}, "
                             f"dropout={self.dropout}")

    def peft_cfg(self):
        from omegaconf import OmegaConf

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return OmegaConf.create({"lora_r": int(self.rank), "lora_alpha": float(self.alpha),
                                 "lora_dropout": float(self.dropout), "use_rslora": bool(self.use_rslora),
                                 "lora_target_modules": targets})


def make_lora_layer(base: nn.Module, peft_cfg, options=None) -> LoRALinear:
    return LoRALinear(base, peft_cfg.lora_r, peft_cfg.lora_alpha, peft_cfg.get("lora_dropout", 0.0),
                      peft_cfg.get("use_rslora", False))


LORA = MethodSpec(name="lora", make_layer=make_lora_layer, options=MethodOptions)
