"""Teacher alignment for LoRA-FA's dual objective: loss = task + beta * D(student, teacher), on a cycle.

What is compared, always on the answer tokens the task loss uses (the positions t whose next token
labels[:, t + 1] is a target):
- ``logits``: the next-token distributions. ``kl`` is Hinton's distillation term, forward KL(teacher || student)
  between softmax(z / T), multiplied by T^2 so its gradient keeps its size whatever the temperature T.
- ``hidden``: the hidden states of the chosen layers (indices into the model's ``hidden_states``: 0 is the input
  embeddings, -1 the last layer after the final norm), per token; D is averaged over the layers.
- ``embeddings``: one vector per sequence, the mean of a layer's states over its answer tokens (a sentence
  embedding); a sequence counts with its number of answer tokens, so the sum below weighs tokens like the task loss.
``mse`` is the mean squared difference over features, ``cosine`` is 1 - cos. When the teacher is wider or narrower
than the student, its states go through a linear map M (teacher width x student width) fitted once by least squares
on the non-padding tokens of the first ``map_samples`` training examples, with the adapters off (the base student):
so it does not depend on when the aligner is built, and a resumed run fits the same map.

``Aligner.loss_sum`` returns D summed over the compared tokens of a micro-batch, so the trainer normalises it like
the task loss: (task_sum + beta * align_sum) / global target tokens. The teacher runs in eval mode without gradients
on the student's token ids, so its tokenizer must give every student token the same id.

Cycle: with period P > 0 and realign_steps R, optimizer steps s (0-based) with s % P >= P - R add beta * D
(realignment), the others are task-only; P = 0 aligns at every step. A gradient init uses the dual objective always.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .schema import ConfigError, option

NAMES = ("none", "teacher")
DIVERGENCES = ("kl", "mse", "cosine")
TARGETS = ("logits", "hidden", "embeddings")
MAPS = ("identity", "lstsq")
TEACHER_DEVICES = ("same", "cpu")


# ---- config ----------------------------------------------------------------------------------------------------------
@dataclass
class NoAlign:
    name: str = "none"


@dataclass
class TeacherAlign:
    """conf/align/teacher.yaml documents each option."""
    name: str = "teacher"
    teacher: str | None = None
    teacher_dtype: str = "same"
    teacher_device: str = option("same", choices=TEACHER_DEVICES)
    divergence: str = option("kl", choices=DIVERGENCES)
    temperature: float = option(1.0, gt=0)
    target: str = option("logits", choices=TARGETS)
    layers: list[int] = field(default_factory=lambda: [-1])
    teacher_layers: list[int] | None = None
    map: str = option("identity", choices=MAPS)
    map_samples: int = option(64, ge=1)
    beta: float = option(1.0, ge=0)
    period: int = option(0, ge=0)
    realign_steps: int = option(0, ge=0)

    def check(self, prefix: str) -> None:
        from omegaconf import OmegaConf

        try:  # the rules between keys (one place, also used by build_aligner)
            validate_align_cfg(OmegaConf.create(asdict(self)))
        except ValueError as e:
            raise ConfigError(str(e)) from None


ALIGNS = {"none": NoAlign, "teacher": TeacherAlign}


def validate_align_cfg(a: Any) -> None:
    """Checks that need no model; raises ValueError naming what is allowed."""
    from .models import DTYPES

    def choice(key, allowed):
        if a.get(key) not in allowed:
            raise ValueError(f"unknown align.{key} {a.get(key)!r}; allowed: {list(allowed)}")

    choice("name", NAMES)
    if a.name == "none":
        return
    if not a.get("teacher") or not str(a.teacher).strip():
        raise ValueError("align=teacher needs align.teacher: a hub name, a local model folder or the run folder "
                         "of an earlier peftlab run")
    t = str(a.teacher)
    if t.startswith(("/", ".", "~")) and not Path(t).expanduser().exists():
        raise ValueError(f"align.teacher {t!r} does not exist (a hub name, a local model folder or a peftlab run "
                         f"folder)")
    for key, allowed in (("divergence", DIVERGENCES), ("target", TARGETS), ("map", MAPS),
                         ("teacher_device", TEACHER_DEVICES), ("teacher_dtype", ("same", *DTYPES))):
        choice(key, allowed)
    if a.divergence == "kl" and a.target != "logits":
        raise ValueError(f"align.divergence=kl compares next-token distributions: it needs align.target=logits, "
                         f"got {a.target!r} (use mse or cosine for hidden states and embeddings)")
    if a.map == "lstsq" and a.target == "logits":
        raise ValueError("align.map=lstsq maps hidden states of other widths; logits need the same vocabulary, so "
                         "use align.map=identity with align.target=logits")
    if not float(a.temperature) > 0:
        raise ValueError(f"align.temperature must be > 0, got {a.temperature}")
    if not float(a.beta) >= 0:
        raise ValueError(f"align.beta must be >= 0, got {a.beta}")
    for key in ("period", "realign_steps", "map_samples"):
        if not isinstance(a.get(key), int) or isinstance(a.get(key), bool) or a[key] < (1 if key == "map_samples" else 0):
            raise ValueError(f"align.{key} must be an integer >= {1 if key == 'map_samples' else 0}, got {a.get(key)!r}")
    if a.period and a.realign_steps > a.period:
        raise ValueError(f"align.realign_steps ({a.realign_steps}) must be <= align.period ({a.period}): the last "
                         f"realign_steps of every period are realignment steps")
    if a.target != "logits":
        layers = list(a.get("layers") or [])
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"align.layers must be a non-empty list of hidden-state indices (e.g. [-1]), "
                             f"got {a.get('layers')!r}")
        tl = a.get("teacher_layers")
        if tl is not None and len(list(tl)) != len(layers):
            raise ValueError(f"align.teacher_layers ({list(tl)}) must pair one teacher layer with each of "
                             f"align.layers ({layers}), or be null (the same indices)")


# ---- divergences (per compared item, fp32) ---------------------------------------------------------------------------
def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) per row."""
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature ** 2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def mse_per_row(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s.float() - t.float()).pow(2).mean(-1)


def cosine_per_row(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(s.float(), t.float(), dim=-1, eps=1e-8)


def fit_linear_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """M (d_x x d_y) minimising ||x M - y||_F (minimum-norm when x is rank-deficient), fitted in fp64."""
    sol = torch.linalg.lstsq(x.double().cpu(), y.double().cpu(), driver="gelsd").solution
    return sol.float()


# ---- the aligner -----------------------------------------------------------------------------------------------------
class Aligner:
    def __init__(self, teacher: torch.nn.Module, a: Any, device: torch.device | str, maps: list | None = None,
                 description: str = ""):
        self.teacher = teacher.eval().requires_grad_(False)
        self.divergence, self.target = str(a.divergence), str(a.target)
        self.temperature, self.beta = float(a.temperature), float(a.beta)
        self.period, self.realign_steps = int(a.period), int(a.realign_steps)
        self.layers = [int(i) for i in (a.get("layers") or [-1])]
        self.teacher_layers = [int(i) for i in (a.get("teacher_layers") or self.layers)]
        self.device = torch.device(device)
        self.teacher_device = next(teacher.parameters()).device
        self.maps = maps  # per layer: None (identity) or M (teacher width x student width)
        self.description = description
        self.needs_hidden_states = self.target != "logits"

    def active(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) adds beta * D."""
        if self.period == 0:
            return True
        return step % self.period >= self.period - self.realign_steps

    @torch.no_grad()
    def teacher_states(self, batch: dict) -> Any:
        """The teacher's logits, or its chosen hidden states, on the student's device."""
        out = self.teacher(input_ids=batch["input_ids"].to(self.teacher_device),
                           attention_mask=batch["attention_mask"].to(self.teacher_device),
                           output_hidden_states=self.needs_hidden_states, use_cache=False)
        if not self.needs_hidden_states:
            return out.logits.to(self.device)
        return [out.hidden_states[i].to(self.device) for i in self.teacher_layers]

    def loss_sum(self, student_out: Any, batch: dict) -> torch.Tensor:
        """D summed over the compared (answer) tokens of the micro-batch; differentiable in the student only."""
        mask = batch["labels"][:, 1:] != -100  # position t predicts token t + 1
        teacher = self.teacher_states(batch)
        if self.target == "logits":
            s, t = student_out.logits[:, :-1][mask], teacher[:, :-1][mask]
            return self._rows(s, t).sum()
        hs = student_out.hidden_states
        if hs is None:
            raise ValueError("the aligner compares hidden states: call the student with output_hidden_states=True")
        total = 0.0
        for k, i in enumerate(self.layers):
            s, t = hs[i][:, :-1].float(), teacher[k][:, :-1].float()
            if self.maps is not None and self.maps[k] is not None:
                t = t @ self.maps[k].to(t.device)
            if self.target == "hidden":
                total = total + self._rows(s[mask], t[mask]).sum()
            else:  # one mean-pooled embedding per sequence, weighted by its answer tokens
                w = mask.unsqueeze(-1).float()
                n = mask.sum(1)
                s_pool = (s * w).sum(1) / n.clamp(min=1).unsqueeze(-1)
                t_pool = (t * w).sum(1) / n.clamp(min=1).unsqueeze(-1)
                total = total + (n * self._rows(s_pool, t_pool)).sum()
        return total / len(self.layers)

    def _rows(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.divergence == "kl":
            return kl_per_token(s, t, self.temperature)
        return mse_per_row(s, t) if self.divergence == "mse" else cosine_per_row(s, t)

    def objective_sum(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """task_sum + beta * align_sum of a micro-batch: the dual objective for a gradient init
        (``estimate_gradient(..., loss_sum=aligner.objective_sum)``)."""
        from .loss import token_loss_sum

        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=self.needs_hidden_states, use_cache=False)
        task = token_loss_sum(out.logits, batch["labels"])
        return task + self.beta * self.loss_sum(out, batch) if self.beta else task

    def cache_key(self) -> dict:
        """What the aligner adds to the identity of a gradient estimated with it (for the init's cache)."""
        fp = [sum(float(p.float().sum()) for p in self.teacher.parameters()),
              sum(float(p.float().norm()) for p in self.teacher.parameters())]
        maps = [None if m is None else float(m.double().norm()) for m in (self.maps or [])]
        return {"teacher": self.description, "teacher_weights": fp, "divergence": self.divergence,
                "target": self.target, "T": self.temperature, "beta": self.beta, "layers": self.layers,
                "teacher_layers": self.teacher_layers, "maps": maps}


# ---- loading the teacher ---------------------------------------------------------------------------------------------
def _adapter_dir(teacher: str) -> Path | None:
    """The PEFT adapter folder when `teacher` is a peftlab run folder (run/adapter) or an adapter folder itself."""
    p = Path(teacher).expanduser()
    for d in (p / "adapter", p):
        if (d / "adapter_config.json").is_file():
            return d
    return None


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file()


def load_teacher(a: Any, dtype: torch.dtype, trust_remote_code: bool = False):
    """(teacher model, teacher tokenizer, description). A run folder: its merged/ model if saved, else its base model
    with its adapter applied by PEFT and merged."""
    from transformers import AutoModelForCausalLM

    from .models import load_tokenizer, resolve_model_path

    teacher = str(a.teacher)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    adapter = _adapter_dir(teacher)
    if adapter is None:
        path = resolve_model_path(teacher)
        return (AutoModelForCausalLM.from_pretrained(path, **kwargs), load_tokenizer(path, trust_remote_code), path)
    merged = adapter.parent / "merged"
    if adapter.name == "adapter" and (merged / "config.json").is_file():
        tok_dir = merged if _has_tokenizer(merged) else adapter
        return (AutoModelForCausalLM.from_pretrained(merged, **kwargs), load_tokenizer(str(tok_dir), trust_remote_code),
                str(merged))
    from peft import PeftModel

    base_name = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"align.teacher: {adapter}/adapter_config.json names no base_model_name_or_path, so the "
                         f"teacher's base model is unknown")
    base_path = resolve_model_path(str(base_name))
    base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    tok_dir = str(adapter) if _has_tokenizer(adapter) else base_path
    return model, load_tokenizer(tok_dir, trust_remote_code), f"{base_path} + {adapter}"


def check_vocab(a: Any, student_tok, teacher_tok, student_model, teacher_model) -> None:
    """The teacher reads the student's token ids: each student token must have the same id in the teacher's
    tokenizer; logits need the very same vocabulary and output width."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    wrong = [tok for tok, i in sv.items() if tv.get(tok) != i]
    if wrong:
        raise ValueError(f"align.teacher {a.teacher!r}: its tokenizer cannot read the student's token ids "
                         f"({len(wrong)} of {len(sv)} student tokens have another id or none, e.g. {wrong[:3]}); "
                         f"use a teacher with the student's tokenizer")
    if a.target == "logits":
        extra = sorted(set(tv) - set(sv))
        vs = student_model.get_output_embeddings().weight.shape[0]
        vt = teacher_model.get_output_embeddings().weight.shape[0]
        if extra or vs != vt:
            raise ValueError(f"align.target=logits needs identical vocabularies: student has {len(sv)} tokens and "
                             f"{vs} logits, teacher {len(tv)} tokens and {vt} logits (extra teacher tokens e.g. "
                             f"{extra[:3]}); compare align.target=hidden or embeddings (with align.map=lstsq if "
                             f"widths differ)")


def _state_batches(model, examples, pad_id, device, layers, batch=8):
    """Per chosen layer, the hidden states of all non-padding tokens of the examples (fp32, CPU), in eval mode."""
    from .data.datasets import collate

    was = model.training
    model.eval()
    out = [[] for _ in layers]
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            b = collate(examples[i:i + batch], pad_id)
            m = b["attention_mask"].bool()
            hs = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                       output_hidden_states=True, use_cache=False).hidden_states
            for k, li in enumerate(layers):
                out[k].append(hs[li].float().cpu()[m])
    model.train(was)
    return [torch.cat(o) for o in out]


def build_aligner(cfg: Any, student_model, student_tokenizer, train_examples: list, pad_id: int,
                  device: torch.device | str) -> Aligner | None:
    """The run's aligner (None for align=none): loads the teacher, checks the vocabularies and widths, fits the maps.
    Leaves the global random state untouched, so building it never changes the rest of the run."""
    a = cfg.get("align")
    if a is None or a.get("name", "none") == "none":
        return None
    validate_align_cfg(a)
    from omegaconf import OmegaConf

    from .adapters import adapter_layers
    from .models import torch_dtype

    # "same": the student's own dtype (that of its frozen embeddings; adapters may be fp32)
    dtype = (student_model.get_input_embeddings().weight.dtype if a.teacher_dtype == "same"
             else torch_dtype(str(a.teacher_dtype)))
    trust = bool(OmegaConf.select(cfg, "model.trust_remote_code", default=False))
    cuda_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        teacher, teacher_tok, desc = load_teacher(a, dtype, trust)
        check_vocab(a, student_tokenizer, teacher_tok, student_model, teacher)
        teacher.to("cpu" if a.teacher_device == "cpu" else device)
        teacher.eval().requires_grad_(False)
        maps = None
        if a.target != "logits":
            maps = _fit_maps(a, student_model, teacher, train_examples, pad_id, device, adapter_layers)
    return Aligner(teacher, a, device, maps, desc)


def _fit_maps(a, student, teacher, examples, pad_id, device, adapter_layers):
    layers = [int(i) for i in a.layers]
    t_layers = [int(i) for i in (a.get("teacher_layers") or layers)]
    n_s = student.config.num_hidden_layers + 1
    n_t = teacher.config.num_hidden_layers + 1
    for name, idx, n in (("align.layers", layers, n_s), ("align.teacher_layers", t_layers, n_t)):
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise ValueError(f"{name} {bad} out of range: the {'student' if n is n_s else 'teacher'} has {n} hidden "
                             f"states (indices {-n}..{n - 1})")
    d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
    if a.map == "identity":
        if d_s != d_t:
            raise ValueError(f"align.target={a.target} with student width {d_s} and teacher width {d_t}: use "
                             f"align.map=lstsq (a least-squares map fitted on the training data)")
        return None
    sample = examples[:int(a.map_samples)]
    if not sample:
        raise ValueError("align.map=lstsq needs training examples to fit the map on")
    adapters = adapter_layers(student)
    for l in adapters.values():  # fit on the base student: the same map whenever (and on resume) it is built
        l.disabled = True
    try:
        ys = _state_batches(student, sample, pad_id, device, layers)
    finally:
        for l in adapters.values():
            l.disabled = False
    xs = _state_batches(teacher, sample, pad_id, next(teacher.parameters()).device, t_layers)
    if xs[0].shape[0] < d_t:
        print(f"peftlab: align.map=lstsq fitted on {xs[0].shape[0]} tokens for a teacher width of {d_t}: "
              f"underdetermined (minimum-norm solution); raise align.map_samples", flush=True)
    return [fit_linear_map(x, y) for x, y in zip(xs, ys)]
