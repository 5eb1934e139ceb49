"""Datasets: rows from the hub, a local json/jsonl/parquet file or the embedded task; prompt formatting; tokenising
with the loss on the answer tokens only; a cache keyed by everything that changes the result."""
from __future__ import annotations

import os
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_file, stable_hash

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TOKENIZE_VERSION = 2


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels[1:] if t != -100)  # the first token is never predicted


def _source(ds_cfg: Any, split: str) -> tuple[str, Path | None]:
    """(description, local file or None) for a dataset config and split."""
    path = str(ds_cfg.path)
    if path.startswith("embedded:"):
        from .embedded import TASKS, ensure_dataset

        task = path.removeprefix("embedded:")
        if task not in TASKS:
            raise ValueError(f"unknown embedded dataset {path!r}; allowed: {['embedded:' + t for t in TASKS]}")
        return f"embedded {task} {split}", ensure_dataset(task) / f"{split}.jsonl"
    suffix = Path(path).suffix.lower()
    if suffix in LOCAL_SUFFIXES or os.sep in path and Path(path).exists():
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"dataset file {p} does not exist (dataset.path; allowed: a hub name or a local "
                                    f"{'/'.join(LOCAL_SUFFIXES)} file)")
        if p.suffix.lower() not in LOCAL_SUFFIXES:
            raise ValueError(f"dataset file {p} has an unsupported type; allowed: {sorted(LOCAL_SUFFIXES)}")
        return str(p), p
    return f"{path}:{ds_cfg.get('subset')}:{split}", None


class DataError(ValueError):
    """Data that cannot train: names the file (or hub dataset), the line or row, and what was expected."""


def load_rows(ds_cfg: Any, split: str) -> tuple[list[dict], str]:
    """Raw rows of one split and a description of where they came from (local files: "<file> line N" per row)."""
    desc, local = _source(ds_cfg, split)
    if local is not None:
        return read_local_rows(local), desc
    import datasets

    ds = datasets.load_dataset(str(ds_cfg.path), ds_cfg.get("subset"), split=split)
    rows = [dict(r) for r in ds]
    if not rows:
        raise DataError(f"{desc}: the split has no rows")
    return rows, desc


def read_local_rows(path: Path, allow_empty: bool = False) -> list[dict]:
    """Rows of a local .jsonl / .json (a JSON array, or JSON lines) / .parquet file; each row remembers its line
    (``_line``) so later errors can name it. Unreadable content names the file and the line."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        rows = [dict(r, _line=f"row {i}") for i, r in enumerate(rows)]
    else:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise DataError(f"{path} line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})"
                            ) from None
        rows = _json_array(path, text) if text.lstrip().startswith("[") else _json_lines(path, text)
    if not rows and not allow_empty:
        raise DataError(f"{path}: the file has no rows (expected JSON objects, one per line or in an array)")
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a local .jsonl / .json / .parquet file (no line tags; none is no error); a bad line fails naming
    the file and line."""
    return [{k: v for k, v in r.items() if k != "_line"} for r in read_local_rows(Path(path), allow_empty=True)]


def _json_array(path: Path, text: str) -> list[dict]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i} of the array is {type(item).__name__}, expected a JSON object")
    return [dict(item, _line=f"item {i}") for i, item in enumerate(items)]


def _json_lines(path: Path, text: str) -> list[dict]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg}); expected one JSON object per line") from None
        if not isinstance(item, dict):
            raise DataError(f"{path} line {n}: a JSON {type(item).__name__}, expected a JSON object")
        rows.append(dict(item, _line=f"line {n}"))
    return rows


def format_row(row: dict, ds_cfg: Any, index: int, source: str) -> tuple[str, str]:
    """(prompt, response) of one row; a missing or non-text field fails naming the row and the expected fields."""
    q_field, r_field, in_field = ds_cfg.query_field, ds_cfg.response_field, ds_cfg.get("input_field")
    where = f"{source} {row.get('_line', f'row {index}')}"
    for f in (q_field, r_field):
        if f not in row or row[f] is None:
            raise DataError(f"{where}: no field {f!r}; expected fields {q_field!r} and {r_field!r} (dataset "
                            f"'{ds_cfg.name}'), found {sorted(k for k, v in row.items() if v is not None and k != '_line')}")
        if not isinstance(row[f], str):
            raise DataError(f"{where}: field {f!r} is {type(row[f]).__name__} ({str(row[f])[:40]!r}), expected text")
    query = row[q_field]
    if in_field and row.get(in_field):
        if not isinstance(row[in_field], str):
            raise DataError(f"{where}: field {in_field!r} is {type(row[in_field]).__name__}, expected text")
        query = f"{query}\n{row[in_field]}"
    return ds_cfg.prompt.format(query=query), row[r_field]


def tokenize(prompt: str, response: str, tokenizer, max_length: int) -> Example | None:
    """Prompt and response are tokenised separately so the label boundary is exact; EOS ends the response."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + r)[:max_length]
    labels = ([-100] * len(p) + r)[:max_length]
    if all(t == -100 for t in labels[1:]):
        return None  # the prompt alone fills max_length: nothing to learn from
    return Example(ids, labels)


def _cache_key(ds_cfg: Any, split: str, tokenizer, max_length: int, n: int | None) -> str:
    from omegaconf import OmegaConf

    _, local = _source(ds_cfg, split)
    stat = (local.stat().st_size, local.stat().st_mtime_ns, str(local.resolve())) if local else None
    return stable_hash({"ds": OmegaConf.to_container(ds_cfg, resolve=True) if not isinstance(ds_cfg, dict) else ds_cfg,
                        "split": split, "file": stat, "max_length": max_length, "n": n,
                        "tok": [tokenizer.name_or_path, type(tokenizer).__name__, len(tokenizer),
                                tokenizer.eos_token_id, tokenizer("Q: 12 + 3\nA: ")["input_ids"]],
                        "v": TOKENIZE_VERSION})


def tokenized_split(ds_cfg: Any, split: str, tokenizer, max_length: int, n: int | None = None) -> list[Example]:
    """Tokenised examples of the first n rows of one split, cached on disk."""
    from .embedded import cache_root

    key = _cache_key(ds_cfg, split, tokenizer, max_length, n)
    cache = cache_root() / "tokenized" / f"{ds_cfg.name}-{split}-{key}.pt"
    if cache.exists():
        return [Example(*e) for e in torch.load(cache)]
    rows, source = load_rows(ds_cfg, split)
    if n is not None:
        rows = rows[:n]
    examples = []
    for i, row in enumerate(rows):
        ex = tokenize(*format_row(row, ds_cfg, i, source), tokenizer, max_length)
        if ex is not None:
            examples.append(ex)
    with atomic_file(cache) as tmp:  # unique per process: every rank may build the same cache
        torch.save([(e.input_ids, e.labels) for e in examples], tmp)
    return examples


def train_eval_examples(ds_cfg: Any, tokenizer, max_length: int) -> tuple[list[Example], list[Example]]:
    """Train examples (first max_train_samples) and eval examples (eval_split, or held out from the train end)."""
    n_eval = int(ds_cfg.get("eval_samples") or 0)
    if ds_cfg.get("eval_split"):
        train = tokenized_split(ds_cfg, ds_cfg.split, tokenizer, max_length, ds_cfg.get("max_train_samples"))
        evals = tokenized_split(ds_cfg, ds_cfg.eval_split, tokenizer, max_length, n_eval or None)
        return train, evals
    rows_total = tokenized_split(ds_cfg, ds_cfg.split, tokenizer, max_length, None)
    cut = len(rows_total) - n_eval
    if cut <= 0:
        raise ValueError(f"dataset '{ds_cfg.name}' has {len(rows_total)} usable rows, not more than "
                         f"eval_samples={n_eval}; lower dataset.eval_samples or give dataset.eval_split")
    train = rows_total[:cut][: ds_cfg.get("max_train_samples") or None]
    return train, rows_total[cut:]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on padding."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
