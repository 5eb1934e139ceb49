"""Batched, sharded GSM8K scoring of a base model, a merged model, a PEFT adapter on a base, or a peftlab run folder.

Prompts are sorted by token length and cut into batches once, the same way on every process; under torchrun /
accelerate launch process r generates batches r, r + world, ... So each example is generated in exactly the batch a
one-process run would use (same padding, same per-batch sampling seed) and the predictions, hence the accuracy,
equal the one-process run's. Rank 0 gathers the rows by example index and checks that none is missing or doubled.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import time
from pathlib import Path

import torch

from ..data.datasets import read_jsonl
from ..models import load_tokenizer, resolve_model_path, torch_dtype
from ..config import load_run_config
from ..runinfo import wandb_identity
from ..utils import atomic_write_json, atomic_write_text
from .extract import extract_flexible, extract_strict, gold_answer, same_number

FORMATS = {
    "lora_one": "Q: {question}\nA: ",  # LoRA-One's training format (peftlab's dataset.prompt default)
    "metamath": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{question}\n\n### Response: Let's think step by step."),
    "fewshot": "Question: {question}\nAnswer:",  # lm-eval's gsm8k; k solved train examples go before it
}
ALIASES = {"loraone": "lora_one", "lora-one": "lora_one", "alpaca": "metamath", "lm_eval": "fewshot",
           "lm-eval": "fewshot"}
STOPS = {"lora_one": ["\nQ:", "\n\nQuestion:", "\n\n\n"],
         "metamath": ["### Instruction", "\n\nQuestion:", "\n\n\n"],
         "fewshot": ["Question:", "\n\n\n"]}
FEWSHOT_SEED = 1234  # the shots are one fixed sample of the train split, the same for every question and process
BUILTIN_SHOTS = [  # written for peftlab in GSM8K's style; used when the data has no train split
    ("Tom has 3 boxes with 4 pens in each box. He gives away 5 pens. How many pens does he have left?",
     "Tom has 3 * 4 = 12 pens. After giving away 5 he has 12 - 5 = 7 pens.\n#### 7"),
    ("A shirt costs $15 and a hat costs $7. How much do 2 shirts and 1 hat cost?",
     "2 shirts cost 2 * 15 = $30. With the hat it is 30 + 7 = $37.\n#### 37"),
    ("Mia reads 12 pages a day. How many days does she need for a 96-page book?",
     "She needs 96 / 12 = 8 days.\n#### 8"),
    ("There are 40 students and 25% of them walk to school. How many students do not walk?",
     "25% of 40 is 40 * 0.25 = 10, so 40 - 10 = 30 students do not walk.\n#### 30"),
    ("A baker makes 3 trays of 24 rolls and sells all but 9. How many rolls does he sell?",
     "He makes 3 * 24 = 72 rolls and sells 72 - 9 = 63 of them.\n#### 63"),
    ("Lena saves $6 a week. After how many weeks can she buy a $1,200 bike if she already has $900?",
     "She still needs 1200 - 900 = $300, which takes 300 / 6 = 50 weeks.\n#### 50"),
    ("A pizza has 8 slices. Sam eats 1/4 of it and Ava eats 3 slices. How many slices are left?",
     "Sam eats 8 / 4 = 2 slices. Together they eat 2 + 3 = 5, so 8 - 5 = 3 slices are left.\n#### 3"),
    ("The temperature was 4 degrees and fell by 11 degrees overnight. What was the temperature in the morning?",
     "It was 4 - 11 = -7 degrees.\n#### -7"),
]
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Score a model on GSM8K: batched generation, sharded over torchrun "
                                            "processes, strict and flexible answer extraction")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="hub name, local folder, embedded:tiny-llama, or a peftlab run folder; with "
                                   "--run_dir/--adapter it overrides the recorded base")
    m.add_argument("--adapter", help="a PEFT adapter folder applied on --model (default base: the adapter's "
                                     "base_model_name_or_path)")
    m.add_argument("--run_dir", help="a peftlab run folder: its merged/ model, else its adapter/ on its base")
    m.add_argument("--dtype", default="auto", help="auto (the run's model.dtype, else the checkpoint's) | float32 | "
                                                   "bfloat16 | float16")
    m.add_argument("--no_merge", action="store_true", help="keep the adapter unmerged (slower, no merge rounding)")
    m.add_argument("--trust_remote_code", action="store_true")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="hub dataset (config --data_config), a local .jsonl/.json/.parquet, a "
                                                "folder with <split>.jsonl, or 'embedded' (arith) or "
                                                "'embedded:<task>'; default: a run's own data (its test split), the "
                                                "embedded test set for embedded models, else openai/gsm8k")
    d.add_argument("--data_config", default=None, help="default: main (the run's dataset.subset for a run's own data)")
    d.add_argument("--split", default="test")
    d.add_argument("--limit", type=int, default=None, help="score the first N examples")
    d.add_argument("--question_field", default=None, help="default: question (a run's own data: its query_field)")
    d.add_argument("--answer_field", default=None, help="default: answer (a run's own data: its response_field)")
    g = p.add_argument_group("generation")
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--max_new_tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--stop", nargs="*", default=None, help="stop strings ('\\n' allowed); default: the format's "
                                                           f"{STOPS}; give --stop alone for none")
    g.add_argument("--prompt_format", default=None, help=f"{sorted(FORMATS)} or a template with {{question}}; "
                                                         "default: the run's dataset.prompt, else lora_one")
    g.add_argument("--num_fewshot", type=int, default=5, help="shots for --prompt_format fewshot")
    g.add_argument("--fewshot_source", default="auto", choices=["auto", "train", "builtin"],
                   help="auto: the data's train split when there is one, else peftlab's built-in shots")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (batch b uses seed + b)")
    o = p.add_argument_group("output")
    o.add_argument("--output_dir", default=None, help="default: <run_dir>/eval, else eval_out/<time>")
    o.add_argument("--score", default=None, help="re-score a predictions .jsonl (or its folder); no generation")
    o.add_argument("--wandb_project", default=None, help="default: the run's wandb.project, else peftlab-eval; "
                                                        "likewise name, entity, group and mode")
    o.add_argument("--wandb_name", default=None)
    o.add_argument("--wandb_entity", default=None)
    o.add_argument("--wandb_group", default=None)
    o.add_argument("--wandb_mode", default=os.environ.get("WANDB_MODE"), choices=["online", "offline", "disabled"])
    a = p.parse_args(argv)
    if not a.score and not (a.model or a.run_dir or a.adapter or a.wandb_name):
        p.error("give --model (optionally with --adapter), --adapter, --run_dir, --wandb_name (its newest run) or "
                "--score FILE")
    if a.run_dir and a.adapter:
        p.error("--adapter and --run_dir both name an adapter; give one")
    for flag in ("batch_size", "max_new_tokens"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if a.limit is not None and a.limit < 1:
        p.error("--limit must be >= 1")
    if a.num_fewshot < 0:
        p.error("--num_fewshot must be >= 0")
    if a.temperature < 0 or not 0 < a.top_p <= 1:
        p.error("--temperature must be >= 0 and --top_p in (0, 1]")
    if a.stop is not None:
        a.stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in a.stop]
    a.given = {k for k, v in DATA_DEFAULTS.items() if getattr(a, k) is not None}  # a run's own data fills the rest
    for k, v in DATA_DEFAULTS.items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    return a


DATA_DEFAULTS = {"data_config": "main", "question_field": "question", "answer_field": "answer"}


# ---- data ---------------------------------------------------------------------------------------------------------
def data_file(data: str, split: str) -> Path | None:
    """The local file holding a split, or None for a hub dataset."""
    if data == "embedded" or data.startswith("embedded:"):  # 'embedded' is the first task, arith
        from ..data.embedded import ensure_dataset

        data = str(ensure_dataset(data.removeprefix("embedded").removeprefix(":") or "arith"))
    p = Path(data)
    if p.is_dir():
        for suffix in LOCAL_SUFFIXES:
            if (p / f"{split}{suffix}").is_file():
                return p / f"{split}{suffix}"
        raise FileNotFoundError(f"--data {p} has no {split}{{{','.join(LOCAL_SUFFIXES)}}} (found "
                                f"{sorted(f.name for f in p.iterdir())})")
    if p.suffix.lower() in LOCAL_SUFFIXES:
        if not p.is_file():
            raise FileNotFoundError(f"--data {p} does not exist")
        return p
    if p.exists():
        raise ValueError(f"--data {p}: allowed a hub dataset, a folder, 'embedded' or a {'/'.join(LOCAL_SUFFIXES)} "
                         "file")
    return None


def read_rows(data: str, split: str, config: str | None) -> tuple[list[dict], str]:
    """All rows of one split and where they came from."""
    path = data_file(data, split)
    if path is None:
        import datasets

        return [dict(r) for r in datasets.load_dataset(data, config, split=split)], f"{data}:{config}:{split}"
    return read_jsonl(path), str(path)  # any local type (jsonl, a json array, parquet); bad lines named


def load_examples(a) -> tuple[list[dict], str]:
    rows, source = read_rows(a.data, a.split, a.data_config)
    examples = []
    for i, r in enumerate(rows[:a.limit]):
        if r.get(a.question_field) is None or r.get(a.answer_field) is None:
            raise ValueError(f"{source}: row {i} needs fields {a.question_field!r} and {a.answer_field!r} (see "
                             f"--question_field/--answer_field), found {sorted(r)}")
        answer = str(r[a.answer_field])
        if gold_answer(answer) is None:  # refused now, before the model loads, not scored as a silent miss
            raise ValueError(f"{source}: row {i}: the gold answer {answer[-80:]!r} has no '#### N' marker (nor is it a "
                             f"bare number or MetaMath's closing 'The answer is: N'); fix the data or --answer_field")
        examples.append({"index": i, "question": str(r[a.question_field]), "answer": answer})
    if not examples:
        raise ValueError(f"{source}: no examples")
    return examples, source


def fewshot_shots(a) -> tuple[list[tuple[str, str]], str]:
    """k (question, answer) pairs: a fixed sample of the data's train split, else the built-in ones."""
    if a.fewshot_source != "builtin":
        try:
            p = data_file(a.data, a.split)
            rows, source = read_rows(str(p.parent) if p is not None else a.data, "train", a.data_config)
            rows = [(str(r[a.question_field]), str(r[a.answer_field])) for r in rows]
            if len(rows) >= a.num_fewshot:
                return random.Random(FEWSHOT_SEED).sample(rows, a.num_fewshot), source
        except (FileNotFoundError, ValueError, KeyError) as e:
            if a.fewshot_source == "train":
                raise ValueError(f"--fewshot_source train: no usable train split for --data {a.data} ({e})") from e
        else:
            if a.fewshot_source == "train":
                raise ValueError(f"--fewshot_source train: {source} has fewer than {a.num_fewshot} rows")
    if a.num_fewshot > len(BUILTIN_SHOTS):
        raise ValueError(f"--num_fewshot {a.num_fewshot}: peftlab has {len(BUILTIN_SHOTS)} built-in shots")
    return BUILTIN_SHOTS[:a.num_fewshot], "builtin"


def prompt_template(fmt: str, shots: list[tuple[str, str]] = ()) -> str:
    """The prompt with a {question} slot; few-shot pairs go first in lm-eval's layout."""
    if fmt == "fewshot":
        return "".join(f"Question: {q}\nAnswer: {ans}\n\n" for q, ans in shots) + FORMATS["fewshot"]
    return FORMATS.get(fmt, fmt)


def resolve_format(name: str | None, run_cfg) -> str:
    """A format name, or a literal template (from the flag or the run's dataset.prompt, whose slot is {query})."""
    if name is None:
        name = _select(run_cfg, "dataset.prompt") or "lora_one"
        name = name.replace("{query}", "{question}")
    key = ALIASES.get(name.lower(), name.lower())
    if key in FORMATS:
        return key
    if "{question}" not in name:
        raise ValueError(f"--prompt_format {name!r}: allowed {sorted(FORMATS)} (or aliases {sorted(ALIASES)}) or a "
                         "template containing {question}")
    return next((k for k, t in FORMATS.items() if t == name), name)


# ---- model --------------------------------------------------------------------------------------------------------
def _select(cfg, key: str):
    if cfg is None:
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(cfg, key)
    except Exception:  # an interpolation only Hydra can resolve (e.g. ${hydra:...})
        return None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "adapter" / "adapter_config.json").is_file()
                              or (path / "merged" / "config.json").is_file())


def run_dir_by_wandb_name(name: str, roots=("outputs", "multirun")) -> str:
    """The newest finished run folder under ./outputs or ./multirun whose wandb.name is ``name``: the seed scores
    the run it trained with ``++wandb.name=$runname`` by giving only ``--wandb_name``."""
    from omegaconf import OmegaConf

    found = [f.parent.parent for root in roots if Path(root).is_dir() for f in Path(root).glob("**/.hydra/config.yaml")
             if OmegaConf.select(OmegaConf.load(f), "wandb.name") == name and is_run_dir(f.parent.parent)]
    if not found:
        searched = [str(Path(r).resolve()) for r in roots]
        raise FileNotFoundError(f"no finished run with wandb.name={name!r} under {searched}; give --run_dir or --model")
    run_dir = max(found, key=lambda p: p.stat().st_mtime)
    print(f"eval_gsm8k: --wandb_name {name}: the run {run_dir}", flush=True)
    return str(run_dir)


def resolve_source(a) -> dict:
    """What to load: {model (name as given), path, adapter, run_dir, run_cfg}."""
    run_dir, base = a.run_dir, a.model
    if run_dir is None and base is None and a.adapter is None and a.wandb_name:
        run_dir = run_dir_by_wandb_name(a.wandb_name)  # the seed's `eval_gsm8k.py --wandb_name="$runname"`
    if run_dir is None and base and is_run_dir(Path(base)):
        run_dir, base = base, None
    run_cfg, adapter = None, a.adapter
    if run_dir is not None:
        rd = Path(run_dir)
        if not is_run_dir(rd):
            raise FileNotFoundError(f"--run_dir {rd} is not a finished peftlab run: it needs merged/config.json or "
                                    "adapter/adapter_config.json")
        run_cfg = load_run_config(rd)
        if (rd / "merged" / "config.json").is_file() and base is None:
            return {"model": str(rd / "merged"), "path": str(rd / "merged"), "adapter": None, "run_dir": str(rd),
                    "run_cfg": run_cfg}
        adapter = str(rd / "adapter")
        if base is None and _select(run_cfg, "model.name"):  # portable (embedded:..., hub name), unlike a path
            base = _select(run_cfg, "model.name")
            _check_base(base, f"model.name in the run's config ({rd})")
    if adapter is not None:
        cfg_file = Path(adapter) / "adapter_config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"--adapter {adapter} has no adapter_config.json (a PEFT adapter folder)")
        if base is None:
            base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"{cfg_file} names no base_model_name_or_path; give --model")
            _check_base(base, f"base_model_name_or_path in {cfg_file}")
    return {"model": str(base), "path": resolve_model_path(str(base)), "adapter": adapter, "run_dir": run_dir,
            "run_cfg": run_cfg}


def _check_base(base: str, where: str) -> None:
    """A recorded base that is a local path and is gone: say so, instead of HF's error about an invalid repo id."""
    if base.startswith("embedded:") or Path(base).expanduser().exists():
        return
    if base.startswith(("/", "./", "../", "~")) or base.count("/") > 1 or "\\" in base:  # not 'name' / 'org/name'
        raise FileNotFoundError(f"the adapter's base model {base} ({where}) does not exist on this machine; give "
                                "--model with the base's hub name or folder")


def load_model(src: dict, a, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = a.dtype if a.dtype != "auto" else (_select(src["run_cfg"], "model.dtype") or "auto")
    model = AutoModelForCausalLM.from_pretrained(src["path"], dtype=dtype if dtype == "auto" else torch_dtype(dtype),
                                                 trust_remote_code=a.trust_remote_code,
                                                 **({"device_map": str(device)} if device.type == "cuda" else {}))
    adapter = src["adapter"]
    has_tok = adapter and any((Path(adapter) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = load_tokenizer(adapter if has_tok else src["path"], a.trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if not a.no_merge:
            model = model.merge_and_unload()
    tok.padding_side = "left"  # generation continues right after each prompt
    return model.to(device).eval(), tok


# ---- generation ---------------------------------------------------------------------------------------------------
def plan_batches(lengths: list[int], batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[int, list[int]]]:
    """This process's (batch number, example positions): longest prompts first (least padding, and an OOM shows at
    once), batches dealt round-robin so every process gets a similar load and the one-process batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    return [(b, idx) for b, idx in enumerate(batches) if b % world == rank]


def truncate_at_stops(text: str, stops: list[str]) -> str:
    cut = min([text.find(s) for s in stops if s and s in text] or [len(text)])
    return text[:cut]


def eos_ids(model, tok) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))


@torch.no_grad()
def generate(model, tok, prompts: list[str], batches, a, stops: list[str], show: bool) -> dict[int, dict]:
    """{position: {generation, num_tokens, hit_max_new_tokens}} for the planned batches."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    ends = eos_ids(model, tok)
    gen_cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0,
                               pad_token_id=tok.pad_token_id, eos_token_id=ends, stop_strings=stops or None,
                               **({"temperature": a.temperature, "top_p": a.top_p} if a.temperature > 0 else {}))
    done_ids = set(ends) | {tok.pad_token_id}
    out = {}
    bar = tqdm(total=sum(len(idx) for _, idx in batches), desc="gsm8k", disable=not show, dynamic_ncols=True)

    def run(idx: list[int], seed: int):
        try:
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(model.device)
            torch.manual_seed(seed)  # sampling depends on the batch, not on which process runs it
            seqs = model.generate(**enc, generation_config=gen_cfg, tokenizer=tok if stops else None)
        except torch.cuda.OutOfMemoryError:
            if len(idx) == 1:
                raise
            torch.cuda.empty_cache()
            print(f"eval_gsm8k: out of memory on a batch of {len(idx)}; splitting it", flush=True)
            run(idx[:len(idx) // 2], seed)
            run(idx[len(idx) // 2:], seed)
            return
        for i, row in zip(idx, seqs[:, enc["input_ids"].shape[1]:].tolist()):
            n = next((k for k, t in enumerate(row) if t in done_ids), len(row))
            text = tok.decode(row[:n], skip_special_tokens=True)
            cut = truncate_at_stops(text, stops)
            out[i] = {"generation": cut, "num_tokens": n, "hit_max_new_tokens": n == a.max_new_tokens and cut == text}
        bar.update(len(idx))

    for b, idx in batches:
        run(idx, a.seed + b)
    bar.close()
    return out


# ---- scoring and output -------------------------------------------------------------------------------------------
def _num(v: float | None):
    """18.0 -> 18 in the predictions file."""
    return int(v) if v is not None and float(v).is_integer() and abs(v) < 2 ** 53 else v


def score_rows(rows: list[dict], source: str = "predictions") -> dict:
    """Fill each row's gold, extracted answers and correctness; return the accuracies. ``source`` names the rows
    (a file) in errors."""
    if not rows:
        raise ValueError(f"{source}: no predictions to score")
    for n, r in enumerate(rows):
        where = f"{source}: row {n} (index {r.get('index')})"
        if "generation" not in r:
            raise ValueError(f"{where} has no 'generation' field")
        gold = gold_answer(str(r["answer"])) if r.get("answer") is not None else r.get("gold")
        if gold is None:
            raise ValueError(f"{where}: no gold answer: 'answer' {str(r.get('answer'))[-80:]!r} has no '#### N' "
                             "marker (nor is it a bare number) and there is no 'gold' value")
        strict, flexible = extract_strict(r["generation"]), extract_flexible(r["generation"])
        r.update(gold=_num(gold), extracted_strict=_num(strict), extracted_flexible=_num(flexible),
                 correct_strict=same_number(strict, gold), correct_flexible=same_number(flexible, gold))
    n = len(rows)
    res = {"n": n}
    for kind in ("strict", "flexible"):
        k = sum(r[f"correct_{kind}"] for r in rows)
        acc = k / max(n, 1)
        res.update({f"accuracy_{kind}": acc, f"correct_{kind}": k,
                    f"stderr_{kind}": math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0})
    res["no_strict_answer"] = sum(r["extracted_strict"] is None for r in rows)
    return res


def write_outputs(out_dir: Path, rows: list[dict], results: dict) -> None:
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out_dir / "results.json", results)


def format_table(res: dict) -> str:
    lines = [f"GSM8K  model={res.get('model')}  adapter={res.get('adapter')}  data={res.get('data')}", "",
             "| metric | value |", "| --- | --- |", f"| examples | {res['n']} |"]
    for kind in ("strict", "flexible"):
        lines.append(f"| accuracy ({kind}) | {res[f'accuracy_{kind}']:.4f} ± {res[f'stderr_{kind}']:.4f} "
                     f"({res[f'correct_{kind}']}/{res['n']}) |")
    lines.append(f"| no strict answer | {res['no_strict_answer']} |")
    for key, label, fmt in (("hit_max_new_tokens", "hit max_new_tokens", "{}"), ("examples_per_s", "examples/s",
                            "{:.2f}"), ("wall_time_s", "wall time (s)", "{:.1f}"), ("changed_flexible",
                            "changed vs file (flexible)", "{}")):
        if res.get(key) is not None:
            lines.append(f"| {label} | {fmt.format(res[key])} |")
    return "\n".join(lines)


def log_wandb(a, results: dict, rows: list[dict]) -> None:
    """The summary (gsm8k/<metric>) and a predictions table; rank 0 only."""
    if (a.wandb_mode or "offline") == "disabled":
        return
    import wandb

    numbers = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    cols = ["index", "question", "gold", "generation", "extracted_flexible", "correct_strict", "correct_flexible"]
    try:
        train_id = getattr(a, "train_wandb_id", None)
        config = {k: v for k, v in results.items() if k not in numbers or k in SETTINGS}
        if train_id:  # the link to the training run: same group and name, and its id
            config["train_run_id"] = train_id
        run = wandb.init(project=a.wandb_project, name=a.wandb_name, entity=a.wandb_entity, group=a.wandb_group,
                         mode=a.wandb_mode, job_type="eval", dir=results.get("output_dir"), config=config,
                         tags=["eval", "gsm8k"] + ([f"train:{train_id}"] if train_id else []))
        run.summary.update({f"gsm8k/{k}": v for k, v in numbers.items()})
        run.log({"gsm8k/predictions": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})
        run.finish()
        wandb.teardown()  # finish() may return before the run file is written; teardown waits for wandb-core
    except Exception as e:  # the results are on disk already; a wandb outage must not fail the evaluation
        print(f"eval_gsm8k: WARNING: wandb logging failed: {e!r}", flush=True)


SETTINGS = ("limit", "batch_size", "max_new_tokens", "temperature", "top_p", "num_fewshot", "seed", "processes")


def rescore(a) -> dict:
    path = Path(a.score)
    path = path / "predictions.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--score {path} does not exist")
    rows = read_jsonl(path)
    before = [(r.get("correct_strict"), r.get("correct_flexible")) for r in rows]
    scored = score_rows(rows, str(path))
    prev = path.parent / "results.json"  # the run's settings (model, data, format), when the file came from eval_gsm8k
    results = {k: v for k, v in (json.loads(prev.read_text()) if prev.is_file() else {}).items()
               if k.split("_")[0] not in ("accuracy", "correct", "stderr", "changed", "rescored")}
    results.update(scored, rescored_from=str(path),
                   changed_strict=sum(b[0] is not None and b[0] != r["correct_strict"] for b, r in zip(before, rows)),
                   changed_flexible=sum(b[1] is not None and b[1] != r["correct_flexible"]
                                        for b, r in zip(before, rows)))
    if a.output_dir:
        write_outputs(Path(a.output_dir), rows, results)
    print(format_table(results), flush=True)
    return results


# ---- main ---------------------------------------------------------------------------------------------------------
def default_data(src: dict) -> str:
    """Embedded models and runs trained on the embedded task are scored on its test split; the rest on GSM8K."""
    from ..data.embedded import VERSION, cache_root

    ds_path = str(_select(src["run_cfg"], "dataset.path") or "")
    embedded_model = src["model"].startswith("embedded:") or Path(src["path"]).resolve() == (
        cache_root() / VERSION / "tiny-llama").resolve()
    if ds_path.startswith("embedded:"):  # the run's own embedded task
        return ds_path
    return "embedded" if not ds_path and embedded_model else "openai/gsm8k"


def run_data(run_cfg) -> dict:
    """The eval data a run implies (flags the user gave win): the embedded task's test split, the test split beside a
    local training file, or the run's GSM8K hub data and subset; a run trained on other hub data (MetaMathQA, ...)
    is scored on openai/gsm8k. Fields follow the run's dataset.query_field/response_field for its own data."""
    ds = _select(run_cfg, "dataset")
    path = str(ds.get("path") or "") if ds is not None else ""
    fields = ({"question_field": ds.get("query_field"), "answer_field": ds.get("response_field")}
              if ds is not None else {})
    if path.startswith("embedded:"):
        return {"data": "embedded", **fields}
    if Path(path).suffix.lower() in LOCAL_SUFFIXES:
        return {"data": str(Path(path).parent), **fields}
    if path and (path == "openai/gsm8k" or ds.get("name") == "gsm8k"):
        return {"data": path, "data_config": ds.get("subset"), **fields}
    return {}


def apply_run_defaults(a, src: dict) -> None:
    """Fill the data flags the user left out from the run (or the model), and the wandb identity from the run, so
    the eval's wandb run sits beside the training run: same project, entity, group and name, job_type eval."""
    if a.data is None:
        for k, v in run_data(src["run_cfg"]).items():
            if v is not None and k not in a.given:
                setattr(a, k, v)
    a.data = a.data or default_data(src)
    ident = wandb_identity(src["run_dir"], src["run_cfg"]) if src["run_dir"] else {}
    for k in ("project", "entity", "group", "name", "mode"):
        if getattr(a, f"wandb_{k}") is None:
            setattr(a, f"wandb_{k}", ident.get(k))
    a.wandb_project = a.wandb_project or "peftlab-eval"
    a.wandb_mode = a.wandb_mode or "offline"
    a.train_wandb_id = ident.get("id")


def setup_distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, whether we started the process group)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # gather_object over NCCL uses the current device
    started = False
    if world > 1 and not torch.distributed.is_initialized():
        # a generous timeout: rank 0 waits for the slowest shard at the gather
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=4))
        started = True
    return rank, world, device, started


def cli(argv=None) -> None:
    """eval_gsm8k.py's entry: errors in the input become one line and exit status 2. Under torchrun every process
    leaves with os._exit once its files are written: a C++ destructor in the interpreter's teardown aborted rank 1 in
    1 of 11 finished two-process evals (issue 16; the same cure as tests/test_gradient_estimation.py's script)."""
    import sys

    world = int(os.environ.get("WORLD_SIZE", 1))
    code = 0
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"eval_gsm8k: error: {e}", file=sys.stderr, flush=True)
        code = 2
    if world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.score:
        return rescore(a)
    t0 = time.time()
    src = resolve_source(a)  # before the process group: a bad flag fails at once on every rank
    apply_run_defaults(a, src)
    fmt = resolve_format(a.prompt_format, src["run_cfg"])
    examples, data_desc = load_examples(a)
    shots, shot_source = fewshot_shots(a) if fmt == "fewshot" else ([], None)
    template = prompt_template(fmt, shots)
    stops = a.stop if a.stop is not None else STOPS.get(fmt, STOPS["lora_one"])
    rank, world, device, started = setup_distributed()
    try:
        model, tok = load_model(src, a, device)
        info = dict(model=src["model"], adapter=src["adapter"], run_dir=src["run_dir"],
                    merged_adapter=bool(src["adapter"]) and not a.no_merge, data=data_desc, split=a.split,
                    limit=a.limit, prompt_format=fmt, prompt_template=template, fewshot_source=shot_source,
                    num_fewshot=len(shots), stop=stops, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                    temperature=a.temperature, top_p=a.top_p, seed=a.seed, processes=world, device=str(device),
                    dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
        # str.replace, not str.format: few-shot answers may hold braces
        prompts = [template.replace("{question}", e["question"]) for e in examples]
        batches = plan_batches([len(ids) for ids in tok(prompts)["input_ids"]], a.batch_size, rank, world)
        if rank == 0:
            print(f"eval_gsm8k: {len(examples)} examples from {data_desc}; model {src['model']}"
                  f"{' + adapter ' + src['adapter'] if src['adapter'] else ''}; format {fmt}; {world} process(es)",
                  flush=True)
        t1 = time.time()
        gens = generate(model, tok, prompts, batches, a, stops, show=rank == 0)
        mine = [{**examples[i], **g} for i, g in gens.items()]
        if world > 1:
            parts = [None] * world if rank == 0 else None
            torch.distributed.gather_object(mine, parts, dst=0)
            mine = [r for part in parts for r in part] if rank == 0 else []
        results = {}
        if rank == 0:
            rows = sorted(mine, key=lambda r: r["index"])
            if [r["index"] for r in rows] != list(range(len(examples))):
                raise RuntimeError("gathered predictions do not cover every example exactly once")
            results = finish(a, rows, info, t0, t1)
        if world > 1:
            torch.distributed.barrier()
        return results
    finally:
        if started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def finish(a, rows: list[dict], info: dict, t0: float, t1: float) -> dict:
    """Score, write predictions.jsonl and results.json, print the table, log to wandb (rank 0)."""
    t2 = time.time()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", info["model"])[-60:]
    out_dir = Path(a.output_dir or (Path(info["run_dir"]) / "eval" if info["run_dir"] else
                                    Path("eval_out") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{slug}"))
    new_tokens = sum(r["num_tokens"] for r in rows)
    results = {"task": "gsm8k", **score_rows(rows), **info,
               "hit_max_new_tokens": sum(r["hit_max_new_tokens"] for r in rows),
               "mean_new_tokens": new_tokens / len(rows), "load_time_s": round(t1 - t0, 3),
               "generation_time_s": round(t2 - t1, 3), "wall_time_s": round(t2 - t0, 3),
               "examples_per_s": len(rows) / max(t2 - t1, 1e-9), "new_tokens_per_s": new_tokens / max(t2 - t1, 1e-9),
               "output_dir": str(out_dir), "created": datetime.datetime.now().isoformat(timespec="seconds")}
    write_outputs(out_dir, rows, results)
    print(format_table(results), f"\nwrote {out_dir / 'predictions.jsonl'} and {out_dir / 'results.json'}", flush=True)
    log_wandb(a, results, rows)
    return results
