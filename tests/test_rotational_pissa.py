"""Rotational PiSSA: closed forms, identity start, orthogonality, way0's penalty, exact merge, way1's restart, (r+p),
PEFT export, NF4 residual and components, config errors, and training (plain loop and the trainer)."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from peftlab.adapters import adapter_layers, apply_adapters, get_method
from peftlab.adapters.rotational_pissa import (WAYS, RotationalPiSSAConfig, RotationalPiSSALinear, cayley,
                                               config_from, expm_low_rank, replace_linear_with_rotational_pissa)

PEFT_QV = OmegaConf.create({"target_set": "qv", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0})


def layer(way="way2", seed=0, **kw):
    torch.manual_seed(seed)
    return RotationalPiSSALinear(nn.Linear(16, 12), RotationalPiSSAConfig(r=4, way=way, **kw))


def perturb(l, scale=0.5):
    """A trained-looking rotation state (way-agnostic)."""
    with torch.no_grad():
        for p in l.parameters():
            if p.requires_grad and p is not getattr(l, "S", None):
                p.add_(scale * torch.randn_like(p))


def fit(l, steps, lr=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, target = torch.randn(64, 16, generator=g), torch.randn(12, 16, generator=g)
    opt = torch.optim.Adam([p for p in l.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        ((l(x) - x @ target.T) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("n,k", [(7, 2), (9, 1), (6, 3)])
def test_low_rank_exponential_and_cayley_closed_forms(n, k):
    torch.manual_seed(0)
    B, C = torch.randn(n, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    K = B @ C.T - C @ B.T
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(expm_low_rank(B, C), torch.linalg.matrix_exp(K))
    torch.testing.assert_close(cayley(B, C), torch.linalg.inv(eye - K) @ (eye + K))
    for R in (expm_low_rank(B, C), cayley(B, C)):
        torch.testing.assert_close(R.T @ R, eye)
        assert torch.linalg.det(R) == pytest.approx(1.0)  # rotations, not reflections
    assert not torch.allclose((eye + K).T @ (eye + K), eye)  # why "I + K" is not enough
    torch.testing.assert_close(expm_low_rank(B, 0 * C), eye)  # K = 0 (a singular small matrix) is fine
    # gradients of the small exponential equal those of the dense one
    Bg, Cg = B.clone().requires_grad_(), C.clone().requires_grad_()
    W = torch.randn(n, n, dtype=torch.float64)
    (expm_low_rank(Bg, Cg) * W).sum().backward()
    B2, C2 = B.clone().requires_grad_(), C.clone().requires_grad_()
    (torch.linalg.matrix_exp(B2 @ C2.T - C2 @ B2.T) * W).sum().backward()
    torch.testing.assert_close(Bg.grad, B2.grad)
    torch.testing.assert_close(Cg.grad, C2.grad)


@pytest.mark.parametrize("way", WAYS)
def test_identity_init_equals_the_base(way):
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    x = torch.randn(20, 64)
    ref = base(x).detach()
    l = RotationalPiSSALinear(base, RotationalPiSSAConfig(r=4, way=way, extra_principal_dims=2))
    torch.testing.assert_close(l(x), ref, rtol=0, atol=1e-6)  # fp32: only the rounding of W_res


@pytest.mark.parametrize("way", ["way1", "way2", "way3"])
def test_rotations_stay_orthogonal_after_many_steps(way):
    l = layer(way)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(64, 16, generator=g), torch.randn(12, 16, generator=g)
    opt = torch.optim.Adam([p for p in l.parameters() if p.requires_grad], lr=0.1)
    for step in range(1, 201):
        ((l(x) - x @ target.T) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        if way == "way1" and step % 25 == 0:
            l.merge_rotations_(opt)
    R_U, R_V = l.rotations()
    eye = torch.eye(4)
    assert (R_U - eye).abs().max() > 0.05 or way == "way1"  # they really moved (way1 was just restarted)
    for R in (R_U, R_V, l.U, l.V):  # merged Givens rotations keep U and V orthonormal too
        torch.testing.assert_close(R.T @ R, eye, rtol=0, atol=1e-5)


def test_way0_penalty_is_the_closed_form_and_pulls_R_toward_orthogonality():
    l = layer("way0")
    perturb(l, 0.3)
    R_U, R_V = l.rot_U.R_U.detach(), l.rot_V.R_V.detach()
    eye = torch.eye(4)
    closed = torch.linalg.matrix_norm(R_U.T @ R_U - eye) ** 2 + torch.linalg.matrix_norm(R_V.T @ R_V - eye) ** 2
    model = nn.Sequential(l)
    spec = get_method("rotational_pissa")
    cfg = OmegaConf.create({"name": "rotational_pissa", "way": "way0", "orthogonality_reg_weight": 0.5})
    torch.testing.assert_close(spec.extra_loss(model, cfg), 0.5 * closed)
    assert spec.extra_loss(model, OmegaConf.create({"way": "way2", "orthogonality_reg_weight": 0.5})) is None

    def orth_err_after_training(w):  # the task loss alone lets R drift; the penalty holds it near O(r)
        l = layer("way0", freeze_singular_values=False)
        g = torch.Generator().manual_seed(1)
        x, target = torch.randn(64, 16, generator=g), 3 * torch.randn(12, 16, generator=g)
        opt = torch.optim.Adam([p for p in l.parameters() if p.requires_grad], lr=0.05)
        for _ in range(200):
            loss = ((l(x) - x @ target.T) ** 2).mean() + w * l.orthogonality_penalty()
            loss.backward()
            opt.step()
            opt.zero_grad()
        return float(l.orthogonality_penalty().detach())

    free, held = orth_err_after_training(0.0), orth_err_after_training(10.0)
    assert free > 0.1 and held < 0.02 * free


@pytest.mark.parametrize("way", WAYS)
def test_merge_is_exact_and_unmerge_restores(way):
    l = layer(way, freeze_singular_values=False, extra_principal_dims=2)
    assert isinstance(l.S, nn.Parameter) and l.S.dtype == torch.float32
    perturb(l)
    with torch.no_grad():
        l.S.mul_(1.5)
    x = torch.randn(3, 16)
    y = l(x)
    W_res = l.base.weight.detach().clone()
    l.merge()
    R_U, R_V = l.rotations()
    expected = W_res + l.U @ R_U @ torch.diag(l.S) @ R_V.T @ l.V.T
    torch.testing.assert_close(l.base.weight, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(l(x), y, rtol=0, atol=1e-5)
    l.unmerge()
    torch.testing.assert_close(l.base.weight, W_res, rtol=0, atol=1e-6)


@pytest.mark.parametrize("way", WAYS)
def test_merging_rotations_into_U_V_keeps_the_function_and_restarts(way):
    l = layer(way)
    opt = fit(l, 10)
    x = torch.randn(5, 16)
    y = l(x).detach()
    l.merge_rotations_(opt)
    R_U, R_V = l.rotations()
    torch.testing.assert_close(R_U, torch.eye(4), rtol=0, atol=1e-6)
    torch.testing.assert_close(R_V, torch.eye(4), rtol=0, atol=1e-6)
    torch.testing.assert_close(l(x), y, rtol=0, atol=1e-5)
    kept = {id(l.rot_U.B), id(l.rot_V.B)} if way in ("way2", "way3") else set()  # B stays, C = 0 gives R = I
    restarted = {id(p) for r in (l.rot_U, l.rot_V) for p in r.parameters()} - kept
    assert not any(id(p) in restarted for p in opt.state)  # stale moments dropped


def test_way1_bases_stay_orthonormal_to_fp32_rounding_over_1000_merges():
    """Each merge folds a Givens product into U and V; without re-orthonormalisation the rounding errors added up
    (max |U^T U - I| 4-7e-6 after 1000 merges of random rotations; 2-5e-7 with the QR at every merge)."""
    torch.manual_seed(0)
    l = RotationalPiSSALinear(nn.Linear(64, 48), RotationalPiSSAConfig(r=8, way="way1", givens_layers=8))
    x = torch.randn(4, 64)
    g = torch.Generator().manual_seed(1)
    for i in range(1000):
        with torch.no_grad():
            for th in [*l.rot_U.theta, *l.rot_V.theta]:
                th.copy_(torch.randn(th.shape, generator=g))
        y = l(x) if i == 999 else None
        l.merge_rotations_()
    torch.testing.assert_close(l(x), y, rtol=0, atol=1e-4)  # the last merge kept the function
    for M in (l.U, l.V):
        assert (M.T @ M - torch.eye(8)).abs().max() < 1e-6


def test_after_step_merges_way1_on_its_schedule():
    model = nn.Sequential(layer("way1"))
    perturb(model[0], 0.3)
    spec = get_method("rotational_pissa")
    cfg = OmegaConf.create({"name": "rotational_pissa", "way": "way1", "merge_every": 5})
    assert spec.after_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 4, cfg) == {}
    assert model[0].rot_U.theta[0].abs().max() > 0
    assert spec.after_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 5, cfg) == {"rot/merged": 1.0}
    assert all(float(t.detach().abs().max()) == 0 for t in model[0].rot_U.theta)


@pytest.mark.parametrize("train_S", [False, True])
def test_extra_principal_dims_let_the_subspace_move(train_S):
    def sin_largest_principal_angle(p):
        l = layer("way2", extra_principal_dims=p, freeze_singular_values=not train_S)
        U0 = l.U[:, :4].clone().double()
        fit(l, 100)
        U = torch.linalg.svd(l.delta_weight().detach().double(), full_matrices=False)[0][:, :4]
        return float(torch.linalg.matrix_norm(U - U0 @ (U0.T @ U), ord=2))

    assert sin_largest_principal_angle(0) < 1e-5
    assert sin_largest_principal_angle(4) > 0.05


@pytest.mark.parametrize("way,p,train_S", [("way3", 0, False), ("way1", 2, True), ("way0", 1, False)])
def test_export_round_trips_through_peft(tmp_path, tiny_llama_dir, way, p, train_S):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.export import save_peft_adapter

    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    cfg = OmegaConf.create({"name": "rotational_pissa", "way": way, "low_rank_r": 2, "extra_principal_dims": p,
                            "freeze_singular_values": not train_S})
    apply_adapters(ours, PEFT_QV, cfg, "rotational_pissa")
    torch.manual_seed(0)
    for l in adapter_layers(ours).values():
        perturb(l)
        if way == "way1":
            l.merge_rotations_()  # U, V moved
            perturb(l)
        if train_S:
            with torch.no_grad():
                l.S.add_(0.3)
    save_peft_adapter(ours, tmp_path / "ad")
    ranks = {r for l in adapter_layers(ours).values() for r in [l.to_lora()[0].shape[0]]}
    assert ranks == {2 * 4 + (p if train_S else 0)}  # principal (r, or r + p when S trains) + the init offset (r)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "ad").eval()
    x = torch.randint(0, 128, (2, 8))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()(x).logits
    assert not torch.allclose(base, ours(x).logits, atol=1e-3)
    torch.testing.assert_close(ref(x).logits, ours(x).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nf4", [False, True])
def test_gpt2_conv1d_export_and_merged_save(tmp_path, tiny_gpt2_dir, nf4):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.export import save_merged, save_peft_adapter

    ours = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    cfg = OmegaConf.create({"name": "rotational_pissa", "way": "way3", "quantize_residual": nf4})
    apply_adapters(ours, OmegaConf.create({"target_set": "qkvo", "lora_r": 4, "lora_alpha": 8}), cfg,
                   "rotational_pissa")
    torch.manual_seed(0)
    for l in adapter_layers(ours).values():
        perturb(l)
    x = torch.randint(0, 128, (2, 8))
    y = ours(x).logits.detach()
    save_merged(ours, None, tmp_path / "merged")  # Conv1D again after dequantising an NF4 residual
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(x).logits, y, rtol=1e-5, atol=1e-5)
    save_peft_adapter(ours, tmp_path / "ad")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), tmp_path / "ad").eval()
    if nf4:  # the change on the full-precision base: off by the residual's quantisation error only
        assert 0 < float((ref(x).logits - y).abs().max() / y.abs().max()) < 0.1
    else:
        torch.testing.assert_close(ref(x).logits, y, rtol=1e-4, atol=1e-5)


def _nf4_roundtrip(w):
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(w.float().reshape(-1), quant_type="nf4", compress_statistics=True)
    return F.dequantize_4bit(q, state).reshape(w.shape).to(w.dtype)


def test_nf4_storage_is_nf4_and_the_nf4_linear_is_a_linear_map():
    import bitsandbytes.functional as F

    from peftlab.adapters.rotational_pissa import NF4Linear, NF4Matrix

    torch.manual_seed(0)
    M = torch.randn(48, 32)  # rows 32 wide: where bitsandbytes 0.50's 2-D CPU dequantize goes wrong
    code = F.get_4bit_type("nf4", device="cpu")  # the 16 NF4 levels
    blocks = M.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    ref = (code[((blocks / absmax)[..., None] - code).abs().argmin(-1)] * absmax).reshape(M.shape)
    torch.testing.assert_close(NF4Matrix(M)(), ref, rtol=0, atol=1e-6)
    q = NF4Matrix(M, double_quant=True)
    torch.testing.assert_close(q(), ref, rtol=0, atol=0.02 * float(M.abs().max()))  # 8-bit block statistics
    assert q.packed.numel() == M.numel() // 2 and q.absmax.dtype == torch.uint8
    assert float((ref - M).norm() / M.norm()) == pytest.approx(0.092, abs=0.01)  # NF4 on Gaussian data
    bias = torch.randn(48)
    lin = NF4Linear(M, bias, torch.float32)
    x = torch.randn(5, 32, requires_grad=True)
    y = lin(x)
    torch.testing.assert_close(y, x @ q().T + bias)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ q())


def test_seed_api_and_nf4_residual(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.export import save_peft_adapter

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()  # noqa: E731
    model = load()
    x = torch.randint(0, 128, (2, 8))
    ref = model(x).logits.detach()
    cfg = RotationalPiSSAConfig(r=4, way="way2", quantize_residual=True)
    layers = replace_linear_with_rotational_pissa(model, cfg, ["q_proj", "v_proj"], "default", True)
    assert len(layers) == 4 and all(l.adapter_name == "default" for l in layers.values())
    # S trains by default (the seed's freeze_singular_values=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "rot_" not in n and not n.endswith(".S"))
    assert all(l.base.qweight.packed.dtype == torch.uint8 for l in layers.values())
    # identity start within NF4's quantisation error of the residual, below quantising the whole weight as QLoRA
    # does (the principal part stays exact); measured 0.026 vs 0.055 of the largest logit on these random tiny weights
    err = float((model(x).logits.detach() - ref).abs().max() / ref.abs().max())
    full = load()
    for name in layers:
        full.get_submodule(name).weight.data = _nf4_roundtrip(full.get_submodule(name).weight.data)
    err_full = float((full(x).logits.detach() - ref).abs().max() / ref.abs().max())
    assert 0 < err < 0.1 and err < err_full

    for l in layers.values():
        perturb(l)
    y = model(x).logits.detach()
    # merge dequantises the residual: exactly the trained model; unmerge puts the NF4 layer back
    l0 = next(iter(layers.values()))
    l0.merge()
    assert isinstance(l0.base, nn.Linear) and l0.merged
    torch.testing.assert_close(model(x).logits, y, rtol=0, atol=1e-5)
    l0.unmerge()
    assert hasattr(l0.base, "qweight") and not l0.merged
    torch.testing.assert_close(model(x).logits, y, rtol=0, atol=0)

    # checkpoint state round trip onto a freshly built NF4 model
    fresh = load()
    again = replace_linear_with_rotational_pissa(fresh, cfg, ["q_proj", "v_proj"])
    for name, l in layers.items():
        again[name].load_adapter_state(l.adapter_state())
    torch.testing.assert_close(fresh(x).logits, y, rtol=0, atol=1e-6)

    # export = the principal change on the ORIGINAL full-precision weights: PEFT gives the fp-residual model with the
    # same rotations, which differs from the NF4 model by the residual's quantisation error only
    save_peft_adapter(model, tmp_path / "ad")
    fp = load()
    fp_layers = replace_linear_with_rotational_pissa(fp, RotationalPiSSAConfig(r=4, way="way2"), ["q_proj", "v_proj"])
    for name, l in layers.items():
        fp_layers[name].load_adapter_state(l.adapter_state())
    peft_logits = PeftModel.from_pretrained(load(), tmp_path / "ad").eval()(x).logits.detach()
    torch.testing.assert_close(peft_logits, fp(x).logits, rtol=1e-4, atol=1e-5)
    assert float((peft_logits - y).abs().max() / y.abs().max()) < 0.1  # the same weight error as at the start


def test_quantized_base_components_warn_and_keep_the_start_and_merge_exact():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    x = torch.randn(20, 64)
    ref = base(x).detach()
    with pytest.warns(UserWarning, match="quantize_base_components"):
        l = RotationalPiSSALinear(base, RotationalPiSSAConfig(r=8, way="way1", quantize_base_components=True))
    assert not hasattr(l, "U") or l.U is None
    assert l.U_nf4.packed.dtype == torch.uint8 and l.U_nf4.packed.numel() == 48 * 8 // 2  # 4 bits per entry
    torch.testing.assert_close(l(x), ref, rtol=0, atol=1e-6)  # the residual absorbed the components' error
    U, _ = l.bases()
    assert 1e-3 < float((U.T @ U - torch.eye(8)).abs().max()) < 0.2  # only roughly orthonormal, as warned
    perturb(l)
    y = l(x)
    l.merge()
    torch.testing.assert_close(l(x), y, rtol=0, atol=1e-5)


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match=r"allowed: \['way0', 'way1', 'way2', 'way3'\]"):
        RotationalPiSSAConfig(way="way9")
    with pytest.raises(ValueError, match="merge_every >= 1"):
        RotationalPiSSAConfig(merge_every=0)
    with pytest.raises(ValueError, match=r"unknown key method.wya = 'way1': method \(rotational_pissa\) has \[.*'way'"):
        config_from(OmegaConf.create({"name": "rotational_pissa", "wya": "way1"}), 4)
    with pytest.raises(ValueError, match="exceeds the layer's smaller dimension 12"):
        layer(extra_principal_dims=9)


@pytest.mark.parametrize("way", WAYS)
def test_every_way_trains_a_tiny_llama(tiny_llama, way):
    cfg = OmegaConf.create({"name": "rotational_pissa", "way": way, "merge_every": 5,
                            "freeze_singular_values": False})  # frozen S: the trainer tests below
    apply_adapters(tiny_llama, OmegaConf.create({"target_set": "qkvo", "lora_r": 4, "lora_alpha": 8}), cfg,
                   "rotational_pissa")
    spec = get_method("rotational_pissa")
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1)
    torch.manual_seed(0)
    x = torch.randint(0, 128, (8, 16))
    losses = []
    for step in range(1, 31):
        loss = tiny_llama(input_ids=x, labels=x).loss
        extra = spec.extra_loss(tiny_llama, cfg)
        (loss + (extra if extra is not None else 0)).backward()
        opt.step()
        opt.zero_grad()
        spec.after_step(tiny_llama, opt, step, cfg)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.04  # random weights and tokens: measured drops 0.08 to 0.12 in 30 steps


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
def test_every_way_trains_on_the_embedded_default(tmp_path, way):
    from test_train import run_inproc

    s = run_inproc(tmp_path, ["method=rotational_pissa", f"++method.way={way}", "++method.merge_every=8",
                              "train.max_steps=24", "model.lr=1e-2"])
    assert s["final_eval_loss"] < 0.9 * s["initial_eval_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("nf4", [False, True])
def test_trainer_run_folder_reloads(tmp_path, nf4):
    """Checkpoint, PEFT adapter and merged model of a trainer run (way1 with merges into U, V) agree with peftlab's
    model; with the NF4 residual, PEFT (on the full-precision base) equals the same checkpoint without NF4."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.config import resolve_config
    from peftlab.train import load_adapters
    from test_config import compose_cfg
    from test_train import FAST, run_inproc

    over = ["method=rotational_pissa", "++method.way=way1", "++method.merge_every=7", "++method.quantize_residual="
            + str(nf4).lower(), "model.saving=true", "model.lr=1e-2"]
    s = run_inproc(tmp_path, over)
    assert s["final_eval_loss"] < 0.9 * s["initial_eval_loss"]
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("rot/merged")] == [7, 14, 21]
    cfg = resolve_config(compose_cfg([*FAST, *over]))
    base_path = json.loads((tmp_path / "adapter/adapter_config.json").read_text())["base_model_name_or_path"]
    ours = AutoModelForCausalLM.from_pretrained(base_path)
    apply_adapters(ours, cfg.peft, cfg.method, cfg.method.name)
    load_adapters(ours, tmp_path / "checkpoint")
    x = torch.randint(3, 500, (2, 12))
    ref = ours.eval()(x).logits
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(x).logits, ref, rtol=1e-5, atol=1e-5)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), tmp_path / "adapter").eval()
    if nf4:  # PEFT holds the full-precision residual: the same checkpoint loaded without NF4
        assert not torch.allclose(peft(x).logits, ref, atol=1e-3)
        ours = AutoModelForCausalLM.from_pretrained(base_path)
        apply_adapters(ours, cfg.peft, OmegaConf.merge(cfg.method, {"quantize_residual": False}), cfg.method.name)
        load_adapters(ours, tmp_path / "checkpoint")
        ref = ours.eval()(x).logits
    torch.testing.assert_close(peft(x).logits, ref, rtol=1e-5, atol=1e-5)


def test_seed_config_names_and_defaults():
    c = RotationalPiSSAConfig()
    assert (c.r, c.lora_alpha, c.way, c.method, c.orthogonality_reg_weight, c.low_rank_r, c.init_identity,
            c.freeze_singular_values, c.quantize_residual, c.quantize_base_components) == \
        (16, 16.0, "way0", "way0", 1e-4, 4, True, False, False, False)  # rotational_pissa_unified's defaults
    c = RotationalPiSSAConfig(r=4, lora_alpha=8, method="way3", lora_dropout=0.1)
    assert (c.way, c.dropout) == ("way3", 0.1)
    with pytest.raises(ValueError, match="give one"):
        RotationalPiSSAConfig(method="way1", way="way2")
    with pytest.raises(ValueError, match="unknown key method.method"):
        config_from(OmegaConf.create({"name": "rotational_pissa", "method": "way1"}), 4)  # Hydra: way only


@pytest.mark.parametrize("way,names", [("way0", {"R_U", "R_V"}), ("way1", {"theta_U.0", "theta_U.1", "theta_V.0",
                                                                             "theta_V.1"}),
                                       ("way2", {"B_U", "C_U", "B_V", "C_V"}), ("way3", {"B_U", "C_U", "B_V", "C_V"})])
def test_rotation_parameters_carry_the_seed_names(way, names):
    l = layer(way, freeze_singular_values=True)
    assert {n.split(".", 1)[1] for n, p in l.named_parameters() if p.requires_grad} == names
