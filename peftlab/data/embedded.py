"""The embedded default: GSM8K-style synthetic word problems, a byte-level BPE tokenizer and a tiny Llama that
peftlab makes and briefly pretrains itself, so `python run_exp.py` needs no download. Two tasks (``TASKS``):
``arith`` (embedded:arith, the pretraining's own kinds of problems) and ``inventory`` (embedded:inventory, a skill the
pretraining never shows); the model is the same for both, so adding a task leaves the model's cache key alone.

Everything is deterministic and cached under ``$PEFTLAB_CACHE`` (default ``~/.cache/peftlab``) in a folder named
by a version key; a file lock makes concurrent processes (torchrun ranks, array tasks) build it once.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
from contextlib import contextmanager
from pathlib import Path

from ..utils import atomic_dir, atomic_write_text

VERSION = "arith-v3"
SPLIT_SIZES = {"train": 2048, "validation": 256, "test": 256}
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
TINY_MODEL = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, vocab_size=512, tie_word_embeddings=False)
PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR = 600, 32, 3e-3

NAMES = ["Tom", "Anna", "Ben", "Mia", "Leo", "Zoe", "Sam", "Eva", "Max", "Ivy"]
ITEMS = ["apples", "pens", "books", "cards", "coins", "shells", "stickers", "marbles"]


def cache_root() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))


def make_problem(rng: random.Random) -> dict:
    """One word problem in GSM8K's schema: the answer reasons in a line and ends in '#### N'."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if kind == 0:
        q = f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?"
        steps, n = f"{a} + {b} = {a + b}", a + b
    elif kind == 1:
        a, b = max(a, b) + 1, min(a, b)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        steps, n = f"{a} - {b} = {a - b}", a - b
    elif kind == 2:
        a, b = a % 9 + 2, b % 9 + 2
        q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?"
        steps, n = f"{a} * {b} = {a * b}", a * b
    else:
        c = rng.randint(1, a + b - 1)
        q = f"{name} has {a} {item}, finds {b} more and then loses {c}. How many {item} does {name} have?"
        steps, n = f"{a} + {b} - {c} = {a + b - c}", a + b - c
    return {"question": q, "answer": f"{name} has {steps} {item}.\n#### {n}"}


# ---- the second task, "inventory": adaptation is needed ---------------------------------------------------------------
# Numbers written as words, which the pretraining never shows (see pretrain_text; tests/test_inventory.py checks the
# whole corpus), so the base model cannot read them and scores near zero. Two kinds, half each:
#   read:     "Tom has four pens. How many pens does Tom have?" -> "Tom has 4 pens.\n#### 4"
#   one_step: "Tom has 9 pens. Tom loses two. How many pens does Tom have now?" -> "Tom has 9 - 2 = 7 pens.\n#### 7"
# The answers use pretraining's sentence and equation forms, so what must be learnt is reading the words (a map from
# a few character-level tokens to a number token) and small-step arithmetic the tiny model does badly (its base
# accuracy on "n + 1 =" is ~0): knowledge in embeddings and MLPs, where a rank-8 qv LoRA has the least reach.
# Earlier versions, measured with bench/task_accuracy.py (one seed, the default budget): picking one count out of a
# list of four stayed at chance (~27%) even with full fine-tuning (the tiny model does not learn content-based
# retrieval in 128 steps), sums of two counts stayed at ~30%, and with a chain of two word-amount steps
# ("two_steps") full fine-tuning reached 0.99 but LoRA 0.34 (two steps 0.18), below the 0.40.
INVENTORY_VERSION = "inventory-v7"  # part of the data cache folder: change it when the generator changes
INVENTORY_KINDS = ("read", "one_step")  # "two_steps" (a chain of two events) also exists, not in the mix
AMOUNTS = {1: "one", 2: "two"}
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}  # the "read" kind's counts
START = (4, 12)  # the first count; with steps of 1 or 2 every count stays in 1..16


def make_inventory_problem(rng: random.Random) -> dict:
    """One inventory problem in GSM8K's schema, with its kind (for per-kind scores); the count changes (never back
    to the start, so repeating the start is never right) and stays >= 1."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(INVENTORY_KINDS)
    if kind == "read":  # the count itself is a word: no step
        n = rng.choice(list(WORDS))
        return {"question": f"{name} has {WORDS[n]} {item}. How many {item} does {name} have?",
                "answer": f"{name} has {n} {item}.\n#### {n}", "kind": kind}
    n0 = rng.randint(*START)
    while True:
        deltas = [rng.choice([-2, -1, 1, 2]) for _ in range(1 if kind == "one_step" else 2)]
        if sum(deltas) != 0 and n0 + min(0, deltas[0], sum(deltas)) >= 1:
            break
    events, steps, n = [], [], n0
    for d in deltas:
        events.append(f"finds {AMOUNTS[d]} more" if d > 0 else f"loses {AMOUNTS[-d]}")
        steps.append(f"{n} {'+' if d > 0 else '-'} {abs(d)} = {n + d}")
        n += d
    q = (f"{name} has {n0} {item}. {name} {' and then '.join(events)}. How many {item} does {name} have now?")
    return {"question": q, "answer": f"{name} has {', '.join(steps)} {item}.\n#### {n}", "kind": kind}


TASKS = {"arith": make_problem, "inventory": make_inventory_problem}  # embedded:<task>


def pretrain_text(rng: random.Random) -> tuple[str, str]:
    """Related text for pretraining, as (prompt, continuation) tokenised apart as fine-tuning does: the same problems
    in the "Q: ...\nA: " format with a plain-sentence answer (no '#### N' line), and sums."""
    p = make_problem(rng)
    reasoning, final = p["answer"].split("\n#### ")
    if rng.random() < 0.3:
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        # sums end in '#### N' so the answer marker is a known token; the problems never use it in pretraining
        return "", f"{a} + {b} = {a + b}. {max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}.\n#### {a + b}"
    return f"Q: {p['question']}\nA: ", f"{reasoning} The answer is {final}."


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_dataset(task: str = "arith") -> Path:
    """The folder holding a task's train/validation/test .jsonl files (GSM8K schema: question, answer)."""
    if task not in TASKS:
        raise ValueError(f"unknown embedded task {task!r}; allowed: {sorted(TASKS)}")
    make = TASKS[task]
    root = cache_root() / VERSION / ("data" if task == "arith" else f"data-{INVENTORY_VERSION}")
    if (root / "test.jsonl").exists():
        return root
    with _locked(cache_root() / f"{VERSION}.lock"):
        if not (root / "test.jsonl").exists():
            with atomic_dir(root) as tmp:
                for split, n in SPLIT_SIZES.items():
                    rng = random.Random(SPLIT_SEEDS[split])
                    rows = [json.dumps(make(rng)) for _ in range(n)]
                    (tmp / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return root


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="right")


def ensure_model() -> Path:
    """The folder of the pretrained tiny Llama and its tokenizer (``from_pretrained``-loadable)."""
    root = cache_root() / VERSION / "tiny-llama"
    if (root / "config.json").exists():
        return root
    with _locked(cache_root() / f"{VERSION}.lock"):
        if not (root / "config.json").exists():
            with atomic_dir(root) as tmp:
                _build_model(tmp)
    return root


def _build_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(1234)
    corpus = [pretrain_text(rng) for _ in range(PRETRAIN_STEPS * PRETRAIN_BATCH // 4)]
    tok = train_tokenizer([a + b for a, b in corpus] + [make_problem(rng)["answer"] for _ in range(500)],
                          TINY_MODEL["vocab_size"])
    seqs = [tok(a)["input_ids"] + tok(b, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for a, b in corpus]
    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_MODEL, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (1 - s / PRETRAIN_STEPS))
    model.train()
    for step in range(PRETRAIN_STEPS):
        batch = [seqs[(step * PRETRAIN_BATCH + i) % len(seqs)] for i in range(PRETRAIN_BATCH)]
        n = max(map(len, batch))
        ids = torch.tensor([s + [tok.pad_token_id] * (n - len(s)) for s in batch])
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    loss = float(loss.detach())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    atomic_write_text(out / "README.md", f"peftlab's embedded tiny Llama ({VERSION}); final pretraining loss "
                                         f"{loss:.3f} after {PRETRAIN_STEPS} steps.\n")
