"""eval_gsm8k end to end on the embedded tiny model: batched generations equal an unbatched reference, stop strings,
run folders (adapter unmerged/merged, merged folder), few-shot prompts, sharding plans, re-scoring, wandb summary,
bad input, and two torchrun processes equal one."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from peftlab.eval.gsm8k import (STOPS, fewshot_shots, generate, log_wandb, main, parse_args, plan_batches,
                                prompt_template, resolve_format, resolve_source, truncate_at_stops)

ROOT = Path(__file__).resolve().parents[1]
LIMIT, NEW = 16, 40


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def evaluate(out_dir, *args):
    res = main([*args, "--max_new_tokens", str(NEW), "--output_dir", str(out_dir), "--wandb_mode", "disabled"])
    return res, read_jsonl(Path(out_dir) / "predictions.jsonl")


@torch.no_grad()
def reference(model, tok, questions, template="Q: {question}\nA: ", stops=STOPS["lora_one"]):
    """Plain one-at-a-time greedy generation: no padding, no batching, no stop criteria (cut afterwards)."""
    outs = []
    for q in questions:
        enc = tok(template.format(question=q), return_tensors="pt")
        seq = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
        outs.append(truncate_at_stops(tok.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True), stops))
    return outs


@pytest.fixture(scope="module")
def test_file(embedded_data_dir):
    return embedded_data_dir / "test.jsonl"


@pytest.fixture(scope="module")
def base_model(embedded_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(embedded_model_dir).eval(), AutoTokenizer.from_pretrained(
        embedded_model_dir)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, embedded_model_dir, test_file):
    out = tmp_path_factory.mktemp("base_eval")
    res, rows = evaluate(out, "--model", str(embedded_model_dir), "--data", str(test_file), "--limit", str(LIMIT),
                         "--batch_size", "5")
    return res, rows, out


def test_end_to_end_outputs(base_run, test_file):
    res, rows, out = base_run
    data = read_jsonl(test_file)[:LIMIT]
    assert [r["index"] for r in rows] == list(range(LIMIT))  # dataset order restored after the length sort
    assert [r["question"] for r in rows] == [d["question"] for d in data]
    assert {"question", "gold", "generation", "extracted_strict", "extracted_flexible", "correct_strict",
            "correct_flexible"} <= set(rows[0])
    assert [r["gold"] for r in rows] == [int(d["answer"].rsplit("#### ", 1)[1]) for d in data]
    # the embedded model was pretrained to answer "... The answer is N.": it solves some, and strict finds its marker
    assert res["correct_flexible"] >= 1 and res["no_strict_answer"] == 0
    assert res["accuracy_strict"] == sum(r["correct_strict"] for r in rows) / LIMIT
    assert json.loads((out / "results.json").read_text())["accuracy_flexible"] == res["accuracy_flexible"]
    assert res["n"] == LIMIT and res["processes"] == 1 and res["examples_per_s"] > 0 and res["hit_max_new_tokens"] == 0


def test_batched_generations_equal_one_at_a_time_reference(base_run, base_model):
    _, rows, _ = base_run
    model, tok = base_model
    assert [r["generation"] for r in rows] == reference(model, tok, [r["question"] for r in rows])


def test_rescoring_reproduces_and_tracks_edits(base_run, tmp_path):
    res, rows, out = base_run
    again = main(["--score", str(out / "predictions.jsonl")])
    for k in ("n", "accuracy_strict", "accuracy_flexible"):
        assert again[k] == res[k]
    assert again["changed_strict"] == again["changed_flexible"] == 0
    # a wrong answer rewritten without a marker: flexible gains exactly one example, strict loses nothing
    wrong = next(i for i, r in enumerate(rows) if not r["correct_flexible"])
    edited = [dict(r) for r in rows]
    edited[wrong]["generation"] = f"so in the end {edited[wrong]['gold']} of them."
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    new = main(["--score", str(tmp_path), "--output_dir", str(tmp_path / "rescored")])
    assert new["correct_flexible"] == res["correct_flexible"] + 1 and new["changed_flexible"] == 1
    assert new["correct_strict"] == res["correct_strict"] - bool(rows[wrong]["correct_strict"])
    assert json.loads((tmp_path / "rescored/results.json").read_text())["correct_flexible"] == new["correct_flexible"]


def test_stop_strings_cut_generations(base_run, tmp_path, embedded_model_dir, test_file):
    _, rows, _ = base_run
    res, cut = evaluate(tmp_path, "--model", str(embedded_model_dir), "--data", str(test_file), "--limit",
                        str(LIMIT), "--batch_size", "8", "--stop", "The answer")
    assert [c["generation"] for c in cut] == [r["generation"].split("The answer")[0] for r in rows]
    assert res["no_strict_answer"] == LIMIT and res["accuracy_strict"] == 0  # the marker itself was cut away
    assert res["stop"] == ["The answer"]


def test_plan_batches_shard_the_one_process_batches():
    lengths = [int(x) for x in torch.randint(1, 50, (37,), generator=torch.Generator().manual_seed(0))]
    one = plan_batches(lengths, 5)
    assert sorted(i for _, idx in one for i in idx) == list(range(37))
    flat = [lengths[i] for _, idx in one for i in idx]
    assert flat == sorted(flat, reverse=True)  # longest first, so batches hold similar lengths
    for world in (2, 3, 4):
        shards = [plan_batches(lengths, 5, r, world) for r in range(world)]
        assert sorted(b for s in shards for b in s) == one  # the same batches, each exactly once
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_sampling_shards_equal_one_process(base_model, test_file):
    model, tok = base_model
    a = parse_args(["--model", "x", "--temperature", "1.0", "--top_p", "0.9", "--max_new_tokens", "24", "--seed",
                    "3"])
    prompts = [f"Q: {r['question']}\nA: " for r in read_jsonl(test_file)[:10]]
    lengths = [len(ids) for ids in tok(prompts)["input_ids"]]
    one = generate(model, tok, prompts, plan_batches(lengths, 3), a, STOPS["lora_one"], show=False)
    two = {}
    for rank in range(2):
        two.update(generate(model, tok, prompts, plan_batches(lengths, 3, rank, 2), a, STOPS["lora_one"], False))
    assert two == one
    greedy = generate(model, tok, prompts, plan_batches(lengths, 3), parse_args(["--model", "x", "--max_new_tokens",
                                                                                 "24"]), STOPS["lora_one"], False)
    assert [one[i]["generation"] for i in range(10)] != [greedy[i]["generation"] for i in range(10)]  # it did sample


def make_run_folder(root, embedded_model_dir, merged=False):
    """A peftlab-style run folder: adapter/ saved by PEFT (random, non-zero B) and .hydra/config.yaml."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).eval()
    model.save_pretrained(root / "adapter")
    (root / ".hydra").mkdir(parents=True)
    # ${hydra:...} cannot be resolved outside Hydra; the evaluator must not need it
    (root / ".hydra/config.yaml").write_text('run_dir: ${hydra:runtime.output_dir}\nmodel:\n  name: embedded:tiny-llama'
                                             '\n  dtype: float32\ndataset:\n  path: embedded:arith\n  prompt: "Q: '
                                             '{query}\\nA: "\n')
    if merged:
        import copy

        copy.deepcopy(model).merge_and_unload().save_pretrained(root / "merged")
        AutoTokenizer.from_pretrained(embedded_model_dir).save_pretrained(root / "merged")
    return model


def test_run_folder_adapter_and_merged(tmp_path, embedded_model_dir, base_run, base_model):
    run = tmp_path / "run"
    peft_model = make_run_folder(run, embedded_model_dir)
    _, tok = base_model
    # no --data: a run trained on the embedded task is scored on its test split; the format comes from the run
    res, rows = evaluate(tmp_path / "unmerged", "--run_dir", str(run), "--limit", "8", "--no_merge")
    assert res["model"] == "embedded:tiny-llama" and res["adapter"] == str(run / "adapter")
    assert res["data"].endswith("test.jsonl") and res["prompt_format"] == "lora_one" and not res["merged_adapter"]
    assert [r["generation"] for r in rows] == reference(peft_model, tok, [r["question"] for r in rows])
    assert [r["generation"] for r in rows] != [r["generation"] for r in base_run[1][:8]]  # the adapter is applied
    # default: the adapter merged in memory; a merged/ folder gives the same weights, hence the same generations
    res_m, rows_m = evaluate(tmp_path / "merged_in_memory", "--run_dir", str(run), "--limit", "8")
    run2 = tmp_path / "run2"
    make_run_folder(run2, embedded_model_dir, merged=True)
    res_f, rows_f = evaluate(tmp_path / "merged_folder", "--model", str(run2), "--limit", "8")  # run folder as --model
    assert res_m["merged_adapter"] and res_f["model"] == str(run2 / "merged") and res_f["adapter"] is None
    assert [r["generation"] for r in rows_f] == [r["generation"] for r in rows_m]
    # without --output_dir a run's results land in <run>/eval, where the sweep report looks
    main(["--run_dir", str(run), "--limit", "2", "--max_new_tokens", "8", "--wandb_mode", "disabled"])
    assert json.loads((run / "eval/results.json").read_text())["n"] == 2
    # --adapter alone takes its base from adapter_config.json
    src = resolve_source(parse_args(["--adapter", str(run / "adapter")]))
    assert Path(src["path"]) == Path(embedded_model_dir) and src["adapter"] == str(run / "adapter")


def test_fewshot_prompts(embedded_data_dir, tmp_path, embedded_model_dir):
    train = read_jsonl(embedded_data_dir / "train.jsonl")
    a = parse_args(["--model", "x", "--data", str(embedded_data_dir), "--prompt_format", "fewshot", "--num_fewshot",
                    "3"])
    shots, source = fewshot_shots(a)
    assert source.endswith("train.jsonl") and len(shots) == 3 and shots == fewshot_shots(a)[0]  # fixed sample
    assert all({"question": q, "answer": ans} in train for q, ans in shots)
    t = prompt_template("fewshot", shots)
    assert t.count("Question:") == 4 and t.endswith("\n\nQuestion: {question}\nAnswer:")
    assert t.startswith(f"Question: {shots[0][0]}\nAnswer: {shots[0][1]}\n\nQuestion: {shots[1][0]}")
    # a lone file without a train split beside it: the built-in shots (or an error when train shots were demanded)
    lone = tmp_path / "lone" / "mine.jsonl"
    lone.parent.mkdir()
    lone.write_text((embedded_data_dir / "test.jsonl").read_text())
    assert fewshot_shots(parse_args(["--model", "x", "--data", str(lone), "--num_fewshot", "8"]))[1] == "builtin"
    with pytest.raises(ValueError, match="fewshot_source train"):
        fewshot_shots(parse_args(["--model", "x", "--data", str(lone), "--fewshot_source", "train"]))
    with pytest.raises(ValueError, match="built-in shots"):
        fewshot_shots(parse_args(["--model", "x", "--data", str(lone), "--num_fewshot", "9"]))
    res, rows = evaluate(tmp_path / "fs", "--model", "embedded:tiny-llama", "--data", "embedded", "--limit", "4",
                         "--prompt_format", "lm-eval", "--num_fewshot", "2")
    assert res["prompt_format"] == "fewshot" and res["fewshot_source"].endswith("train.jsonl")
    assert res["prompt_template"].count("Question:") == 3 and not any("Question:" in r["generation"] for r in rows)


def test_prompt_formats():
    assert resolve_format("lorAone", None) == "lora_one" and resolve_format("alpaca", None) == "metamath"
    assert prompt_template("lora_one") == "Q: {question}\nA: "
    assert prompt_template("metamath").endswith("Instruction:\n{question}\n\n### Response: Let's think step by step.")
    custom = "Problem: {question}\nSolution:"
    assert resolve_format(custom, None) == custom and prompt_template(custom) == custom
    with pytest.raises(ValueError, match="allowed"):
        resolve_format("bogus", None)
    assert parse_args(["--model", "m", "--stop", "\\nQ:", "#"]).stop == ["\nQ:", "#"]  # '\n' typed in a shell
    assert parse_args(["--model", "m", "--stop"]).stop == []  # no stop strings at all


def test_wandb_summary(monkeypatch, base_run, capsys):
    res, rows, _ = base_run
    calls = {}

    class Run:
        summary = {}

        def log(self, d):
            calls["log"] = d

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.setdefault("init", kw) and Run(),
                                 Table=lambda columns, data: ("table", columns, len(data)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    a = parse_args(["--model", "x", "--wandb_project", "p", "--wandb_name", "n", "--wandb_mode", "offline"])
    log_wandb(a, res, rows)
    assert calls["init"]["project"] == "p" and calls["init"]["name"] == "n" and calls["init"]["mode"] == "offline"
    assert Run.summary["gsm8k/accuracy_flexible"] == res["accuracy_flexible"] and calls["finished"]
    assert calls["log"]["gsm8k/predictions"][2] == len(rows) and calls["init"]["config"]["model"] == res["model"]
    fake.init = lambda **kw: 1 / 0  # a wandb outage warns; the results are on disk already
    log_wandb(a, res, rows)
    assert "wandb logging failed" in capsys.readouterr().out


def test_bad_input_fails_clearly(tmp_path, embedded_data_dir):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        main(["--model", "embedded:tiny-llama", "--data", str(tmp_path / "nope.jsonl"), "--wandb_mode", "disabled"])
    with pytest.raises(FileNotFoundError, match="has no dev"):
        main(["--model", "embedded:tiny-llama", "--data", str(embedded_data_dir), "--split", "dev"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "solution": "1"}) + "\n")
    with pytest.raises(ValueError, match="needs fields 'question' and 'answer'"):
        main(["--model", "embedded:tiny-llama", "--data", str(bad)])
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished peftlab run"):
        main(["--run_dir", str(tmp_path / "empty_run")])
    with pytest.raises(ValueError, match="allowed"):
        main(["--model", "embedded:tiny-llama", "--prompt_format", "chat"])
    (tmp_path / "p.jsonl").write_text(json.dumps({"index": 0, "answer": "#### 1"}) + "\n")
    with pytest.raises(ValueError, match="no 'generation'"):
        main(["--score", str(tmp_path / "p.jsonl")])
    for argv in (["--data", "x.jsonl"], ["--model", "m", "--batch_size", "0"], ["--run_dir", "r", "--adapter", "a"],
                 ["--model", "m", "--top_p", "0"]):
        with pytest.raises(SystemExit):
            main(argv)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, test_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = ["--model", "embedded:tiny-llama", "--data", str(test_file), "--limit", "13", "--batch_size", "3",
            "--max_new_tokens", "32"]
    for n in (1, 2):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                              str(ROOT / "eval_gsm8k.py"), *args, "--output_dir", str(tmp_path / str(n))],
                             env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
    p1, p2 = read_jsonl(tmp_path / "1/predictions.jsonl"), read_jsonl(tmp_path / "2/predictions.jsonl")
    assert [r["index"] for r in p2] == list(range(13))  # none dropped, none twice
    assert p1 == p2  # identical rows: generations, extractions, correctness
    r1, r2 = (json.loads((tmp_path / f"{n}/results.json").read_text()) for n in (1, 2))
    assert (r1["accuracy_strict"], r1["accuracy_flexible"]) == (r2["accuracy_strict"], r2["accuracy_flexible"])
    assert r1["processes"] == 1 and r2["processes"] == 2
