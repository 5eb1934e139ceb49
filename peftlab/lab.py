"""The method lab: controlled experiments over every registered method x applicable init.

    python -m peftlab.lab [--quick] [-o bench/results/lab] [--methods lora gplora] [--inits default LoRA-FA]
                          [--parts regression language] [--seeds N]

(a) Low-rank regression. y = (W0 + dW*) x with dW* = U* diag(s) V*^T of planted rank r*, inputs x ~ N(0, Sigma)
    with an anisotropic Sigma (eigenvalues log-spaced over `anisotropy`^2, random eigenbasis), so that the gradient
    G = -(2/d_out) dW* Sigma has a row space tilted away from V*: LoRA-One's rows follow Sigma V*, LoRA-FA's metric
    P^(-1/2) undoes the tilt. The model is one nn.Linear(W0) adapted by apply_adapters; training is the trainer's
    step (the method's optimizer / AdamW / PrecondAdamW, extra_loss, clipping, after_step) on minibatches.
    Measured per seed: steps until the full-data loss is <= target x its value at W0; the alignment of the init
    with dW* (mean cos^2 of the principal angles between the column space of the init's B and U*, and between the
    row space of its A and V*: 1 = the planted subspace is inside, ~k/d = chance); the final relative loss, the
    relative weight error ||W_eff - W0 - dW*||_F / ||dW*||_F, the rank of the learned change W_eff - W0 (singular
    values above 1% of the largest) and the adapter's own rank at the end (GeoLoRA adapts it).
    The gradient inits get G and Sigma from the full regression data and go through peftlab.init.directions (the
    registered gradient init estimates G from language-model examples, which this model has none of).
(b) The embedded language task (GSM8K-style word problems): a fixed budget of optimizer steps per method x init via
    peftlab.train.train (configs composed from conf/ as run_exp.py does), then the eval loss and the GSM8K accuracy
    (peftlab.eval.gsm8k, greedy, strict '#### N' match) on the first test examples.
Writes lab.md (tables: mean +- std over seeds), regression.csv, language.csv and PNG plots into the output folder.
"""
from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from .adapters import METHODS, adapter_layers, apply_adapters, get_method
from .config import CONF_DIR, load_group
from .utils import atomic_write_text, save_figure, write_csv

GRADIENT_DIRECTIONS = ("LoRA-GA", "LoRA-One", "LoRA-FA")


# ---- subspaces ---------------------------------------------------------------------------------------------------------
def orth(M: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis of the column space of M (columns = basis vectors; none when M is 0)."""
    U, S, _ = torch.linalg.svd(M.double(), full_matrices=False)
    if S.numel() == 0 or S[0] <= 0:
        return U[:, :0]
    return U[:, : int((S > rtol * S[0]).sum())]


def principal_angles(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of X and Y; min(rank X, rank Y) of them."""
    Qx, Qy = orth(X), orth(Y)
    if Qx.shape[1] == 0 or Qy.shape[1] == 0:
        return torch.empty(0, dtype=torch.float64)
    cos = torch.linalg.svdvals(Qx.T @ Qy).clamp(max=1.0)
    return torch.arccos(cos)


def alignment(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Mean cos^2 of the principal angles: 1 when the smaller space lies in the other, nan when one is empty."""
    a = principal_angles(X, Y)
    return float(torch.cos(a).pow(2).mean()) if a.numel() else float("nan")


# ---- (a) the planted regression ----------------------------------------------------------------------------------------
@dataclass
class Regression:
    W0: torch.Tensor
    dW: torch.Tensor  # planted change, rank r_star
    U: torch.Tensor  # its column and row bases
    V: torch.Tensor
    X: torch.Tensor
    Y: torch.Tensor
    sigma: torch.Tensor  # the input second moment X^T X / n


def make_regression(d_in: int = 64, d_out: int = 64, r_star: int = 4, n: int = 2048, anisotropy: float = 10.0,
                    seed: int = 0) -> Regression:
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    U = torch.linalg.qr(torch.randn(d_out, r_star, generator=g))[0]
    V = torch.linalg.qr(torch.randn(d_in, r_star, generator=g))[0]
    dW = U @ torch.diag(torch.linspace(1.0, 0.5, r_star)) @ V.T
    Q = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0]
    std = torch.logspace(0, -math.log10(anisotropy), d_in)  # Sigma's eigenvalues from 1 down to 1/anisotropy^2
    X = (torch.randn(n, d_in, generator=g) * std) @ Q.T
    return Regression(W0, dW, U, V, X, X @ (W0 + dW).T, X.T @ X / n)


class OneLinear(nn.Module):
    def __init__(self, W0: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(W0)

    def forward(self, x):
        return self.proj(x)


def mse(model: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return ((model(X) - Y) ** 2).mean()


@torch.no_grad()
def full_loss(layer, task: Regression) -> float:
    """The full-data MSE in closed form: mean((E x)^2) = tr(E Sigma E^T) / d_out with E = W_eff - W0 - dW*
    (the targets are noiseless), far cheaper than a pass over the data at every step."""
    E = effective_change(layer, task.W0) - task.dW
    return float(((E @ task.sigma) * E).sum() / E.shape[0])


@dataclass
class Variant:
    """A method as the lab runs it: the registered name, method-config overrides and the trainer's optimizer."""
    method: str
    overrides: dict = field(default_factory=dict)
    optimizer: str = "adamw"
    tag: str | None = None  # names the overrides in the label (default: their values)

    @property
    def label(self) -> str:
        extra = f":{self.tag}" if self.tag else "".join(f":{v}" for v in self.overrides.values())
        return self.method + extra + ("+precond_adamw" if self.optimizer == "precond_adamw" else "")


def variants(methods: list[str] | None) -> list[Variant]:
    out = []
    for name in METHODS.names():
        if methods and name not in methods and not any(m.startswith(name + ":") for m in methods):
            continue
        if name == "rotational_pissa":
            out += [Variant(name, {"way": w}) for w in ("way0", "way1", "way2", "way3")]
        else:
            out.append(Variant(name))
        if name == "lora":
            out.append(Variant("lora", optimizer="precond_adamw"))
        if name == "gplora":  # besides its default (every step, moments keep): DESIGN's transport, every step
            out.append(Variant(name, {"moments": "transport", "every": 1}, tag="transport-every1"))
    if methods:  # "rotational_pissa:way2" or "lora+precond_adamw" pick one variant
        exact = [v for v in out if v.label in methods]
        out = exact or [v for v in out if v.method in methods]
    return out


def init_names(inits: list[str] | None) -> list[str]:
    from .init import INITS

    order = ["default", "gaussian", "pissa", "gradient"]
    names = []
    for n in sorted(INITS.names(), key=lambda k: (order.index(k) if k in order else len(order), k)):
        names += list(GRADIENT_DIRECTIONS) if n == "gradient" else [n]
    if inits:
        unknown = set(inits) - set(names)
        if unknown:
            raise ValueError(f"unknown init(s) {sorted(unknown)}; allowed: {names}")
        names = [n for n in names if n in inits]
    return names


def run_cfg(v: Variant, init: str, lr: float, seed: int):
    """The parts of a resolved run config the step and the inits read (model.*, train.*, method.*, init.*, seed)."""
    base = OmegaConf.load(CONF_DIR / "config.yaml")
    init_file = "gradient" if init in GRADIENT_DIRECTIONS else init
    init_cfg = OmegaConf.to_container(load_group("init", init_file)) if (CONF_DIR / "init" / f"{init_file}.yaml"
                                                                          ).exists() else {"name": init}
    if init in GRADIENT_DIRECTIONS:
        init_cfg["direction"] = init
    model = OmegaConf.to_container(load_group("model", "tiny"))
    model.update(lr=lr, weight_decay=0.0)
    train = {**OmegaConf.to_container(base.train), "optimizer": v.optimizer}
    return OmegaConf.create({"model": model, "train": train,
                             "method": {**OmegaConf.to_container(load_group("method", v.method)), **v.overrides},
                             "init": init_cfg, "seed": seed})


def regression_gradient(model: nn.Module, layer, task: Regression) -> torch.Tensor:
    """G = dL/dW at the base weight (the adapter switched off), on all the data: the full-batch gradient."""
    W = layer.base.weight
    W.requires_grad_(True)
    layer.disabled = True
    try:
        (G,) = torch.autograd.grad(mse(model, task.X, task.Y), W)
    finally:
        layer.disabled = False
        W.requires_grad_(False)
    return G.detach().float()


@torch.no_grad()
def apply_gradient_init(layer, G: torch.Tensor, sigma: torch.Tensor, ic) -> None:
    """The registered gradient init's closed forms (peftlab.init.gradient.run) on this layer's G and Sigma."""
    from .init.directions import lora_fa, lora_ga, lora_one

    r, s, gamma = layer.rank, layer.scaling, float(ic.stable_gamma)
    if ic.direction == "LoRA-GA":
        A, B = lora_ga(G, r, s, ic.scale, gamma, ic.ga_direction, ic.ga_convention)
    elif ic.direction == "LoRA-One":
        A, B = lora_one(G, r, s, ic.scale, gamma)
    else:
        metric = ic.get("metric") in ("on", True)
        A, B = lora_fa(G, r, s, sigma if metric else None, float(ic.damping), ic.scale, gamma)
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B)
    if ic.direction == "LoRA-GA":  # the output stays unchanged: the base moves by -s B A
        layer.set_offset(layer.lora_A, layer.lora_B, layer.scaling)


def init_alignment(layer, task: Regression) -> tuple[float, float]:
    """(column, row) alignment of the init's factors with dW*; a zero B has no column space (nan)."""
    A, B = layer.lora_factors()
    return alignment(B, task.U), alignment(A.T, task.V)


def effective_change(layer, W0: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer.base.weight.float() + layer.delta_weight() - W0


def run_regression(v: Variant, init: str, seed: int, steps: int, target: float, r: int = 8, alpha: float = 16,
                   lr: float = 1e-2, batch: int = 128, **task_kw) -> dict:
    """One run; raises ValueError when the init does not apply to the method (no LoRA factors)."""
    from .init import InitContext, get_init, lora_factor_layers
    from .train import build_optimizer

    task = make_regression(seed=seed, **task_kw)
    cfg = run_cfg(v, init, lr, seed)
    torch.manual_seed(seed)
    model = OneLinear(task.W0)
    peft = OmegaConf.create({"lora_target_modules": ["proj"], "lora_r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
                             "use_rslora": False})
    spec = get_method(v.method)
    layers = apply_adapters(model, peft, cfg.method, v.method)
    layer = layers["proj"]
    if init in GRADIENT_DIRECTIONS:
        lora_factor_layers(InitContext(model, layers, cfg), init)  # raises as the registered init would
        apply_gradient_init(layer, regression_gradient(model, layer, task), task.sigma, cfg.init)
    else:
        get_init(init).run(InitContext(model, layers, cfg))
        layer = adapter_layers(model)["proj"]
    col_align, row_align = init_alignment(layer, task)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, spec, model, params)
    base_loss = float(((task.dW @ task.sigma) * task.dW).sum() / task.dW.shape[0])  # the loss at W0
    start_loss = full_loss(layer, task)
    g = torch.Generator().manual_seed(seed + 1)
    curve, reached = [start_loss / base_loss], None
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(task.X), (batch,), generator=g)
        loss = mse(model, task.X[idx], task.Y[idx])
        extra = spec.extra_loss(model, cfg.method)
        if extra is not None:
            loss = loss + extra
        loss.backward()
        if cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        spec.after_step(model, optimizer, step, cfg.method)
        curve.append(full_loss(adapter_layers(model)["proj"], task) / base_loss)
        if reached is None and curve[-1] <= target:
            reached = step
    layer = adapter_layers(model)["proj"]
    change = effective_change(layer, task.W0)
    sv = torch.linalg.svdvals(change.double())
    return {"method": v.label, "init": init, "seed": seed, "steps_to_target": reached,
            "init_loss": curve[0], "final_loss": curve[-1],
            "weight_error": float(torch.linalg.norm(change - task.dW) / torch.linalg.norm(task.dW)),
            "col_alignment": col_align, "row_alignment": row_align,
            "learned_rank": int((sv > 1e-2 * sv[0]).sum()) if sv[0] > 0 else 0,
            "adapter_rank": getattr(layer, "rank", None), "curve": curve}


# ---- (b) the embedded language task ------------------------------------------------------------------------------------
def language_overrides(v: Variant, init: str, steps: int, seed: int, run_dir: Path, eval_samples: int) -> list[str]:
    o = [f"method={v.method}", f"train.max_steps={steps}", "train.save_every=0", "wandb.mode=disabled",
         f"run_dir={run_dir}", f"seed={seed}", f"train.optimizer={v.optimizer}",
         f"++dataset.eval_samples={eval_samples}"]
    o += [f"++method.{k}={val}" for k, val in v.overrides.items()]
    if init in GRADIENT_DIRECTIONS:
        o += ["+init=gradient", f"++init.direction={init}"]
    elif init != "default":
        o.append(f"+init={init}")
    return o


def gsm8k_accuracy(source: list[str], out: Path, limit: int) -> dict:
    """peftlab.eval.gsm8k on the first `limit` embedded test examples (greedy; its printout silenced)."""
    import contextlib
    import io

    from .data.embedded import ensure_dataset
    from .eval.gsm8k import main as gsm8k

    with contextlib.redirect_stdout(io.StringIO()):
        return gsm8k(source + ["--data", str(ensure_dataset() / "test.jsonl"), "--limit", str(limit), "--batch_size",
                               "32", "--max_new_tokens", "40", "--wandb_mode", "disabled", "--output_dir", str(out)])


def base_model_row(out: Path, eval_samples: int, gsm8k_limit: int) -> dict:
    """The reference: the embedded model without any adapter (eval loss as the trainer computes it)."""
    from accelerate import Accelerator

    from .data.datasets import train_eval_examples
    from .models import load_model_and_tokenizer
    from .train import evaluate

    m = load_group("model", "tiny")
    model, tok, path = load_model_and_tokenizer(m)
    ds = OmegaConf.merge(load_group("dataset", "tiny"), {"eval_samples": eval_samples})
    _, eval_ex = train_eval_examples(ds, tok, m.max_length)
    loss = evaluate(model, eval_ex, tok.pad_token_id, m.per_device_batch_size, Accelerator(cpu=True))
    acc = gsm8k_accuracy(["--model", str(m.name)], out / "runs" / "base" / "eval", gsm8k_limit)
    return {"method": "base model (no adapter)", "init": "-", "seed": 0, "steps": 0, "initial_eval_loss": loss,
            "final_eval_loss": loss, "final_train_loss": None, "gsm8k_accuracy": acc["accuracy_strict"],
            "gsm8k_n": acc["n"], "train_s": 0.0}


def run_language(v: Variant, init: str, seed: int, steps: int, out: Path, eval_samples: int, gsm8k_limit: int
                 ) -> dict:
    from hydra import compose, initialize_config_dir

    from .train import train

    run_dir = out / "runs" / f"{v.label}-{init}-s{seed}".replace(":", "_").replace("+", "_")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=language_overrides(v, init, steps, seed, run_dir, eval_samples))
    s = train(cfg)
    acc = gsm8k_accuracy(["--run_dir", str(run_dir)], run_dir / "eval", gsm8k_limit)
    return {"method": v.label, "init": init, "seed": seed, "steps": s["steps"],
            "initial_eval_loss": s["initial_eval_loss"], "final_eval_loss": s["final_eval_loss"],
            "final_train_loss": s["final_train_loss"], "gsm8k_accuracy": acc["accuracy_strict"],
            "gsm8k_n": acc["n"], "train_s": s["train_time_s"]}


# ---- tables and plots --------------------------------------------------------------------------------------------------
def mean_std(xs: list[float], digits: int = 3) -> str:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "n/a"
    m = statistics.mean(xs)
    return f"{m:.{digits}g} ± {statistics.pstdev(xs):.{digits}g}" if len(xs) > 1 else f"{m:.{digits}g}"


def group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["method"], r["init"]), []).append(r)
    return out


def regression_table(rows: list[dict], steps: int, target: float) -> list[str]:
    lines = [f"| method | init | steps to {target:g} x L(W0) | init col align | init row align | init loss | "
             f"final loss | weight error | learned rank | adapter rank |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (m, i), rs in group(rows).items():
        hit = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
        reach = (f"{mean_std(hit)} ({len(hit)}/{len(rs)})" if hit else f"> {steps} (0/{len(rs)})")
        lines.append(f"| {m} | {i} | {reach} | {mean_std([r['col_alignment'] for r in rs])} | "
                     f"{mean_std([r['row_alignment'] for r in rs])} | {mean_std([r['init_loss'] for r in rs])} | "
                     f"{mean_std([r['final_loss'] for r in rs])} | {mean_std([r['weight_error'] for r in rs])} | "
                     f"{mean_std([r['learned_rank'] for r in rs])} | {mean_std([r['adapter_rank'] for r in rs])} |")
    return lines


def language_table(rows: list[dict]) -> list[str]:
    lines = ["| method | init | eval loss before | eval loss after | train loss | GSM8K accuracy | train s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (m, i), rs in group(rows).items():
        lines.append(f"| {m} | {i} | {mean_std([r['initial_eval_loss'] for r in rs], 4)} | "
                     f"{mean_std([r['final_eval_loss'] for r in rs], 4)} | "
                     f"{mean_std([r['final_train_loss'] for r in rs], 4)} | "
                     f"{mean_std([r['gsm8k_accuracy'] for r in rs])} | {mean_std([r['train_s'] for r in rs])} |")
    return lines


def claims(reg: list[dict], lm: list[dict], steps: int, r_star: int = 4) -> list[str]:
    """The seeds' claims, checked on what was measured (steps to target: a run that missed counts as steps + 1)."""
    g = group(reg)
    cost = {k: statistics.mean(r["steps_to_target"] or steps + 1 for r in rs) for k, rs in g.items()}

    def c(k) -> str:
        return f"> {steps}" if cost[k] > steps else f"{cost[k]:.1f}"

    loss = {k: statistics.mean(r["final_eval_loss"] for r in rs) for k, rs in group(lm).items()}
    out = []

    def verdict(ok: bool) -> str:
        return "holds" if ok else "does not hold"

    base = cost.get(("lora", "default"))
    for d in GRADIENT_DIRECTIONS:
        if base is not None and ("lora", d) in cost:
            lm_part = (f"; language eval loss {loss[('lora', d)]:.3f} vs {loss[('lora', 'default')]:.3f}"
                       if ("lora", d) in loss and ("lora", "default") in loss else "")
            out.append(f"- Gradient init {d} converges faster than LoRA's default init: {verdict(cost[('lora', d)] < base)}"
                       f" (regression: {c(('lora', d))} vs {c(('lora', 'default'))} steps to target{lm_part}).")
    for gp in sorted({m for m, _ in cost if m.startswith("gplora")}):
        pairs = [i for (m, i) in cost if m == gp and ("lora", i) in cost]
        if pairs:
            faster = sum(cost[(gp, i)] < cost[("lora", i)] for i in pairs)
            slower = sum(cost[(gp, i)] > cost[("lora", i)] for i in pairs)
            out.append(f"- Gauge projection ({gp}) accelerates training: {verdict(faster > slower)}, faster with "
                       f"{faster} and slower with {slower} of {len(pairs)} inits "
                       f"(regression steps to target vs LoRA with the same init: "
                       + ", ".join(f"{i} {c((gp, i))} vs {c(('lora', i))}" for i in pairs) + ").")
    geo = [r["adapter_rank"] for r in reg if r["method"] == "geolora" and r["adapter_rank"] is not None]
    if geo:
        out.append(f"- GeoLoRA finds a small rank: {verdict(statistics.mean(geo) <= 2 * r_star)} (final adapter rank "
                   f"{mean_std(geo)} with planted rank {r_star}, initial rank 8).")
    return out


def plot_regression(path: Path, rows: list[dict], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows)
    methods = sorted({m for m, _ in groups})
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], methods):
        for (gm, i), rs in groups.items():
            if gm != m:
                continue
            n = min(len(r["curve"]) for r in rs)
            mean = [statistics.mean(r["curve"][k] for r in rs) for k in range(n)]
            ax.plot(range(n), mean, label=i)
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss / L(W0), mean over seeds")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_language(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows)
    labels = [f"{m}\n{i}" for m, i in groups]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.7 * len(labels)) * 2, 3.8))
    for ax, key, title in ((axes[0], "final_eval_loss", "eval loss after the budget"),
                           (axes[1], "gsm8k_accuracy", "GSM8K-style accuracy (strict)")):
        ax.bar(range(len(labels)), [statistics.mean(r[key] for r in rs) for rs in groups.values()])
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7, ha="right")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ---- the command -------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="peftlab's method lab: controlled experiments per method x init")
    ap.add_argument("--quick", action="store_true", help="fewer seeds and steps (minutes on a laptop CPU)")
    ap.add_argument("-o", "--outdir", type=Path, default=Path("bench/results/lab"))
    ap.add_argument("--methods", nargs="*", help="registered method names or variant labels (default: all)")
    ap.add_argument("--inits", nargs="*", help="default gaussian pissa LoRA-GA LoRA-One LoRA-FA (default: all)")
    ap.add_argument("--parts", nargs="*", default=["regression", "language"], choices=["regression", "language"])
    ap.add_argument("--seeds", type=int, default=None, help="regression seeds (default 5, quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="regression steps (default 400, quick 200)")
    ap.add_argument("--target", type=float, default=0.01, help="regression target: loss <= target x L(W0)")
    ap.add_argument("--lm-steps", type=int, default=None, help="language steps per run (default 128 = the default "
                                                               "run's 2 epochs, quick 32)")
    ap.add_argument("--lm-seeds", type=int, default=None, help="language seeds (default 2, quick 1)")
    ap.add_argument("--gsm8k-limit", type=int, default=None, help="test examples scored (default 256, quick 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the lab's models are tiny)")
    a = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return run_lab(a)
    finally:
        torch.set_num_threads(threads)


def run_lab(a) -> dict:
    seeds = a.seeds or (2 if a.quick else 5)
    steps = a.steps or (200 if a.quick else 400)
    lm_steps, lm_seeds = a.lm_steps or (32 if a.quick else 128), a.lm_seeds or (1 if a.quick else 2)
    gsm8k_limit = a.gsm8k_limit or (64 if a.quick else 256)
    out = a.outdir
    out.mkdir(parents=True, exist_ok=True)
    vs, inits = variants(a.methods), init_names(a.inits)
    if not vs:
        raise SystemExit(f"no method matches {a.methods}; registered: {METHODS.names()}")
    md = ["# peftlab method lab", "", f"`python -m peftlab.lab{' --quick' if a.quick else ''}`; methods: "
          f"{', '.join(v.label for v in vs)}; inits: {', '.join(inits)}.", ""]
    result = {}
    skipped: dict[tuple[str, str], list[str]] = {}  # (method, reason) -> inits it applied to
    if "regression" in a.parts:
        rows = []
        for v in vs:
            for init in inits:
                for seed in range(seeds):
                    try:
                        rows.append(run_regression(v, init, seed, steps, a.target))
                    except ValueError as e:
                        reason = ("the init sets LoRA factors (lora_A, lora_B), which the method has none of"
                                  if "sets LoRA factors" in str(e) else f"{type(e).__name__}: {e}")
                        skipped.setdefault((v.label, reason), []).append(init)
                        break
                if rows and rows[-1]["method"] == v.label and rows[-1]["init"] == init:
                    print(f"lab: regression {v.label} x {init}: "
                          f"{regression_table(rows[-seeds:], steps, a.target)[-1]}", flush=True)
        write_csv(out / "regression.csv", rows, [k for k in rows[0] if k != "curve"])
        plot_regression(out / "regression.png", rows, a.target)
        md += ["## Low-rank regression", "",
               f"d_in = d_out = 64, planted rank r* = 4 (singular values 1 .. 0.5), n = 2048 inputs with covariance "
               f"eigenvalues 1 .. 1e-2 in a random basis; adapter rank 8, alpha 16, AdamW lr 1e-2, batch 128, "
               f"{steps} steps, {seeds} seeds (mean ± std; steps to target over the seeds that reached it). "
               f"Alignment: mean cos² of the principal angles between the init's B columns / A rows and dW*'s "
               f"column / row space (1: contains it; chance ≈ 8/64). Loss is relative to L(W0). "
               f"Plot: regression.png.", ""] + regression_table(rows, steps, a.target) + [""]
        result["regression"] = rows
    if "language" in a.parts:
        rows = [base_model_row(out, 64 if a.quick else 256, gsm8k_limit)]
        lm_inits = inits
        for v in vs:
            for init in lm_inits:
                if a.quick and v.label != "lora" and init != "default":
                    continue  # quick: every init on LoRA, every method with its default init
                for seed in range(lm_seeds):
                    if any(v.label == m and init in inits_ for (m, _), inits_ in skipped.items()):
                        break  # not applicable on the regression: the same holds here
                    try:
                        rows.append(run_language(v, init, seed, lm_steps, out, 64 if a.quick else 256, gsm8k_limit))
                    except Exception as e:  # a method still being written must not stop the lab; say why
                        skipped.setdefault((v.label, f"language task failed: {type(e).__name__}: "
                                                     f"{str(e)[:300]}"), []).append(init)
                        break
        if rows:
            write_csv(out / "language.csv", rows, [k for k in rows[0] if k != "curve"])
            plot_language(out / "language.png", rows)
        md += ["## Embedded language task", "",
               f"The embedded tiny Llama on the embedded GSM8K-style data, peft qv r 8, the default run config, "
               f"{lm_steps} optimizer steps (global batch 32), {lm_seeds} seed(s); eval loss on "
               f"{64 if a.quick else 256} validation examples; accuracy: greedy, strict '#### N' match on the first "
               f"{gsm8k_limit} test examples. Plot: language.png.", ""] + language_table(rows) + [""]
        result["language"] = rows
    found = claims(result.get("regression", []), result.get("language", []), steps)
    if found:
        md += ["## The seeds' claims, as measured here", ""] + found + [""]
    if skipped:
        md += ["## Not run", ""] + [f"- {m} x {', '.join(inits_)}: {reason}" for (m, reason), inits_ in skipped.items()]
        md.append("")
    atomic_write_text(out / "lab.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
