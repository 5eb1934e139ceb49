"""LoRA layer: closed form, HF PEFT equivalence, merge/unmerge, rsLoRA, targets."""
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from peftlab.adapters import LoRALinear, apply_adapters, apply_lora, get_lora_parameters, merge_lora, adapter_layers


def peft_cfg(**kw):
    base = dict(target_set="qv", lora_target_modules=None, lora_r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False)
    return OmegaConf.create({**base, **kw})


def test_forward_and_merge_match_closed_form():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear.from_linear(base, rank=3, alpha=6)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 12)
    W, b, A, B = base.weight.detach().clone(), base.bias.detach().clone(), layer.lora_A.detach(), layer.lora_B.detach()
    expected = x @ W.T + b + (6 / 3) * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * B @ A)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, W + 2.0 * B @ A)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W, rtol=0, atol=1e-6)


def test_rslora_scaling_and_default_init():
    layer = LoRALinear(nn.Linear(16, 16), rank=16, alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / math.sqrt(16))
    assert LoRALinear(nn.Linear(16, 16), rank=16, alpha=8).scaling == pytest.approx(0.5)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in 16 gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.abs().max() <= bound


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=2, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 8)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, layer.base(x) + (mask_x @ layer.lora_A.T @ layer.lora_B.T))
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.lora_A.T @ layer.lora_B.T)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_lora_with_same_weights(tiny_llama_dir, use_rslora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layers = apply_adapters(ours, peft_cfg(target_set="qkvo", lora_r=4, lora_alpha=16, use_rslora=use_rslora))
    for layer in layers.values():
        nn.init.normal_(layer.lora_B, std=0.1)
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                         LoraConfig(r=4, lora_alpha=16, use_rslora=use_rslora, lora_dropout=0.0,
                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, layer in layers.items():
        mod = ref.base_model.model.get_submodule(name)
        mod.lora_A["default"].weight.data.copy_(layer.lora_A)
        mod.lora_B["default"].weight.data.copy_(layer.lora_B)
        assert mod.scaling["default"] == pytest.approx(layer.scaling)
    x = torch.randint(0, 128, (2, 9))
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    n_ours = sum(p.numel() for p in get_lora_parameters(ours))
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert n_ours == n_ref


def test_target_sets_and_freezing(tiny_llama):
    layers = apply_adapters(tiny_llama, peft_cfg(target_set="all"))
    leaves = {n.split(".")[-1] for n in layers}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_regex_and_list_targets(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layers = apply_adapters(m, peft_cfg(lora_target_modules=r".*\.1\.self_attn\.(q|v)_proj"))
    assert sorted(layers) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert len(apply_adapters(m, peft_cfg(lora_target_modules=["down_proj"]))) == 2


def test_target_that_matches_nothing_lists_candidates(tiny_llama):
    with pytest.raises(ValueError, match=r"match no Linear.*q_proj"):
        apply_adapters(tiny_llama, peft_cfg(lora_target_modules=["query_key_value"]))


def test_gpt2_conv1d_targets_and_merge(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    layers = apply_adapters(m, peft_cfg(target_set="qv"))
    assert all(n.endswith("attn.c_attn") for n in layers)
    for layer in layers.values():
        nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randint(0, 128, (2, 6))
    before = m(x).logits
    merged = merge_lora(m)
    assert not adapter_layers(merged)
    torch.testing.assert_close(merged(x).logits, before, rtol=1e-5, atol=1e-5)


def test_seed_api_apply_lora(tiny_llama):
    assert apply_lora(tiny_llama, {"lora_target_modules": ["q_proj"], "lora_r": 2, "lora_alpha": 4}) is tiny_llama
    layers = adapter_layers(tiny_llama)
    assert len(layers) == 2 and all(isinstance(l, LoRALinear) and l.rank == 2 for l in layers.values())


def test_seed_lora_config_bias_and_errors():
    from peftlab.adapters import LoRAConfig

    with pytest.raises(ValueError, match="bias must be one of"):
        LoRAConfig(bias="some")
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    apply_lora(m, config=LoRAConfig(rank=2, target_modules=["0"], bias="lora_only"))
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == ["0.base.bias", "0.lora_A", "0.lora_B"]
    assert len(get_lora_parameters(m)) == 2  # the adapter's own, not the bias
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    apply_lora(m, rank=2, target_modules=["0"], bias="all")  # keyword fields build the LoRAConfig
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == ["0.base.bias", "0.lora_A", "0.lora_B",
                                                                             "1.bias"]
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"\['x'\] match no"):  # a ListConfig is checked entry by entry
        apply_lora(m, {"lora_target_modules": OmegaConf.create(["0", "x"]), "lora_r": 2, "lora_alpha": 4})
