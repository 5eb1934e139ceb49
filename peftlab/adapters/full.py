"""Full fine-tuning, the ceiling every LoRA table compares against: no adapter layers; every parameter of the model
trains (all Linear weights and biases, the token embeddings, every norm's weight and the output head; a tied head is
one parameter). `peft.*` is ignored; only init=default applies (there are no factors to initialise).

Through the same trainer: a checkpoint holds the whole state_dict (so resume continues exactly), the model is saved
whole as merged/ whatever `model.saving` says, and no adapter/ is written (a PEFT adapter does not apply; the
summary says so). FSDP is refused: peftlab's FSDP shards only the frozen base, and here nothing is frozen.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import register_method
from ..schema import fail
from .base import MethodSpec, unwrap

STATE_KEY = "__full_state_dict__"  # a checkpoint's adapters.pt holds {STATE_KEY: state_dict} for method=full
MARK = "peftlab_full_finetune"  # set on the model by `apply`, read by the checkpoint code


def _no_layer(*args, **kwargs):
    raise RuntimeError("method=full makes no adapter layers")


class FullFineTune(MethodSpec):
    exports_adapter = False
    uses_targets = False
    export_note = "not applicable: method=full trains every weight; the whole model is saved in merged/"

    def check_run(self, run: Any) -> None:
        super().check_run(run)
        if run.train.fsdp:
            fail("train.fsdp", run.train.fsdp, "method=full: peftlab's FSDP shards only a frozen base and full "
                 "fine-tuning freezes nothing; use DDP", "train.fsdp=false")

    def apply(self, model: nn.Module, peft_cfg: Any, method_cfg: Any, model_type: str | None) -> dict:
        for p in model.parameters():
            p.requires_grad_(True)
        setattr(unwrap(model), MARK, True)
        return {}


def is_full(model: nn.Module) -> bool:
    return bool(getattr(unwrap(model), MARK, False))


def full_state(model: nn.Module) -> dict:
    return {STATE_KEY: {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}}


@torch.no_grad()
def load_full_state(model: nn.Module, states: dict, source: str) -> None:
    if STATE_KEY not in states or not is_full(model):
        raise ValueError(f"{source} and this run disagree about method=full (one holds adapters, the other the "
                         f"whole model)")
    unwrap(model).load_state_dict(states[STATE_KEY])


register_method(FullFineTune(name="full", make_layer=_no_layer, inits=("default",), lora_factors=False))
