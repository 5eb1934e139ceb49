"""FSDP (peftlab/fsdp.py): the frozen base sharded over two CPU processes (gloo), the adapters whole. A sharded run
trains to the same adapters as DDP and as one process, resumes after SIGKILL, exports the merged model, and runs the
methods whose hooks rewrite whole matrices."""
import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from peftlab.adapters import apply_adapters
from peftlab.fsdp import adapter_owned_parameters, decoder_layer_classes, shard_frozen_base, sharding_strategy
from test_train import ROOT, adapter_tensors, run_cli, wait_for_checkpoint

SMALL = ["+peft=qv", "++peft.lora_dropout=0", "model.per_device_batch_size=8", "++dataset.eval_samples=63"]


def fake_accelerator(kind="MULTI_CPU", strategy=None):
    """What the trainer reads of an Accelerator (accelerate builds no FSDP plugin without a GPU); the plugin holds
    torch's ShardingStrategy, as accelerate's does."""
    from torch.distributed.fsdp import ShardingStrategy

    plugin = SimpleNamespace(sharding_strategy=ShardingStrategy[strategy]) if strategy else None
    return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), state=SimpleNamespace(fsdp_plugin=plugin))


def test_strategy_from_the_config_or_from_an_accelerate_fsdp_launch():
    assert sharding_strategy(False, fake_accelerator()) is None
    assert sharding_strategy(None, fake_accelerator()) is None
    assert sharding_strategy(True, fake_accelerator()) == "full_shard"
    assert sharding_strategy("SHARD_GRAD_OP", fake_accelerator()) == "shard_grad_op"
    assert sharding_strategy(False, fake_accelerator("FSDP", "HYBRID_SHARD")) == "hybrid_shard"
    assert sharding_strategy("full_shard", fake_accelerator("FSDP", "HYBRID_SHARD")) == "full_shard"
    with pytest.raises(ValueError, match="unknown train.fsdp 'zero3'; allowed"):
        sharding_strategy("zero3", fake_accelerator())


def peft(targets=("q_proj", "v_proj")):
    return OmegaConf.create({"lora_r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "use_rslora": False,
                             "lora_target_modules": list(targets)})


def test_the_adapters_own_their_factors_but_not_the_base_weights(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    method = OmegaConf.merge(OmegaConf.load(ROOT / "conf/method/rotational_pissa.yaml"), {"way": "way1"})
    layers = apply_adapters(model, peft(), method, "rotational_pissa")
    owned = {id(p) for p in adapter_owned_parameters(model)}
    for layer in layers.values():
        assert all(id(p) not in owned for p in layer.base.parameters())
        assert all(id(p) in owned for n, p in layer.named_parameters() if not n.startswith("base."))
    assert {c.__name__ for c in decoder_layer_classes(model)} == {"LlamaDecoderLayer"}


def test_unshardable_models_fail_before_wrapping(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    apply_adapters(model, peft(), OmegaConf.create({"name": "lora"}), "lora")
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="these train too: \\['lm_head.weight'\\]"):
        shard_frozen_base(model, "full_shard", torch.device("cpu"))
    with pytest.raises(ValueError, match="no decoder layer class"):
        decoder_layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def finish(proc):
    out = proc.communicate(timeout=400)[0]
    assert proc.returncode == 0, out[-4000:]


def close(a, b, **tol):
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], **tol)


def same_merged(a, b):
    ta, tb = (load_file(str(d / "merged/model.safetensors")) for d in (a, b))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6)


def eval_losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval/loss"] for r in rows if "eval/loss" in r]


@pytest.mark.slow
def test_sharded_run_equals_one_process(tmp_path):
    """Gradient checkpointing on top; an odd eval set (63) leaves one process a stand-in eval batch."""
    over = [*SMALL, "train.max_steps=12"]
    one = run_cli(tmp_path / "one", over)
    finish(run_cli(tmp_path / "fsdp", [*over, "train.fsdp=full_shard", "train.gradient_checkpointing=true"], nproc=2))
    finish(one)
    assert json.loads((tmp_path / "fsdp/summary.json").read_text())["processes"] == 2
    close(tmp_path / "one", tmp_path / "fsdp", rtol=1e-4, atol=1e-6)
    assert eval_losses(tmp_path / "fsdp") == pytest.approx(eval_losses(tmp_path / "one"), rel=1e-6)


@pytest.mark.slow
def test_sharded_run_with_a_gradient_init_resumes_after_sigkill_and_exports_like_ddp(tmp_path):
    """LoRA-GA (the full-batch gradient estimated before sharding, the base offset) under FSDP, killed and resumed,
    gives DDP's adapters and merged model."""
    over = [*SMALL, "+init=gradient", "init.direction=LoRA-GA", "train.max_steps=40", "train.save_every=5",
            "model.saving=true"]  # (init=gradient alone is LoRA-One: no base offset)
    ddp = run_cli(tmp_path / "ddp", over, nproc=2)
    finish(ddp)
    fsdp = [*over, "train.fsdp=full_shard"]
    p = run_cli(tmp_path / "fsdp", fsdp, nproc=2, start_new_session=True)
    state = wait_for_checkpoint(p, tmp_path / "fsdp", 10)
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and both workers
    p.wait()
    assert json.loads(state.read_text())["step"] < 40 and not (tmp_path / "fsdp/summary.json").exists()
    finish(run_cli(tmp_path / "fsdp", [*fsdp, "resume=true"], nproc=2))
    close(tmp_path / "ddp", tmp_path / "fsdp", rtol=0, atol=1e-6)
    same_merged(tmp_path / "ddp", tmp_path / "fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("method", [["method=rotational_pissa", "method.way=way1", "method.merge_every=3"],
                                    ["method=rotational_pissa", "method.quantize_residual=true", "model.saving=true"],
                                    ["method=geolora"], ["method=gplora", "++model.dtype=bfloat16"],
                                    ["+align=teacher", "align.teacher=embedded:tiny-llama", "align.target=hidden",
                                     "align.divergence=mse", "align.map=lstsq", "align.period=4",
                                     "align.realign_steps=2", "+init=gradient"]],
                         ids=["rotational_pissa_way1", "rotational_pissa_nf4", "geolora", "gplora_bf16_base",
                              "teacher_alignment"])
def test_methods_that_rewrite_whole_matrices_run_sharded_like_ddp(tmp_path, method):
    """Way1 folds its rotations into the frozen U, V every 3 steps; an NF4 residual (buffers, left whole by FSDP) is
    rebuilt for the merged export; GeoLoRA changes ranks and optimizer state;
    GP-LoRA projects factors and moments in its optimizer wrapper (here over a bf16 base: fp32 adapters beside it);
    the teacher-alignment cycle adds a hidden-state term to some steps after a teacher-aware gradient init."""
    over = [*SMALL, *method, "train.max_steps=9"]
    ddp = run_cli(tmp_path / "ddp", over, nproc=2)
    finish(ddp)
    finish(run_cli(tmp_path / "fsdp", [*over, "train.fsdp=full_shard"], nproc=2))
    close(tmp_path / "ddp", tmp_path / "fsdp", rtol=0, atol=1e-6)
    if "model.saving=true" in method:
        same_merged(tmp_path / "ddp", tmp_path / "fsdp")


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_wrapped_model_keeps_names_and_outputs_and_refuses_gradient_estimation(tiny_llama_dir, one_process_group):
    from transformers import AutoModelForCausalLM

    from peftlab.adapters import adapter_layers
    from peftlab.data.datasets import Example
    from peftlab.init.gradient import estimate_gradient

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layers = apply_adapters(model, peft(), OmegaConf.create({"name": "lora"}), "lora")
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    wrapped = shard_frozen_base(model, "full_shard", torch.device("cpu"))
    assert adapter_layers(wrapped).keys() == layers.keys()  # no "_fsdp_wrapped_module." in checkpoint names
    assert all(p.requires_grad and p.dim() == 2 for p in adapter_owned_parameters(model))  # whole, not flattened
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, ref)
    with pytest.raises(ValueError, match="sharded by FSDP; run the init before wrapping"):
        estimate_gradient(wrapped, adapter_layers(wrapped), [Example([1, 2, 3], [-100, 2, 3])], 0, 1, progress=False)
