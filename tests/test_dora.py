"""DoRA against HF PEFT's LoraConfig(use_dora=True) with the same weights: forward, gradients, merge, export."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from peftlab.adapters import apply_adapters, merge_adapters
from peftlab.adapters.dora import DoRALinear
from peftlab.export import save_peft_adapter


def peft_cfg(**kw):
    base = dict(target_set="qv", lora_target_modules=None, lora_r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False)
    return OmegaConf.create({**base, **kw})


def perturb(layers, seed=0):
    """Non-trivial weights: B != 0 and a magnitude away from ||W||, so every DoRA term counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude_vector.shape, generator=g))


def ours_and_peft(model_dir, dropout=0.0, use_rslora=False, targets=("q_proj", "v_proj")):
    """Our DoRA model and PEFT's with our weights copied in."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(model_dir)
    layers = apply_adapters(ours, peft_cfg(lora_target_modules=list(targets), lora_dropout=dropout,
                                           use_rslora=use_rslora), method="dora")
    perturb(layers)
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                         LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_rslora=use_rslora, use_dora=True,
                                    target_modules=list(targets)))
    for name, layer in layers.items():
        mod = ref.base_model.model.get_submodule(name)
        mod.lora_A["default"].weight.data.copy_(layer.lora_A)
        mod.lora_B["default"].weight.data.copy_(layer.lora_B)
        mod.lora_magnitude_vector["default"].weight.data.copy_(layer.lora_magnitude_vector)
    return ours, layers, ref


def test_closed_form_and_initial_identity():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    W0 = base.weight.detach().clone()
    layer = DoRALinear(base, rank=2, alpha=4)
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), W0.norm(dim=1))
    torch.testing.assert_close(layer(x), base(x))  # B = 0: the base model
    nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.5)
    V = W0 + 2.0 * layer.lora_B @ layer.lora_A
    W_eff = (layer.lora_magnitude_vector / V.norm(dim=1))[:, None] * V
    torch.testing.assert_close(layer(x), x @ W_eff.T + base.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), W_eff - W0, rtol=1e-5, atol=1e-6)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, W_eff, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_gradients_match_peft(tiny_llama_dir, use_rslora):
    ours, layers, ref = ours_and_peft(tiny_llama_dir, use_rslora=use_rslora)
    x = torch.randint(0, 128, (2, 9))
    ours.eval(), ref.eval()
    lo, lr_ = ours(x).logits, ref(x).logits
    torch.testing.assert_close(lo, lr_, rtol=1e-5, atol=1e-5)
    lo.square().mean().backward()
    lr_.square().mean().backward()
    for name, layer in layers.items():  # the detached norm: PEFT's gradients exactly
        mod = ref.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.grad, mod.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(layer.lora_B.grad, mod.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(layer.lora_magnitude_vector.grad, mod.lora_magnitude_vector["default"].weight.grad,
                                   rtol=1e-4, atol=1e-7)
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert n_ref == sum(p.numel() for p in ours.parameters() if p.requires_grad)


def test_dropout_in_training_matches_peft(tiny_llama_dir):
    """With dropout, W x in the DoRA terms is taken on the dropped-out input (PEFT's forward); same seed, same masks."""
    ours, _, ref = ours_and_peft(tiny_llama_dir, dropout=0.3)
    x = torch.randint(0, 128, (2, 9))
    ours.train(), ref.train()
    torch.manual_seed(5)
    lo = ours(x).logits
    torch.manual_seed(5)
    torch.testing.assert_close(lo, ref(x).logits, rtol=1e-5, atol=1e-5)


def test_merged_weights_match_peft_merge_and_unload(tiny_llama_dir):
    ours, _, ref = ours_and_peft(tiny_llama_dir, targets=("q_proj", "v_proj", "down_proj"))
    merged_ours = merge_adapters(ours).state_dict()
    merged_ref = ref.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_ref.keys()
    for k in merged_ours:
        torch.testing.assert_close(merged_ours[k], merged_ref[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_export_loads_in_peft_with_equal_logits(tiny_llama_dir, tmp_path, init):
    """A `use_dora: true` adapter on the ORIGINAL base; with PiSSA the base offset travels in the factors (rank 2r)."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layers = apply_adapters(ours, peft_cfg(), method="dora")
    if init == "pissa":
        from peftlab.init import InitContext, get_init

        cfg = OmegaConf.create({"init": {"name": "pissa", "niter": None}, "method": {"name": "dora"}})
        get_init("pissa").run(InitContext(ours, layers, cfg))
    perturb(layers, seed=1)
    save_peft_adapter(ours, tmp_path / "adapter")
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["use_dora"] is True and conf["r"] == (8 if init == "pissa" else 4)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == len(layers)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapter")
    x = torch.randint(0, 128, (2, 9))
    ours.eval(), ref.eval()
    torch.testing.assert_close(ref(x).logits, ours(x).logits, rtol=1e-4, atol=1e-5)


def test_pissa_keeps_the_model_and_gradient_inits_are_refused(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from peftlab.init import InitContext, get_init

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    x = torch.randint(0, 128, (2, 7))
    before = m(x).logits
    layers = apply_adapters(m, peft_cfg(), method="dora")
    cfg = OmegaConf.create({"init": {"name": "pissa", "niter": None}, "method": {"name": "dora"}})
    get_init("pissa").run(InitContext(m, layers, cfg))
    torch.testing.assert_close(m(x).logits, before, rtol=1e-4, atol=1e-5)

    from test_config import compose_cfg

    from peftlab.config import resolve_config

    with pytest.raises(ValueError, match=r"init.name = 'gradient': method=dora takes the inits .*pissa"):
        resolve_config(compose_cfg(["method=dora", "+init=gradient"]))


def test_trained_run_exports_a_dora_adapter_equal_to_its_merged_model(tmp_path):
    """Through the trainer: adapter/ is `use_dora: true`, and PEFT's adapter on the base gives merged/'s logits."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from test_train import run_inproc

    s = run_inproc(tmp_path, ["method=dora", "train.max_steps=3", "model.saving=true", "model.eval_epochs=0"])
    assert s["steps"] == 3
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["use_dora"] is True
    base = AutoModelForCausalLM.from_pretrained(conf["base_model_name_or_path"])
    ref = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    x = torch.randint(3, 500, (2, 12))
    torch.testing.assert_close(ref(x).logits, merged(x).logits, rtol=1e-4, atol=1e-4)


def test_gpt2_conv1d_export_and_merge_match_peft(tiny_gpt2_dir, tmp_path):
    """GPT-2's Conv1D stores (in, out): PEFT's fan_in_fan_out DoRA loads our export with equal logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    layers = apply_adapters(ours, peft_cfg(target_set="qv"), method="dora")
    perturb(layers)
    save_peft_adapter(ours, tmp_path / "adapter")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), tmp_path / "adapter").eval()
    x = torch.randint(0, 128, (2, 7))
    y = ours(x).logits
    torch.testing.assert_close(ref(x).logits, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merge_adapters(ours)(x).logits, y, rtol=1e-4, atol=1e-5)
