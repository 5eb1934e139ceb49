"""Before/after figures for the numerical defects of issue 14, measured on whatever peftlab PYTHONPATH names:

    PYTHONPATH=. python bench/numerics.py --label "after (branch i14num)"            # this checkout
    PYTHONPATH=/tmp/base63 python bench/numerics.py --label "before (63a89b7, git archive)"  # git archive 63a89b7

(Not a bench_*.py: run_all does not run it; it compares checkouts.)
Each run adds its label to bench/results/numerics.json (seconds on a CPU; deterministic seeds, so the figures repeat
exactly on one machine; they may differ in the last digits elsewhere).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "numerics.json"


def geolora_step_error() -> dict:
    """Relative error of one GeoLoRA SGD step (lr / loss scale) against its float64 closed form, when the gradient's
    residual is rank-deficient (2 samples, rank 4): the error, as a fraction of the step, per loss scale."""
    from peftlab.adapters.geolora import GeoLoRALinear, GeoLoRAOptimizer

    def closed(U, S, V, G, lr):
        def aug(B, GB):
            R = GB - B @ (B.T @ GB)
            R = R - B @ (B.T @ R)
            Q, sv, _ = torch.linalg.svd(R, full_matrices=False)
            return torch.cat([B, Q[:, :int((sv > 1e-10 * torch.linalg.matrix_norm(GB, ord=2)).sum())]], 1)
        Uh, Vh = aug(U, G @ V), aug(V, G.T @ U)
        PT = G @ V @ V.T + U @ U.T @ G - U @ U.T @ G @ V @ V.T
        return Uh @ (Uh.T @ (U @ S @ V.T - lr * PT) @ Vh) @ Vh.T

    torch.manual_seed(0)
    d, n = 24, 2
    W0, X, Y = torch.randn(d, d) / d ** 0.5, torch.randn(n, d), torch.randn(n, d)
    out = {}
    for scale in (1e-2, 1.0, 1e2, 1e4):
        torch.manual_seed(1)
        lin = nn.Linear(d, d, bias=False)
        lin.weight.data.copy_(W0)
        layer = GeoLoRALinear(lin, 4, 12, 1.0, init_scale=0.3)
        U, S, V = (t.detach().double() for t in (layer.U, layer.S, layer.V))
        W = (U @ S @ V.T).requires_grad_(True)
        (scale * 0.5 * ((X.double() @ (W0.double() + W).T - Y.double()) ** 2).sum(1).mean()).backward()
        lr = 0.3 / scale
        expected = closed(U, S, V, W.grad, lr)
        (scale * 0.5 * ((layer(X) - Y) ** 2).sum(1).mean()).backward()
        GeoLoRAOptimizer({"l": layer}, lr=lr, small_optimizer="sgd", tau=0.0).step()
        err = torch.linalg.norm(layer.delta_weight().detach().double() - expected) / torch.linalg.norm(
            expected - W.detach())
        out[f"loss_x{scale:g}"] = {"rank": layer.rank, "step_error": float(err)}
    return out


def geolora_divergence() -> str:
    """The exception a GeoLoRA step raises when its coefficient step overflows."""
    from peftlab.adapters.geolora import GeoLoRALinear, GeoLoRAOptimizer

    torch.manual_seed(0)
    layer = GeoLoRALinear(nn.Linear(24, 24, bias=False), 3, 12, 1.0)
    x = torch.randn(64, 24)
    (1e6 * layer(x).pow(2).mean()).backward()
    try:
        GeoLoRAOptimizer({"l": layer}, lr=1e38, small_optimizer="sgd").step()
    except Exception as e:  # noqa: BLE001 - the type is the figure
        return f"{type(e).__module__}.{type(e).__name__}"
    return "none"


def geolora_trainer_penalty() -> float:
    """First-step loss difference of the seed trainer with orthogonal_regularization 0.5 vs 0 when ||U^T U - I||^2 = 9
    (closed form: 4.5)."""
    from peftlab.geolora import GeoLoRAConfig, GeoLoRAModel, GeoLoRATrainer

    X, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 4
    first = []
    for w in (0.0, 0.5):
        torch.manual_seed(0)
        config = GeoLoRAConfig(rank_init=2, learning_rate=1e-3, orthogonal_regularization=w)
        model = GeoLoRAModel(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), config, ["0"])
        with torch.no_grad():
            model.geolora_layers["0"].geo_U[:, 0] *= 2.0
        first.append(GeoLoRATrainer(model, config).train([(X, y)], num_epochs=1)["train_loss"][0])
    return first[1] - first[0]


def gplora_zero_factor() -> dict:
    from peftlab.optim.gauge import gauge_project_

    A, B = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), torch.zeros(12, 4)
    gauge_project_((A, B), eps=0.0)
    return {"A_finite": bool(torch.isfinite(A).all()), "B_finite": bool(torch.isfinite(B).all())}


def rotational_pissa_drift() -> float:
    """max |U^T U - I|, |V^T V - I| after 1000 way1 merges of random Givens rotations (r 8, 8 layers, angles N(0,1))."""
    from peftlab.adapters.rotational_pissa import RotationalPiSSAConfig, RotationalPiSSALinear

    torch.manual_seed(0)
    layer = RotationalPiSSALinear(nn.Linear(64, 48), RotationalPiSSAConfig(r=8, way="way1", givens_layers=8))
    g = torch.Generator().manual_seed(1)
    for _ in range(1000):
        with torch.no_grad():
            for th in [*layer.rot_U.theta, *layer.rot_V.theta]:
                th.copy_(torch.randn(th.shape, generator=g))
        layer.merge_rotations_()
    return max(float((M.T @ M - torch.eye(8)).abs().max()) for M in (layer.U, layer.V))


def pissa_rank_above_dimension() -> str:
    """PiSSA r = 8 on a 1 x 64 layer: the error, or the residual as a multiple of W."""
    from omegaconf import OmegaConf

    from peftlab.adapters import apply_adapters
    from peftlab.init import InitContext, get_init

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1))
    W = model[0].weight.detach().clone()
    layers = apply_adapters(model, OmegaConf.create({"lora_target_modules": ["0"], "lora_r": 8, "lora_alpha": 8}))
    try:
        get_init("pissa").run(InitContext(model, layers, OmegaConf.create({"init": {"name": "pissa"}})))
    except ValueError as e:
        return f"ValueError: {e}"
    return f"residual = {float((layers['0'].base.weight @ W.T / (W @ W.T)).squeeze()):.3g} W"


def lora_ga_sign_sensitivity() -> float:
    """Max change of LoRA-GA's factors (20 x 14 G, r = 3) when torch's SVD returns some singular pairs negated, as
    rounding-level changes of G can make it do."""
    from peftlab.init.directions import lora_ga

    torch.manual_seed(0)
    G = torch.randn(20, 14)
    plain = lora_ga(G, 3, 2.0)
    svd = torch.linalg.svd
    flip = torch.tensor([-1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0])

    def flipped(M, full_matrices=True):
        U, S, Vh = svd(M, full_matrices=full_matrices)
        return U * flip[:S.shape[-1]], S, Vh * flip[:S.shape[-1], None]

    torch.linalg.svd = flipped
    try:
        other = lora_ga(G, 3, 2.0)
    finally:
        torch.linalg.svd = svd
    return max(float((a - b).abs().max()) for a, b in zip(plain, other))


def lora_ga_split_difference() -> float:
    """Max LoRA-GA factor difference over bsz x iters = 8x1, 4x2, 1x8 on a tiny random Llama (token_mean)."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from peftlab.adapters import apply_adapters
    from peftlab.data.datasets import Example
    from peftlab.init import InitContext, get_init

    root = Path(__file__).resolve().parents[1]
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(16):
        L = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(1, 128, (L,), generator=g).tolist()
        p = int(torch.randint(2, L - 2, (1,), generator=g))
        examples.append(Example(ids, [-100] * p + ids[p:]))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
                         ).save_pretrained(tmp)
        runs = []
        for bsz, iters in ((8, 1), (4, 2), (1, 8)):
            model = AutoModelForCausalLM.from_pretrained(tmp).eval()
            layers = apply_adapters(model, OmegaConf.create({"target_set": "qv", "lora_target_modules": None,
                                                             "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}))
            init = OmegaConf.merge(OmegaConf.load(root / "conf/init/gradient.yaml"),
                                   {"direction": "LoRA-GA", "bsz": bsz, "iters": iters})
            init.pop("reduction", None)  # a key older checkouts do not know
            cfg = OmegaConf.create({"init": init, "seed": 0, "model": {"name": "x", "max_length": 64},
                                    "dataset": {}, "method": {"name": "lora"}})
            get_init("gradient").run(InitContext(model, layers, cfg, examples, 0))
            runs.append({n: (l.lora_A.detach(), l.lora_B.detach()) for n, l in layers.items()})
    return max(float((a - b).abs().max()) for r in runs[1:] for n in r for a, b in zip(r[n], runs[0][n]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import peftlab

    figures = {"peftlab": str(Path(peftlab.__file__).parent), "geolora_step_error": geolora_step_error(),
               "geolora_divergence_raises": geolora_divergence(),
               "geolora_trainer_penalty_difference (closed form 4.5)": geolora_trainer_penalty(),
               "gplora_eps0_B0": gplora_zero_factor(),
               "rotational_pissa_way1_orthonormality_error_after_1000_merges": rotational_pissa_drift(),
               "pissa_r8_on_a_1x64_layer": pissa_rank_above_dimension(),
               "lora_ga_factor_change_under_svd_sign_flips": lora_ga_sign_sensitivity(),
               "lora_ga_factor_difference_over_bsz_iters_splits": lora_ga_split_difference()}
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[args.label] = figures
    from peftlab.utils import atomic_write_text

    atomic_write_text(RESULTS, json.dumps(data, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
