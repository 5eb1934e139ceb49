"""The training loop: HF accelerate for processes and devices, a plain loop of our own for everything else.

The trainer knows no method: it calls the method's optimizer factory, extra loss and after-step hook.
Batching: a global batch of ``model.real_batch_size`` examples per optimizer step, split into micro-batches of
``model.per_device_batch_size`` over processes and accumulation steps. The loss is the mean token loss over the
whole global batch (summed token losses / the global count of target tokens), so the gradient is the same for any
split of the batch over processes and micro-batches.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from .adapters import adapter_layers, apply_adapters, get_method, load_trainable_state, trainable_state, unwrap
from .config import resolve_config
from .data.datasets import Example, collate, train_eval_examples
from .export import save_merged, save_peft_adapter
from .fsdp import average_gradients, shard_frozen_base, sharding_strategy
from .init import InitContext, get_init
from .models import load_model_and_tokenizer
from .utils import atomic_dir, atomic_write_json, atomic_write_text, recover_dir

CHECKPOINT = "checkpoint"


class NonFiniteLoss(FloatingPointError):
    pass


# ---- pieces ----------------------------------------------------------------------------------------------------------
def make_accelerator(cfg: DictConfig):
    from accelerate import Accelerator

    # Without cpu=True, two CPU processes would train without gradient sync; so be explicit about the CPU.
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    bf16 = bool(cfg.model.bf16) and not on_cpu and torch.cuda.is_bf16_supported()
    return Accelerator(cpu=on_cpu, mixed_precision="bf16" if bf16 else "no")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over target tokens, in fp32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


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


def build_optimizer(cfg: DictConfig, spec, model, params):
    # a method's own optimizer sees the run's learning rate and weight decay with the train options
    if cfg.train.get("loraplus_lr_ratio") is not None:  # LoRA+ groups for any LoRA-factor method
        from .optim.loraplus import loraplus_optimizer

        return loraplus_optimizer(cfg, model, params)
    train_cfg = OmegaConf.merge(cfg.train, {"lr": cfg.model.lr, "weight_decay": cfg.model.weight_decay})
    opt = spec.make_optimizer(model, params, train_cfg, cfg.method)
    if opt is not None:
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


def micro_batches(indices: list[int], per_device: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches: chunk j of the global batch goes to process j % world."""
    chunks = [indices[i:i + per_device] for i in range(0, len(indices), per_device)]
    return chunks[rank::world]


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


def save_checkpoint(run_dir: Path, accelerator, model, optimizer, scheduler, state: dict) -> None:
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


def whole_copy(cfg: DictConfig, model):
    """The trained model unsharded, on the CPU: the original weights with its adapter states (offsets included)
    loaded as a resume loads them."""
    plain, _, _ = load_model_and_tokenizer(cfg.model)
    apply_adapters(plain, cfg.peft, cfg.method, cfg.method.name)
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
def evaluate(model, examples: list[Example], pad_id: int, batch: int, accelerator) -> float:
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
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        if part:
            total[0] += token_loss_sum(logits, b["labels"]).double()
            total[1] += (b["labels"][:, 1:] != -100).sum()
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))


# ---- the run ---------------------------------------------------------------------------------------------------------
def train(cfg: DictConfig) -> dict:
    """Train one run as configured; returns the summary (also written to run_dir/summary.json)."""
    try:
        return _train(cfg)
    finally:  # on every exit (the end, a stop signal, an error): gloo aborts processes that leave with the group alive
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: DictConfig) -> dict:
    cfg = resolve_config(cfg)
    stop = StopSignal()  # from the start: a signal during loading or the init must not kill the run
    t_start = time.time()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if accelerator.distributed_type.name == "DEEPSPEED":
        raise ValueError("peftlab does not train under DeepSpeed; for a sharded base use FSDP (train.fsdp=full_shard "
                         "or conf/accelerate/fsdp.yaml), which keeps the adapters whole")
    fsdp = sharding_strategy(cfg.train.get("fsdp"), accelerator)
    fsdp = fsdp if world > 1 else None  # one process has nothing to shard over
    m = cfg.model
    per_step_micro = m.real_batch_size // m.per_device_batch_size
    if per_step_micro % world:
        raise ValueError(f"model.real_batch_size {m.real_batch_size} / per_device_batch_size "
                         f"{m.per_device_batch_size} = {per_step_micro} micro-batches per step cannot be shared "
                         f"by {world} processes; make it a multiple of {world}")
    model, tokenizer, model_path = load_model_and_tokenizer(m)
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model loaded with empty (meta) weights on this process, as accelerate's "
                         "fsdp_cpu_ram_efficient_loading does; every process needs the whole weights for the inits: "
                         "set fsdp_cpu_ram_efficient_loading: false (conf/accelerate/fsdp.yaml does)")
    train_ex, eval_ex = train_eval_examples(cfg.dataset, tokenizer, m.max_length)
    if len(train_ex) < m.real_batch_size:
        raise ValueError(f"dataset '{cfg.dataset.name}' ({cfg.dataset.path}) has {len(train_ex)} usable training "
                         f"examples, fewer than one global batch (model.real_batch_size={m.real_batch_size})")
    # seeded after loading: building the embedded model on first use must not change this run's randomness
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    spec = get_method(cfg.method.name)
    apply_adapters(model, cfg.peft, cfg.method, cfg.method.name)
    model.to(accelerator.device)
    layers = adapter_layers(model)
    if m.get("gradient_checkpointing") or cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False

    from .align import build_aligner

    aligner = build_aligner(cfg, model, tokenizer, train_ex, tokenizer.pad_token_id, accelerator.device)
    ckpt_dir = run_dir / CHECKPOINT
    if accelerator.is_main_process:
        recover_dir(ckpt_dir)
    accelerator.wait_for_everyone()
    # a requeued SLURM job resumes even when its command line lacks resume=true (e.g. submitit multiruns)
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    resuming = (bool(cfg.resume) or requeued) and (ckpt_dir / "trainer_state.json").exists()
    init_metrics = {}
    if resuming:
        load_adapters(model, ckpt_dir)
    else:
        init_metrics = get_init(cfg.init.name).run(InitContext(model, layers, cfg, train_ex, tokenizer.pad_token_id,
                                                               accelerator, run_dir, aligner))
        layers = adapter_layers(model)  # an init may rebuild layers (e.g. per-layer ranks)
    torch.manual_seed(cfg.seed * 1000 + rank)  # after the (rank-identical) init: independent dropout per process
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = build_optimizer(cfg, spec, model, params)

    steps_per_epoch = len(train_ex) // m.real_batch_size
    total_steps = int(m.epochs * steps_per_epoch)
    if cfg.train.max_steps:
        total_steps = min(total_steps, int(cfg.train.max_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    eval_every = max(1, int(round(m.eval_epochs * steps_per_epoch))) if m.eval_epochs else 0

    state = {"step": 0, "wall_time_s": 0.0, "tokens": 0, "initial_eval_loss": None, "last_eval_loss": None,
             "init_metrics": init_metrics}
    if resuming:
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=False))
        state = json.loads((ckpt_dir / "trainer_state.json").read_text())
        set_rng_state(torch.load(ckpt_dir / f"rng_{rank}.pt", weights_only=False))

    if fsdp:
        ddp_model = shard_frozen_base(model, fsdp, accelerator.device)
    else:
        ddp_model = accelerator.prepare(model) if world > 1 else model
    wandb_run = init_wandb(cfg, run_dir) if main else None
    log = MetricsLog(run_dir / "metrics.jsonl", main, wandb_run)
    if resuming:
        log.truncate_after(state["step"])
    elif main:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    pad_id = tokenizer.pad_token_id
    save_every = int(cfg.train.save_every or 0)

    def checkpoint():
        state["wall_time_s"] += time.time() - t_seg[0]
        t_seg[0] = time.time()
        save_checkpoint(run_dir, accelerator, model, optimizer, scheduler, state)

    t_seg = [time.time()]
    if state["initial_eval_loss"] is None and eval_ex and eval_every:
        state["initial_eval_loss"] = state["last_eval_loss"] = evaluate(ddp_model, eval_ex, pad_id,
                                                                         m.per_device_batch_size, accelerator)
        log.log({"step": 0, "eval/loss": state["initial_eval_loss"], **init_metrics})

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state["step"], disable=not main, desc=f"{cfg.method.name}/{cfg.init.name}",
               dynamic_ncols=True)
    ddp_model.train()
    recent = []
    while state["step"] < total_steps:
        step = state["step"]
        indices = global_batch(len(train_ex), m.real_batch_size, step, cfg.seed)
        n_targets = sum(train_ex[i].n_targets for i in indices)  # known to every process: no communication
        micros = micro_batches(indices, m.per_device_batch_size, rank, world)
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        align_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        aligning = aligner is not None and aligner.active(step)
        extra_total = 0.0
        for j, idx in enumerate(micros):
            b = {k: v.to(accelerator.device) for k, v in collate([train_ex[i] for i in idx], pad_id).items()}
            sync = j == len(micros) - 1
            with (accelerator.no_sync(ddp_model) if (world > 1 and not sync and not fsdp) else _null()):
                with accelerator.autocast():
                    out = ddp_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                    output_hidden_states=aligning and aligner.needs_hidden_states)
                    lsum = token_loss_sum(out.logits, b["labels"])
                    total = lsum
                    if aligning:  # summed over the same answer tokens, so normalised like the task loss
                        asum = aligner.loss_sum(out, b)
                        total = lsum + aligner.beta * asum
                        align_sum += asum.detach().double()
                    # DDP averages gradients over processes, hence * world
                    loss = total * (world / n_targets)
                    extra = spec.extra_loss(unwrap(ddp_model), cfg.method)
                    if extra is not None:
                        loss = loss + extra / len(micros)
                        extra_total += float(extra.detach()) / len(micros)
                loss.backward()
            loss_sum += lsum.detach().double()
        if fsdp:
            average_gradients(params_of(optimizer), world)
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")
        train_loss = float(loss_sum) / n_targets  # the task loss; the alignment term is logged apart
        align_loss = float(accelerator.reduce(align_sum, reduction="sum")) / n_targets if aligning else 0.0
        if not math.isfinite(train_loss + align_loss):
            bar.close()
            log.close()
            raise NonFiniteLoss(f"train loss is {train_loss} at step {step + 1}; stopped before the update, "
                                f"{_kept(ckpt_dir)}. Lower model.lr, enable train.max_grad_norm, or check the data.")
        grad_norm = None
        if cfg.train.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params_of(optimizer), cfg.train.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(torch.stack(torch._foreach_norm(params_of(optimizer)))).all():  # one sync
            bar.close()
            log.close()
            raise NonFiniteLoss(f"parameters became non-finite in the update of step {step + 1} (train loss "
                                f"{train_loss:.4g}); {_kept(ckpt_dir)}. Lower model.lr or enable train.max_grad_norm.")
        hook_metrics = spec.after_step(unwrap(ddp_model), optimizer, step + 1, cfg.method)
        state["step"] = step + 1
        state["tokens"] += n_targets
        recent = (recent + [train_loss])[-10:]
        row = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch, "train/loss": train_loss,
               "lr": scheduler.get_last_lr()[0], **hook_metrics}
        if grad_norm is not None:
            row["train/grad_norm"] = grad_norm
        if extra_total:
            row["train/extra_loss"] = extra_total
        if aligner is not None:
            row["align/active"] = int(aligning)
            if aligning:
                row["train/align_loss"] = align_loss
        if eval_every and (state["step"] % eval_every == 0 or state["step"] == total_steps) and eval_ex:
            state["last_eval_loss"] = row["eval/loss"] = evaluate(ddp_model, eval_ex, pad_id,
                                                                  m.per_device_batch_size, accelerator)
        if state["step"] % cfg.train.log_every == 0 or "eval/loss" in row:
            log.log(row)
        state["last_train_loss"] = sum(recent) / len(recent)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)
        got_signal = _any_process(accelerator, stop.received is not None)
        if (save_every and state["step"] % save_every == 0) or state["step"] == total_steps or got_signal:
            checkpoint()
        if got_signal and state["step"] < total_steps:
            bar.close()
            log.close()
            requeued = main and requeue_slurm_job()
            print(f"peftlab: stop signal received; checkpoint saved at step {state['step']} in {ckpt_dir}"
                  f"{' and the job requeued' if requeued else ''}; continue with resume=true", flush=True)
            raise SystemExit(0)
    bar.close()
    if total_steps == 0 or not (ckpt_dir / "trainer_state.json").exists():
        checkpoint()
    state["wall_time_s"] += time.time() - t_seg[0]

    summary = {
        "method": cfg.method.name, "init": cfg.init.name, "model": str(m.name), "dataset": cfg.dataset.name,
        "steps": state["step"], "epochs": m.epochs, "final_train_loss": state.get("last_train_loss"),
        "initial_eval_loss": state["initial_eval_loss"], "final_eval_loss": state["last_eval_loss"],
        "trainable_params": n_trainable, "train_time_s": round(state["wall_time_s"], 3),
        "wall_time_s": round(time.time() - t_start, 3), "target_tokens": state["tokens"],
        "target_tokens_per_s": round(state["tokens"] / max(state["wall_time_s"], 1e-9), 1),
        "processes": world, "seed": cfg.seed, "run_dir": str(run_dir),
    }
    if not spec.exports_adapter:  # method=full: no adapter/, the model is saved whole in merged/
        summary["adapter"] = spec.export_note
    if main:
        if spec.exports_adapter:
            save_peft_adapter(model, run_dir / "adapter", base_model_name_or_path=model_path,
                              extra={"method": cfg.method.name, "init": cfg.init.name})
            tokenizer.save_pretrained(run_dir / "adapter")
        spec.on_train_end(unwrap(model), run_dir, cfg.method)
        if m.saving and fsdp:  # the live base is sharded: merge a whole copy instead
            save_merged(whole_copy(cfg, model), tokenizer, run_dir / "merged", in_place=True)
        elif m.saving or not spec.exports_adapter:  # (full: nothing to merge, so no copy of the model)
            save_merged(model, tokenizer, run_dir / "merged", in_place=not spec.exports_adapter)
        atomic_write_json(run_dir / "summary.json", summary)
        line = summary_line(summary)
        atomic_write_text(run_dir / "summary.txt", line + "\n")
        print(line, flush=True)
        log.close()
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in summary.items() if v is not None})
            wandb_run.finish()
    accelerator.wait_for_everyone()
    return summary


def summary_line(s: dict) -> str:
    ev = (f"eval_loss {s['initial_eval_loss']:.4f} -> {s['final_eval_loss']:.4f}"
          if s["final_eval_loss"] is not None else "eval_loss n/a")
    tl = f"{s['final_train_loss']:.4f}" if s["final_train_loss"] is not None else "n/a"
    return (f"peftlab: method={s['method']} init={s['init']} model={s['model']} data={s['dataset']} "
            f"steps={s['steps']} train_loss={tl} {ev} params={s['trainable_params']} "
            f"time={s['wall_time_s']:.1f}s run_dir={s['run_dir']}")


def _kept(ckpt_dir: Path) -> str:
    return f"the last good checkpoint is {ckpt_dir}" if ckpt_dir.exists() else "no checkpoint was saved yet"


def params_of(optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
