"""method=full: every weight trains through the same trainer; merged/ instead of an adapter; checkpoint and resume."""
import json
import os
import signal

import pytest
import torch

from peftlab.adapters import adapter_layers, apply_adapters, get_method
from peftlab.adapters.full import STATE_KEY
from peftlab.config import resolve_config
from test_config import compose_cfg
from test_train import run_inproc

FULL = ["method=full", "train.max_steps=6", "model.eval_epochs=0", "++dataset.eval_samples=32"]


def test_every_parameter_trains_and_no_layer_is_made(tiny_llama):
    from omegaconf import OmegaConf

    assert apply_adapters(tiny_llama, OmegaConf.create({"target_set": "qv"}), None, "full") == {}
    names = [n for n, p in tiny_llama.named_parameters()]
    assert all(p.requires_grad for p in tiny_llama.parameters())
    for part in ("embed_tokens", "input_layernorm", "post_attention_layernorm", "model.norm", "lm_head", "q_proj",
                 "gate_proj"):
        assert any(part in n for n in names), part
    assert not adapter_layers(tiny_llama)


def test_run_saves_the_merged_model_and_no_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    from peftlab.models import load_model_and_tokenizer

    s = run_inproc(tmp_path, FULL)  # model.saving stays false: full saves merged/ anyway
    assert s["adapter"].startswith("not applicable: method=full")
    assert json.loads((tmp_path / "summary.json").read_text())["adapter"] == s["adapter"]
    assert not (tmp_path / "adapter").exists() and (tmp_path / "merged" / "config.json").exists()
    base, _, _ = load_model_and_tokenizer(compose_cfg().model)
    assert s["trainable_params"] == sum(p.numel() for p in base.parameters())
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ref = dict(base.named_parameters())
    for name, p in trained.named_parameters():  # embeddings, norms and head trained too
        assert not torch.equal(p, ref[name]), name
    ckpt = torch.load(tmp_path / "checkpoint" / "adapters.pt", weights_only=False)
    assert set(ckpt) == {STATE_KEY}
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(ckpt[STATE_KEY][k], v, rtol=0, atol=0)


def test_resume_after_a_stop_signal_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    run_inproc(tmp_path / "whole", FULL)
    spec = get_method("full")

    def stop_at_3(model, optimizer, step, method_cfg):  # SLURM's pre-emption signal, after step 3
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return {}

    monkeypatch.setattr(spec, "after_step", stop_at_3)
    with pytest.raises(SystemExit):
        run_inproc(tmp_path / "cut", FULL)
    assert json.loads((tmp_path / "cut/checkpoint/trainer_state.json").read_text())["step"] == 3
    monkeypatch.undo()
    run_inproc(tmp_path / "cut", [*FULL, "resume=true"])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "merged").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "merged").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("overrides, message", [
    (["method=full", "+init=pissa"], r"init.name = 'pissa': method=full takes the inits \['default'\]"),
    (["method=full", "train.fsdp=full_shard"], r"train.fsdp = 'full_shard': method=full: .*set it with train.fsdp=false"),
])
def test_refusals_before_the_model_loads(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(compose_cfg(overrides))
