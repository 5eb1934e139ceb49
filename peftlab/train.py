"""The training loop: HF accelerate for processes and devices, a plain loop of our own for everything else.

``setup`` (everything before the first step, in the order the run contract needs: config, folder lock, resume
checks, data with only the tokenizer, targets on the skeleton, then weights), ``train_step`` (one optimizer step),
``after_step`` (eval, log, checkpoint, stop signals) and ``finish`` (export, summary); ``train`` is the loop.
The trainer knows no method: it calls the method's optimizer factory, extra loss and after-step hook, and the update
order is peftlab.optim.step's.
Batching: a global batch of ``model.real_batch_size`` examples per optimizer step, split into micro-batches of
``model.per_device_batch_size`` over processes and accumulation steps (cut after sorting by length, or packed to a
token budget: data/batching.py). The loss is the mean token loss over the whole global batch (summed token losses /
the global count of target tokens; peftlab/loss.py, chunked over answer positions), so the gradient is the same for
any split of the batch over processes and micro-batches.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .adapters import adapter_layers, apply_adapters, get_method, load_trainable_state, trainable_state, unwrap
from .config import RESOLVED_CONFIG, config_differences, resolve_config, save_resolved
from .data import batching
from .data.datasets import DataError, Example, collate, train_eval_examples
from .export import save_merged, save_peft_adapter
from .fsdp import average_gradients, shard_frozen_base, sharding_strategy
from .init import InitContext, get_init
from .loss import loss_sum as answer_loss_sum
from .models import load_model_and_tokenizer, load_tokenizer, resolve_model_path
from .optim.step import NonFiniteError, optimizer_step, params_of
from .schema import ConfigError
from .serving import summary_notes as serving_summary
from .utils import atomic_dir, atomic_write_json, atomic_write_text, recover_dir

CHECKPOINT = "checkpoint"
CHECKPOINT_FILES = ("adapters.pt", "optimizer.pt", "scheduler.pt", "trainer_state.json", RESOLVED_CONFIG)
LOCK = ".peftlab.lock"
NonFiniteLoss = NonFiniteError  # the name tests and users know


# ---- pieces ----------------------------------------------------------------------------------------------------------
def make_accelerator(cfg: DictConfig):
    from accelerate import Accelerator

    # Without cpu=True, two CPU processes would train without gradient sync; so be explicit about the CPU.
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    bf16 = bool(cfg.model.bf16) and not on_cpu and torch.cuda.is_bf16_supported()
    return Accelerator(cpu=on_cpu, mixed_precision="bf16" if bf16 else "no")


def lr_lambda(cfg: DictConfig, total_steps: int):
    warmup = cfg.model.warmup
    warmup_steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    kind = cfg.train.scheduler

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_optimizer(cfg: DictConfig, spec, options, model, params):
    # a method's own optimizer sees the run's learning rate and weight decay with the train options
    if cfg.train.loraplus_lr_ratio is not None:  # LoRA+ groups for any LoRA-factor method
        from .optim.loraplus import loraplus_optimizer

        return loraplus_optimizer(cfg, model, params)
    train_cfg = OmegaConf.merge(OmegaConf.to_container(cfg.train),
                                {"lr": cfg.model.lr, "weight_decay": cfg.model.weight_decay})
    opt = spec.make_optimizer(model, params, train_cfg, options)
    if opt is not None:
        if cfg.train.optimizer == "precond_adamw":  # it would be ignored: refuse (optim/precond.py)
            from .optim.precond import check_preconditionable

            check_preconditionable(model, spec.name)
        return opt
    kwargs = dict(lr=cfg.model.lr, weight_decay=cfg.model.weight_decay, betas=tuple(cfg.train.adam_betas),
                  eps=cfg.train.adam_eps)
    if cfg.train.optimizer == "precond_adamw":
        from .optim.precond import PrecondAdamW

        return PrecondAdamW(model, params, prec_reg=cfg.model.prec_reg, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def global_batch(n_examples: int, batch: int, step: int, seed: int) -> list[int]:
    """Example indices of the optimizer step's global batch: a fresh permutation each epoch, last partial dropped."""
    per_epoch = n_examples // batch
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch:(k + 1) * batch].tolist()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, accelerator, model, optimizer, scheduler, state: dict, cfg: DictConfig) -> None:
    """Atomic: every process writes into a temporary folder, the main process renames it over the old one."""
    final = run_dir / CHECKPOINT
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(trainable_state(model), tmp / "adapters.pt")  # method=full: the whole state_dict
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        (tmp / RESOLVED_CONFIG).write_text(OmegaConf.to_yaml(cfg))  # what a resume must match
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(final) as staged:
            for f in tmp.iterdir():
                os.replace(f, staged / f.name)
        tmp.rmdir()
    accelerator.wait_for_everyone()


def load_adapters(model, folder: Path) -> None:
    load_adapter_states(model, torch.load(folder / "adapters.pt", weights_only=False), f"checkpoint {folder}")


def load_adapter_states(model, states: dict, source: str) -> None:
    if load_trainable_state(model, states, source):  # method=full
        return
    layers = adapter_layers(model)
    if set(states) != set(layers):
        raise ValueError(f"{source} holds adapters for other modules than this run's targets: "
                         f"{sorted(set(states) ^ set(layers))[:5]}")
    for name, layer in layers.items():
        layer.load_adapter_state(states[name])


def whole_copy(cfg: DictConfig, options, model):
    """The trained model unsharded, on the CPU: the original weights with its adapter states (offsets included)
    loaded as a resume loads them."""
    plain, _, _ = load_model_and_tokenizer(cfg.model)
    apply_adapters(plain, cfg.peft, options, cfg.method.name)
    load_adapter_states(plain, {n: l.adapter_state() for n, l in adapter_layers(model).items()}, "the trained model")
    return plain


class MetricsLog:
    """metrics.jsonl (one object per logged step) on the main process; wandb when enabled."""

    def __init__(self, path: Path, enabled: bool, wandb_run=None):
        self.path, self.enabled, self.wandb_run = path, enabled, wandb_run
        self.fh = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines a killed run wrote after its last checkpoint (and any torn last line)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.fh is None:
            self.fh = open(self.path, "a")
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def init_wandb(cfg: DictConfig, run_dir: Path):
    if cfg.wandb.mode == "disabled":
        return None
    import wandb

    return wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, entity=cfg.wandb.entity,
                      group=cfg.wandb.group, tags=list(cfg.wandb.tags or []) + [cfg.method.name, cfg.init.name],
                      mode=cfg.wandb.mode, dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True),
                      resume="allow", id=_wandb_id(run_dir))


def finish_wandb(wandb_run) -> None:
    """Finish the run and wait for wandb-core to write all of it: run.finish() may return before the run file is
    flushed (seen with wandb 0.31 for a second run in one process: 7 bytes on return), wandb.teardown() waits."""
    if wandb_run is None:
        return
    import wandb

    wandb_run.finish()
    wandb.teardown()


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run folder, so a resumed (requeued) run continues the same curve."""
    path = run_dir / "wandb_id.txt"
    if not path.exists():
        import secrets

        atomic_write_text(path, secrets.token_hex(4))
    return path.read_text().strip()


class StopSignal:
    """SLURM sends a signal before the time limit (sbatch --signal); we checkpoint at the next step and requeue."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners)
                pass

    def _handle(self, signum, frame):
        self.received = signum


def requeue_slurm_job() -> bool:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = (f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job
              else os.environ.get("SLURM_JOB_ID"))
    if not job_id:
        return False
    import subprocess

    return subprocess.run(["scontrol", "requeue", job_id], check=False).returncode == 0


# ---- evaluation ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, examples: list[Example], pad_id: int, batch: int, accelerator, chunk: int = 1024) -> float:
    """Mean token loss over the eval set, each process taking a strided shard."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = examples[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    # as many forwards on every process (FSDP's are collective): a short shard runs a discarded stand-in batch
    for i in range(0, -(-len(examples) // world), batch):
        part = shard[i:i + batch]
        b = {k: v.to(accelerator.device) for k, v in collate(part or examples[:1], pad_id).items()}
        with accelerator.autocast():
            lsum, _ = answer_loss_sum(model, b, chunk)
        if part:
            total[0] += lsum.double()
            total[1] += (b["labels"][:, 1:] != -100).sum()
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))


# ---- the run folder: one run at a time, resumes that match -----------------------------------------------------------
class RunFolderLock:
    """An exclusive lock on the run folder while a run uses it (flock: released by the OS if the process dies)."""

    def __init__(self, run_dir: Path):
        import fcntl
        import socket

        self.path = run_dir / LOCK
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise ConfigError(f"run folder {run_dir} is in use by {holder}; a second run into it would corrupt both. "
                              f"Wait for it, or choose another hydra.run.dir") from None
        self.fh.seek(0)
        self.fh.truncate()
        job = os.environ.get("SLURM_JOB_ID")
        self.fh.write(f"pid {os.getpid()} on {socket.gethostname()}{f' (SLURM job {job})' if job else ''} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.fh.flush()

    def release(self) -> None:
        if not self.fh.closed:
            self.fh.close()  # closing releases the flock; the file stays (removing it would race a new holder)


def read_checkpoint(ckpt_dir: Path, rank: int) -> dict:
    """Every file of a checkpoint, loaded; an incomplete or damaged checkpoint is refused naming the file."""
    out = {}
    for name in CHECKPOINT_FILES + (f"rng_{rank}.pt",):
        path = ckpt_dir / name
        if not path.is_file():
            raise ConfigError(f"cannot resume: checkpoint file {path} is missing (an incomplete checkpoint, or one "
                              f"written with another number of processes); nothing was changed in {ckpt_dir.parent}")
        try:
            if name.endswith(".pt"):
                out[name] = torch.load(path, weights_only=False, map_location="cpu")
            elif name.endswith(".json"):
                out[name] = json.loads(path.read_text())
            else:
                out[name] = OmegaConf.load(path)
        except Exception as e:
            raise ConfigError(f"cannot resume: checkpoint file {path} is damaged ({type(e).__name__}: {e}); "
                              f"nothing was changed in {ckpt_dir.parent}") from None
    return out


def check_resume(cfg: DictConfig, ckpt: dict, ckpt_dir: Path) -> None:
    diff = config_differences(ckpt[RESOLVED_CONFIG], cfg)
    if diff:
        old = ckpt[RESOLVED_CONFIG]
        shown = "; ".join(f"{k}: {OmegaConf.select(old, k)!r} -> {OmegaConf.select(cfg, k)!r}" for k in diff[:8])
        raise ConfigError(f"cannot resume {ckpt_dir}: the config differs from the checkpointed one in what changes "
                          f"the result ({shown}); resume with the same overrides, or start a new run folder")


# ---- before the model: config, folder, data ---------------------------------------------------------------------------
def prepare_data(cfg: DictConfig) -> tuple[Any, str, list[Example], list[Example]]:
    """The tokenizer and the tokenised data, checked, with no model loaded: (tokenizer, model path, train, eval)."""
    m = cfg.model
    path = resolve_model_path(str(m.name))
    tokenizer = load_tokenizer(path, m.trust_remote_code)
    train_ex, eval_ex = train_eval_examples(cfg.dataset, tokenizer, m.max_length)
    where = f"dataset '{cfg.dataset.name}' ({cfg.dataset.path})"
    if len(train_ex) < m.real_batch_size:
        raise DataError(f"{where} has {len(train_ex)} usable training examples (rows whose prompt leaves room for "
                        f"an answer within model.max_length={m.max_length}), fewer than one global batch "
                        f"(model.real_batch_size={m.real_batch_size})")
    if m.eval_epochs and cfg.dataset.eval_samples and not eval_ex:
        raise DataError(f"{where} has no usable evaluation examples (dataset.eval_split={cfg.dataset.eval_split}); "
                        f"set dataset.eval_samples=0 or model.eval_epochs=0 to train without evaluation")
    return tokenizer, path, train_ex, eval_ex


def check_targets(cfg: DictConfig, path: str) -> None:
    """The target modules, found on the model's skeleton (meta device: no weights read), so a pattern that
    matches nothing fails before loading. Skipped where the skeleton cannot be built without loading."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters.base import find_targets, resolve_target_patterns

    if not get_method(cfg.method.name).uses_targets:
        return
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except Exception:
        return
    p = cfg.peft
    patterns = resolve_target_patterns(p.target_set, p.lora_target_modules, getattr(config, "model_type", None))
    try:
        find_targets(skeleton, patterns)
    except ValueError as e:
        raise ConfigError(f"peft.lora_target_modules / peft.target_set ({p.lora_target_modules or p.target_set}): "
                          f"{e}") from None


# ---- the run: setup, step, finish --------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a run holds between setup and finish."""
    cfg: DictConfig
    run_dir: Path
    accelerator: Any
    model: torch.nn.Module            # unwrapped, adapted
    ddp_model: torch.nn.Module        # what the forward runs through (DDP / FSDP / the model itself)
    tokenizer: Any
    model_path: str
    spec: Any
    options: Any                      # the method's checked options
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_ex: list
    eval_ex: list
    aligner: Any
    fsdp: str | None
    state: dict
    total_steps: int
    steps_per_epoch: int
    eval_every: int
    n_trainable: int
    log: MetricsLog
    wandb_run: Any
    lock: RunFolderLock | None
    stop: StopSignal
    t_start: float
    t_segment: float = 0.0
    recent: list = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CHECKPOINT

    def checkpoint(self) -> None:
        now = time.time()
        self.state["wall_time_s"] += now - self.t_segment
        self.t_segment = now
        save_checkpoint(self.run_dir, self.accelerator, self.model, self.optimizer, self.scheduler, self.state,
                        self.cfg)

    def close(self) -> None:
        self.log.close()
        if self.lock is not None:
            self.lock.release()


def setup(cfg: DictConfig) -> Run:
    """Everything before the first step. The order is the contract: the config is resolved and checked, the run
    folder locked, a resume checked against its checkpoint, the data read and checked with only the tokenizer, the
    targets found on the model's skeleton; only then are weights loaded."""
    cfg = resolve_config(cfg)
    stop = StopSignal()  # from the start: a signal during loading or the init must not kill the run
    t_start = time.time()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg)
    world, main = accelerator.num_processes, accelerator.is_main_process
    if accelerator.distributed_type.name == "DEEPSPEED":
        raise ConfigError("peftlab does not train under DeepSpeed; for a sharded base use FSDP (train.fsdp=full_shard "
                          "or conf/accelerate/fsdp.yaml), which keeps the adapters whole")
    fsdp = sharding_strategy(cfg.train.fsdp, accelerator)
    fsdp = fsdp if world > 1 else None  # one process has nothing to shard over
    m = cfg.model
    per_step_micro = m.real_batch_size // m.per_device_batch_size
    if per_step_micro % world:
        raise ConfigError(f"model.real_batch_size {m.real_batch_size} / per_device_batch_size "
                          f"{m.per_device_batch_size} = {per_step_micro} micro-batches per step cannot be shared "
                          f"by {world} processes; make it a multiple of {world}")
    lock = RunFolderLock(run_dir) if main else None
    try:
        ckpt = _resume_checkpoint(cfg, run_dir, accelerator)
        if main:
            save_resolved(cfg, run_dir)
        tokenizer, model_path, train_ex, eval_ex = prepare_data(cfg)
        check_targets(cfg, model_path)
        return _setup_model(cfg, run_dir, accelerator, fsdp, ckpt, tokenizer, model_path, train_ex, eval_ex, lock,
                            stop, t_start)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _resume_checkpoint(cfg: DictConfig, run_dir: Path, accelerator) -> dict | None:
    """The checkpoint to continue from (None: a fresh start). Never silently starts over: a folder holding a
    checkpoint needs resume=true, and a resume needs a complete checkpoint of the same config."""
    ckpt_dir = run_dir / CHECKPOINT
    if accelerator.is_main_process:
        recover_dir(ckpt_dir)
    accelerator.wait_for_everyone()
    # a requeued SLURM job resumes even when its command line lacks resume=true (e.g. submitit multiruns)
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    if not ckpt_dir.exists():
        if cfg.resume and accelerator.is_main_process:
            print(f"peftlab: resume=true but {run_dir} has no checkpoint yet: starting at step 0", flush=True)
        return None
    if not (cfg.resume or requeued):
        raise ConfigError(f"run folder {run_dir} already holds a run's checkpoint; continue it with resume=true, "
                          f"or choose another hydra.run.dir (refusing to overwrite it)")
    ckpt = read_checkpoint(ckpt_dir, accelerator.process_index)
    check_resume(cfg, ckpt, ckpt_dir)
    return ckpt


def _setup_model(cfg, run_dir, accelerator, fsdp, ckpt, tokenizer, model_path, train_ex, eval_ex, lock, stop,
                 t_start) -> Run:
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    m = cfg.model
    model, _, _ = load_model_and_tokenizer(m)
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model loaded with empty (meta) weights on this process, as accelerate's "
                         "fsdp_cpu_ram_efficient_loading does; every process needs the whole weights for the inits: "
                         "set fsdp_cpu_ram_efficient_loading: false (conf/accelerate/fsdp.yaml does)")
    # seeded after loading: building the embedded model on first use must not change this run's randomness
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    spec = get_method(cfg.method.name)
    options = spec.parse(cfg.method)
    apply_adapters(model, cfg.peft, options, cfg.method.name)
    model.to(accelerator.device)
    layers = adapter_layers(model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False

    from .align import build_aligner

    aligner = build_aligner(cfg, model, tokenizer, train_ex, tokenizer.pad_token_id, accelerator.device)
    init_metrics = {}
    if ckpt is not None:
        load_adapter_states(model, ckpt["adapters.pt"], f"checkpoint {run_dir / CHECKPOINT}")
    else:
        init_metrics = get_init(cfg.init.name).run(InitContext(model, layers, cfg, train_ex, tokenizer.pad_token_id,
                                                               accelerator, run_dir, aligner))
    torch.manual_seed(cfg.seed * 1000 + rank)  # after the (rank-identical) init: independent dropout per process
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, spec, options, model, params)

    steps_per_epoch = len(train_ex) // m.real_batch_size
    total_steps = int(m.epochs * steps_per_epoch)
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    eval_every = max(1, int(round(m.eval_epochs * steps_per_epoch))) if m.eval_epochs else 0

    state = {"step": 0, "wall_time_s": 0.0, "tokens": 0, "initial_eval_loss": None, "last_eval_loss": None,
             "init_metrics": init_metrics}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer.pt"])
        scheduler.load_state_dict(ckpt["scheduler.pt"])
        state = ckpt["trainer_state.json"]
        set_rng_state(ckpt[f"rng_{rank}.pt"])

    if fsdp:
        ddp_model = shard_frozen_base(model, fsdp, accelerator.device)
    else:
        ddp_model = accelerator.prepare(model) if world > 1 else model
    wandb_run = init_wandb(cfg, run_dir) if main else None
    log = MetricsLog(run_dir / "metrics.jsonl", main, wandb_run)
    if ckpt is not None:
        log.truncate_after(state["step"])
    elif main:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    # loading/init time and segments, summed over requeue segments like state["wall_time_s"] (the loop's time)
    state["setup_time_s"] = state.get("setup_time_s", 0.0) + time.time() - t_start
    state["segments"] = state.get("segments", 0) + 1
    run = Run(cfg=cfg, run_dir=run_dir, accelerator=accelerator, model=model, ddp_model=ddp_model,
              tokenizer=tokenizer, model_path=model_path, spec=spec, options=options, optimizer=optimizer,
              scheduler=scheduler, train_ex=train_ex, eval_ex=eval_ex, aligner=aligner, fsdp=fsdp, state=state,
              total_steps=total_steps, steps_per_epoch=steps_per_epoch, eval_every=eval_every,
              n_trainable=sum(p.numel() for p in params), log=log, wandb_run=wandb_run, lock=lock, stop=stop,
              t_start=t_start, t_segment=time.time())
    if state["initial_eval_loss"] is None and eval_ex and eval_every:
        state["initial_eval_loss"] = state["last_eval_loss"] = run_eval(run)
        log.log({"step": 0, "eval/loss": state["initial_eval_loss"], **init_metrics})
    return run


def run_eval(run: Run) -> float:
    return evaluate(run.ddp_model, run.eval_ex, run.tokenizer.pad_token_id, run.cfg.model.per_device_batch_size,
                    run.accelerator, run.cfg.train.loss_chunk_tokens)


def train_step(run: Run) -> dict:
    """One optimizer step over one global batch: the micro-batches' forward and backward on every process, then the
    update (peftlab.optim.step); returns the step's metrics row."""
    cfg, acc, spec = run.cfg, run.accelerator, run.spec
    rank, world = acc.process_index, acc.num_processes
    step = run.state["step"]
    indices = global_batch(len(run.train_ex), cfg.model.real_batch_size, step, cfg.seed)
    n_targets = sum(run.train_ex[i].n_targets for i in indices)  # known to every process: no communication
    # sorted by length (or packed) before cutting: the same gradient, less padding (data/batching.py)
    micros = batching.micro_batches(run.train_ex, indices, cfg.model.per_device_batch_size, rank, world,
                                    cfg.train.micro_batch_order, cfg.model.max_tokens_per_micro_batch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    align_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    aligner = run.aligner
    aligning = aligner is not None and aligner.active(step)
    extra_total = 0.0
    pad_id = run.tokenizer.pad_token_id
    for j, part in enumerate(micros):
        b = {k: v.to(acc.device) for k, v in collate(part, pad_id).items()}
        sync = j == len(micros) - 1
        with (acc.no_sync(run.ddp_model) if (world > 1 and not sync and not run.fsdp) else contextlib.nullcontext()):
            with acc.autocast():
                chunk = 0 if aligning and aligner.target == "logits" else cfg.train.loss_chunk_tokens
                lsum, out = answer_loss_sum(run.ddp_model, b, chunk,
                                            output_hidden_states=aligning and aligner.needs_hidden_states)
                total = lsum
                if aligning:  # summed over the same answer tokens, so normalised like the task loss
                    asum = aligner.loss_sum(out, b)
                    total = lsum + aligner.beta * asum
                    align_sum += asum.detach().double()
                # DDP averages gradients over processes, hence * world
                loss = total * (world / n_targets)
                extra = spec.extra_loss(unwrap(run.ddp_model), run.options)
                if extra is not None:
                    loss = loss + extra / len(micros)
                    extra_total += float(extra.detach()) / len(micros)
            loss.backward()
        loss_sum += lsum.detach().double()
    if run.fsdp:
        average_gradients(params_of(run.optimizer), world)
    train_loss = float(acc.reduce(loss_sum, reduction="sum")) / n_targets  # the task loss; alignment logged apart
    align_loss = float(acc.reduce(align_sum, reduction="sum")) / n_targets if aligning else 0.0
    kept = (f"the last good checkpoint is {run.ckpt_dir}" if run.ckpt_dir.exists()
            else "no checkpoint was saved yet")
    if not math.isfinite(train_loss + align_loss):
        raise NonFiniteError(f"train loss is {train_loss} at step {step + 1}; stopped before the update, {kept}. "
                             f"Lower model.lr, enable train.max_grad_norm, or check the data.")
    grad_norm, hook_metrics = optimizer_step(
        run.optimizer, run.scheduler, max_grad_norm=cfg.train.max_grad_norm, spec=spec,
        model=unwrap(run.ddp_model), options=run.options, step=step + 1,
        where=f" (train loss {train_loss:.4g}); {kept}")
    run.state["step"] = step + 1
    run.state["tokens"] += n_targets
    run.recent = (run.recent + [train_loss])[-10:]
    run.state["last_train_loss"] = sum(run.recent) / len(run.recent)
    row = {"step": step + 1, "epoch": (step + 1) / run.steps_per_epoch, "train/loss": train_loss,
           "lr": run.scheduler.get_last_lr()[0], **hook_metrics}
    if grad_norm is not None:
        row["train/grad_norm"] = grad_norm
    if extra_total:
        row["train/extra_loss"] = extra_total
    if aligner is not None:
        row["align/active"] = int(aligning)
        if aligning:
            row["train/align_loss"] = align_loss
    return row


def after_step(run: Run, row: dict) -> bool:
    """Evaluation, logging, checkpoints and stop signals after an update; False when the run must stop now."""
    s, cfg = run.state["step"], run.cfg
    if run.eval_every and run.eval_ex and (s % run.eval_every == 0 or s == run.total_steps):
        run.state["last_eval_loss"] = row["eval/loss"] = run_eval(run)
    if s % cfg.train.log_every == 0 or "eval/loss" in row:
        run.log.log(row)
    got_signal = _any_process(run.accelerator, run.stop.received is not None)
    if (cfg.train.save_every and s % cfg.train.save_every == 0) or s == run.total_steps or got_signal:
        run.checkpoint()
    if got_signal and s < run.total_steps:
        run.log.close()
        finish_wandb(run.wandb_run)  # first: the requeue's SIGTERM would kill wandb-core before it wrote the run
        requeued = run.main and requeue_slurm_job()
        print(f"peftlab: stop signal received; checkpoint saved at step {s} in {run.ckpt_dir}"
              f"{' and the job requeued' if requeued else ''}; continue with resume=true", flush=True)
        return False
    return True


def finish(run: Run) -> dict:
    """The final checkpoint, the adapter (and merged model), the summary; returns the summary."""
    cfg, m, state = run.cfg, run.cfg.model, run.state
    if run.total_steps == 0 or not (run.ckpt_dir / "trainer_state.json").exists():
        run.checkpoint()
    state["wall_time_s"] += time.time() - run.t_segment
    summary = {
        "method": cfg.method.name, "init": cfg.init.name, "model": str(m.name), "dataset": cfg.dataset.name,
        "steps": state["step"], "epochs": m.epochs, "final_train_loss": state.get("last_train_loss"),
        "initial_eval_loss": state["initial_eval_loss"], "final_eval_loss": state["last_eval_loss"],
        "trainable_params": run.n_trainable, "train_time_s": round(state["wall_time_s"], 3),
        "wall_time_s": round(state["setup_time_s"] + state["wall_time_s"], 3), "segments": state["segments"],
        "segment_wall_time_s": round(time.time() - run.t_start, 3), "target_tokens": state["tokens"],
        "target_tokens_per_s": round(state["tokens"] / max(state["wall_time_s"], 1e-9), 1),
        "processes": run.accelerator.num_processes, "seed": cfg.seed, "run_dir": str(run.run_dir),
    }
    spec = run.spec
    if not spec.exports_adapter:  # method=full: no adapter/, the model is saved whole in merged/
        summary["adapter"] = spec.export_note
    if run.main:
        if spec.exports_adapter:
            save_peft_adapter(run.model, run.run_dir / "adapter", base_model_name_or_path=run.model_path,
                              extra={"method": cfg.method.name, "init": cfg.init.name})
            summary.update(serving_summary(run.run_dir / "adapter"))  # adapter_r; vllm_note when vLLM refuses it
            run.tokenizer.save_pretrained(run.run_dir / "adapter")
        spec.on_train_end(unwrap(run.model), run.run_dir, run.options)
        if m.saving and run.fsdp:  # the live base is sharded: merge a whole copy instead
            save_merged(whole_copy(cfg, run.options, run.model), run.tokenizer, run.run_dir / "merged", in_place=True)
        elif m.saving or not spec.exports_adapter:  # (full: nothing to merge, so no copy of the model)
            save_merged(run.model, run.tokenizer, run.run_dir / "merged", in_place=not spec.exports_adapter)
        atomic_write_json(run.run_dir / "summary.json", summary)
        line = summary_line(summary)
        atomic_write_text(run.run_dir / "summary.txt", line + "\n")
        print(line, flush=True)
        run.log.close()
        if run.wandb_run is not None:
            run.wandb_run.summary.update({k: v for k, v in summary.items() if v is not None})
            finish_wandb(run.wandb_run)
    run.accelerator.wait_for_everyone()
    return summary


def train(cfg: DictConfig) -> dict:
    """Train one run as configured; returns the summary (also written to run_dir/summary.json)."""
    run = None
    try:
        run = setup(cfg)
        from tqdm.auto import tqdm

        bar = tqdm(total=run.total_steps, initial=run.state["step"], disable=not run.main, dynamic_ncols=True,
                   desc=f"{run.cfg.method.name}/{run.cfg.init.name}")
        with bar:
            while run.state["step"] < run.total_steps:
                row = train_step(run)
                bar.update(1)
                bar.set_postfix(loss=f"{row['train/loss']:.4f}", refresh=False)
                if not after_step(run, row):
                    raise SystemExit(0)
        return finish(run)
    finally:  # on every exit (the end, a stop signal, an error): gloo aborts processes that leave with the group alive
        if run is not None:
            run.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def summary_line(s: dict) -> str:
    ev = (f"eval_loss {s['initial_eval_loss']:.4f} -> {s['final_eval_loss']:.4f}"
          if s["final_eval_loss"] is not None else "eval_loss n/a")
    tl = f"{s['final_train_loss']:.4f}" if s["final_train_loss"] is not None else "n/a"
    return (f"peftlab: method={s['method']} init={s['init']} model={s['model']} data={s['dataset']} "
            f"steps={s['steps']} train_loss={tl} {ev} params={s['trainable_params']} "
            f"time={s['wall_time_s']:.1f}s run_dir={s['run_dir']}")


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)
