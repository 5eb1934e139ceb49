"""The preconditioned (scaled / Riemannian) AdamW: g_A <- (B^T B + lam I)^-1 g_A, g_B <- g_B (A A^T + lam I)^-1 from
the factors before the update, then AdamW; other parameters are plain AdamW; the trainer's switch."""
import torch
from omegaconf import OmegaConf
from torch import nn

from peftlab.adapters import LoRALinear
from peftlab.optim.precond import PrecondAdamW


def lora_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(LoRALinear(nn.Linear(6, 5), 3, 3), nn.Linear(5, 4))  # the head: not a LoRA factor
    nn.init.normal_(model[0].lora_B)
    return model


def test_preconditioned_gradients_against_the_closed_form():
    model = lora_model()
    layer = model[0]
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    layer.lora_A.grad, layer.lora_B.grad = gA.clone(), gB.clone()
    lam = 0.1
    PrecondAdamW(model, [layer.lora_A, layer.lora_B], prec_reg=lam, lr=0.1).precondition_()
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(layer.lora_A.grad.double(), torch.linalg.inv(B.T.double() @ B.double() + lam * eye)
                               @ gA.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.lora_B.grad.double(), gB.double() @ torch.linalg.inv(
        A.double() @ A.T.double() + lam * eye), rtol=1e-5, atol=1e-7)


def test_steps_equal_adamw_on_the_preconditioned_gradients():
    """Two steps: the same parameters and moments as torch AdamW fed the closed-form preconditioned gradients; the
    non-LoRA head gets plain AdamW."""
    ours, ref = lora_model(), lora_model()
    kw = dict(lr=0.05, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-8)
    lam = 1e-3
    opt = PrecondAdamW(ours, list(ours.parameters()), prec_reg=lam, **kw)
    ref_opt = torch.optim.AdamW(list(ref.parameters()), **kw)
    x = torch.randn(7, 6)
    for _ in range(2):
        for m in (ours, ref):
            m.zero_grad()
            m(x).pow(2).mean().backward()
        a, b = ref[0].lora_A.detach(), ref[0].lora_B.detach()
        eye = torch.eye(3)
        ga = torch.linalg.solve(b.T @ b + lam * eye, ref[0].lora_A.grad)
        gb = ref[0].lora_B.grad @ torch.linalg.inv(a @ a.T + lam * eye)
        ref[0].lora_A.grad, ref[0].lora_B.grad = ga, gb
        opt.step()
        ref_opt.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_trainer_switch_trains_with_the_preconditioner(tmp_path):
    from peftlab.train import train
    from test_config import compose_cfg

    summaries = {}
    for opt in ("adamw", "precond_adamw"):
        cfg = compose_cfg(["wandb.mode=disabled", "train.max_steps=6", "++dataset.eval_samples=32", f"train.optimizer={opt}",
                           "+init=gradient", "++init.direction=LoRA-One", "model.prec_reg=1e-3"])
        cfg.run_dir = str(tmp_path / opt)
        summaries[opt] = train(cfg)
    s = summaries["precond_adamw"]
    assert s["final_eval_loss"] < s["initial_eval_loss"]
    assert s["final_eval_loss"] != summaries["adamw"]["final_eval_loss"]


def test_non_lora_adapters_and_methods_with_their_own_optimizer_are_refused():
    import pytest

    from peftlab.adapters import get_method
    from peftlab.adapters.rotational_pissa import RotationalPiSSAConfig, RotationalPiSSALinear
    from peftlab.config import resolve_config
    from peftlab.train import build_optimizer
    from test_config import compose_cfg

    rot = nn.Sequential(RotationalPiSSALinear(nn.Linear(6, 5), RotationalPiSSAConfig(r=2)))
    with pytest.raises(ValueError, match=r"\['RotationalPiSSALinear'\] layers have none"):
        PrecondAdamW(rot, [p for p in rot.parameters() if p.requires_grad], lr=0.1)
    cfg = resolve_config(compose_cfg(["method=geolora"]))
    spec = get_method("geolora")
    options = spec.parse(cfg.method)
    geo = nn.Sequential(spec.make_layer(nn.Linear(6, 5), OmegaConf.create({"lora_r": 2, "lora_alpha": 2}), options))
    precond = OmegaConf.merge(cfg, {"train": {"optimizer": "precond_adamw"}})  # past the config check, as by hand
    with pytest.raises(ValueError, match="method=geolora, which brings its own optimizer"):
        build_optimizer(precond, spec, options, geo, [p for p in geo.parameters() if p.requires_grad])
    for method in ("geolora", "rotational_pissa"):  # and the run refuses it before anything loads
        with pytest.raises(ValueError, match=f"train.optimizer = 'precond_adamw': preconditions LoRA factors"):
            resolve_config(compose_cfg([f"method={method}", "train.optimizer=precond_adamw"]))
