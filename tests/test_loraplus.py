"""LoRA+ parameter groups equal PEFT's create_loraplus_optimizer on the same model; the trainer's optimizer uses them."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from peftlab.adapters import apply_adapters
from peftlab.config import resolve_config
from peftlab.optim.loraplus import loraplus_param_groups
from test_config import compose_cfg

LR, RATIO, WD = 2e-4, 16.0, 0.05


def peft_cfg(**kw):
    base = dict(target_set="qv", lora_target_modules=None, lora_r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False)
    return OmegaConf.create({**base, **kw})


def peft_groups(model):
    from peft.optimizers import create_loraplus_optimizer

    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                    loraplus_weight_decay=WD)
    return opt.param_groups


def as_sets(groups):
    """Each non-empty group as (parameter ids, lr, weight decay), in order."""
    return [({id(p) for p in g["params"]}, g["lr"], g["weight_decay"]) for g in groups if g["params"]]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_groups_equal_peft_on_the_same_model(tiny_llama, method):
    apply_adapters(tiny_llama, peft_cfg(target_set="qkvo"), None, method)
    ours = as_sets(loraplus_param_groups(tiny_llama, LR, RATIO, WD))
    assert ours == as_sets(peft_groups(tiny_llama))
    A = {id(p) for n, p in tiny_llama.named_parameters() if "lora_A" in n}
    assert ours[0] == (A, LR, WD) and ours[1][1] == LR * RATIO  # B (and DoRA's magnitude) at lr * ratio
    if method == "dora":
        mags = {id(p) for n, p in tiny_llama.named_parameters() if "magnitude" in n}
        assert mags and mags <= ours[1][0]


def test_biases_and_layernorms_go_to_the_no_decay_group():
    """What decays and what does not, on a model with a trainable LayerNorm and a bias (PEFT's groupB_no_decay)."""
    from peftlab.adapters.lora import LoRALinear

    model = nn.Sequential(LoRALinear(nn.Linear(8, 8), rank=2, alpha=4), nn.LayerNorm(8), nn.Linear(8, 3))
    model[0].base.bias.requires_grad_(True)
    model[2].weight.requires_grad_(False)
    ours = as_sets(loraplus_param_groups(model, LR, RATIO, WD))
    assert ours == as_sets(peft_groups(model))
    no_decay = {id(model[0].base.bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    assert ours[-1] == (no_decay, LR * RATIO, 0.0)


def test_peft_model_and_ours_group_the_same_names(tiny_llama_dir):
    """Against a PEFT LoRA model built by PEFT itself: the same parameters (by module name) in the same groups."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    apply_adapters(ours, peft_cfg())
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    def named(model, groups, strip):
        names = {id(p): strip(n) for n, p in model.named_parameters()}
        return [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in groups if g["params"]]

    peft_named = named(ref, peft_groups(ref),
                       lambda n: n.removeprefix("base_model.model.").replace(".default.weight", ""))
    assert named(ours, loraplus_param_groups(ours, LR, RATIO, WD), lambda n: n) == peft_named


@pytest.mark.parametrize("optimizer", ["adamw", "precond_adamw"])
def test_trainer_builds_the_loraplus_optimizer(tiny_llama, optimizer):
    from peftlab.train import build_optimizer

    cfg = resolve_config(compose_cfg(["train.loraplus_lr_ratio=16", f"train.optimizer={optimizer}",
                                      "model.weight_decay=0.01"]))
    apply_adapters(tiny_llama, cfg.peft, cfg.method, "lora")
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    from peftlab.adapters import get_method

    opt = build_optimizer(cfg, get_method("lora"), get_method("lora").parse(cfg.method), tiny_llama, params)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(cfg.model.lr, 0.01),
                                                                         (cfg.model.lr * 16, 0.01)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # a schedule scales both groups alike
    assert sched.get_last_lr() == [cfg.model.lr * 0.5, cfg.model.lr * 8]


def test_bad_ratio_and_methods_without_factors_are_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"train.loraplus_lr_ratio = -2: must be a number > 0 or null"):
        resolve_config(compose_cfg(["train.loraplus_lr_ratio=-2"]))
    for method in ("geolora", "rotational_pissa", "full"):
        with pytest.raises(ValueError, match=f"LoRA\\+ sets the learning rates of LoRA factors, which method '{method}'"):
            resolve_config(compose_cfg([f"method={method}", "train.loraplus_lr_ratio=16"]))
    apply_adapters(tiny_llama, peft_cfg(), None, "full")
    with pytest.raises(ValueError, match=r"applies to methods with LoRA factors"):
        loraplus_param_groups(tiny_llama, LR, RATIO, WD)
