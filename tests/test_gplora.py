"""GP-LoRA: the projection against closed forms (fp64 reference), the guard at B = 0, the optimizer moments, the
optimizer wrapper, bf16, the method hook, PEFT export, DDP ranks and the embedded default against LoRA."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from peftlab.adapters import LoRALinear, apply_adapters, get_method
from peftlab.optim.gauge import (GaugeProjectedOptimizer, gauge_project_, gauge_project_model,
                                 imbalance, resolve_mu)

ROOT = Path(__file__).resolve().parents[1]


def trained_layer(m=24, n=16, r=4, seed=0, dtype=torch.float32):
    """A LoRA layer whose B carries signal (as after some training)."""
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(n, m), r, 2 * r, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.copy_(0.3 * torch.randn(m, r))
    return layer


def fp64_gauge(A, B, mu, eps):
    """The formula of DESIGN.md, term by term, in float64: R = S^1/2, S = G_A^-1/2 (G_A^1/2 mu G_B G_A^1/2)^1/2 G_A^-1/2."""
    A, B = A.detach().double(), B.detach().double()
    eye = torch.eye(A.shape[0], dtype=torch.float64)

    def power(M, p):
        e, V = torch.linalg.eigh(M)
        return V @ torch.diag(e ** p) @ V.T

    GA, GB = A @ A.T + eps * eye, B.T @ B + eps * eye
    S = power(GA, -0.5) @ power(power(GA, 0.5) @ (mu * GB) @ power(GA, 0.5), 0.5) @ power(GA, -0.5)
    return power(S, 0.5)


def test_projection_matches_the_closed_form_keeps_BA_and_balances_at_eps_zero():
    layer = trained_layer()
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    mu = 4 / 24
    R64 = fp64_gauge(A0, B0, mu, 0.0)
    out = gauge_project_(layer, mu="auto", eps=0.0)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    torch.testing.assert_close(A.double(), R64 @ A0.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B.double(), B0.double() @ torch.linalg.inv(R64), rtol=1e-5, atol=1e-6)
    assert torch.linalg.norm(B @ A - B0 @ A0) <= 1e-5 * torch.linalg.norm(B0 @ A0)
    assert torch.linalg.norm(A @ A.T - mu * B.T @ B) <= 1e-5 * torch.linalg.norm(A @ A.T)  # fp32-exact balance
    assert out["gplora/imbalance"] > 0.5 and out["gplora/R_minus_I"] > 0.1 and out["gplora/project_ms"] > 0


def test_eps_leaves_the_closed_form_residual_of_order_eps():
    # R (A A^T + eps) R = mu R^-1 (B^T B + eps) R^-1  =>  A'A'^T - mu B'^T B' = eps (mu R^-2 - R^2)
    for eps in (1e-3, 1e-2):
        layer = trained_layer()
        R = fp64_gauge(layer.lora_A, layer.lora_B, 0.5, eps)
        gauge_project_(layer, mu=0.5, eps=eps)
        A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        resid = A @ A.T - 0.5 * B.T @ B
        expected = eps * (0.5 * torch.linalg.inv(R @ R) - R @ R)
        torch.testing.assert_close(resid, expected, rtol=1e-3, atol=1e-6)
        assert 0.1 * eps < torch.linalg.norm(resid) < 10 * eps


def test_projecting_twice_equals_once():
    layer = trained_layer()
    gauge_project_(layer, eps=0.0)
    A1, B1 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    out = gauge_project_(layer, eps=0.0)
    assert out["gplora/R_minus_I"] < 1e-4
    torch.testing.assert_close(layer.lora_A, A1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B, B1, rtol=1e-5, atol=1e-6)


def test_mu_auto_is_r_over_m_and_bad_options_fail_early():
    assert resolve_mu("auto", 8, 64) == 8 / 64 and resolve_mu(0.3, 8, 64) == 0.3
    layer = trained_layer(m=40, n=12, r=5)
    gauge_project_(layer, mu="auto", eps=0.0)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    torch.testing.assert_close(A @ A.T, (5 / 40) * B.T @ B, rtol=1e-4, atol=1e-6)
    for bad, msg in (({"mu": "big"}, "'auto'"), ({"mu": -1.0}, "positive"), ({"moments": "move"}, "allowed"),
                     ({"guard": 2.0}, "guard"), ({"eps": -1.0}, "eps")):
        with pytest.raises(ValueError, match=msg):
            gauge_project_model(nn.Sequential(layer), **bad)
    with pytest.raises(ValueError, match="every"):
        apply_adapters(nn.Sequential(nn.Linear(4, 4)), OmegaConf.create({"lora_target_modules": ["0"], "lora_r": 2,
                                                                         "lora_alpha": 2}),
                       OmegaConf.create({"name": "gplora", "every": 0}), "gplora")


def test_batched_over_shapes_and_ranks_equals_layer_by_layer():
    torch.manual_seed(0)
    shapes = [(24, 16, 4), (24, 16, 4), (8, 16, 4), (24, 16, 2), (24, 16, 4)]
    layers = [trained_layer(m, n, r, seed=i) for i, (m, n, r) in enumerate(shapes)]
    with torch.no_grad():
        layers[4].lora_B.zero_()  # guarded: left alone while the others in its shape group are projected
    refs = [(l.lora_A.detach().clone(), l.lora_B.detach().clone()) for l in layers]
    out = gauge_project_model(nn.Sequential(*layers), mu="auto", eps=1e-4, guard=0.01)
    assert out["gplora/projected_layers"] == pytest.approx(4 / 5)
    for l, (A0, B0) in zip(layers[:4], refs[:4]):
        R = fp64_gauge(A0, B0, A0.shape[0] / B0.shape[0], 1e-4)
        torch.testing.assert_close(l.lora_A.double(), R @ A0.double(), rtol=1e-4, atol=1e-6)
    assert torch.equal(layers[4].lora_A, refs[4][0]) and torch.equal(layers[4].lora_B, refs[4][1])


def test_bf16_parameters_are_projected_in_fp32():
    layer = trained_layer(dtype=torch.bfloat16)
    ref = trained_layer(dtype=torch.float32)
    with torch.no_grad():
        ref.lora_A.copy_(layer.lora_A.float())
        ref.lora_B.copy_(layer.lora_B.float())
    gauge_project_(layer, eps=1e-4)
    gauge_project_(ref, eps=1e-4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    # the same fp32 computation, rounded once to bf16 at the end
    assert torch.equal(layer.lora_A, ref.lora_A.bfloat16()) and torch.equal(layer.lora_B, ref.lora_B.bfloat16())


def test_guard_leaves_B_zero_layers_alone_and_unguarded_projection_starves_B():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64), 8, 16)  # the default init: B = 0
    x = torch.randn(32, 64)
    A0 = layer.lora_A.detach().clone()
    out = gauge_project_model(nn.Sequential(layer), guard=0.01)
    assert out["gplora/projected_layers"] == 0 and torch.equal(layer.lora_A, A0)

    def grad_B():
        layer.lora_B.grad = None
        layer(x).pow(2).sum().backward()
        return layer.lora_B.grad.norm()

    g0 = grad_B()
    gauge_project_model(nn.Sequential(layer), guard=0.0)  # the trap: A collapses towards B = 0
    assert layer.lora_A.norm() < A0.norm() / 10 and grad_B() < g0 / 10
    with torch.no_grad():  # once B carries signal (rho = mu |B|^2 / |A|^2 = 0.02 >= guard) the layer is projected
        layer.lora_A.copy_(A0)
        layer.lora_B.normal_()
        layer.lora_B.mul_((0.02 * A0.norm() ** 2 / (8 / 64)).sqrt() / layer.lora_B.norm())
    assert gauge_project_model(nn.Sequential(layer), guard=0.01)["gplora/projected_layers"] == 1
    with torch.no_grad():  # the mirror trap: A = 0 against a large B is guarded too
        layer.lora_A.zero_()
    assert gauge_project_model(nn.Sequential(layer), guard=0.01)["gplora/projected_layers"] == 0


def test_eps_zero_skips_a_zero_factor_instead_of_writing_nan():
    """At eps = 0 a zero factor has no balancing gauge (S = 0, R^-1 infinite); it used to come back NaN unguarded.
    The layer is left alone, and a zero layer batched with others does not disturb their projection."""
    for zero in ("B", "A"):
        layers = [trained_layer(seed=i) for i in range(3)]
        with torch.no_grad():
            getattr(layers[1], f"lora_{zero}").zero_()
        before = [(l.lora_A.detach().clone(), l.lora_B.detach().clone()) for l in layers]
        out = gauge_project_model(nn.Sequential(*layers), mu="auto", eps=0.0, guard=0.0)
        assert out["gplora/projected_layers"] == pytest.approx(2 / 3)
        assert torch.isfinite(torch.tensor(list(out.values()))).all()
        assert torch.equal(layers[1].lora_A, before[1][0]) and torch.equal(layers[1].lora_B, before[1][1])
        for i in (0, 2):
            R = fp64_gauge(*before[i], 4 / 24, 0.0)
            torch.testing.assert_close(layers[i].lora_A.double(), R @ before[i][0].double(), rtol=1e-5, atol=1e-6)
    A, B = torch.randn(4, 16), torch.zeros(12, 4)  # the bare-factors API, unguarded
    gauge_project_((A, B), eps=0.0)
    assert torch.isfinite(A).all() and torch.equal(B, torch.zeros(12, 4))


def adam_state(layer, steps=3):
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for s in range(steps):
        torch.manual_seed(s)
        layer(torch.randn(5, 16)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_transported_moments_follow_the_gradient_at_the_regauged_point():
    layer = trained_layer()
    opt = adam_state(layer)
    st = opt.state
    mA, vA = st[layer.lora_A]["exp_avg"].clone(), st[layer.lora_A]["exp_avg_sq"].clone()
    mB, vB = st[layer.lora_B]["exp_avg"].clone(), st[layer.lora_B]["exp_avg_sq"].clone()
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    R = fp64_gauge(A0, B0, 4 / 24, 1e-4).float()
    Ri = torch.linalg.inv(R)
    x = torch.randn(7, 16)

    def grads():
        layer.zero_grad()
        layer(x).pow(2).sum().backward()
        return layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    gA, gB = grads()
    gauge_project_model(nn.Sequential(layer), guard=0.0, optimizer=opt, moments="transport")
    gA2, gB2 = grads()
    # the loss depends on B A only, so the gradient maps as dL/dA' = R^-1 dL/dA, dL/dB' = dL/dB R; so do the moments
    torch.testing.assert_close(gA2, Ri @ gA, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gB2, gB @ R, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st[layer.lora_A]["exp_avg"], Ri @ mA, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(st[layer.lora_B]["exp_avg"], mB @ R, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(st[layer.lora_A]["exp_avg_sq"], (Ri * Ri) @ vA, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(st[layer.lora_B]["exp_avg_sq"], vB @ (R * R), rtol=1e-4, atol=1e-10)
    assert float(st[layer.lora_A]["step"]) == 3


def test_reset_gives_a_fresh_adam_state_and_keep_leaves_it():
    layer = trained_layer()
    opt = adam_state(layer)
    before = {k: v.clone() for k, v in opt.state[layer.lora_A].items()}
    gauge_project_model(nn.Sequential(layer), guard=0.0, optimizer=opt, moments="keep")
    assert all(torch.equal(before[k], v) for k, v in opt.state[layer.lora_A].items())
    gauge_project_model(nn.Sequential(layer), guard=0.0, optimizer=opt, moments="reset")
    for p in (layer.lora_A, layer.lora_B):
        st = opt.state[p]
        assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    # the next step is a first AdamW step again (bias correction restarted): A (1 - lr wd) - lr g / (|g| + eps)
    A = layer.lora_A.detach().clone()
    layer(torch.randn(5, 16)).pow(2).sum().backward()
    g = layer.lora_A.grad.clone()
    opt.step()
    torch.testing.assert_close(layer.lora_A.detach(), A * (1 - 1e-2 * 1e-2) - 1e-2 * g / (g.abs() + 1e-8), rtol=1e-5,
                               atol=1e-7)


def test_transport_refuses_optimizer_state_it_does_not_know():
    layer = trained_layer()
    opt = torch.optim.Adamax(layer.parameters(), lr=1e-2)  # exp_inf: an infinity norm, neither moment
    layer(torch.randn(5, 16)).pow(2).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="exp_inf"):
        gauge_project_model(nn.Sequential(layer), guard=0.0, optimizer=opt, moments="transport")


def test_optimizer_wrapper_passes_everything_through():
    layer = trained_layer()
    model = nn.Sequential(layer)
    base = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    opt = GaugeProjectedOptimizer(base, model, mu="auto", eps=1e-4, every=2)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert base.param_groups[0]["lr"] == 0.5e-2
    for step in (1, 2):
        layer(torch.randn(3, 16)).pow(2).sum().backward()
        opt.step()
        sched.step()
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        balanced = float(imbalance(A, B, 4 / 24)) < 1e-3
        assert balanced == (step == 2)  # every=2: projected after the second step only
    assert set(opt.last_metrics) >= {"gplora/imbalance", "gplora/R_minus_I", "gplora/project_ms"}
    assert layer.lora_A.grad is not None
    opt.zero_grad()
    assert layer.lora_A.grad is None
    sd = opt.state_dict()
    assert sd["gauge_steps"] == 2
    base2 = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    opt2 = GaugeProjectedOptimizer(base2, model, every=2)
    opt2.load_state_dict(sd)
    assert opt2.steps == 2
    torch.testing.assert_close(base2.state[layer.lora_A]["exp_avg"], base.state[layer.lora_A]["exp_avg"])
    torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2).load_state_dict(sd)  # a plain optimizer loads it too


def test_method_hook_projects_on_schedule_and_logs():
    conf = OmegaConf.load(ROOT / "conf" / "method" / "gplora.yaml")
    assert conf.name == "gplora" and conf.mu == "auto" and conf.moments in ("transport", "reset", "keep")
    layer = trained_layer()
    model = nn.Sequential(layer)
    spec = get_method("gplora")
    cfg = OmegaConf.merge(conf, {"every": 3, "warmup_steps": 3})
    assert spec.after_step(model, None, 3, cfg) == {}  # still warming up
    assert spec.after_step(model, None, 5, cfg) == {}  # not a multiple of every
    out = spec.after_step(model, None, 6, cfg)
    assert out["gplora/projected_layers"] == 1 and out["gplora/imbalance"] > 0.5
    assert spec.after_step(model, None, 9, cfg)["gplora/imbalance"] < 1e-3


def test_exported_adapter_loads_in_peft(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.export import save_peft_adapter

    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    apply_adapters(ours, OmegaConf.create({"target_set": "qkvo", "lora_r": 4, "lora_alpha": 8}), None, "gplora")
    params = [p for p in ours.parameters() if p.requires_grad]
    opt = GaugeProjectedOptimizer(torch.optim.AdamW(params, lr=5e-2), ours, guard=0.0)
    x = torch.randint(0, 128, (2, 8))
    for _ in range(3):
        ours(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.last_metrics["gplora/projected_layers"] == 1
    save_peft_adapter(ours, tmp_path / "ad")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)


DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, {tests!r})
from test_gplora import trained_layer
from peftlab.optim.gauge import GaugeProjectedOptimizer, gauge_project_model
dist.init_process_group("gloo")
rank = dist.get_rank()
layers = [trained_layer(seed=10 + rank), trained_layer(m=8, n=24, seed=20 + rank)]  # different on each rank ...
for l in layers:
    for p in l.parameters():
        dist.broadcast(p.data, src=0)  # ... until rank 0's factors are broadcast
model = nn.Sequential(*layers)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

def gathered():
    flat = torch.cat([t.detach().flatten() for l in layers for t in (l.lora_A, l.lora_B)]
                     + [v.flatten() for p in opt.state for v in opt.state[p].values() if v.dim()])
    out = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(out, flat)
    return out

gauge_project_model(model, guard=0.0)
a, b = gathered()
assert torch.equal(a, b), "projection differs between ranks"
wrapped = GaugeProjectedOptimizer(opt, model, moments="transport", guard=0.0)
for step in range(4):  # data-parallel steps: different data per rank, gradients averaged as DDP does, then projected
    torch.manual_seed(100 + rank)
    model(torch.randn(4, 16)).pow(2).sum().backward()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= 2
    wrapped.step()
    wrapped.zero_grad()
a, b = gathered()
assert torch.equal(a, b), (a - b).abs().max()
if rank == 0:
    print("IDENTICAL", flush=True)
dist.barrier()
dist.destroy_process_group()
os._exit(0)  # skip interpreter finalization: gloo's threads can still hold tensors then and abort the process
"""


@pytest.mark.slow
def test_ddp_ranks_hold_identical_factors_after_projection(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "IDENTICAL" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.slow
def test_gplora_guard_waits_for_B_then_projects_every_layer(tmp_path):
    """Which method trains faster is a claim for the lab (seeds, intervals), not a unit test; this checks the guard."""
    from test_train import run_inproc

    run_inproc(tmp_path / "gp", ["model.epochs=2", "train.max_steps=64", "method=gplora"])
    rows = [json.loads(l) for l in (tmp_path / "gp" / "metrics.jsonl").read_text().splitlines()]
    projected = [r["gplora/projected_layers"] for r in rows if "gplora/projected_layers" in r]
    assert projected[0] == 0 and projected[-1] == 1  # the guard waits for B, then lets every layer in


def test_peft_and_loralib_style_lora_layers_are_projected():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(5, 16)
    y = model(x).detach()
    out = gauge_project_model(model, guard=0.0)
    assert out["gplora/projected_layers"] == 1.0
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
    pairs = [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in model.modules()
             if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]
    assert len(pairs) == 2
    for A, B in pairs:
        assert float(imbalance(A.detach(), B.detach(), 4 / B.shape[0])) < 1e-3

    class LoralibStyle(nn.Linear):  # loralib's layers: an nn.Linear with lora_A (r, in), lora_B (out, r)
        def __init__(self):
            super().__init__(16, 24)
            self.lora_A, self.lora_B = nn.Parameter(torch.randn(4, 16)), nn.Parameter(torch.randn(24, 4))

    m = nn.Sequential(LoralibStyle())
    gauge_project_model(m, guard=0.0)
    assert float(imbalance(m[0].lora_A.detach(), m[0].lora_B.detach(), 4 / 24)) < 1e-3


def test_models_it_cannot_project_are_refused_not_skipped():
    from peftlab.adapters.geolora import GeoLoRALinear

    geo = nn.Sequential(GeoLoRALinear(nn.Linear(8, 8), 2, 4, 1.0))
    for model, message in ((geo, r"cannot project \['0 \(GeoLoRALinear\)'\]"),
                           (nn.Sequential(nn.Linear(8, 8)), "no LoRA layers"),
                           (nn.Sequential(trained_layer(), nn.Linear(4, 4)), None)):
        if message is None:  # LoRA layers next to plain ones: fine
            GaugeProjectedOptimizer(torch.optim.AdamW(model.parameters()), model)
            continue
        with pytest.raises(ValueError, match=message):
            GaugeProjectedOptimizer(torch.optim.AdamW(model.parameters()), model)
        with pytest.raises(ValueError, match=message):
            gauge_project_model(model)
    stray = nn.Sequential(trained_layer())
    stray.register_parameter("lora_scale", nn.Parameter(torch.ones(1)))  # a LoRA parameter of unknown meaning
    with pytest.raises(ValueError, match="lora_scale"):
        gauge_project_model(stray)


def test_loralib_linear_refuses_what_it_cannot_be():
    import peftlab.adapters.gplora as lora

    with pytest.raises(ValueError, match="r=0"):
        lora.Linear(8, 8)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        lora.Linear(8, 8, r=2, fan_in_fan_out=True)
