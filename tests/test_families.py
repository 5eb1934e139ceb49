"""Every common HF family x every method x export: a few optimizer steps on a tiny random model, then the PEFT-loaded
adapter, the merged model and the trained model give the same logits. Also the per-family target sets, the MoE and
tied-head cases and the error messages."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from peftlab.adapters import apply_adapters, get_method
from peftlab.adapters.targets import FUSED_QKV, TARGET_SETS, resolve_target_patterns

H = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=128)
ATTN = dict(H, intermediate_size=64, num_key_value_heads=2)
FAMILIES = {  # model_type: (config class name, kwargs)
    "llama": ("LlamaConfig", ATTN),
    "mistral": ("MistralConfig", ATTN),
    "qwen2": ("Qwen2Config", ATTN),
    "qwen3": ("Qwen3Config", dict(ATTN, head_dim=8)),
    "gemma": ("GemmaConfig", dict(ATTN, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(ATTN, head_dim=8)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=1, n_head=4, vocab_size=128, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", dict(H, intermediate_size=64)),
    "falcon": ("FalconConfig", H),
    "phi3": ("Phi3Config", dict(ATTN, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "opt": ("OPTConfig", dict(H, ffn_dim=64, word_embed_proj_dim=32)),
    "mixtral": ("MixtralConfig", dict(ATTN, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(ATTN, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                         num_experts=4, num_experts_per_tok=2)),
}
MOE = ("mixtral", "qwen2_moe")
METHODS = ("lora", "gplora", "geolora", "rotational_pissa")
METHOD_CFG = {"lora": {}, "gplora": {"guard": 1e-6}, "geolora": {"rmax": 8, "tau": 0.05},
              "rotational_pissa": {"way": "way2"}}
FAST = {f: METHODS[i % len(METHODS)] for i, f in enumerate(FAMILIES)}  # one method per family in the fast suite


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """A saved tiny random model per family, made on first use."""
    made = {}

    def get(family):
        if family not in made:
            import transformers

            cls, kw = FAMILIES[family]
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw))
            with torch.no_grad():  # zero-initialised biases and norms would hide a wrong merge of them
                for p in model.parameters():
                    p.add_(0.02 * torch.randn_like(p))
            made[family] = tmp_path_factory.mktemp(family)
            model.save_pretrained(made[family])
        return made[family]

    return get


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def peft_cfg(target_set="all", modules=None, r=4):
    return OmegaConf.create({"target_set": target_set, "lora_target_modules": modules, "lora_r": r, "lora_alpha": 8,
                             "lora_dropout": 0.0, "use_rslora": False})


def train_a_little(model, method, steps=2):
    """Optimizer steps through the method's own optimizer and after-step hook (GeoLoRA's ranks move, GP-LoRA's
    gauge projects), so the exported change is a trained one, not the init."""
    spec, mcfg = get_method(method), OmegaConf.create(METHOD_CFG[method])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = spec.make_optimizer(model, params, OmegaConf.create({"lr": 3e-2}), mcfg) or torch.optim.AdamW(params, 3e-2)
    g = torch.Generator().manual_seed(1)
    model.train()
    for step in range(steps):
        x = torch.randint(0, 128, (2, 12), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        spec.after_step(model, opt, step + 1, mcfg)
    return model.eval()


def check_exports_agree(path, tmp_path, method, pcfg):
    """trained == PEFT-loaded adapter == merged model (max |logit difference| <= 1e-5), and the change is real."""
    from peft import PeftModel

    from peftlab.export import save_merged, save_peft_adapter

    torch.manual_seed(0)
    model = load(path)
    apply_adapters(model, pcfg, OmegaConf.create(METHOD_CFG[method]), method)
    train_a_little(model, method)
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trained = model(x).logits
        base = load(path)(x).logits
    save_peft_adapter(model, tmp_path / "adapter")
    save_merged(model, None, tmp_path / "merged")
    with torch.no_grad():
        via_peft = PeftModel.from_pretrained(load(path), tmp_path / "adapter").eval()(x).logits
        merged = load(tmp_path / "merged")(x).logits
    assert (trained - base).abs().max() > 1e-4  # the steps changed the model, so the comparisons below can fail
    assert (via_peft - trained).abs().max() <= 1e-5
    assert (merged - trained).abs().max() <= 1e-5
    return model


def _matrix():
    for family in FAMILIES:
        for method in METHODS:
            marks = () if FAST[family] == method else (pytest.mark.slow,)
            yield pytest.param(family, method, marks=marks, id=f"{family}-{method}")


@pytest.mark.parametrize("family,method", list(_matrix()))
def test_family_method_export_matrix(family_dir, tmp_path, family, method):
    # all linears on dense models; on MoE models `all` refuses (experts are 3-D parameters), so qkvo
    check_exports_agree(family_dir(family), tmp_path, method, peft_cfg("qkvo" if family in MOE else "all"))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("target_set", ["qv", "qkvo"])
def test_named_target_sets_resolve_on_every_family(family_dir, family, target_set):
    model = load(family_dir(family))
    layers = apply_adapters(model, peft_cfg(target_set), None, "lora")
    leaves = {n.split(".")[-1] for n in layers}
    n_layers = 1
    expected = TARGET_SETS.get(family, TARGET_SETS["default"])[target_set]
    assert len(layers) == n_layers * len(expected)
    assert leaves == {p.split(".")[-1] for p in expected}
    if family in FUSED_QKV:  # q and v are only reachable through the fused projection
        assert FUSED_QKV[family] in leaves


def test_qv_follows_peft_defaults_where_peft_has_them():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    checked = 0
    for family in FAMILIES:
        if PEFT_DEFAULTS.get(family):
            assert sorted(resolve_target_patterns("qv", None, family)) == sorted(PEFT_DEFAULTS[family]), family
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("family", MOE)
def test_all_on_moe_refuses_naming_the_experts(family_dir, family):
    model = load(family_dir(family))
    with pytest.raises(ValueError, match=r"peft.target_set=all on .*3-D parameters.*experts.*lora_target_modules"):
        apply_adapters(model, peft_cfg("all"), None, "lora")


def test_a_layer_a_method_cannot_adapt_is_named_with_the_selection(family_dir):
    # Qwen2-MoE's shared_expert_gate is 1 x 32: rank 4 rotations of its singular vectors do not exist
    model = load(family_dir("qwen2_moe"))
    with pytest.raises(ValueError, match=r"rotational_pissa cannot adapt layer model\.layers\.0\.mlp\.shared_expert_gate "
                                         r"\(1 x 32\) selected by peft\.lora_target_modules"):
        apply_adapters(model, peft_cfg(modules=["q_proj", "shared_expert_gate"]), OmegaConf.create({}),
                       "rotational_pissa")


def test_unknown_pattern_names_the_target_set_and_candidates(family_dir):
    model = load(family_dir("gpt_neox"))
    with pytest.raises(ValueError, match=r"peft.lora_target_modules=.*\['q_proj'\].*query_key_value"):
        apply_adapters(model, peft_cfg(modules=["q_proj"]), None, "lora")


@pytest.mark.parametrize("family,modules", [("gpt2", ["c_attn", "lm_head"]), ("gemma", ["q_proj", "lm_head"])])
def test_tied_head_is_untied_so_init_and_merge_leave_the_embedding(family_dir, tmp_path, family, modules):
    """A PiSSA init moves the head's base weight and the merge adds to it: neither may reach the input embedding."""
    from peftlab.init import InitContext, get_init

    path = family_dir(family)
    original = load(path)
    assert original.lm_head.weight is original.get_input_embeddings().weight  # the family ties them
    torch.manual_seed(0)
    model = load(path)
    layers = apply_adapters(model, peft_cfg(modules=modules), None, "lora")
    get_init("pissa").run(InitContext(model, layers, OmegaConf.create({"init": {"name": "pissa", "niter": None}})))
    torch.testing.assert_close(model.get_input_embeddings().weight, original.get_input_embeddings().weight,
                               rtol=0, atol=0)
    model = check_exports_agree(path, tmp_path, "lora", peft_cfg(modules=modules))
    merged = load(tmp_path / "merged")
    torch.testing.assert_close(merged.get_input_embeddings().weight, original.get_input_embeddings().weight,
                               rtol=0, atol=0)
    assert not torch.allclose(merged.lm_head.weight, original.lm_head.weight)


def test_attn_implementation_is_left_to_transformers_unless_set():
    from peftlab.config import CONF_DIR

    for f in (CONF_DIR / "model").glob("*.yaml"):
        assert OmegaConf.load(f).attn_implementation is None, f.name
