"""Datasets: the real schemas from local files, label masking, caching and clear errors."""
import json

import pytest
from omegaconf import OmegaConf

from peftlab.config import load_group
from peftlab.data.datasets import collate, tokenize, train_eval_examples
from peftlab.models import load_tokenizer

ROWS = {
    "meta_math": {"query": "What is 2 + 3?", "response": "2 + 3 = 5.\nThe answer is: 5", "type": "GSM_AnsAug"},
    "gsm8k": {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    "code_feedback": {"query": "Write add(a, b).", "answer": "def add(a, b):\n    return a + b"},
}


@pytest.fixture(scope="module")
def tok(embedded_model_dir):
    return load_tokenizer(str(embedded_model_dir))


def ds_cfg(name, path, **kw):
    cfg = load_group("dataset", name)
    cfg.path = str(path)
    cfg.eval_split = None
    cfg.eval_samples = kw.pop("eval_samples", 2)
    return OmegaConf.merge(cfg, kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", sorted(ROWS))
def test_real_schemas_from_local_files(tmp_path, tok, name):
    f = write_jsonl(tmp_path / f"{name}.jsonl", [ROWS[name]] * 6)
    train, evals = train_eval_examples(ds_cfg(name, f), tok, 128)
    assert len(train) == 4 and len(evals) == 2
    ex = train[0]
    prompt_len = next(i for i, t in enumerate(ex.labels) if t != -100)
    prompt = tok.decode(ex.input_ids[:prompt_len], skip_special_tokens=True)
    assert prompt.startswith("Q: ") and prompt.endswith("\nA: ")
    if name == "alpaca":
        assert "Add the numbers.\n2 and 3" in prompt  # input appended to the instruction
    assert ex.labels[-1] == tok.eos_token_id and ex.input_ids[-1] == tok.eos_token_id


def test_parquet_file(tmp_path, tok):
    import pandas as pd

    f = tmp_path / "g.parquet"
    pd.DataFrame([ROWS["gsm8k"]] * 5).to_parquet(f)
    train, evals = train_eval_examples(ds_cfg("gsm8k", f), tok, 64)
    assert len(train) == 3 and len(evals) == 2


def test_labels_mask_exactly_the_prompt(tok):
    ex = tokenize("Q: a\nA: ", "b c", tok, 64)
    p = tok("Q: a\nA: ")["input_ids"]
    r = tok("b c", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == p + r + [tok.eos_token_id]
    assert ex.labels == [-100] * len(p) + r + [tok.eos_token_id]
    assert ex.n_targets == len(r) + 1


def test_truncation_and_prompt_only_rows(tok):
    n_prompt = len(tok("Q: a\nA: ")["input_ids"])
    ex = tokenize("Q: a\nA: ", "one two three four five six seven", tok, n_prompt + 3)
    assert len(ex.input_ids) == n_prompt + 3 == len(ex.labels) and ex.n_targets == 3
    assert tokenize("Q: " + "long " * 50 + "\nA: ", "x", tok, 8) is None


def test_collate_pads_right_and_masks_labels(tok):
    a, b = tokenize("Q: a\nA: ", "b", tok, 64), tokenize("Q: a b c\nA: ", "d e f", tok, 64)
    batch = collate([a, b], tok.pad_token_id)
    n = len(a.input_ids)
    assert batch["attention_mask"][0].sum() == n and (batch["labels"][0, n:] == -100).all()
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()


def test_missing_file_names_it(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        train_eval_examples(ds_cfg("gsm8k", tmp_path / "nope.jsonl"), tok, 64)


def test_row_without_field_names_row_and_fields(tmp_path, tok):
    f = write_jsonl(tmp_path / "bad.jsonl", [ROWS["gsm8k"], ROWS["gsm8k"], {"question": "q", "solution": "s"}])
    with pytest.raises(ValueError, match=r"bad.jsonl line 3: no field 'answer'.*found \['question', 'solution'\]"):
        train_eval_examples(ds_cfg("gsm8k", f), tok, 64)


def test_tokenized_cache_is_keyed_by_file_content(tmp_path, tok):
    f = write_jsonl(tmp_path / "g.jsonl", [ROWS["gsm8k"]] * 4)
    cfg = ds_cfg("gsm8k", f)
    assert len(train_eval_examples(cfg, tok, 64)[0]) == 2
    write_jsonl(f, [ROWS["gsm8k"]] * 7)
    assert len(train_eval_examples(cfg, tok, 64)[0]) == 5
