"""How one global batch is cut into micro-batches and shared over processes.

The loss is the summed token loss of the whole global batch over its global target-token count (train.py), so ANY
regrouping of the global batch's examples into micro-batches gives the same gradient (up to fp32 summation order);
only the padding, hence the time and memory, changes. Three orders (``train.micro_batch_order``):

- ``arrival``: chunks of ``per_device`` examples in the sampled order (what HF Trainer does without group_by_length);
- ``length`` (the default): the global batch sorted by length (longest first) before the cut, so each micro-batch
  holds examples of similar length and pads little;
- with ``model.max_tokens_per_micro_batch`` set (either order): sorted, then packed greedily into micro-batches whose
  padded size (examples x longest) stays within the budget; an example longer than the budget goes alone.

Micro-batch j goes to process j % world. Every process does the same number of forward passes (FSDP's forwards are
collective and DDP syncs on the last backward): a process short of work gets stand-ins, a 2-token copy of an example
with no target tokens, whose loss is exactly 0.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from .datasets import Example

Lengths = Sequence[int] | Mapping[int, int]  # example index -> tokens

ORDERS = ("length", "arrival")


def by_length(indices: list[int], lengths: Lengths) -> list[int]:
    """Longest first; ties keep the sampled order (a stable sort), so the plan is the same on every process."""
    return sorted(indices, key=lambda i: -lengths[i])


def pack(indices: list[int], lengths: Lengths, max_tokens: int) -> list[list[int]]:
    """Greedy: walking longest first, a micro-batch takes the next example while (count + 1) x its longest stays
    within max_tokens (the first example is its longest)."""
    chunks: list[list[int]] = []
    for i in by_length(indices, lengths):
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= max_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def plan(indices: list[int], lengths: Lengths, per_device: int, world: int, order: str = "length",
         max_tokens: int | None = None) -> list[list[list[int]]]:
    """Per process, its micro-batches as example indices; all processes get as many (an empty list is a stand-in)."""
    if max_tokens:
        chunks = pack(indices, lengths, max_tokens)
    else:
        ordered = by_length(indices, lengths) if order == "length" else list(indices)
        chunks = [ordered[i:i + per_device] for i in range(0, len(ordered), per_device)]
    chunks += [[] for _ in range(-len(chunks) % world)]
    return [chunks[r::world] for r in range(world)]


def stand_in(example: Example) -> Example:
    """A 2-token input with no target token: a forward and backward through every layer whose loss is 0."""
    ids = example.input_ids[:2]
    return Example(ids, [-100] * len(ids))


def micro_batches(examples: list[Example], indices: list[int], per_device: int, rank: int, world: int,
                  order: str = "length", max_tokens: int | None = None) -> list[list[Example]]:
    """This process's micro-batches of the global batch ``indices`` (examples, stand-ins included)."""
    lengths = {i: len(examples[i].input_ids) for i in indices}
    mine = plan(indices, lengths, per_device, world, order, max_tokens)[rank]
    return [[examples[i] for i in idx] if idx else [stand_in(examples[indices[0]])] for idx in mine]


def padded_tokens(chunks: list[list[int]], lengths: Lengths) -> int:
    """Tokens computed when each chunk is padded to its longest (the cost the orders differ in)."""
    return sum(len(c) * max(lengths[i] for i in c) for c in chunks if c)
