"""Shared bench helpers: medians over repeats (interleaved when comparing), Llama-shaped random models, the machine,
JSON results in bench/results/."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from peftlab.utils import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, list]:
    """Every repeat runs each function once, in a rotated order, so that a change of machine load hits all alike;
    returns the per-repeat seconds of each (take the median)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for rep in range(repeats):
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(timed(fns[n]))
    return times


def status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process image; ru_maxrss would carry the parent's peak across exec."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024


def held_mb() -> float:
    """RSS after giving freed heap back to the OS (else glibc keeps freed buffers, e.g. weights
    replaced by NF4 or by FSDP's shards, and RSS shows what was ever allocated rather than what is live)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status_mb("VmRSS")


def llama_config(hidden: int = 512, layers: int = 4, vocab: int = 2048, intermediate: int | None = None,
                 heads: int | None = None, kv_heads: int | None = None, max_positions: int = 4096):
    from transformers import LlamaConfig

    heads = heads or max(1, hidden // 64)
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or int(hidden * 8 / 3) // 64 * 64,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                       vocab_size=vocab, max_position_embeddings=max_positions)


def llama(hidden: int = 512, layers: int = 4, vocab: int = 2048, dtype=torch.float32, seed: int = 0, **config):
    """A Llama-shaped causal LM with random weights (seeded)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(hidden, layers, vocab, **config)).to(dtype)


def write(name: str, payload: dict) -> Path:
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path
