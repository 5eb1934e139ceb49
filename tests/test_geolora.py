"""GeoLoRA: the backward's K/S/L gradients and one step against the dense closed form, orthonormal bases, the rank
settling at a planted rank, the three truncation strategies, truncation error bounded by tau, checkpoint resume,
PEFT export with per-layer ranks, the trainer path and the seed's Python API."""
import io
import json
import os
import signal

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from peftlab.adapters import apply_adapters, get_method
from peftlab.adapters.geolora import (GeoLoRALinear, GeoLoRAOptimizer, augment_basis, geolora_options,
                                      local_threshold_rank)


def planted(d=24, r_star=3, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d, d, generator=g) / d ** 0.5
    U = torch.linalg.qr(torch.randn(d, r_star, generator=g))[0]
    V = torch.linalg.qr(torch.randn(d, r_star, generator=g))[0]
    dW = U @ torch.diag(torch.linspace(1.0, 0.5, r_star)) @ V.T
    X = torch.randn(n, d, generator=g)
    return W0, dW, X, X @ (W0 + dW).T


def geo_layer(W0, rank, rmax=12, scaling=1.0, seed=0, init_scale=1e-4):
    torch.manual_seed(seed)
    lin = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
    lin.weight.data.copy_(W0)
    return GeoLoRALinear(lin, rank, rmax, scaling, init_scale=init_scale)


def mse(layer, X, Y):
    return 0.5 * ((layer(X) - Y) ** 2).sum(1).mean()


def train(layer, X, Y, steps, lr, small="sgd", check=None, **kw):
    opt = GeoLoRAOptimizer({"l": layer}, lr=lr, small_optimizer=small, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    losses, ranks = [], []
    for _ in range(steps):
        loss = mse(layer, X, Y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        ranks.append(layer.rank)
        if check:
            check(layer)
    return losses, ranks


def assert_orthonormal(layer):
    eye = torch.eye(layer.rank)
    assert (layer.U.T @ layer.U - eye).abs().max() < 1e-5
    assert (layer.V.T @ layer.V - eye).abs().max() < 1e-5
    assert layer.geo_U[:, layer.rank:].abs().max() == 0 and layer.geo_V[:, layer.rank:].abs().max() == 0


def test_backward_gives_the_K_S_L_gradients_of_the_dense_gradient():
    torch.manual_seed(0)
    layer = GeoLoRALinear(nn.Linear(12, 10), 3, 8, scaling=2.0, init_scale=0.5)
    x = torch.randn(5, 7, 12, requires_grad=True)
    (layer(x) ** 3).sum().backward()
    W = layer.delta_weight().detach().requires_grad_(True)  # the same function through a dense change
    x2 = x.detach().clone().requires_grad_(True)
    ((layer.base(x2) + x2 @ W.T) ** 3).sum().backward()
    GW = 2.0 * W.grad  # d/d(U S V^T) = s * d/d(delta)
    U, V = layer.U.detach(), layer.V.detach()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.geo_U.grad[:, :3], GW @ V, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.geo_S.grad[:3, :3], U.T @ GW @ V, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.geo_V.grad[:, :3], GW.T @ U, rtol=1e-4, atol=1e-4)
    assert layer.geo_U.grad[:, 3:].abs().max() == 0 and layer.geo_S.grad[3:].abs().max() == 0


def test_one_sgd_step_equals_the_projected_dense_step():
    """W_new = P_Uhat (W - lr P_T(G)) P_Vhat, span(U_hat) = span[U, G V], P_T(G) = G V V^T + U U^T G - U U^T G V V^T."""
    W0, dW, X, Y = planted()
    # seed 1: with seed 0 the layer's random U is the planted one (the same random stream), so G V lies in span(U)
    # and the step added only rounding-level directions
    layer = geo_layer(W0, 3, init_scale=0.3, seed=1)
    U, S, V = (t.detach().double() for t in (layer.U, layer.S, layer.V))
    W = (U @ S @ V.T).requires_grad_(True)
    (0.5 * ((X.double() @ (W0.double() + W).T - Y.double()) ** 2).sum(1).mean()).backward()
    G, lr = W.grad, 0.7
    PT = G @ V @ V.T + U @ U.T @ G - U @ U.T @ G @ V @ V.T
    proj = lambda B: (lambda Q: Q @ Q.T)(torch.linalg.qr(B)[0])
    expected = proj(torch.cat([U, G @ V], 1)) @ (W.detach() - lr * PT) @ proj(torch.cat([V, G.T @ U], 1))
    mse(layer, X, Y).backward()
    GeoLoRAOptimizer({"l": layer}, lr=lr, small_optimizer="sgd", tau=0.0, epsilon_resid=0.0).step()
    assert layer.rank == 6
    torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=1e-4, atol=1e-5)


def test_augmentation_drops_residual_directions_below_epsilon_and_keeps_U():
    torch.manual_seed(0)
    U = torch.linalg.qr(torch.randn(20, 3))[0]
    new = torch.linalg.qr(torch.cat([U, torch.randn(20, 2)], 1))[0][:, 3:]
    G = torch.cat([U @ torch.randn(3, 2), new * torch.tensor([1.0, 1e-9]), new[:, :1] * 2.0], 1)  # 1 direction > eps
    U_hat = augment_basis(U, G, 1e-6)
    assert U_hat.shape == (20, 4)
    torch.testing.assert_close(U_hat[:, :3], U, rtol=0, atol=1e-6)
    torch.testing.assert_close(U_hat.T @ U_hat, torch.eye(4), rtol=0, atol=1e-6)  # orthonormal without a QR
    assert torch.linalg.norm(new[:, 0] - U_hat @ (U_hat.T @ new[:, 0])) < 1e-5


def geolora_step_float64(U, S, V, G, lr, tau):
    """The GeoLoRA step (paper, Alg. 1; the authors' parallel integrator) in float64, for SGD: augment each basis with
    an orthonormal basis of the gradient's residual outside it (its exact rank: singular values above 1e-10 of the
    largest), step the augmented coefficients along the projected gradient (zero new x new block), truncate by SVD."""
    def augment(B, GB):
        R = GB - B @ (B.T @ GB)
        R = R - B @ (B.T @ R)
        Q, sv, _ = torch.linalg.svd(R, full_matrices=False)
        return torch.cat([B, Q[:, :int((sv > 1e-10 * torch.linalg.matrix_norm(GB, ord=2)).sum())]], 1)

    U_hat, V_hat = augment(U, G @ V), augment(V, G.T @ U)
    PT = G @ V @ V.T + U @ U.T @ G - U @ U.T @ G @ V @ V.T  # U_hat^T PT V_hat has the zero new x new block
    S_hat = U_hat.T @ (U @ S @ V.T - lr * PT) @ V_hat
    P, sigma, Qh = torch.linalg.svd(S_hat)
    k = local_threshold_rank(sigma, tau)
    return U_hat @ P[:, :k] @ torch.diag(sigma[:k]) @ Qh[:k] @ V_hat.T, k


@pytest.mark.parametrize("loss_scale", [1e-2, 1.0, 1e4])
def test_step_with_a_rank_deficient_gradient_residual_equals_the_float64_step_at_any_loss_scale(loss_scale):
    """Two samples make G rank 2 < r = 4, so the residuals of G V and G^T U are rank-deficient. The rounding-level
    singular vectors of such a residual are not orthogonal to U; with an absolute epsilon_resid they were kept once the
    loss was scaled up (step 20-30% off at loss x 1e2..1e4). With lr / loss_scale the step is the same at any scale."""
    torch.manual_seed(0)
    d, n = 24, 2
    W0, X, Y = torch.randn(d, d) / d ** 0.5, torch.randn(n, d), torch.randn(n, d)
    layer = geo_layer(W0, 4, seed=1, init_scale=0.3)
    U, S, V = (t.detach().double() for t in (layer.U, layer.S, layer.V))
    W = (U @ S @ V.T).requires_grad_(True)
    (loss_scale * 0.5 * ((X.double() @ (W0.double() + W).T - Y.double()) ** 2).sum(1).mean()).backward()
    lr, tau = 0.3 / loss_scale, 1e-3
    expected, k = geolora_step_float64(U, S, V, W.grad, lr, tau)
    (loss_scale * mse(layer, X, Y)).backward()
    GeoLoRAOptimizer({"l": layer}, lr=lr, small_optimizer="sgd", tau=tau).step()
    assert layer.rank == k == 6  # 4 + the two gradient directions on each side
    step = torch.linalg.norm(expected - W.detach())
    assert torch.linalg.norm(layer.delta_weight().double() - expected) < 1e-5 * step
    assert_orthonormal(layer)


def test_divergence_is_the_trainer_s_non_finite_error_not_a_linalg_error():
    from peftlab.train import NonFiniteLoss

    W0, dW, X, Y = planted()
    layer = geo_layer(W0, 3)
    mse(layer, X, Y).backward()
    layer.geo_U.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="GeoLoRA diverged: the gradient"):
        GeoLoRAOptimizer({"l": layer}, lr=0.1, small_optimizer="sgd").step()
    layer.zero_grad()
    (1e6 * mse(layer, X, Y)).backward()
    with pytest.raises(NonFiniteLoss, match="coefficient matrix .* not finite"):  # the step overflows fp32
        GeoLoRAOptimizer({"l": layer}, lr=1e38, small_optimizer="sgd").step()


@pytest.mark.parametrize("small,lr,tau", [("sgd", 0.5, 1e-3), ("adam", 1e-2, 1e-3), ("adam_entrywise", 1e-2, 5e-2)])
@pytest.mark.parametrize("r0", [8, 2])
def test_rank_settles_at_the_planted_rank_with_orthonormal_bases_and_the_loss_falls(small, lr, tau, r0):
    W0, dW, X, Y = planted()
    layer = geo_layer(W0, r0)
    losses, ranks = train(layer, X, Y, 300, lr, small, check=assert_orthonormal, tau=tau)
    assert ranks[-50:] == [3] * 50, ranks[::10]
    assert losses[-1] < 1e-3 * losses[0]
    assert torch.linalg.norm(layer.delta_weight() - dW) < 0.05 * torch.linalg.norm(dW)


def test_entrywise_adam_keeps_too_many_directions_at_the_default_tau():
    """Why the default Adam has one second moment per layer: entrywise steps are full rank in the augmented space."""
    W0, dW, X, Y = planted()
    _, ranks = train(geo_layer(W0, 8), X, Y, 200, 1e-2, "adam_entrywise", tau=1e-3)
    assert ranks[-1] > 3
    _, ranks = train(geo_layer(W0, 8), X, Y, 200, 1e-2, "adam", tau=1e-3)
    assert ranks[-1] == 3


@pytest.mark.parametrize("small", ["sgd", "adam", "adam_entrywise"])
def test_fixed_rank_keeps_r(small):
    W0, dW, X, Y = planted()
    layer = geo_layer(W0, 5)
    losses, ranks = train(layer, X, Y, 100, 0.5 if small == "sgd" else 3e-2, small, check=assert_orthonormal,
                          truncation_strategy="fixed_rank")
    assert set(ranks) == {5} and losses[-1] < 0.1 * losses[0]


class TwoMaps(nn.Module):
    """Two independent planted regressions (ranks 3 and 1) sharing one loss: a budget of 4 fits both exactly."""

    def __init__(self):
        super().__init__()
        self.tasks = [planted(r_star=3, seed=1), planted(r_star=1, seed=2)]
        self.a, self.b = (nn.Linear(24, 24, bias=False) for _ in range(2))
        for lin, (W0, *_) in zip((self.a, self.b), self.tasks):
            lin.weight.data.copy_(W0)

    def loss(self):
        (_, _, Xa, Ya), (_, _, Xb, Yb) = self.tasks
        return 0.5 * (((self.a(Xa) - Ya) ** 2).sum(1).mean() + ((self.b(Xb) - Yb) ** 2).sum(1).mean())


def test_global_budget_keeps_the_total_within_budget_and_gives_it_where_it_is_needed():
    torch.manual_seed(0)
    model = TwoMaps()
    layers = apply_adapters(model, OmegaConf.create({"lora_target_modules": ["a", "b"], "lora_r": 4,
                                                     "lora_alpha": 4}), {"rmax": 12}, "geolora")
    opt = GeoLoRAOptimizer(layers, lr=0.5, small_optimizer="sgd", truncation_strategy="global_budget", budget=4)
    first = float(model.loss().detach())
    for _ in range(150):
        model.loss().backward()
        opt.step()
        opt.zero_grad()
        assert sum(l.rank for l in layers.values()) <= 4
        for l in layers.values():
            assert_orthonormal(l)
    assert (layers["a"].rank, layers["b"].rank) == (3, 1)
    assert float(model.loss().detach()) < 1e-4 * first
    with pytest.raises(ValueError, match="budget"):
        GeoLoRAOptimizer(layers, lr=0.1, truncation_strategy="global_budget", budget=1)


def test_truncation_changes_the_layer_only_by_the_discarded_energy_bounded_by_tau():
    W0, dW, X, Y = planted()
    layer = geo_layer(W0, 8, scaling=2.0)
    train(layer, X, Y, 20, 1e-2, "adam_entrywise", tau=0.0)  # a layer with many small singular values
    tau = 0.05
    opt = GeoLoRAOptimizer({"l": layer}, lr=1e-2, small_optimizer="adam", tau=tau)
    mse(layer, X, Y).backward()
    p = opt.coefficient_step(layer)
    S_hat = p["P"] @ torch.diag(p["sigma"]) @ p["Q"].T
    before = 2.0 * p["U_hat"] @ S_hat @ p["V_hat"].T  # the stepped layer, untruncated
    k = local_threshold_rank(p["sigma"], tau)
    assert k < len(p["sigma"])
    opt.truncate(layer, p, k)
    assert layer.rank == k
    discarded = float(torch.linalg.norm(p["sigma"][k:]))
    assert discarded <= tau * float(torch.linalg.norm(p["sigma"])) + 1e-7
    change = layer.delta_weight().detach() - before
    assert float(torch.linalg.norm(change)) == pytest.approx(2.0 * discarded, rel=1e-3, abs=1e-6)
    out_change = X @ change.T  # the layer output moves by at most ||x|| * s * discarded
    assert (out_change.norm(dim=1) <= X.norm(dim=1) * 2.0 * discarded * (1 + 1e-4) + 1e-6).all()


@pytest.mark.parametrize("small", ["sgd", "adam", "adam_entrywise"])
def test_checkpoint_resume_continues_exactly(small):
    W0, dW, X, Y = planted()
    lr = 0.5 if small == "sgd" else 1e-2

    def run(layer, opt, steps):
        for _ in range(steps):
            mse(layer, X, Y).backward()
            opt.step()
            opt.zero_grad()

    layer = geo_layer(W0, 8)
    opt = GeoLoRAOptimizer({"l": layer}, lr=lr, small_optimizer=small)
    run(layer, opt, 7)
    buf = io.BytesIO()
    torch.save({"adapter": layer.adapter_state(), "opt": opt.state_dict()}, buf)
    rank_at_save = layer.rank
    run(layer, opt, 10)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = geo_layer(W0, 8, seed=123)  # other random bases: everything must come from the checkpoint
    resumed.load_adapter_state(ckpt["adapter"])
    assert resumed.rank == rank_at_save
    opt2 = GeoLoRAOptimizer({"l": resumed}, lr=lr, small_optimizer=small)
    opt2.load_state_dict(ckpt["opt"])
    run(resumed, opt2, 10)
    assert resumed.rank == layer.rank
    torch.testing.assert_close(resumed.delta_weight(), layer.delta_weight(), rtol=0, atol=1e-6)


def test_merge_unmerge_and_lora_factors_match_the_forward():
    W0, dW, X, Y = planted()
    layer = geo_layer(W0, 4, scaling=1.5, init_scale=0.2)
    ref = layer(X).detach()
    A, B = layer.lora_factors()
    assert A.shape == (4, 24) and B.shape == (24, 4)
    torch.testing.assert_close(X @ (W0 + B @ A).T, ref, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(X), ref, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W0, rtol=0, atol=1e-6)


def test_export_round_trips_through_peft_with_per_layer_ranks(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.export import save_peft_adapter

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layers = apply_adapters(model, OmegaConf.create({"target_set": "qkvo", "lora_r": 4, "lora_alpha": 8,
                                                     "lora_dropout": 0.0}), {"rmax": 8, "tau": 0.05}, "geolora")
    opt = get_method("geolora").make_optimizer(model, [p for p in model.parameters() if p.requires_grad],
                                               OmegaConf.create({"lr": 1e-2}), OmegaConf.create({"tau": 0.05}))
    x = torch.randint(0, 128, (4, 16))
    for _ in range(5):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for i, l in enumerate(layers.values()):  # make sure the ranks differ from layer to layer
        opt.truncate(l, {"U_hat": l.U.detach(), "V_hat": l.V.detach(), "P": torch.eye(l.rank), "Q": torch.eye(l.rank),
                         "sigma": torch.diagonal(l.S).detach(), "moments": None}, 1 + i % min(3, l.rank))
    ranks = {n: l.rank for n, l in layers.items()}
    assert len(set(ranks.values())) > 1
    save_peft_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    notes = json.loads((tmp_path / "adapter" / "peftlab.json").read_text())
    # one rank and one scaling for every layer (vLLM ignores patterns); the true ranks are kept in peftlab.json
    assert cfg["r"] == max(ranks.values()) and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    assert notes["layer_ranks"] == ranks
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapter")
    ref = model.eval()(x).logits
    torch.testing.assert_close(peft_model.eval()(x).logits, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(x).logits, ref, atol=1e-4)


def test_orthogonal_regularization_is_the_penalty_and_zero_on_the_integrator_s_bases():
    W0, dW, X, Y = planted()
    layer = geo_layer(W0, 4)
    model = nn.Sequential()
    model.add_module("l", layer)
    spec, cfg = get_method("geolora"), OmegaConf.create({"orthogonal_regularization": 0.5})
    assert spec.extra_loss(model, OmegaConf.create({})) is None
    assert float(spec.extra_loss(model, cfg).detach()) < 1e-10
    with torch.no_grad():
        layer.geo_U[:, 0] *= 2.0  # ||U^T U - I||^2 = (4 - 1)^2
    penalty = spec.extra_loss(model, cfg)
    assert float(penalty.detach()) == pytest.approx(0.5 * 9.0, rel=1e-5)
    penalty.backward()
    assert layer.geo_U.grad[:, 0].norm() > 0


def test_options_fail_early_naming_what_is_allowed():
    with pytest.raises(ValueError, match="local_threshold"):
        geolora_options({"truncation_strategy": "topk"})
    with pytest.raises(ValueError, match="adam_entrywise"):
        geolora_options({"use_small_matrix_optimizer": "lion"})
    with pytest.raises(ValueError, match="budget"):
        geolora_options({"truncation_strategy": "global_budget"})
    with pytest.raises(ValueError, match="unknown key method.rank = 4.*did you mean method.rank_init"):
        geolora_options({"rank": 4})
    with pytest.raises(ValueError, match="rank_init"):
        GeoLoRALinear(nn.Linear(4, 4), 0, 8, 1.0)
    with pytest.warns(UserWarning, match="starts at rank 4"):  # above the layer's capacity: capped, as rmax is
        assert GeoLoRALinear(nn.Linear(4, 4), 8, 8, 1.0).rank == 4
    with pytest.raises(ValueError, match="learning rate"):
        get_method("geolora").make_optimizer(nn.Module(), [], OmegaConf.create({}), None)


# ---- the trainer path (run_exp.py) -----------------------------------------------------------------------------------
FAST = ["wandb.mode=disabled", "model.epochs=1", "train.max_steps=12", "++dataset.eval_samples=32", "method=geolora",
        "++method.lr=3e-3", "++method.rmax=12", "++peft.lora_dropout=0", "train.save_every=4"]


def run_train(run_dir, overrides=()):
    from test_config import compose_cfg

    from peftlab.train import train

    cfg = compose_cfg([*FAST, *overrides])
    cfg.run_dir = str(run_dir)
    return train(cfg)


def test_trainer_logs_ranks_and_resumes_a_stopped_run_exactly(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    full = run_train(tmp_path / "full")
    rows = [json.loads(l) for l in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 12 and full["final_eval_loss"] < full["initial_eval_loss"]
    rank_keys = [k for k in steps[-1] if k.startswith("geolora/rank/")]
    assert len(rank_keys) == 4  # q_proj, v_proj in 2 layers
    assert steps[-1]["geolora/total_rank"] == sum(steps[-1][k] for k in rank_keys)
    assert steps[-1]["geolora/trainable_params"] > 0

    spec = get_method("geolora")
    real = spec.after_step

    def stop_after_5(model, optimizer, step, cfg):  # as SLURM would: a signal, a checkpoint at the next step
        if step == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(model, optimizer, step, cfg)

    monkeypatch.setattr(spec, "after_step", stop_after_5)
    with pytest.raises(SystemExit):
        run_train(tmp_path / "stopped")
    monkeypatch.setattr(spec, "after_step", real)
    assert json.loads((tmp_path / "stopped/checkpoint/trainer_state.json").read_text())["step"] == 5
    run_train(tmp_path / "stopped", ["resume=true"])
    a, b = (load_file(str(tmp_path / d / "adapter/adapter_model.safetensors")) for d in ("full", "stopped"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("small", ["adam", "sgd"])
def test_two_processes_equal_one(tmp_path, small):
    """DDP averages (G_K, G_S, G_L) like any gradient; the rotation-invariant steps then agree to rounding. (The
    factors are defined up to rotations among equal singular values, so the products B A are compared.)"""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    over = [o for o in FAST if not o.startswith("train.save_every")] + [
        "model.per_device_batch_size=8", f"++method.use_small_matrix_optimizer={small}"]
    procs = []
    for name, launcher in (("one", [sys.executable]), ("two", [sys.executable, "-m", "torch.distributed.run",
                                                                "--standalone", "--nproc_per_node=2"])):
        procs.append(subprocess.Popen([*launcher, str(root / "run_exp.py"), *over, f"hydra.run.dir={tmp_path / name}"],
                                      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out = p.communicate(timeout=400)[0]
        assert p.returncode == 0, out
    a, b = (load_file(str(tmp_path / d / "adapter/adapter_model.safetensors")) for d in ("one", "two"))
    for k in (k for k in a if "lora_A" in k):
        kb = k.replace("lora_A", "lora_B")
        assert a[k].shape == b[k].shape  # the same ranks
        torch.testing.assert_close(b[kb] @ b[k], a[kb] @ a[k], rtol=1e-4, atol=1e-5)


# ---- the seed's Python API -------------------------------------------------------------------------------------------
def seed_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def test_python_api_on_the_seed_mlp(tmp_path):
    from peftlab.geolora import GeoLoRAConfig, GeoLoRAModel, GeoLoRATrainer

    torch.manual_seed(0)
    X = torch.randn(256, 1, 28, 28)
    y = (X.flatten(1)[:, :10].argmax(1))  # a learnable labelling
    data = list(zip(X.split(32), y.split(32)))
    config = GeoLoRAConfig(rank_init=4, rmax=16, learning_rate=3e-2, tau=1e-2)
    model = GeoLoRAModel(seed_mlp(), config, target_modules=["1", "3", "5"])
    assert set(model.ranks()) == {"1", "3", "5"} and model.trainable_parameters() == \
        4 * (784 + 512 + 4) + 4 * (512 + 256 + 4) + 4 * (256 + 10 + 4)
    history = GeoLoRATrainer(model, config, output_dir=tmp_path).train(data, data[:2], num_epochs=4)
    assert history["epoch_train_loss"][-1] < 0.5 * history["epoch_train_loss"][0]
    assert len(history["total_rank"]) == 4 * len(data) == len(history["ranks"]["1"])
    assert history["val_accuracy"][-1] is not None and history["trainable_params"][-1] == model.trainable_parameters()
    png = tmp_path / "rank_evolution.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="truncation_strategy"):
        GeoLoRAConfig(truncation_strategy="nope")


def test_python_api_on_an_hf_model_and_its_export(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.geolora import GeoLoRAConfig, GeoLoRAModel, GeoLoRATrainer

    torch.manual_seed(0)
    config = GeoLoRAConfig(rank_init=4, learning_rate=1e-2, lora_alpha=8)
    model = GeoLoRAModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config, ["q_proj", "v_proj"])
    assert len(model.ranks()) == 4
    x = torch.randint(0, 128, (8, 16))
    data = [{"input_ids": x[i:i + 4], "labels": x[i:i + 4]} for i in (0, 4)]
    history = GeoLoRATrainer(model, config).train(data, num_epochs=10)
    assert history["train_loss"][-1] < history["train_loss"][0]
    model.save_adapter(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapter")
    torch.testing.assert_close(peft_model.eval()(x).logits, model.eval()(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_seed_trainer_applies_orthogonal_regularization():
    """The trainer's loss is the task loss plus w (||U^T U - I||^2 + ||V^T V - I||^2), summed over layers."""
    from peftlab.geolora import GeoLoRAConfig, GeoLoRAModel, GeoLoRATrainer

    X, y = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 10
    first = {}
    for w in (0.0, 0.5):
        torch.manual_seed(0)
        config = GeoLoRAConfig(rank_init=4, learning_rate=1e-3, orthogonal_regularization=w)
        model = GeoLoRAModel(seed_mlp(), config, target_modules=["1", "3"])
        with torch.no_grad():
            model.geolora_layers["1"].geo_U[:, 0] *= 2.0  # ||U^T U - I||^2 = (4 - 1)^2 on this layer, 0 elsewhere
        first[w] = GeoLoRATrainer(model, config).train([(X, y)], num_epochs=1)["train_loss"][0]
    assert first[0.5] - first[0.0] == pytest.approx(0.5 * 9.0, rel=1e-5)


def test_divergence_in_the_trainer_is_its_non_finite_error(tmp_path):
    from peftlab.train import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="GeoLoRA diverged"):
        run_train(tmp_path / "run", ["++method.lr=1e38", "train.max_grad_norm=null"])
