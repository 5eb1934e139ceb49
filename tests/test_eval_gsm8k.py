"""eval_gsm8k: answer extraction (including the cases peers get wrong), end to end on the embedded model, run folders,
re-scoring, and two processes equal one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.eval.extract import extract_flexible, extract_strict, gold_answer, parse_number, same_number
from peftlab.eval.gsm8k import build_prompt, main, truncate_at_stops

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, strict, flexible", [
    ("She has 3 + 4 = 7 apples.\n#### 7", 7, 7),
    ("#### -12", -12, -12),  # negatives
    ("The total is 1,000 dollars.\n#### 1,000", 1000, 1000),  # thousands separators
    ("#### 1,234,567", 1234567, 1234567),
    ("The answer is: 3.50", 3.5, 3.5),  # decimals compare numerically
    ("So it costs $5.\nThe answer is $5.", 5, 5),  # currency sign and trailing period
    ("The answer is: 18.", 18, 18),
    ("The final answer is 42", 42, 42),
    ("The final answer is: -0.25", -0.25, -0.25),
    ("\\boxed{\\frac{3}{4}}", 0.75, 0.75),  # LaTeX fractions
    ("The answer is 3/4", 0.75, 0.75),
    ("so the result is \\boxed{-7}.", -7, -7),
    ("The answer is 45%", 45, 45),
    ("He earns 18 dollars per hour, so in 2 hours 36 dollars.", None, 36),  # the flexible fallback: last number
    ("#### 12\nQuestion: then 99 more", 12, 12),  # an answer followed by other numbers
    ("no numbers here", None, None),
    ("It is -$4 in the end", None, -4),
])
def test_extraction(text, strict, flexible):
    s, f = extract_strict(text), extract_flexible(text)
    assert (s is None) if strict is None else same_number(s, strict), s
    assert (f is None) if flexible is None else same_number(f, flexible), f


def test_gold_and_numbers():
    assert gold_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == 72
    assert gold_answer("#### 1,080") == 1080
    assert parse_number("$1,000.50") == 1000.5 and parse_number("-3") == -3 and parse_number("abc") is None
    assert same_number(3.5, 3.50) and not same_number(3.5, 3.51) and not same_number(None, 1)


def test_prompts_and_stops():
    assert build_prompt("What?", "lora_one", 0) == "Q: What?\nA: "
    fs = build_prompt("What?", "fewshot", 2)
    assert fs.count("Question:") == 3 and fs.endswith("Question: What?\nAnswer:")
    assert truncate_at_stops("#### 5\nQ: next", ["\nQ:"]) == "#### 5"


@pytest.fixture(scope="module")
def test_file(embedded_data_dir):
    return embedded_data_dir / "test.jsonl"


def test_end_to_end_on_the_embedded_model_and_rescoring(tmp_path, test_file):
    res = main(["--model", "embedded:tiny-llama", "--data", str(test_file), "--limit", "12", "--batch_size", "5",
                "--max_new_tokens", "40", "--output_dir", str(tmp_path), "--wandb_mode", "disabled"])
    assert res["n"] == 12 and 0 <= res["accuracy_strict"] <= res["accuracy_flexible"] <= 1
    rows = [json.loads(l) for l in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(12))
    assert {"question", "gold", "generation", "extracted_strict", "correct_flexible"} <= set(rows[0])
    assert json.loads((tmp_path / "results.json").read_text())["accuracy_flexible"] == res["accuracy_flexible"]
    again = main(["--score", str(tmp_path / "predictions.jsonl")])
    assert again["accuracy_strict"] == res["accuracy_strict"] and again["accuracy_flexible"] == res["accuracy_flexible"]
    # batching does not change greedy results
    one = main(["--model", "embedded:tiny-llama", "--data", str(test_file), "--limit", "12", "--batch_size", "1",
                "--max_new_tokens", "40", "--output_dir", str(tmp_path / "b1"), "--wandb_mode", "disabled"])
    assert one["accuracy_flexible"] == res["accuracy_flexible"]


def test_run_folder_with_adapter(tmp_path, test_file):
    from test_train import run_inproc

    run_inproc(tmp_path / "run", ["train.max_steps=30"])
    res = main(["--run_dir", str(tmp_path / "run"), "--data", str(test_file), "--limit", "8", "--max_new_tokens", "40",
                "--wandb_mode", "disabled"])
    assert res["adapter"].endswith("adapter") and res["model"].endswith("tiny-llama")
    assert (tmp_path / "run/eval/results.json").exists()


def test_bad_input_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        main(["--model", "embedded:tiny-llama", "--data", str(tmp_path / "nope.jsonl"), "--wandb_mode", "disabled"])
    with pytest.raises(SystemExit):
        main(["--data", "x.jsonl"])


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, test_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = ["--model", "embedded:tiny-llama", "--data", str(test_file), "--limit", "13", "--batch_size", "4",
            "--max_new_tokens", "32"]
    for n in (1, 2):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                              str(ROOT / "eval_gsm8k.py"), *args, "--output_dir", str(tmp_path / str(n))],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    p1 = [json.loads(l) for l in (tmp_path / "1/predictions.jsonl").read_text().splitlines()]
    p2 = [json.loads(l) for l in (tmp_path / "2/predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in p2] == list(range(13))  # none dropped, none twice
    assert [r["generation"] for r in p1] == [r["generation"] for r in p2]
    r1 = json.loads((tmp_path / "1/results.json").read_text())
    r2 = json.loads((tmp_path / "2/results.json").read_text())
    assert r1["accuracy_flexible"] == r2["accuracy_flexible"] and r2["processes"] == 2
