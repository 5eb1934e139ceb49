"""The embedded:inventory task: its generator (answers recomputed from the question), determinism, the splits, and a
pretraining corpus that never shows the skill."""
import json
import random
import re

import pytest

from peftlab.data.embedded import (INVENTORY_KINDS, ITEMS, NAMES, PRETRAIN_BATCH, PRETRAIN_STEPS, SPLIT_SIZES,
                                   ensure_dataset, make_inventory_problem, pretrain_text)

QUESTION = re.compile(r"^(\w+) has (\w+) (\w+)\.(?: \1 (.+)\.)? How many \3 does \1 have(?: now)?\?$")
WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def solve(question: str) -> int:
    """The answer from the question alone: the start count (digits or a word) and each event's amount (a word)."""
    name, n0, item, events = QUESTION.match(question).groups()
    n = int(n0) if n0.isdigit() else WORDS[n0]
    for event in (events or "").split(" and then ") if events else []:
        verb, amount = event.split()[:2]
        n += WORDS[amount] if verb == "finds" else -WORDS[amount]
    return n


def test_answers_follow_from_the_question_and_end_in_the_marker():
    rng = random.Random(7)
    kinds = set()
    for _ in range(500):
        p = make_inventory_problem(rng)
        reasoning, final = p["answer"].split("\n#### ")
        m = QUESTION.match(p["question"])
        assert int(final) == solve(p["question"]) and int(final) >= 1
        assert m.group(1) in NAMES and m.group(3) in ITEMS
        equations = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", reasoning)  # one per event, chained
        assert len(equations) == {"read": 0, "one_step": 1, "two_steps": 2}[p["kind"]]
        if p["kind"] == "read":
            assert not m.group(2).isdigit() and reasoning.endswith(f" {final} {m.group(3)}.")
        else:
            assert int(equations[0][0]) == int(m.group(2)) != int(final) and int(equations[-1][3]) == int(final)
        for a, op, b, c in equations:
            assert int(c) == int(a) + (int(b) if op == "+" else -int(b))
        kinds.add(p["kind"])
    assert kinds == set(INVENTORY_KINDS)


def test_deterministic_and_different_from_the_arith_task():
    a = [make_inventory_problem(random.Random(3)) for _ in range(2)]
    assert a == [make_inventory_problem(random.Random(3)) for _ in range(2)]
    root, arith = ensure_dataset("inventory"), ensure_dataset("arith")
    assert root != arith
    rows = {s: [json.loads(l) for l in (root / f"{s}.jsonl").read_text().splitlines()] for s in SPLIT_SIZES}
    assert {s: len(r) for s, r in rows.items()} == SPLIT_SIZES
    assert all(solve(r["question"]) == int(r["answer"].rsplit("#### ", 1)[1]) for r in rows["test"])
    with pytest.raises(ValueError, match=r"unknown embedded task 'nope'; allowed: \['arith', 'inventory'\]"):
        ensure_dataset("nope")


def test_pretraining_never_reads_a_number_word_or_chains_equations():
    """The whole pretraining corpus (same generator, same seed): no number written as a word, no chained equations."""
    rng = random.Random(1234)  # as _build_model
    corpus = [a + b for a, b in (pretrain_text(rng) for _ in range(PRETRAIN_STEPS * PRETRAIN_BATCH // 4))]
    skill = re.compile(r"\b(one|two|three|four|five|six)\b|= \d+, \d+ [+-]")
    assert not any(skill.search(t) for t in corpus)
    p = make_inventory_problem(random.Random(0))
    assert skill.search(p["question"])  # the check can fail: the task's own text trips it
