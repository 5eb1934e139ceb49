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

from peftlab.eval.gsm8k import (STOPS, apply_run_defaults, fewshot_shots, generate, log_wandb, main, parse_args,
                                plan_batches, prompt_template, resolve_format, resolve_source, truncate_at_stops)

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
                                 Table=lambda columns, data: ("table", columns, len(data)),
                                 teardown=lambda: calls.setdefault("teardown", True))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    a = parse_args(["--model", "x", "--wandb_project", "p", "--wandb_name", "n", "--wandb_mode", "offline"])
    log_wandb(a, res, rows)
    assert calls["init"]["project"] == "p" and calls["init"]["name"] == "n" and calls["init"]["mode"] == "offline"
    assert Run.summary["gsm8k/accuracy_flexible"] == res["accuracy_flexible"] and calls["finished"]
    assert calls["teardown"] and "wandb logging failed" not in capsys.readouterr().out
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


# ---- run folders: the eval inherits the run's data, prompt and wandb identity ------------------------------------------
def write_resolved(run, **dataset):
    """config.yaml as the trainer writes it, and .hydra/config.yaml as Hydra does (dataset: {} and
    dataset_name: the group file names the data, so the dataset's path is not in it)."""
    import yaml

    ds = {"name": "tiny", "path": "embedded:arith", "query_field": "question", "response_field": "answer",
          "subset": None, "prompt": "Problem: {query}\nSolution: ", **dataset}
    cfg = {"model": {"name": "embedded:tiny-llama", "dtype": "float32"}, "dataset": ds,
           "wandb": {"project": "proj", "group": "grp", "name": "seed=1", "entity": None, "mode": "offline"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra/config.yaml").write_text("run_dir: ${hydra:runtime.output_dir}\ndataset_name: tiny\ndataset: {}\n")
    (run / "wandb_id.txt").write_text("abcd1234\n")


def test_run_with_merged_uses_its_own_data_prompt_and_wandb_identity(tmp_path, embedded_model_dir, monkeypatch):
    import datasets

    from wandb_files import run_files, summarize

    def no_download(*a, **k):
        raise AssertionError(f"tried to load a hub dataset: {a}")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    run = tmp_path / "run"
    make_run_folder(run, embedded_model_dir, merged=True)
    write_resolved(run)
    res = main(["--run_dir", str(run), "--limit", "2", "--max_new_tokens", "4", "--wandb_mode", "offline"])
    assert res["model"] == str(run / "merged") and res["adapter"] is None
    assert res["data"].endswith("test.jsonl") and res["prompt_template"] == "Problem: {question}\nSolution: "
    assert res["output_dir"] == str(run / "eval")
    [wb] = run_files(run / "eval" / "wandb")
    seen = summarize(wb)
    assert (seen["project"], seen["group"], seen["name"], seen["job_type"]) == ("proj", "grp", "seed=1", "eval")
    assert seen["config"]["train_run_id"] == "abcd1234" and "train:abcd1234" in seen["tags"]
    assert seen["summary"]["gsm8k/accuracy_flexible"] == res["accuracy_flexible"] and seen["exit_code"] == 0


def fake_run_folder(run):
    (run / "merged").mkdir(parents=True)
    (run / "merged/config.json").write_text("{}")  # nothing is loaded: only the choices are checked
    return run


def run_choices(*argv):
    a = parse_args(list(argv))
    src = resolve_source(a)
    apply_run_defaults(a, src)
    return a


def test_run_data_choices(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    # a run folder from before config.yaml: .hydra/config.yaml is resolved with conf/
    for name, data, subset in (("tiny", "embedded", "main"), ("gsm8k", "openai/gsm8k", "socratic"),
                               ("meta_math", "openai/gsm8k", "main")):
        run = fake_run_folder(tmp_path / f"old_{name}")
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"dataset_name={name}", "++dataset.prompt='P: {query}'",
                                               *(["++dataset.subset=socratic"] if name == "gsm8k" else [])])
        (run / ".hydra").mkdir()
        (run / ".hydra/config.yaml").write_text(OmegaConf.to_yaml(cfg))
        a = run_choices("--run_dir", str(run))
        assert (a.data, a.data_config, a.question_field, a.answer_field) == (data, subset, "question", "answer")
        assert resolve_format(None, resolve_source(a)["run_cfg"]) == "P: {question}"  # the run's prompt
    # a run on a local file: the test split beside it, the run's field names; flags the user gives win
    run = fake_run_folder(tmp_path / "local")
    write_resolved(run, name="mine", path=str(tmp_path / "data/train.jsonl"), query_field="q", response_field="a")
    a = run_choices("--run_dir", str(run))
    assert (a.data, a.question_field, a.answer_field) == (str(tmp_path / "data"), "q", "a")
    assert a.wandb_project == "proj" and a.wandb_name == "seed=1" and a.train_wandb_id == "abcd1234"
    a = run_choices("--run_dir", str(run), "--answer_field", "solution", "--wandb_project", "other")
    assert (a.question_field, a.answer_field, a.wandb_project) == ("q", "solution", "other")
    a = run_choices("--run_dir", str(run), "--data", "embedded")
    assert (a.data, a.question_field) == ("embedded", "question")  # another data set: its own field defaults
    a = run_choices("--model", "embedded:tiny-llama")  # no run: no identity to inherit
    assert (a.data, a.wandb_project, a.wandb_group, a.train_wandb_id) == ("embedded", "peftlab-eval", None, None)


def test_input_errors_name_the_file_line_and_row(tmp_path, embedded_data_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"{empty}: no predictions"):
        main(["--score", str(empty)])
    out = subprocess.run([sys.executable, str(ROOT / "eval_gsm8k.py"), "--score", str(empty)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and f"eval_gsm8k: error: {empty}: no predictions" in out.stderr
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps({"index": 0, "answer": "#### 1", "generation": "1"}) + '\n{"index": 1, "answ\n')
    with pytest.raises(ValueError, match=f"{torn} line 2: not valid JSON"):
        main(["--score", str(torn)])
    rows = read_jsonl(embedded_data_dir / "test.jsonl")[:3]
    bad_data = tmp_path / "data.jsonl"
    bad_data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "[1, 2]\n")
    with pytest.raises(ValueError, match=f"{bad_data} line 4: a JSON list, expected a JSON object"):
        main(["--model", "embedded:tiny-llama", "--data", str(bad_data)])
    rows[1]["answer"] = "He has 5 apples and eats 2, leaving 3."
    no_marker = tmp_path / "no_marker.jsonl"
    no_marker.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=f"{no_marker}: row 1: the gold answer .*has no '#### N' marker"):
        main(["--model", "embedded:tiny-llama", "--data", str(no_marker)])
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"index": 0, "answer": "#### 4", "generation": "4"}) + "\n" +
                     json.dumps({"index": 7, "answer": "about 4 or 5", "generation": "4"}) + "\n")
    with pytest.raises(ValueError, match=rf"{preds}: row 1 \(index 7\): no gold answer"):
        main(["--score", str(preds)])


def test_missing_adapter_base_is_named(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/models/llama-7b",
                                                             "peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match=r"base model /gone/models/llama-7b \(base_model_name_or_path in "
                                                r".*adapter_config.json\) does not exist on this machine; give --model"):
        main(["--adapter", str(adapter)])
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter/adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (run / "config.yaml").write_text("model:\n  name: ./models/gone\n")
    with pytest.raises(FileNotFoundError, match=r"base model ./models/gone \(model.name in the run's config"):
        main(["--run_dir", str(run)])
    # a hub-style name is left to the hub (it may be cached); --model overrides the recorded base
    assert resolve_source(parse_args(["--adapter", str(adapter), "--model", "org/name"]))["model"] == "org/name"


@pytest.mark.slow
def test_trained_run_folder_end_to_end(tmp_path, monkeypatch):
    """A real run with merged/: the eval finds the run's data and prompt (no hub download) and joins its wandb run."""
    import datasets

    from peftlab.train import train
    from test_config import compose_cfg
    from wandb_files import run_files, summarize

    cfg = compose_cfg(["model.epochs=1", "train.max_steps=3", "++dataset.eval_samples=16", "model.saving=true",
                       "wandb.mode=offline", "wandb.project=proj", "wandb.group=grp", "wandb.name=r4",
                       "++dataset.prompt='Problem: {query}\nSolution: '"])
    cfg.run_dir = str(tmp_path / "run")
    train(cfg)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail(f"hub dataset requested: {a}"))
    res = main(["--run_dir", str(tmp_path / "run"), "--limit", "2", "--max_new_tokens", "4", "--wandb_mode",
                "offline"])
    assert res["model"] == str(tmp_path / "run/merged") and res["data"].endswith("test.jsonl")
    assert res["prompt_template"] == "Problem: {question}\nSolution: "
    train_id = (tmp_path / "run/wandb_id.txt").read_text().strip()
    [trained] = run_files(tmp_path / "run/wandb", train_id)
    [evaluated] = run_files(tmp_path / "run/eval/wandb")
    t, e = summarize(trained), summarize(evaluated)
    assert (e["project"], e["group"], e["name"]) == (t["project"], t["group"], t["name"]) == ("proj", "grp", "r4")
    assert e["config"]["train_run_id"] == t["id"] == train_id and e["id"] != train_id
