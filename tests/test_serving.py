"""Serving-safe export: vLLM's loading rules (peftlab/serving.py, read from vLLM's source) applied to adapters
written by peftlab and to hand-made bad ones; no GPU and no vLLM needed. The reference for what vLLM serves is an
emulation of its loader: one scaling ``lora_alpha / r`` for every module, lora_A zero-padded to max_lora_rank."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from peftlab.adapters import adapter_layers, apply_adapters
from peftlab.export import main as export_main
from peftlab.export import save_peft_adapter
from peftlab.serving import check, module_ranks, peft_view, read_adapter, summary_notes, vllm_problems


def peft_cfg(r=4, alpha=8, rslora=False, target_set="qkvo"):
    return OmegaConf.create({"target_set": target_set, "lora_target_modules": None, "lora_r": r, "lora_alpha": alpha,
                             "lora_dropout": 0.0, "use_rslora": rslora})


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def vllm_deltas(folder, max_lora_rank=16):
    """What vLLM adds to each module's weight: PEFTHelper's one scaling times B @ A, after set_lora's padding
    (a layer above max_lora_rank raises, as the slot copy does)."""
    cfg, _ = read_adapter(folder)
    t = load_file(str(folder / "adapter_model.safetensors"))
    s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    out = {}
    for k, A in t.items():
        if ".lora_A." in k:
            B = t[k.replace(".lora_A.", ".lora_B.")]
            if A.shape[0] > max_lora_rank:
                raise RuntimeError(f"set_lora: rank {A.shape[0]} does not fit the {max_lora_rank}-row slot")
            out[k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")] = s * B.float() @ A.float()
    return out


def peft_deltas(peft_model):
    """What PEFT adds to each module (its own get_delta_weight)."""
    return {n.removeprefix("base_model.model."): m.get_delta_weight("default").float()
            for n, m in peft_model.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}


def mixed_rank_lora(model_dir, r=4):
    """peftlab LoRA whose layers have different ranks and scalings (as LoRA-FA rank=auto leaves them)."""
    torch.manual_seed(0)
    model = load(model_dir)
    layers = apply_adapters(model, peft_cfg(r=r, alpha=8, rslora=True), None, "lora")
    for i, layer in enumerate(layers.values()):
        k = 1 + i % r
        layer.lora_A.data = layer.lora_A.data[:k].clone()
        layer.lora_B.data = torch.randn(layer.out_features, k) * 0.1
        layer.set_rank_scaling(k)  # scaling alpha / sqrt(k): differs by layer
    return model, layers


def test_peftlab_export_serves_in_vllm_as_peft_loads_it(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    model, layers = mixed_rank_lora(tiny_llama_dir)
    assert len({l.scaling for l in layers.values()}) > 1  # per-layer scalings that patterns would be needed for
    save_peft_adapter(model, tmp_path / "ad")
    cfg, shapes = read_adapter(tmp_path / "ad")
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"] and cfg["r"] == 4
    assert set(module_ranks(shapes).values()) == {4}  # padded to r
    assert vllm_problems(cfg, shapes) == [] and check(tmp_path / "ad")["ok"]
    served = vllm_deltas(tmp_path / "ad")
    loaded = peft_deltas(PeftModel.from_pretrained(load(tiny_llama_dir), tmp_path / "ad"))
    for name, layer in layers.items():  # vLLM == PEFT == the trained layer's own change
        torch.testing.assert_close(served[name], layer.delta_weight(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loaded[name], layer.delta_weight(), rtol=1e-5, atol=1e-7)
    notes = json.loads((tmp_path / "ad/peftlab.json").read_text())
    assert notes["layer_ranks"] == {n: l.rank for n, l in layers.items()} and notes["vllm"] == []


def test_patterns_are_flagged_with_the_scaling_error_vllm_would_serve(tiny_llama_dir, tmp_path):
    """A PEFT adapter with rank_pattern/alpha_pattern: PEFT loads it; released vLLM serves alpha/r everywhere."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load(tiny_llama_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 16}, init_lora_weights="gaussian"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    model.save_pretrained(tmp_path / "pat")
    report = check(tmp_path / "pat")
    assert not report["ok"]
    (line,) = [l for l in report["vllm"] if l.startswith("wrong scaling")]
    # q: alpha 16 / r 4 = 4 served as 2 (error 0.5); v: 8 / 2 = 4 served as 2 (0.5); every module differs
    assert "4 of 4 modules" in line and "relative error up to 0.5" in line
    assert report["peft"][0].startswith("loads 4 modules")
    # the emulated vLLM delta differs from PEFT's by exactly that factor
    served, loaded = vllm_deltas(tmp_path / "pat"), peft_deltas(model)
    for name in loaded:
        torch.testing.assert_close(served[name], 0.5 * loaded[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("r,expect", [(32, "refuses: r = 32 exceeds --max-lora-rank 16; serve with --max-lora-rank 32"),
                                      (24, "serve with --max-lora-rank 32"),
                                      (600, "cannot be served")])
def test_rank_above_max_lora_rank_is_refused_with_the_flag_to_use(r, expect):
    shapes = {"base_model.model.q.lora_A.weight": (r, 8), "base_model.model.q.lora_B.weight": (8, r)}
    cfg = {"r": r, "lora_alpha": 2 * r, "use_rslora": False}
    assert any(expect in l for l in vllm_problems(cfg, shapes))
    if r <= 512:
        assert vllm_problems(cfg, shapes, max_lora_rank=512) == []


def test_layer_rank_above_r_fails_in_peft_and_crashes_vllm(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    model, _ = mixed_rank_lora(tiny_llama_dir, r=4)
    for layer in adapter_layers(model).values():  # one layer of rank 20 > 16
        layer.lora_A.data = torch.randn(20, layer.in_features)
        layer.lora_B.data = torch.randn(layer.out_features, 20)
        layer.set_rank_scaling(20)
        break
    save_peft_adapter(model, tmp_path / "ad")  # peftlab's own export: r = 20, so vLLM needs --max-lora-rank 32
    assert read_adapter(tmp_path / "ad")[0]["r"] == 20
    cfg_path = tmp_path / "ad/adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 4  # hand-made: the config claims rank 4, one layer holds 20
    cfg_path.write_text(json.dumps(cfg))
    report = check(tmp_path / "ad")
    assert any("tensors of rank 20 but the config gives rank 4" in l for l in report["peft"])
    assert any(l.startswith("crashes: layer rank 20 > --max-lora-rank 16") for l in report["vllm"])
    with pytest.raises(RuntimeError, match="size mismatch"):  # the rule holds for the real PEFT
        PeftModel.from_pretrained(load(tiny_llama_dir), tmp_path / "ad")
    with pytest.raises(RuntimeError, match="slot"):
        vllm_deltas(tmp_path / "ad")


@pytest.mark.parametrize("field,value,expect", [("use_dora", True, "DoRA"), ("bias", "all", "bias"),
                                                ("modules_to_save", ["lm_head"], "modules_to_save"),
                                                ("init_lora_weights", "pissa", "moves the base")])
def test_features_vllm_refuses(field, value, expect):
    shapes = {"base_model.model.q.lora_A.weight": (4, 8), "base_model.model.q.lora_B.weight": (8, 4)}
    cfg = {"r": 4, "lora_alpha": 8, field: value}
    assert any(expect in l for l in vllm_problems(cfg, shapes))
    assert vllm_problems({"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian"}, shapes) == []


def test_cli_lists_each_tool_and_exits_nonzero_when_unsafe(tiny_llama_dir, tmp_path, capsys):
    model, _ = mixed_rank_lora(tiny_llama_dir)
    save_peft_adapter(model, tmp_path / "ad")
    assert export_main(["--check", str(tmp_path / "ad")]) == 0
    out = capsys.readouterr().out
    assert "vllm: loads with --max-lora-rank 16" in out and "peft: loads" in out and "transformers:" in out
    cfg = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    (tmp_path / "ad/adapter_config.json").write_text(json.dumps(dict(cfg, rank_pattern={"q_proj": 2})))
    assert export_main(["--check", str(tmp_path / "ad")]) == 1
    assert "NOT safe" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        check(tmp_path)


def test_transformers_line_names_the_peft_version_it_needs(tiny_llama_dir, tmp_path):
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    model, _ = mixed_rank_lora(tiny_llama_dir)
    save_peft_adapter(model, tmp_path / "ad")
    (line,) = check(tmp_path / "ad")["transformers"]
    assert line.startswith("refuses") == (Version(version("peft")) < Version(MIN_PEFT_VERSION))


def test_pissa_2r_export_gets_a_summary_note(tiny_llama_dir, tmp_path):
    """PiSSA at r = 16 exports rank 32 (the base move is part of the change): fine for PEFT, needs a flag in vLLM."""
    from peftlab.init import InitContext, get_init

    torch.manual_seed(0)
    model = load(tiny_llama_dir)
    layers = apply_adapters(model, peft_cfg(r=16, alpha=16, target_set="qv"), None, "lora")
    get_init("pissa").run(InitContext(model, layers, OmegaConf.create({"init": {"name": "pissa", "niter": None}})))
    save_peft_adapter(model, tmp_path / "ad")
    notes = summary_notes(tmp_path / "ad")
    assert notes["adapter_r"] == 32 and "serve with --max-lora-rank 32" in notes["vllm_note"]
    assert check(tmp_path / "ad", max_lora_rank=32)["ok"]
    view, problems = peft_view(*read_adapter(tmp_path / "ad"))
    assert problems == [] and {r for r, _ in view.values()} == {32}


@pytest.mark.slow
def test_a_run_whose_adapter_exceeds_vllm_s_default_rank_says_so_in_its_summary(tmp_path):
    from test_train import run_inproc

    s = run_inproc(tmp_path / "big", ["train.max_steps=2", "+init=pissa", "++peft.lora_r=16"])
    assert s["adapter_r"] == 32 and "serve with --max-lora-rank 32" in s["vllm_note"]
    assert json.loads((tmp_path / "big/summary.json").read_text())["vllm_note"] == s["vllm_note"]
    s = run_inproc(tmp_path / "small", ["train.max_steps=2"])
    assert s["adapter_r"] == 8 and "vllm_note" not in s
