"""Batched, sharded GSM8K scoring of a base model, a merged model, an adapter on a base, or a peftlab run folder.

Under torchrun / accelerate launch each process generates for a disjoint strided shard; rank 0 gathers the
predictions by example index, so no example is dropped or counted twice and the accuracy equals the 1-process run.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ..models import load_tokenizer, resolve_model_path, torch_dtype
from ..utils import atomic_write_json, atomic_write_text
from .extract import extract_flexible, extract_strict, gold_answer, same_number

FORMATS = {
    "lora_one": "Q: {question}\nA: ",
    "metamath": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{question}\n\n### Response: Let's think step by step."),
    "fewshot": "Question: {question}\nAnswer:",
}
DEFAULT_STOPS = ["\nQ:", "\n\nQuestion:", "\nQuestion:", "</s>", "<|endoftext|>", "\n\n\n"]
FEWSHOT = [  # lm-eval style exemplars (short, hand-written in GSM8K's style)
    ("Tom has 3 boxes with 4 pens in each box. He gives away 5 pens. How many pens does he have left?",
     "Tom has 3 * 4 = 12 pens. After giving away 5 he has 12 - 5 = 7 pens.\n#### 7"),
    ("A shirt costs $15 and a hat costs $7. How much do 2 shirts and 1 hat cost?",
     "2 shirts cost 2 * 15 = $30. With the hat it is 30 + 7 = $37.\n#### 37"),
    ("Mia reads 12 pages a day. How many days does she need for a 96-page book?",
     "She needs 96 / 12 = 8 days.\n#### 8"),
    ("There are 40 students and 25% of them walk to school. How many students do not walk?",
     "25% of 40 is 10, so 40 - 10 = 30 students do not walk.\n#### 30"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Score a model on GSM8K (batched, sharded over torchrun processes)")
    src = p.add_argument_group("model")
    src.add_argument("--model", help="hub name, local folder or embedded:tiny-llama")
    src.add_argument("--adapter", help="a PEFT adapter folder applied on --model")
    src.add_argument("--run_dir", help="a peftlab run folder: its merged model, else its adapter on its base")
    src.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="openai/gsm8k", help="hub name (config 'main') or a local .jsonl/.json/.parquet "
                                                         "with question/answer")
    d.add_argument("--split", default="test")
    d.add_argument("--limit", type=int, default=None)
    g = p.add_argument_group("generation")
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--max_new_tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--stop", nargs="*", default=None, help=f"stop strings (default {DEFAULT_STOPS})")
    g.add_argument("--prompt_format", default="lora_one", choices=sorted(FORMATS))
    g.add_argument("--num_fewshot", type=int, default=4)
    g.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--output_dir", default=None, help="default: <run_dir>/eval or eval_out/<time>")
    o.add_argument("--score", default=None, help="re-score an existing predictions .jsonl; no generation")
    o.add_argument("--wandb_project", default="peftlab-eval")
    o.add_argument("--wandb_name", default=None)
    o.add_argument("--wandb_mode", default=os.environ.get("WANDB_MODE", "offline"),
                   choices=["online", "offline", "disabled"])
    a = p.parse_args(argv)
    if not a.score and not (a.model or a.run_dir):
        p.error("give --model (optionally with --adapter), --run_dir, or --score FILE")
    if a.batch_size < 1:
        p.error("--batch_size must be >= 1")
    return a


# ---- data -------------------------------------------------------------------------------------------------------------
def load_examples(data: str, split: str, limit: int | None) -> list[dict]:
    import datasets

    path = Path(data)
    if path.suffix.lower() in (".json", ".jsonl", ".parquet"):
        if not path.is_file():
            raise FileNotFoundError(f"--data {path} does not exist")
        kind = "parquet" if path.suffix.lower() == ".parquet" else "json"
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        ds = datasets.load_dataset(data, "main", split=split)
    rows = []
    for i, r in enumerate(ds):
        if "question" not in r or "answer" not in r:
            raise ValueError(f"{data}: row {i} needs fields 'question' and 'answer', found {sorted(r)}")
        rows.append({"index": i, "question": r["question"], "answer": r["answer"]})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def build_prompt(question: str, fmt: str, num_fewshot: int) -> str:
    if fmt != "fewshot":
        return FORMATS[fmt].format(question=question)
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEWSHOT[:num_fewshot])
    return shots + FORMATS["fewshot"].format(question=question)


# ---- model --------------------------------------------------------------------------------------------------------------
def resolve_run(run_dir: Path) -> tuple[str, str | None]:
    """(model path, adapter path or None) for a peftlab run folder."""
    if (run_dir / "merged" / "config.json").exists():
        return str(run_dir / "merged"), None
    cfg_path = run_dir / "adapter" / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a finished peftlab run: it has neither merged/ nor adapter/")
    base = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.exists():
        from omegaconf import OmegaConf

        base = str(OmegaConf.load(hydra_cfg).model.name)  # the name the run was given (embedded:..., hub name)
    return base, str(run_dir / "adapter")


def load_model(a):
    from transformers import AutoModelForCausalLM

    model_name, adapter = (resolve_run(Path(a.run_dir)) if a.run_dir else (a.model, a.adapter))
    path = resolve_model_path(model_name)
    kwargs = {} if a.dtype == "auto" else {"dtype": torch_dtype(a.dtype)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tok = load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else path)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tok.padding_side = "left"
    return model.eval(), tok, {"model": model_name, "adapter": adapter}


@torch.no_grad()
def generate(model, tok, prompts: list[str], a, stops: list[str], device, show: bool) -> list[str]:
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths batch together
    out: list[str] = [""] * len(prompts)
    gen_kwargs = dict(max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      do_sample=a.temperature > 0)
    if a.temperature > 0:
        gen_kwargs.update(temperature=a.temperature, top_p=a.top_p)
    if stops:
        gen_kwargs.update(stop_strings=stops, tokenizer=tok)
    for s in tqdm(range(0, len(order), a.batch_size), desc="gsm8k", disable=not show, dynamic_ncols=True):
        idx = order[s:s + a.batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        seqs = model.generate(**enc, **gen_kwargs)
        texts = tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, t in zip(idx, texts):
            out[i] = truncate_at_stops(t, stops)
    return out


def truncate_at_stops(text: str, stops: list[str]) -> str:
    cut = min([text.find(s) for s in stops if s and s in text] or [len(text)])
    return text[:cut]


# ---- scoring ------------------------------------------------------------------------------------------------------------
def score_rows(rows: list[dict]) -> dict:
    """Fill the extracted answers and correctness of each prediction row; return the accuracies."""
    for r in rows:
        gold = gold_answer(r["answer"])
        r["gold"] = gold
        r["extracted_strict"] = extract_strict(r["generation"])
        r["extracted_flexible"] = extract_flexible(r["generation"])
        r["correct_strict"] = same_number(r["extracted_strict"], gold)
        r["correct_flexible"] = same_number(r["extracted_flexible"], gold)
    n = len(rows)
    return {"n": n, "accuracy_strict": sum(r["correct_strict"] for r in rows) / max(n, 1),
            "accuracy_flexible": sum(r["correct_flexible"] for r in rows) / max(n, 1)}


def write_outputs(out_dir: Path, rows: list[dict], results: dict) -> None:
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out_dir / "results.json", results)


def print_table(results: dict) -> None:
    print(f"\n| metric | value |\n| --- | --- |\n| examples | {results['n']} |\n"
          f"| accuracy (strict) | {results['accuracy_strict']:.4f} |\n"
          f"| accuracy (flexible) | {results['accuracy_flexible']:.4f} |", flush=True)


def log_wandb(a, results: dict) -> None:
    if a.wandb_mode == "disabled":
        return
    import wandb

    run = wandb.init(project=a.wandb_project, name=a.wandb_name, mode=a.wandb_mode, config=vars(a),
                     dir=str(results.get("output_dir", ".")))
    run.summary.update({f"gsm8k/{k}": v for k, v in results.items() if isinstance(v, (int, float))})
    run.finish()


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.score:
        rows = [json.loads(l) for l in Path(a.score).read_text().splitlines() if l.strip()]
        results = score_rows(rows)
        print_table(results)
        return results
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(a.seed)
    t0 = time.time()
    model, tok, source = load_model(a)
    model.to(device)
    examples = load_examples(a.data, a.split, a.limit)
    shard = examples[rank::world]
    stops = DEFAULT_STOPS if a.stop is None else a.stop
    gens = generate(model, tok, [build_prompt(e["question"], a.prompt_format, a.num_fewshot) for e in shard], a,
                    stops, device, rank == 0)
    mine = [{**e, "generation": g} for e, g in zip(shard, gens)]
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        torch.distributed.gather_object(mine, gathered, dst=0)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"]) if rank == 0 else []
    else:
        rows = mine
    results = {}
    if rank == 0:
        assert [r["index"] for r in rows] == [e["index"] for e in examples], "an example was dropped or duplicated"
        results = score_rows(rows)
        wall = time.time() - t0
        out_dir = Path(a.output_dir) if a.output_dir else (
            Path(a.run_dir) / "eval" if a.run_dir else Path("eval_out") / time.strftime("%Y-%m-%d_%H-%M-%S"))
        results.update(source, data=a.data, split=a.split, prompt_format=a.prompt_format, batch_size=a.batch_size,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, processes=world,
                       wall_time_s=round(wall, 3), examples_per_s=round(len(rows) / wall, 3), output_dir=str(out_dir))
        write_outputs(out_dir, rows, results)
        print_table(results)
        log_wandb(a, results)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results
