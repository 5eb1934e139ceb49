"""Length-aware micro-batches: a partition of the global batch, the same number of forwards on every process, less
padding, and the trained adapter of the arrival-order run (1 and 2 processes; dropout 0 so masks cannot differ)."""
import json
import random

import pytest
import torch

from peftlab.data.batching import micro_batches, pack, padded_tokens, plan
from peftlab.data.datasets import Example
from test_train import adapter_tensors, run_cli, run_inproc

EXACT = ["+peft=qv", "++peft.lora_dropout=0", "model.per_device_batch_size=4"]


def lengths_of(n, seed=0):
    rng = random.Random(seed)
    return [rng.randint(3, 60) for _ in range(n)]


@pytest.mark.parametrize("order, max_tokens, world", [("arrival", None, 1), ("length", None, 2), ("length", 150, 1),
                                                      ("arrival", 150, 2), ("length", 100, 3)])
def test_plan_partitions_the_global_batch_with_equal_forwards_per_process(order, max_tokens, world):
    lengths = lengths_of(40)
    indices = random.Random(1).sample(range(40), 24)
    per_rank = plan(indices, lengths, 4, world, order, max_tokens)
    assert len(per_rank) == world and len({len(r) for r in per_rank}) == 1
    flat = [i for r in per_rank for c in r for i in c]
    assert sorted(flat) == sorted(indices)  # every example once: the loss sums the same terms
    for chunk in (c for r in per_rank for c in r if c):
        if max_tokens:
            assert len(chunk) == 1 or len(chunk) * max(lengths[i] for i in chunk) <= max_tokens
        else:
            assert len(chunk) <= 4


def test_arrival_is_the_sampled_order_and_length_sorts_longest_first():
    lengths = lengths_of(12)
    idx = list(range(12))
    arrival = plan(idx, lengths, 3, 2, "arrival")
    assert arrival == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9, 10, 11]]]
    by_len = [i for r in zip(*plan(idx, lengths, 3, 1, "length")) for c in r for i in c]
    assert [lengths[i] for i in by_len] == sorted(lengths, reverse=True)


def test_sorting_and_packing_pad_less_than_arrival_order():
    lengths = lengths_of(400, seed=3)
    arr = srt = pk = 0
    for k in range(0, 384, 32):
        idx = list(range(k, k + 32))
        arr += padded_tokens(plan(idx, lengths, 4, 1, "arrival")[0], lengths)
        srt += padded_tokens(plan(idx, lengths, 4, 1, "length")[0], lengths)
        pk += padded_tokens(pack(idx, lengths, 160), lengths)
    assert srt < arr and pk < arr
    assert sum(lengths[:384]) <= min(srt, pk)


def test_stand_ins_have_no_target_tokens():
    ex = [Example([5, 6, 7, 8], [-100, -100, 7, 8]) for _ in range(3)]
    mine = micro_batches(ex, [0, 1, 2], 1, 1, 2, "length")  # 3 chunks over 2 processes: rank 1 gets one stand-in
    assert len(mine) == 2 and mine[1][0].n_targets == 0 and mine[1][0].input_ids == [5, 6]


def test_bad_values_fail_naming_the_key():
    from peftlab.config import resolve_config
    from peftlab.schema import ConfigError
    from test_config import compose_cfg

    with pytest.raises(ConfigError, match=r"train.micro_batch_order = 'random': allowed: \['length', 'arrival'\]"):
        resolve_config(compose_cfg(["++train.micro_batch_order=random"]))
    with pytest.raises(ConfigError, match="model.max_tokens_per_micro_batch = 0: must be an integer >= 1 or null"):
        resolve_config(compose_cfg(["++model.max_tokens_per_micro_batch=0"]))


def step_gradient(model, examples, indices, world, order, max_tokens, chunk):
    """The trainer's accumulated gradient of one global batch: every process's micro-batches, summed."""
    from peftlab.data.datasets import collate
    from peftlab.loss import loss_sum

    model.zero_grad(set_to_none=True)
    n_targets = sum(examples[i].n_targets for i in indices)
    forwards = set()
    for rank in range(world):
        micros = micro_batches(examples, indices, 4, rank, world, order, max_tokens)
        forwards.add(len(micros))
        for part in micros:
            (loss_sum(model, collate(part, 0), chunk)[0] / n_targets).backward()
    assert len(forwards) == 1  # as many forwards on every process
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_every_order_and_split_gives_the_arrival_order_gradient(tiny_llama):
    """The exactness claim itself: the global batch's gradient does not depend on how it is cut (fp32 rounding)."""
    from omegaconf import OmegaConf

    from peftlab.adapters import apply_adapters

    apply_adapters(tiny_llama, OmegaConf.create({"lora_target_modules": ["q_proj", "v_proj"], "lora_r": 4,
                                                 "lora_alpha": 8, "lora_dropout": 0.0}))
    with torch.no_grad():
        for n, p in tiny_llama.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    rng = random.Random(0)
    examples = []
    for n in lengths_of(40, seed=5):
        ids = [rng.randint(3, 127) for _ in range(n)]
        cut = rng.randint(1, n - 1)
        examples.append(Example(ids, [-100] * cut + ids[cut:]))
    indices = rng.sample(range(40), 24)
    lens = [len(e.input_ids) for e in examples]
    assert any(not c for r in plan(indices, lens, 4, 3, "length", 70) for c in r)  # stand-ins are exercised
    ref = step_gradient(tiny_llama, examples, indices, 1, "arrival", None, 0)
    for world, order, max_tokens, chunk in [(1, "length", None, 1024), (2, "length", None, 3), (1, "arrival", 90, 1024),
                                            (2, "length", 90, 1024), (3, "length", 70, 1024)]:
        got = step_gradient(tiny_llama, examples, indices, world, order, max_tokens, chunk)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=f"{world} {order} {max_tokens}: {n}")


def close_adapters(got, ref, what):
    """Adam divides each gradient entry by its running RMS, so for the few entries with near-zero gradients the fp32
    rounding of differently padded matmuls grows to ~1e-4 of the tensor's scale after some steps; any real
    difference (another batch, a dropped micro-batch, dropout) moves entries by the scale itself."""
    for k in ref:
        scale = float(ref[k].abs().max())
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-3 * scale, msg=f"{what}: {k}")


@pytest.mark.slow
def test_sorted_and_packed_runs_train_the_arrival_order_adapter(tmp_path):
    over = [*EXACT, "train.max_steps=8", "model.eval_epochs=0"]
    runs = {"arrival": ["train.micro_batch_order=arrival"], "length": ["train.micro_batch_order=length"],
            "packed": ["++model.max_tokens_per_micro_batch=200"]}
    summaries = {k: run_inproc(tmp_path / k, [*over, *v]) for k, v in runs.items()}
    ref = adapter_tensors(tmp_path / "arrival")
    assert any(v.abs().max() > 1e-4 for k, v in ref.items() if "lora_B" in k)  # it trained
    for name in ("length", "packed"):
        close_adapters(adapter_tensors(tmp_path / name), ref, name)
        assert summaries[name]["final_train_loss"] == pytest.approx(summaries["arrival"]["final_train_loss"], rel=1e-5)


@pytest.mark.slow
def test_two_processes_sorted_and_packed_equal_one_process_in_arrival_order(tmp_path):
    over = [*EXACT, "train.max_steps=8", "model.eval_epochs=0"]
    one = run_cli(tmp_path / "one", [*over, "train.micro_batch_order=arrival"])
    # a budget that gives an odd number of micro-batches in some steps: stand-ins on one process
    two = run_cli(tmp_path / "two", [*over, "++model.max_tokens_per_micro_batch=300"], nproc=2)
    out1, out2 = one.communicate(timeout=400)[0], two.communicate(timeout=400)[0]
    assert one.returncode == 0, out1
    assert two.returncode == 0, out2
    assert json.loads((tmp_path / "two/summary.json").read_text())["processes"] == 2
    close_adapters(adapter_tensors(tmp_path / "two"), adapter_tensors(tmp_path / "one"), "2 processes")
