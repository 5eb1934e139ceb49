"""Rotational PiSSA: identity start, orthogonality, way0's penalty, closed forms, exact merge, PEFT export, (r+p)."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from peftlab.adapters import adapter_layers, apply_adapters
from peftlab.adapters.rotational_pissa import (RotationalPiSSAConfig, RotationalPiSSALinear, cayley, expm_low_rank,
                                               replace_linear_with_rotational_pissa)


def layer(way="way2", seed=0, **kw):
    torch.manual_seed(seed)
    return RotationalPiSSALinear(nn.Linear(16, 12), RotationalPiSSAConfig(r=4, way=way, **kw))


def test_low_rank_exponential_and_cayley_closed_forms():
    torch.manual_seed(0)
    B, C = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    K = B @ C.T - C @ B.T
    torch.testing.assert_close(expm_low_rank(B, C), torch.linalg.matrix_exp(K))
    eye = torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(cayley(B, C), torch.linalg.inv(eye - K) @ (eye + K))
    for R in (expm_low_rank(B, C), cayley(B, C)):
        torch.testing.assert_close(R.T @ R, eye)
    assert not torch.allclose((eye + K).T @ (eye + K), eye)  # why "I + K" is not enough


@pytest.mark.parametrize("way", ["way0", "way1", "way2", "way3"])
def test_identity_init_equals_the_base(way):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    x = torch.randn(5, 16)
    ref = base(x).detach()
    l = RotationalPiSSALinear(base, RotationalPiSSAConfig(r=4, way=way))
    torch.testing.assert_close(l(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("way", ["way1", "way2", "way3"])
def test_rotations_stay_orthogonal_after_many_steps(way):
    l = layer(way, merge_every=25)
    opt = torch.optim.Adam([p for p in l.parameters() if p.requires_grad], lr=0.05)
    target = torch.randn(12, 16)
    x = torch.randn(64, 16)
    for step in range(1, 201):
        ((l(x) - x @ target.T) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        if way == "way1" and step % 25 == 0:
            l.merge_rotations_(opt)
    R_U, R_V = l.rotations()
    eye = torch.eye(4)
    torch.testing.assert_close(R_U.T @ R_U, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(R_V.T @ R_V, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(l.U.T @ l.U, eye, rtol=0, atol=1e-5)  # merged Givens keep U orthonormal


def test_way0_penalty_pulls_R_toward_orthogonality():
    l = layer("way0")
    with torch.no_grad():
        l.rot_U.R.add_(0.3 * torch.randn(4, 4))
    before = float(l.orthogonality_penalty())
    opt = torch.optim.SGD([l.rot_U.R], lr=0.05)
    for _ in range(100):
        l.orthogonality_penalty().backward()
        opt.step()
        opt.zero_grad()
    assert float(l.orthogonality_penalty()) < 0.01 * before


def test_merge_is_exact_and_trainable_S_is_fp32():
    l = layer("way3", freeze_singular_values=False)
    assert isinstance(l.S, nn.Parameter) and l.S.dtype == torch.float32
    with torch.no_grad():
        l.rot_U.C.normal_()
        l.S.mul_(1.5)
    x = torch.randn(3, 16)
    y = l(x)
    W_res = l.base.weight.detach().clone()
    l.merge()
    R_U, R_V = l.rotations()
    torch.testing.assert_close(l.base.weight, W_res + l.U @ R_U @ torch.diag(l.S) @ R_V.T @ l.V.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l(x), y, rtol=1e-5, atol=1e-5)


def test_extra_principal_dims_let_the_subspace_move():
    def principal_angle_after_training(p):
        l = layer("way2", extra_principal_dims=p, freeze_singular_values=False)
        U0 = l.U[:, :4].clone()
        opt = torch.optim.Adam([q for q in l.parameters() if q.requires_grad], lr=0.05)
        x, target = torch.randn(64, 16), torch.randn(12, 16)
        for _ in range(100):
            ((l(x) - x @ target.T) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        U = torch.linalg.svd(l.delta_weight().double(), full_matrices=False)[0][:, :4]
        U0 = U0.double()
        return float(torch.linalg.matrix_norm(U - U0 @ (U0.T @ U), ord=2))  # sin of the largest principal angle

    assert principal_angle_after_training(0) < 1e-5
    assert principal_angle_after_training(4) > 0.05


def test_export_round_trips_through_peft(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.export import save_peft_adapter

    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    cfg = OmegaConf.create({"name": "rotational_pissa", "way": "way3", "low_rank_r": 2})
    apply_adapters(ours, OmegaConf.create({"target_set": "qv", "lora_r": 4, "lora_alpha": 8}), cfg,
                   "rotational_pissa")
    for l in adapter_layers(ours).values():
        with torch.no_grad():
            l.rot_U.C.normal_()
            l.rot_V.C.normal_()
    save_peft_adapter(ours, tmp_path / "ad")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "ad").eval()
    x = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(ref(x).logits, ours(x).logits, rtol=1e-4, atol=1e-5)


def test_seed_api_and_nf4_residual(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    x = torch.randint(0, 128, (2, 8))
    ref = model(x).logits
    cfg = RotationalPiSSAConfig(r=4, way="way2", quantize_residual=True)
    layers = replace_linear_with_rotational_pissa(model, cfg, ["q_proj", "v_proj"], "default", True)
    assert len(layers) == 4 and all(l.adapter_name == "default" for l in layers.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "rot_" not in n)
    err = float((model(x).logits - ref).abs().max() / ref.abs().max())
    # identity start within NF4's quantisation error of the residual (random tiny weights: ~6% of the max logit),
    # and smaller than quantising the whole weight as QLoRA does (the principal part stays exact)
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    for name in layers:
        full.get_submodule(name).weight.data = _nf4_roundtrip(full.get_submodule(name).weight.data)
    err_full = float((full(x).logits - ref).abs().max() / ref.abs().max())
    assert 0 < err < 0.1 and err < err_full
    with pytest.raises(RuntimeError, match="NF4 residual"):
        next(iter(layers.values())).merge()


def _nf4_roundtrip(w):
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(w.float(), quant_type="nf4")
    return F.dequantize_4bit(q, state).to(w.dtype)


def test_bad_way_fails():
    with pytest.raises(ValueError, match=r"allowed: \['way0', 'way1', 'way2', 'way3'\]"):
        RotationalPiSSAConfig(way="way9")


@pytest.mark.slow
@pytest.mark.parametrize("way", ["way0", "way1", "way2", "way3"])
def test_every_way_trains_on_the_embedded_default(tmp_path, way):
    from test_train import run_inproc

    s = run_inproc(tmp_path, ["method=rotational_pissa", f"++method.way={way}", "++method.merge_every=8",
                              "train.max_steps=24", "model.lr=1e-2"])
    assert s["final_eval_loss"] < 0.9 * s["initial_eval_loss"]
