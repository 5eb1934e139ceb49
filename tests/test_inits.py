"""Data-aware inits: each direction against its closed form, PiSSA and LoRA-GA against HF PEFT on the same model and
data, LoRA-FA against LoRA-One, unchanged outputs, PEFT export round trips, per-layer ranks through resume, early
config errors, and the seed command end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from peftlab.adapters import adapter_layers, apply_adapters
from peftlab.data.datasets import collate
from peftlab.export import save_peft_adapter
from peftlab.init import InitContext, get_init
from peftlab.init.directions import inverse_sqrt_metric, lora_fa, lora_ga, lora_one, rank_by_energy
from peftlab.init.gradient import calibration_samples
from peftlab.loss import token_loss_sum
from test_gradient_estimation import init_cfg, load, peft_cfg, random_examples

ROOT = Path(__file__).resolve().parents[1]


def svd(M):
    """float64 SVD with the inits' canonical signs (largest-|.| entry of each left singular vector positive)."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
    return U * sign, S, Vh * sign.T


def peft_delta(peft_model, name):
    m = peft_model.base_model.model.get_submodule(name)
    return m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight, m.base_layer.weight


# ---- closed forms on small matrices -------------------------------------------------------------------------------
def test_lora_one_closed_form_for_each_scale():
    torch.manual_seed(0)
    G, r, s, gamma = torch.randn(20, 12), 3, 2.0, 16.0
    U, S, Vh = svd(-G)
    step = ((U[:, :r] * S[:r]) @ Vh[:r] / S[0]).float()  # [-G]_r / s1
    for scale, factor in [("stable", 1 / gamma), ("gd", 1 / s ** 2), ("unit", 1.0)]:
        A, B = lora_one(G, r, s, scale, gamma)
        torch.testing.assert_close(s * B @ A, s * factor * step, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B.norm(), A.norm())  # the step split evenly between the factors
    with pytest.raises(ValueError, match=r"allowed: \['stable', 'gd', 'unit'\]"):
        lora_one(G, r, s, "big")


def test_lora_ga_closed_form_both_conventions_and_directions():
    torch.manual_seed(0)
    G, r, s, gamma = torch.randn(16, 10), 2, 4.0, 9.0
    U, S, Vh = svd(G)
    U, S, Vh = U.float(), S.float(), Vh.float()
    stable = 16 ** 0.25 / 3.0  # d_out^(1/4) / sqrt(gamma)
    A, B = lora_ga(G, r, s, "stable", gamma)  # the authors' code: ArB2r, the factor on both
    torch.testing.assert_close(A, Vh[:r] * stable)
    torch.testing.assert_close(B, U[:, r:2 * r] * stable)
    A, B = lora_ga(G, r, s, "gd", gamma)
    torch.testing.assert_close(s * B @ A, U[:, r:2 * r] @ Vh[:r] / s)
    A, B = lora_ga(G, r, s, "unit", gamma, "A2rBr")
    torch.testing.assert_close(B @ A, U[:, :r] @ Vh[r:2 * r])
    A, B = lora_ga(G, r, s, "unit", gamma, "ArBr")
    torch.testing.assert_close(B @ A, U[:, [0, 2]] @ Vh[[1, 3]])
    A, B = lora_ga(G, r, s, "stable", gamma, convention="peft")  # PEFT: B carries S, the factor on B alone
    torch.testing.assert_close(A, Vh[:r])
    torch.testing.assert_close(B, U[:, r:2 * r] * S[r:2 * r] * stable)
    with pytest.raises(ValueError, match="2r <= min"):
        lora_ga(G, 6, s)


def test_lora_fa_without_metric_or_with_isotropic_inputs_is_lora_one():
    torch.manual_seed(0)
    G, r, s = torch.randn(14, 9), 3, 2.0
    for scale in ("stable", "gd", "unit"):
        A1, B1 = lora_one(G, r, s, scale, 16.0)
        A2, B2 = lora_fa(G, r, s, sigma=None, scale=scale, gamma=16.0)
        torch.testing.assert_close(A2, A1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B2, B1, rtol=1e-5, atol=1e-6)
        A3, B3 = lora_fa(G, r, s, sigma=3.7 * torch.eye(9), damping=0.1, scale=scale, gamma=16.0)
        torch.testing.assert_close(A3, A1, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(B3, B1, rtol=1e-4, atol=1e-6)


def test_lora_fa_closed_form_with_anisotropic_metric():
    torch.manual_seed(0)
    G, r, s, gamma, damping = torch.randn(12, 8), 2, 1.5, 4.0, 0.01
    X = torch.randn(200, 8) * torch.linspace(0.1, 3, 8)
    sigma = X.T @ X / 200
    A, B = lora_fa(G, r, s, sigma=sigma, damping=damping, scale="stable", gamma=gamma)
    P = sigma.double() + damping * torch.trace(sigma.double()) / 8 * torch.eye(8, dtype=torch.float64)
    ev, Q = torch.linalg.eigh(P)
    p_is = (Q * ev.rsqrt()) @ Q.T
    U, S, Vh = svd(-G.double() @ p_is)
    dW = (U[:, :r] * S[:r]) @ Vh[:r] @ p_is  # -eta [G P^-1/2]_r P^-1/2, eta chosen for spectral norm 1
    dW = dW / torch.linalg.matrix_norm(dW, ord=2)
    torch.testing.assert_close((gamma * B @ A).double(), dW, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(A.norm(), B.norm(), rtol=1e-5, atol=0)
    torch.testing.assert_close(inverse_sqrt_metric(sigma, damping).double(), p_is, rtol=1e-4, atol=1e-6)
    # it minimises <G, dW> + (1/2 eta) E||dW x||^2 over rank r: better than LoRA-One's direction at the same proximity
    Ao, Bo = lora_one(G, r, s, "stable", gamma)
    fa, one = (B @ A).double(), (Bo @ Ao).double()
    P_sig = sigma.double()
    prox = lambda d: torch.trace(d @ P_sig @ d.T)  # noqa: E731
    one = one * (prox(fa) / prox(one)).sqrt()
    assert (G.double() * fa).sum() < (G.double() * one).sum()


def test_factors_do_not_depend_on_the_svd_s_sign_choices(monkeypatch):
    """An SVD's signs are arbitrary and flipped with rounding-level changes of G (another bsz/iters split or process
    count), which moved LoRA-GA's factors by O(1). Every SVD-based init now fixes them: flipping any singular pairs in
    torch's SVD changes no factor."""
    from peftlab.init.directions import lora_fa
    from peftlab.init.pissa import pissa_factors
    from peftlab.init.svd import top_r_svd

    torch.manual_seed(0)
    G, W, sigma = torch.randn(20, 14), torch.randn(20, 14), torch.cov(torch.randn(14, 50)) + torch.eye(14)
    inits = {"LoRA-GA": lambda: lora_ga(G, 3, 2.0), "LoRA-GA peft": lambda: lora_ga(G, 3, 2.0, convention="peft"),
             "LoRA-One": lambda: lora_one(G, 3, 2.0), "LoRA-FA": lambda: lora_fa(G, 3, 2.0, sigma=sigma),
             "PiSSA": lambda: pissa_factors(W, 3, 2.0), "PiSSA fast": lambda: pissa_factors(W, 3, 2.0, niter=2),
             "Rotational PiSSA": lambda: top_r_svd(W, 3)}
    plain = {k: f() for k, f in inits.items()}
    svd = torch.linalg.svd
    flip = torch.tensor([-1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0] * 2)

    def flipped_svd(M, full_matrices=True):
        U, S, Vh = svd(M, full_matrices=full_matrices)
        k = S.shape[-1]
        return U * flip[:k].to(U.dtype), S, Vh * flip[:k, None].to(Vh.dtype)

    monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
    for k, f in inits.items():
        for mine, ref in zip(f(), plain[k]):
            torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6, msg=k)


def test_rank_by_energy():
    S = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, 0.25 of 14.25
    assert rank_by_energy(S, 9 / 14.25, 4) == 1
    assert rank_by_energy(S, 0.91, 4) == 2 and rank_by_energy(S, 0.92, 4) == 3
    assert rank_by_energy(S, 0.99, 4) == 4 and rank_by_energy(S, 0.99, 3) == 3 and rank_by_energy(S, 1.0, 4) == 4


# ---- PiSSA against PEFT ---------------------------------------------------------------------------------------------
def run_pissa(model, niter=None, **peft_kw):
    layers = apply_adapters(model, peft_cfg(**peft_kw))
    get_init("pissa").run(InitContext(model, layers, OmegaConf.create({"init": {"name": "pissa", "niter": niter}})))
    return layers


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_matches_peft_and_keeps_the_output(tiny_llama_dir, use_rslora):
    from peft import LoraConfig, get_peft_model

    ours = load(tiny_llama_dir)
    x = torch.randint(0, 128, (2, 9))
    before = ours(x).logits
    layers = run_pissa(ours, None, lora_r=4, lora_alpha=8, use_rslora=use_rslora)
    torch.testing.assert_close(ours(x).logits, before, rtol=1e-4, atol=1e-5)
    ref = get_peft_model(load(tiny_llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          use_rslora=use_rslora, init_lora_weights="pissa"))
    for name, layer in layers.items():
        delta, base = peft_delta(ref, name)
        torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.base.weight, base, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def decaying_llama_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama with q/v weights whose spectrum has a gap after the 4th value, where randomized SVDs (PEFT's
    has no oversampling) converge to the top-4 subspace in a few power iterations."""
    model = load(tiny_llama_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                out, inp = m.weight.shape
                U, _ = torch.linalg.qr(torch.randn(out, out, generator=g))
                V, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g))
                k = min(out, inp)
                spectrum = torch.cat([torch.tensor([1.0, 0.8, 0.6, 0.4]), 1e-3 * 0.5 ** torch.arange(k - 4)])
                m.weight.copy_((U[:, :k] * spectrum) @ V[:, :k].T)
    path = tmp_path_factory.mktemp("decaying_llama")
    model.save_pretrained(path)
    return path


def test_pissa_refuses_a_rank_above_a_layer_s_smaller_dimension_naming_it():
    """A 1 x 64 layer has one singular triplet; r = 4 used to broadcast it into every row (residual -7 W)."""
    from torch import nn

    from peftlab.init.pissa import pissa_factors

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 1))
    w = [m.weight.detach().clone() for m in model]
    layers = apply_adapters(model, OmegaConf.create({"lora_target_modules": ["0", "1"], "lora_r": 4,
                                                     "lora_alpha": 8}))
    with pytest.raises(ValueError, match=r"PiSSA needs lora_r <= min\(out, in\); 1 is \(1, 32\), r=4"):
        get_init("pissa").run(InitContext(model, layers, OmegaConf.create({"init": {"name": "pissa"}})))
    assert all(torch.equal(l.base.weight, w0) for l, w0 in zip(layers.values(), w))  # refused before any change
    with pytest.raises(ValueError, match="lora_r <= min"):
        pissa_factors(torch.randn(1, 64), 4, 2.0)


def test_pissa_fast_svd_matches_peft_pissa_niter_4(decaying_llama_dir):
    from peft import LoraConfig, get_peft_model

    ours = load(decaying_llama_dir)
    x = torch.randint(0, 128, (2, 9))
    before = ours(x).logits
    layers = run_pissa(ours, 4, lora_r=4, lora_alpha=8)
    torch.testing.assert_close(ours(x).logits, before, rtol=1e-4, atol=1e-5)
    ref = get_peft_model(load(decaying_llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights="pissa_niter_4"))
    full = run_pissa(load(decaying_llama_dir), None, lora_r=4, lora_alpha=8)
    for name, layer in layers.items():
        delta, base = peft_delta(ref, name)
        torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.base.weight, base, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.delta_weight(), full[name].delta_weight(), rtol=1e-4, atol=1e-5)


# ---- LoRA-GA against PEFT -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction, scale, peft_scale", [("ArB2r", "stable", "stable"), ("A2rBr", "gd", "gd_scale"),
                                                          ("ArBr", "unit", "unit")])
def test_lora_ga_matches_peft_lora_ga(tiny_llama_dir, monkeypatch, direction, scale, peft_scale):
    """Same model, same data, same G: PEFT's lora_ga and ours (ga_convention=peft) give the same s B A and base."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    examples = random_examples(12)
    ours = load(tiny_llama_dir)
    x = torch.randint(0, 128, (2, 9))
    before = ours(x).logits
    layers = apply_adapters(ours, peft_cfg(lora_r=2, lora_alpha=4))
    cfg = init_cfg(direction="LoRA-GA", ga_convention="peft", ga_direction=direction, scale=scale, stable_gamma=16,
                   bsz=3, iters=2)
    get_init("gradient").run(InitContext(ours, layers, cfg, examples, 0))
    torch.testing.assert_close(ours(x).logits, before, rtol=1e-4, atol=1e-5)  # output unchanged

    def exact_svd(M, q=None, niter=None):  # PEFT calls the randomized SVD; LoRA-GA's B A depends on SVD signs,
        U, S, Vh = svd(M)  # so PEFT gets the exact SVD with the same canonical signs as ours
        return U.to(M.dtype), S.to(M.dtype), Vh.T.to(M.dtype)

    monkeypatch.setattr(torch, "svd_lowrank", exact_svd)
    ref_model = load(tiny_llama_dir)
    b = collate(calibration_samples(examples, 6, 0), 0)  # the same calibration samples, PEFT's own estimation

    def train_step():
        logits = ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        (token_loss_sum(logits, b["labels"]) / (b["labels"][:, 1:] != -100).sum()).backward()

    lcfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
                      lora_ga_config=LoraGAConfig(direction=direction, scale=peft_scale, stable_gamma=16))
    preprocess_loraga(ref_model, lcfg, train_step)
    ref = get_peft_model(ref_model, lcfg)
    for name, layer in layers.items():
        delta, base = peft_delta(ref, name)
        torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.base.weight, base, rtol=1e-4, atol=1e-6)


def test_lora_one_and_lora_fa_inits_on_a_model(tiny_llama_dir):
    """No offset: the effective weight is W0 + s B A with the closed forms of the estimated G; metric off = LoRA-One."""
    from peftlab.init.gradient import estimate_gradient

    examples = random_examples(8)
    model = load(tiny_llama_dir)
    layers = apply_adapters(model, peft_cfg(use_rslora=True))
    G, _, _ = estimate_gradient(model, layers, calibration_samples(examples, 8, 0), 0, 8, progress=False)
    w0 = {n: l.base.weight.clone() for n, l in layers.items()}
    deltas = {}
    for kw in ({"direction": "LoRA-One"}, {"direction": "LoRA-FA", "metric": "off"}):
        get_init("gradient").run(InitContext(model, layers, init_cfg(bsz=4, iters=2, **kw), examples, 0))
        deltas[kw["direction"]] = {n: l.delta_weight() for n, l in layers.items()}
    for n, l in layers.items():
        assert torch.equal(l.base.weight, w0[n]) and l.offset_A is None
        U, S, Vh = svd(-G[n])
        target = (l.scaling / 16) * ((U[:, :4] * S[:4]) @ Vh[:4] / S[0]).float()
        torch.testing.assert_close(deltas["LoRA-One"][n], target, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(deltas["LoRA-FA"][n], target, rtol=1e-4, atol=1e-6)


# ---- reduction: batch_mean against the authors' estimate -------------------------------------------------------------
def authors_gradient(model_dir, names, samples, bsz):
    """LoRA-One's and LoRA-GA's estimate_gradient, transcribed: a DataLoader of batch_size=bsz over the samples (in
    order), outputs.loss (HF's mean over the batch's target tokens) backward, every batch's gradient summed into
    named_grads, then named_grads /= the number of batches."""
    model = load(model_dir)
    weights = [model.get_submodule(n).weight for n in names]
    named_grads = {n: torch.zeros_like(w) for n, w in zip(names, weights)}
    num = 0
    for i in range(0, len(samples), bsz):
        b = collate(samples[i:i + bsz], 0)
        num += 1
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        for n, g in zip(names, torch.autograd.grad(loss, weights)):
            named_grads[n] += g
    return {n: g / num for n, g in named_grads.items()}


@pytest.mark.parametrize("direction", ["LoRA-GA", "LoRA-One"])
def test_batch_mean_reproduces_the_authors_estimate_and_factors(tiny_llama_dir, direction):
    from test_gradient_estimation import QV

    examples = random_examples(16)  # lengths and prompt lengths vary, so the two reductions differ
    bsz, iters = 3, 3
    samples = calibration_samples(examples, bsz * iters, 0)
    G = authors_gradient(tiny_llama_dir, QV, samples, bsz)
    runs = {}
    for reduction in ("batch_mean", "token_mean"):
        model = load(tiny_llama_dir)
        layers = apply_adapters(model, peft_cfg(lora_r=2, lora_alpha=4))
        cfg = init_cfg(direction=direction, bsz=bsz, iters=iters, reduction=reduction)
        get_init("gradient").run(InitContext(model, layers, cfg, examples, 0))
        runs[reduction] = layers
    for n in QV:
        l = runs["batch_mean"][n]
        A, B = (lora_ga if direction == "LoRA-GA" else lora_one)(G[n], 2, l.scaling)
        torch.testing.assert_close(l.lora_A.detach(), A, rtol=0, atol=1e-5)
        torch.testing.assert_close(l.lora_B.detach(), B, rtol=0, atol=1e-5)
        other = runs["token_mean"][n].delta_weight()
        assert (other - l.delta_weight()).norm() > 1e-3 * l.delta_weight().norm()  # the reductions differ here


# ---- export, per-layer ranks, resume --------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "LoRA-GA", "LoRA-FA-auto"])
def test_export_round_trips_through_peft(tmp_path, tiny_llama_dir, init):
    from peft import PeftModel

    examples = random_examples(8)
    ours = load(tiny_llama_dir)
    layers = apply_adapters(ours, peft_cfg(target_set="all", lora_r=4, lora_alpha=8, use_rslora=True))
    if init == "pissa":
        get_init("pissa").run(InitContext(ours, layers, OmegaConf.create({"init": {"name": "pissa", "niter": None}})))
    else:
        kw = {"direction": "LoRA-GA"} if init == "LoRA-GA" else {"direction": "LoRA-FA", "rank": "auto",
                                                                  "energy": 0.5}
        get_init("gradient").run(InitContext(ours, layers, init_cfg(bsz=4, iters=2, **kw), examples, 0))
    for layer in adapter_layers(ours).values():  # move away from the init so the export is non-trivial
        layer.lora_B.data += 0.01 * torch.randn_like(layer.lora_B)
    save_peft_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(tiny_llama_dir))
    cfg = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    if init == "LoRA-FA-auto":  # ranks chosen per layer: exported at the largest, no patterns (vLLM ignores them)
        ranks = json.loads((tmp_path / "ad/peftlab.json").read_text())["layer_ranks"]
        assert len(set(ranks.values())) > 1 and cfg["r"] == max(ranks.values()) and not cfg["rank_pattern"]
    else:
        assert cfg["r"] == 8  # the init's move of the base is exported too: rank 2r
    peft_model = PeftModel.from_pretrained(load(tiny_llama_dir), tmp_path / "ad").eval()
    x = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(peft_model(x).logits, ours(x).logits, rtol=1e-4, atol=1e-5)


def test_rank_auto_layers_survive_a_resume(tiny_llama_dir):
    """Resume builds layers at peft.lora_r and loads the checkpoint's smaller factors: rank and scaling follow."""
    ours = load(tiny_llama_dir)
    layers = apply_adapters(ours, peft_cfg(target_set="all", lora_r=4, lora_alpha=8, use_rslora=True))
    metrics = get_init("gradient").run(InitContext(
        ours, layers, init_cfg(direction="LoRA-FA", rank="auto", energy=0.5, bsz=4, iters=2), random_examples(8), 0))
    chosen = adapter_layers(ours)
    assert metrics["init/mean_rank"] < 4 and {l.rank for l in chosen.values()} != {4}
    assert all(layers[n] is chosen[n] for n in chosen)  # the context's layer map follows the rebuilt layers
    resumed = load(tiny_llama_dir)
    fresh = apply_adapters(resumed, peft_cfg(target_set="all", lora_r=4, lora_alpha=8, use_rslora=True))
    for n, layer in fresh.items():
        layer.load_adapter_state(chosen[n].adapter_state())
        assert layer.rank == chosen[n].rank == layer.lora_A.shape[0] == layer.lora_B.shape[1]
        assert layer.scaling == pytest.approx(8 / chosen[n].rank ** 0.5) == pytest.approx(chosen[n].scaling)
    x = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(resumed(x).logits, ours(x).logits)


# ---- config errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"direction": "LoRA-XX"}, r"init.direction = 'LoRA-XX': allowed: \['LoRA-GA', 'LoRA-One', 'LoRA-FA'\]"),
    ({"scale": "big"}, r"init.scale = 'big': allowed: \['stable', 'gd', 'unit'\]"),
    ({"mode": "svd"}, r"init.mode = 'svd': allowed: \['gradient'\]"),
    ({"dtype": "int8"}, r"init.dtype = 'int8': allowed: \['float32', 'fp32', 'bfloat16'"),
    ({"metric": "maybe"}, r"init.metric = 'maybe': allowed: \['on', 'off'\]"),
    ({"ga_direction": "BA"}, r"allowed: \['ArB2r', 'A2rBr', 'ArBr'\]"),
    ({"rank": "auto"}, "it needs init.direction=LoRA-FA"),
    ({"rank": 3}, r"init.rank = 3: must be one of \['auto'\]"),
    ({"bsz": 0}, "init.bsz = 0: must be an integer >= 1"),
    ({"energy": 1.5}, r"init.energy = 1.5: must be a number > 0 and <= 1"),
    ({"reduction": "sum"}, r"init.reduction = 'sum': allowed: \['token_mean', 'batch_mean'\]"),
])
def test_bad_init_values_fail_at_config_resolution(overrides, message):
    from test_config import compose_cfg

    from peftlab.config import resolve_config

    cfg = compose_cfg(["+init=gradient", *[f"++init.{k}={v}" for k, v in overrides.items()]])
    with pytest.raises(ValueError, match=message):
        resolve_config(cfg)


def test_bad_pissa_niter_fails_at_config_resolution():
    from test_config import compose_cfg

    from peftlab.config import resolve_config

    assert resolve_config(compose_cfg(["+init=pissa", "++init.niter=4"])).init.niter == 4
    with pytest.raises(ValueError, match="init.niter = 'fast': must be an integer >= 0 or null"):
        resolve_config(compose_cfg(["+init=pissa", "++init.niter=fast"]))


# ---- end to end -----------------------------------------------------------------------------------------------------
SEED = ["-m", "++dataset_name=meta_math", "++model.epochs=1", "++model.eval_epochs=1", "+init=gradient",
        "++init.direction=LoRA-FA", "++init.weight=stable", "++init.stable_gamma=128", "+peft=qv", "++peft.lora_r=8",
        "++peft.use_rslora=True", "++peft.lora_alpha=16", "++wandb.name=x", "++wandb.project=lorafa", "++init.iters=8"]


def run_seed(tmp_path, extra):
    cmd = [sys.executable, str(ROOT / "run_exp.py"), *SEED, *extra, "++train.max_steps=4", "++wandb.mode=disabled",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep/0/summary.json").read_text())
    cfg = OmegaConf.load(tmp_path / "sweep/0/.hydra/config.yaml")
    assert summary["init"] == "gradient" and summary["steps"] == 4
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert cfg.init.weight == "stable" and cfg.wandb.project == "lorafa" and cfg.init.iters == 8
    row0 = json.loads((tmp_path / "sweep/0/metrics.jsonl").read_text().splitlines()[0])
    assert row0["step"] == 0 and row0["init/calibration_samples"] == 8
    return summary


@pytest.mark.slow
def test_seed_command_on_a_local_metamath_file(tmp_path, embedded_data_dir):
    rows = [json.loads(l) for l in (embedded_data_dir / "train.jsonl").read_text().splitlines()[:240]]
    f = tmp_path / "MetaMathQA.jsonl"
    f.write_text("".join(json.dumps({"query": r["question"], "type": "GSM_AnsAug",
                                     "response": r["answer"].replace("####", "The answer is:")}) + "\n" for r in rows))
    s = run_seed(tmp_path, [f"++dataset.path={f}", "++dataset.eval_samples=16"])
    assert s["dataset"] == "meta_math"


@pytest.mark.slow
def test_seed_command_on_the_embedded_default(tmp_path):
    s = run_seed(tmp_path, ["++dataset_name=tiny", "++dataset.eval_samples=16"])
    assert s["dataset"] == "tiny"


@pytest.mark.slow
def test_resumed_rank_auto_run_exports_the_same_adapter(tmp_path):
    """A finished rank-auto run resumed from its checkpoint (init skipped, layers rebuilt at peft.lora_r) exports
    the same PEFT adapter, ranks and alphas."""
    from safetensors.torch import load_file

    from peftlab.train import train
    from test_config import compose_cfg

    overrides = ["wandb.mode=disabled", "train.max_steps=3", "++dataset.eval_samples=16", "+init=gradient",
                 "++init.direction=LoRA-FA", "++init.rank=auto", "++init.energy=0.6", "+peft=qkvo",
                 "++peft.use_rslora=True"]
    for resume in (False, True):
        cfg = compose_cfg([*overrides, f"resume={resume}"])
        cfg.run_dir = str(tmp_path)
        train(cfg)
        config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
        tensors = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
        ranks = json.loads((tmp_path / "adapter/peftlab.json").read_text())["layer_ranks"]
        if not resume:
            first_config, first, first_ranks = config, tensors, ranks
    assert config == first_config and not config["rank_pattern"] and not config["alpha_pattern"]
    assert ranks == first_ranks and len(set(ranks.values())) > 1
    for k in first:
        torch.testing.assert_close(tensors[k], first[k])
