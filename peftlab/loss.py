"""The training loss: summed next-token cross-entropy over the answer tokens (labels != -100), in fp32.

The plain way (``token_loss_sum``) applies the LM head to every position and upcasts the logits: at Llama-3's
vocabulary (128,256) a micro-batch of 4 x 1024 tokens holds 2.1 GB of fp32 logits plus their gradient.
``loss_sum`` instead swaps the model's output head, for the duration of one forward, for a module that selects the
answer positions (the only ones with a loss) and applies the real head and the cross-entropy to ``chunk`` of them at a
time under non-reentrant activation checkpointing: the backward recomputes each chunk's logits, so at most one chunk's
logits live at a time. The swap happens inside the model's own forward, so DDP / FSDP wrappers, autocast and an
adapted head (LoRA on lm_head) work unchanged. The sum equals the plain one to fp32 rounding (tests).

Families whose forward post-processes the head's output (Gemma 2's final-logit softcapping, Cohere's logit scale, ...)
would turn the loss into nonsense, so only the families listed in ``CHUNKABLE`` (their forward returns
``self.lm_head(hidden_states)`` as is, checked in transformers' source) take the chunked path; others take the plain
one. Callers that need the logits themselves (teacher alignment on logits) ask for the plain path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# model_type values whose CausalLM forward returns the output head's result unchanged
CHUNKABLE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt2", "phi3", "gemma")
DEFAULT_CHUNK = 1024


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over target tokens of full logits, in fp32 (the plain path)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def _chunk_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _LossHead(nn.Module):
    """Stands in for the output head during one forward: computes the loss sum and keeps it in ``result``."""

    def __init__(self, head: nn.Module, labels: torch.Tensor, chunk: int):
        super().__init__()
        self.head, self.labels, self.chunk = head, labels, chunk
        self.result = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.labels[:, 1:] != -100
        h = hidden[:, :-1][mask]  # answer positions only: the head never sees the prompt or the padding
        t = self.labels[:, 1:][mask]
        total = None
        # at least one (possibly empty) chunk: every head parameter then takes a (zero) gradient, as DDP expects
        for i in range(0, max(len(t), 1), self.chunk):
            part = checkpoint(_chunk_ce, self.head, h[i:i + self.chunk], t[i:i + self.chunk], use_reentrant=False)
            total = part if total is None else total + part
        self.result = total
        return total


def head_slot(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(module holding the output head, attribute name) when the chunked path applies to this model, else None."""
    from .adapters import unwrap

    inner = unwrap(model)
    cfg = getattr(inner, "config", None)
    if getattr(cfg, "model_type", None) not in CHUNKABLE or getattr(cfg, "final_logit_softcapping", None):
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    name = next((n for n, c in inner.named_children() if c is head and head is not None), None)
    return (inner, name) if name else None


def loss_sum(model: nn.Module, batch: dict, chunk: int | None = DEFAULT_CHUNK, **forward_kwargs):
    """(summed answer-token cross-entropy in fp32, the model's output) for one batch. ``chunk``: answer positions
    per head application (0 or None: the plain path, whose output keeps the full logits). With the chunked path the
    output's ``logits`` is not the logits (the loss sum stands there)."""
    slot = head_slot(model) if chunk else None
    if slot is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **forward_kwargs)
        return token_loss_sum(out.logits, batch["labels"]), out
    inner, name = slot
    head = getattr(inner, name)
    stand_in = _LossHead(head, batch["labels"], int(chunk))
    setattr(inner, name, stand_in)
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **forward_kwargs)
    finally:
        setattr(inner, name, head)
    return stand_in.result, out
