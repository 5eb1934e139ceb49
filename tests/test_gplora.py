"""GP-LoRA: the projection's invariants, the guard, moments, the optimizer wrapper, DDP ranks and PEFT export."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from peftlab.adapters import LoRALinear, apply_adapters
from peftlab.optim.gauge import (GaugeProjectedOptimizer, gauge_matrices, gauge_project_, gauge_project_model,
                                 imbalance, resolve_mu)

ROOT = Path(__file__).resolve().parents[1]


def trained_layer(m=24, n=16, r=4, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(n, m), r, 2 * r, dtype=dtype)
    nn.init.normal_(layer.lora_B, std=0.3)
    return layer


def test_projection_keeps_BA_and_balances_exactly_at_eps_zero():
    layer = trained_layer()
    BA = layer.lora_B.detach() @ layer.lora_A.detach()
    mu = resolve_mu("auto", 4, 24)
    assert mu == 4 / 24
    gauge_project_(layer, mu="auto", eps=0.0)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    torch.testing.assert_close(B @ A, BA, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(A @ A.T, mu * B.T @ B, rtol=1e-4, atol=1e-6)
    assert float(imbalance(A[None], B[None], mu)) < 1e-4


def test_eps_leaves_a_residual_of_order_eps():
    layer = trained_layer()
    gauge_project_(layer, mu=0.5, eps=1e-3)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    resid = torch.linalg.matrix_norm(A @ A.T - 0.5 * B.T @ B)
    assert 0 < resid < 5e-3


def test_projecting_twice_equals_once():
    layer = trained_layer()
    gauge_project_(layer, eps=0.0)
    A1, B1 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    gauge_project_(layer, eps=0.0)
    torch.testing.assert_close(layer.lora_A, A1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_B, B1, rtol=1e-4, atol=1e-5)


def test_R_solves_the_balance_equation_in_batch():
    torch.manual_seed(0)
    A, B = torch.randn(5, 3, 10), torch.randn(5, 7, 3)
    R, R_inv = gauge_matrices(A, B, 0.3, eps=0.0)
    torch.testing.assert_close(R @ R_inv, torch.eye(3).expand(5, 3, 3), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(R, R.transpose(-1, -2))
    S = R @ R
    torch.testing.assert_close(S @ (A @ A.transpose(-1, -2)) @ S, 0.3 * B.transpose(-1, -2) @ B, rtol=1e-3, atol=1e-4)


def test_bf16_parameters_are_projected_in_fp32():
    layer = trained_layer(dtype=torch.bfloat16)
    ref = trained_layer(dtype=torch.float32)
    ref.lora_A.data.copy_(layer.lora_A.float())
    ref.lora_B.data.copy_(layer.lora_B.float())
    gauge_project_(layer, eps=0.0)
    gauge_project_(ref, eps=0.0)
    assert layer.lora_A.dtype == torch.bfloat16
    torch.testing.assert_close(layer.lora_A.float(), ref.lora_A.bfloat16().float(), rtol=1e-2, atol=1e-2)


def test_guard_skips_layers_at_B_zero():
    layer = LoRALinear(nn.Linear(16, 16), 4, 8)  # default init: B = 0
    A0 = layer.lora_A.detach().clone()
    out = gauge_project_model(nn.Sequential(layer), guard=0.01)
    assert out["gplora/projected_layers"] == 0 and torch.equal(layer.lora_A, A0)
    gauge_project_model(nn.Sequential(layer), guard=0.0)  # unguarded: A collapses toward B = 0
    assert layer.lora_A.norm() < A0.norm() / 10


def test_moments_transport_reset_keep():
    layer = trained_layer()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.randn(3, 16)).sum().backward()
    opt.step()
    st = opt.state
    mA, mB = st[layer.lora_A]["exp_avg"].clone(), st[layer.lora_B]["exp_avg"].clone()
    vA = st[layer.lora_A]["exp_avg_sq"].clone()
    R, R_inv = gauge_matrices(layer.lora_A.detach()[None], layer.lora_B.detach()[None], "auto" == 0 or 4 / 24, 1e-4)
    gauge_project_model(nn.Sequential(layer), guard=0.0, optimizer=opt, moments="transport")
    torch.testing.assert_close(st[layer.lora_A]["exp_avg"], R_inv[0] @ mA, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(st[layer.lora_B]["exp_avg"], mB @ R[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(st[layer.lora_A]["exp_avg_sq"], (R_inv[0] ** 2) @ vA, rtol=1e-4, atol=1e-9)
    gauge_project_model(nn.Sequential(layer), guard=0.0, optimizer=opt, moments="reset")
    assert st[layer.lora_A]["exp_avg"].abs().sum() == 0 and st[layer.lora_B]["exp_avg_sq"].abs().sum() == 0
    with pytest.raises(ValueError, match=r"allowed: \['transport', 'reset', 'keep'\]"):
        gauge_project_model(nn.Sequential(layer), moments="move")


def test_optimizer_wrapper_passes_everything_through():
    layer = trained_layer()
    model = nn.Sequential(layer)
    base = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    opt = GaugeProjectedOptimizer(base, model, mu="auto", eps=1e-4)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert base.param_groups[0]["lr"] == 0.5e-2
    layer(torch.randn(3, 16)).pow(2).sum().backward()
    opt.step()
    sched.step()
    assert opt.last_metrics["gplora/projected_layers"] == 1.0
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    assert float(imbalance(A[None], B[None], 4 / 24)) < 1e-2
    opt.zero_grad()
    assert layer.lora_A.grad is None
    sd = opt.state_dict()
    base2 = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    GaugeProjectedOptimizer(base2, model).load_state_dict(sd)
    torch.testing.assert_close(base2.state[layer.lora_A]["exp_avg"], base.state[layer.lora_A]["exp_avg"])


def test_exported_adapter_loads_in_peft(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.export import save_peft_adapter

    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    layers = apply_adapters(ours, OmegaConf.create({"target_set": "qkvo", "lora_r": 4, "lora_alpha": 8}),
                            None, "gplora")
    for l in layers.values():
        nn.init.normal_(l.lora_B, std=0.1)
    gauge_project_model(ours, guard=0.0)
    save_peft_adapter(ours, tmp_path / "ad")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "ad").eval()
    x = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(ref(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_ddp_ranks_hold_identical_factors(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(ROOT / 'tests')!r})
from test_gplora import trained_layer
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from peftlab.optim.gauge import GaugeProjectedOptimizer
dist.init_process_group("gloo")
rank = dist.get_rank()
layer = trained_layer(seed=0)
model = DDP(nn.Sequential(layer))
opt = GaugeProjectedOptimizer(torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2), model)
for step in range(5):
    torch.manual_seed(100 + rank)  # different data per rank
    model(torch.randn(4, 16)).pow(2).sum().backward()
    opt.step(); opt.zero_grad()
flat = torch.cat([layer.lora_A.detach().flatten(), layer.lora_B.detach().flatten()])
gathered = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(gathered, flat)
if rank == 0:
    assert torch.equal(gathered[0], gathered[1]), (gathered[0] - gathered[1]).abs().max()
    print("IDENTICAL")
dist.barrier(); dist.destroy_process_group()
""")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "IDENTICAL" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.slow
def test_gplora_trains_on_the_embedded_default_at_least_as_fast_as_lora(tmp_path):
    from test_train import run_inproc

    # the default run (2 epochs, 128 steps): GP-LoRA's defaults from the default init, against plain LoRA
    lora = run_inproc(tmp_path / "lora", ["model.epochs=2", "train.max_steps=128"])
    gp = run_inproc(tmp_path / "gp", ["model.epochs=2", "train.max_steps=128", "method=gplora"])
    rows = [json.loads(l) for l in (tmp_path / "gp" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("gplora/projected_layers", 0) for r in rows) == 1.0  # the guard lets every layer in
    assert gp["final_eval_loss"] <= lora["final_eval_loss"] * 1.01
