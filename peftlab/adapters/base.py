"""What every method shares: the adapter layer surface, target selection and the method hooks.

An adapter layer wraps one frozen base projection (``nn.Linear`` or GPT-2's ``Conv1D``). Its surface:
``forward``, ``delta_weight`` (the current change of the effective weight, out x in, fp32), ``merge``/``unmerge``
and ``to_lora`` (the exact change against the ORIGINAL base weight, as LoRA factors, for export). An init may move
the base weight (PiSSA, LoRA-GA); the move is kept as low-rank fp32 factors (``offset_B @ offset_A * scaling`` is
subtracted from the original weight) so that export and resume can rebuild it exactly.

A method (``MethodSpec``) makes layers from a base module and may add an optimizer, an after-step hook and an extra
loss term. The trainer only ever calls those hooks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

try:  # GPT-2 style fused projections store weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency, keep the module importable without it
    Conv1D = ()  # type: ignore[assignment]


def base_weight_out_in(base: nn.Module) -> torch.Tensor:
    """The base weight as (out, in), a view for Linear and a transpose view for Conv1D."""
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def base_dims(base: nn.Module) -> tuple[int, int]:
    w = base_weight_out_in(base)
    return w.shape[1], w.shape[0]


class AdapterLayer(nn.Module):
    """Base class: a frozen ``base`` projection plus a trainable change.

    Subclasses implement ``adapter_forward(x)`` (the change applied to x, in x's dtype) and ``delta_weight()``.
    """

    adapter_param_names: tuple[str, ...] = ()

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"adapters replace nn.Linear or Conv1D layers, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_dims(base)
        self.merged = False
        self.disabled = False  # True: the adapter adds nothing (e.g. while an init estimates the base gradient)
        # Low-rank move of the base weight made by an init: W_base = W_orig - offset_scaling * offset_B @ offset_A.
        self.register_buffer("offset_A", None)
        self.register_buffer("offset_B", None)
        self.offset_scaling = 1.0

    # ---- the surface --------------------------------------------------------------------------------------------
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """Current change of the effective weight against the (possibly offset) base, (out, in), fp32."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.disabled:
            return y
        return y + self.adapter_forward(x).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._add_to_base(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_base(-self.delta_weight())
            self.merged = False

    @torch.no_grad()
    def to_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with B @ A == W_effective - W_original exactly (fp32); rank grows by the offset's rank."""
        A, B = self.lora_factors()
        if self.offset_A is not None:
            s = self.offset_scaling
            A = torch.cat([A, self.offset_A.float()], 0)
            B = torch.cat([B, -s * self.offset_B.float()], 1)
        return A, B

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with B @ A == delta_weight(); default: a thin SVD of the dense delta (exact, rank-revealing)."""
        d = self.delta_weight()
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        k = int((S > S.max() * 1e-7).sum()) if S.numel() and S.max() > 0 else 0
        k = max(k, 1)
        return Vh[:k] * S[:k, None], U[:, :k].contiguous()

    # ---- base-weight offsets (used by inits) --------------------------------------------------------------------
    @torch.no_grad()
    def set_offset(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Move the base weight by -scaling * B @ A (in fp32), remembering the factors for export and resume."""
        A, B = A.detach().float(), B.detach().float()
        self._add_to_base(-scaling * (B @ A))
        if self.offset_A is not None:  # a second move: keep one factor pair at the new scaling
            A = torch.cat([self.offset_A, A], 0)
            B = torch.cat([self.offset_B * (self.offset_scaling / scaling), B], 1)
        self.offset_A, self.offset_B, self.offset_scaling = A.clone(), B.clone(), float(scaling)

    @torch.no_grad()
    def _add_to_base(self, delta_out_in: torch.Tensor) -> None:
        w = self.base.weight
        d = delta_out_in.T if isinstance(self.base, Conv1D) else delta_out_in
        w.copy_((w.float() + d.to(w.device, torch.float32)).to(w.dtype))

    # ---- state for checkpoints ----------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, Any]:
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if not k.startswith("base.")}
        state["offset_scaling"] = self.offset_scaling
        return state

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Any]) -> None:
        """Load what ``adapter_state`` saved; tensors may change shape (rank-adaptive methods).

        The base weight must be the original one: the saved offset is re-applied to it.
        """
        state = dict(state)
        if self.offset_A is not None:  # a layer that moved its base when built: back to the original first
            self._add_to_base(self.offset_scaling * (self.offset_B @ self.offset_A))
            self.offset_A = self.offset_B = None
        scaling = state.pop("offset_scaling", 1.0)
        off_A, off_B = state.pop("offset_A", None), state.pop("offset_B", None)
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        for k, v in state.items():
            if k not in own:
                raise KeyError(f"checkpoint has {k!r}, which {type(self).__name__} does not have")
            t = own[k]
            if t is None:
                continue
            if t.shape != v.shape:
                t.data = v.to(t.device, t.dtype)
            else:
                t.copy_(v)
        if off_A is not None:
            self.set_offset(off_A, off_B, scaling)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, merged={self.merged}"


# ---- target selection: peftlab/adapters/targets.py (re-exported here for existing imports) -------------------
from .targets import (ADAPTABLE, EXCLUDED_FROM_ALL, TARGET_SETS, find_targets, name_matches,  # noqa: E402,F401
                      resolve_target_patterns, untie_target)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Adapter layers by the name of the module they replaced (no DDP/FSDP/compile prefixes)."""
    model = unwrap(model)
    return {n.replace("_fsdp_wrapped_module.", ""): m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / FSDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


# ---- methods --------------------------------------------------------------------------------------------------------
@dataclass
class MethodOptions:
    """A method's options (``method.*``): subclass with typed fields (``peftlab.schema.option``) and a ``name``
    default equal to the method's name; conf/method/<name>.yaml holds the same defaults, with comments."""

    name: str = "lora"


@dataclass
class MethodSpec:
    """A method: how to make its layer, and optional optimizer-side behaviour. Subclass and register.

    ``make_layer(base, peft_cfg, options)`` and every hook receive the method's checked options (``options``, a
    ``MethodOptions`` dataclass). ``lora_factors``: its layers hold (lora_A, lora_B), so the LoRA-factor inits
    (gaussian, pissa, gradient) apply. ``output_preserved_at_init``: with init=default the adapted model starts equal
    to the base (checked by tests/test_method_contract.py)."""

    name: str
    make_layer: Callable[..., AdapterLayer]
    options: type = MethodOptions
    lora_factors: bool = True
    output_preserved_at_init: bool = True

    def parse(self, given: Any = None):
        """The checked options from a mapping (a config group, a dict, None: the defaults), or as given (the hooks
        call it first, so they take either)."""
        if isinstance(given, self.options):
            return given
        from ..schema import build

        return build(self.options, {"name": self.name, **dict(given or {})}, "method", self.name)
    inits: tuple[str, ...] | None = None  # the inits the method accepts (None: any that applies)
    exports_adapter = True  # False: no PEFT adapter applies (full fine-tuning); the run saves merged/ instead
    uses_targets = True  # False: peft.* target selection does not apply (full fine-tuning)
    export_note = None  # why not, for the run's summary

    def apply(self, model: nn.Module, peft_cfg: Any, options: Any, model_type: str | None) -> dict | None:
        """None: the generic path (freeze, wrap every target in make_layer); a method without layers overrides."""
        return None

    def check_run(self, run: Any) -> None:
        """Rules that involve other groups, checked before anything loads (``fail`` names the key)."""
        if self.inits is not None and run.init.name not in self.inits:
            from ..schema import fail

            fail("init.name", run.init.name, f"method={self.name} takes the inits {list(self.inits)}",
                 "+init=<name>")

    def make_optimizer(self, model: nn.Module, params: Iterable[nn.Parameter], train_cfg: Any, method_cfg: Any):
        """None lets the trainer build its default AdamW."""
        return None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, method_cfg: Any
                   ) -> dict[str, float]:
        """Runs after every optimizer step on the unwrapped model (every process); returns metrics to log."""
        return {}

    def on_train_end(self, model: nn.Module, run_dir: Any, method_cfg: Any) -> None:
        """Runs once on the main process after the adapter is saved (e.g. a plot in the run folder)."""

    def extra_loss(self, model: nn.Module, method_cfg: Any) -> torch.Tensor | None:
        """A regulariser added to the task loss (e.g. an orthogonality penalty); logged separately."""
        return None
