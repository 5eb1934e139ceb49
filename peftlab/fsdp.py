"""FSDP for adapter training: shard the frozen base, keep the adapters whole and replicated.

The base weights are where the memory is and they never change, so FSDP (v1) shards them (each decoder layer one
unit, every flat parameter frozen: uniform requires_grad and dtype, so no use_orig_params). The adapter parameters
are left out of FSDP (``ignored_states``): every process holds them whole, their gradients are averaged by one
all-reduce per optimizer step, exactly as DDP would. So method hooks, method optimizers, checkpoints and the adapter
export see whole matrices as without FSDP, and two sharded processes train to the same result as one.

Switched on by ``train.fsdp=full_shard`` (or shard_grad_op / hybrid_shard) under any multi-process launch, or by
launching with an accelerate FSDP config (conf/accelerate/fsdp.yaml), whose sharding strategy is then used.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard")


def sharding_strategy(setting, accelerator) -> str | None:
    """The strategy name to shard with, or None. ``setting`` is train.fsdp (null/false: off unless accelerate was
    launched with an FSDP config, true: full_shard)."""
    if setting is True:
        setting = "full_shard"
    if setting in (None, False):
        if accelerator.distributed_type.name != "FSDP":
            return None
        setting = accelerator.state.fsdp_plugin.sharding_strategy.name.lower()
    setting = str(setting).lower()
    if setting not in STRATEGIES:
        raise ValueError(f"unknown train.fsdp {setting!r}; allowed: false, true, {list(STRATEGIES)}")
    return setting


def decoder_layer_classes(model: nn.Module) -> set[type]:
    """The model's own repeated block classes (transformers' ``_no_split_modules``): one FSDP unit each."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"cannot shard {type(model).__name__} with FSDP: it names no decoder layer class "
                         "(_no_split_modules); train it with DDP (leave train.fsdp unset)")
    return classes


def adapter_owned_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter an adapter layer holds outside its base module, trained or not: the state that method hooks
    read and rewrite, so it stays whole. (FSDP never shards buffers: Rotational PiSSA's U, V and its NF4 residual
    stay whole too.)"""
    from .adapters import adapter_layers

    layers = adapter_layers(model).values()
    base = {id(p) for layer in layers for p in layer.base.parameters()}
    return [p for layer in layers for p in layer.parameters() if id(p) not in base]


def shard_frozen_base(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """Wrap ``model`` in FSDP over the base model's parameters; the adapters' stay plain, whole parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    adapters = adapter_owned_parameters(model)
    owned = {id(p) for p in adapters}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    if stray:  # they would be flattened with frozen weights and trained by nobody's all-reduce
        raise ValueError(f"train.fsdp shards every parameter outside the adapters, but these train too: {stray[:4]}")
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=decoder_layer_classes(model))
    # every process loaded the same weights and ran the same (seeded) init: nothing to broadcast, which also lets
    # FSDP run on CPU processes (its sync_module_states needs a GPU)
    return FSDP(model, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy[strategy.upper()],
                ignored_states=adapters, device_id=torch.device("cpu") if device.type == "cpu" else device,
                sync_module_states=False, use_orig_params=False)


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """DDP's gradient averaging for the parameters FSDP leaves alone: one all-reduce over all of them."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, torch.split(flat, [g.numel() for g in grads])):
        p.grad = g.view_as(p).to(p.dtype)
