"""The seed documents' code runs as written: every fenced block of every seed (../shared/seeds/*.txt) is accounted for
in KINDS, and every code block is executed from the seed text itself with only its import line rewritten
(seedtext.IMPORTS), in a namespace holding the stand-ins the document defines elsewhere (a model, a dataloader, its
config dict). Shell blocks run their peftlab equivalents (slow). What each block must do is asserted after it runs."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seedtext
from seedtext import blocks, run_block

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(seedtext.seed_dir() is None, reason="no shared/seeds above the repository "
                                "(set PEFTLAB_SEEDS to the seed documents' folder)")

# Every fenced block, by seed and position: python (executed as written), walkthrough (the document's implementation,
# executed as a reference against peftlab's layer), port (ORIGINAL / MODIFIED sections: the MODIFIED code is executed;
# the ORIGINAL is the LoRA-GA PEFT fork it replaces), fragment (not Python: a sketch), yaml (config keys, composed),
# shell (its peftlab equivalent runs), listing / formula / empty (no code).
KINDS = {
    "000": ["python", "python", "python", "listing", "shell", "shell", "formula"],
    "001": ["shell-install", "python", "python", "shell", "listing", "empty"],
    "002": ["formula"] * 5 + ["python"] * 4 + ["walkthrough"] * 3 + ["python"] * 3 + ["formula"] + ["python"] * 3,
    "003": ["port"] * 5 + ["fragment", "port", "shell"],
    "004": ["yaml", "shell", "shell"],
}


def test_every_block_of_every_seed_is_accounted_for():
    for seed, kinds in KINDS.items():
        found = blocks(seed)
        assert len(found) == len(kinds), f"seed {seed}: {len(found)} blocks, KINDS lists {len(kinds)}"
        for b, kind in zip(found, kinds):
            where = f"seed {seed} block {b.index} (line {b.line})"
            if kind in ("python", "walkthrough"):
                compile(seedtext.rewrite_imports(b.code), where, "exec")
            elif kind == "port":
                assert set(seedtext.sections(b.code)) == {"ORIGINAL", "MODIFIED"}, where
                compile(seedtext.rewrite_imports(seedtext.sections(b.code)["MODIFIED"]), where, "exec")
            elif kind == "fragment":
                with pytest.raises(SyntaxError):
                    compile(b.code, where, "exec")


# ---- 002: LoRA (nexus.models.compression.peft -> peftlab.adapters) -------------------------------------------------
def lora_ns(**extra):
    return {"torch": torch, "nn": nn, "F": F, "NexusModule": nn.Module, **extra}


def captured(block, ns, **kw) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_block(block, ns, **kw)
    return out.getvalue()


def test_lora_seed_usage_blocks_run_as_written(tiny_llama):
    from peftlab.adapters import LoRALinear

    b = blocks("002")
    ns = run_block(b[5], lora_ns())  # LoRALinear.from_linear(original_layer, rank=8, alpha=16.0, dropout=0.1)
    layer = ns["lora_layer"]
    assert isinstance(layer, LoRALinear) and layer.base is ns["original_layer"] and layer.scaling == 2.0
    assert layer.lora_A.shape == (8, 768) and layer.lora_dropout.p == 0.1 and not layer.linear.weight.requires_grad

    ns["model"] = tiny_llama  # the document's blocks share one session, as a reader runs them
    run_block(b[6], ns)  # LoRAConfig(...), model = apply_lora(model, config=config)
    model = ns["model"]
    assert model is tiny_llama
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert {m.lora_dropout.p for m in model.modules() if isinstance(m, LoRALinear)} == {0.1}

    text = captured(b[7], ns)  # counts trainable parameters
    n_lora = sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALinear))
    assert ns["trainable"] == n_lora and text.startswith(f"Trainable: {n_lora:,} / ")
    assert captured(b[16], ns) == ""  # the freezing check warns about nothing
    assert sorted(re.findall(r"LoRA applied to: (\S+)", captured(b[17], ns))) == sorted(adapted)

    run_block(b[13], ns)  # get_lora_parameters, base_params (p not in lora_params), two AdamW groups
    groups = ns["optimizer"].param_groups
    assert [g["lr"] for g in groups] == [1e-5, 1e-3] and len(groups[1]["params"]) == 2 * len(adapted)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))

    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.5)  # a trained adapter, so that merging changes the weights
    model.eval()
    ids = torch.randint(0, 128, (2, 6))
    before = model(ids).logits.detach()
    ns["input"] = ids
    run_block(b[8], ns)  # model = merge_lora(model); output = model(input)
    assert not any(isinstance(m, LoRALinear) for m in ns["model"].modules())
    torch.testing.assert_close(ns["output"].logits, before, rtol=1e-5, atol=1e-5)


def test_lora_seed_config_blocks(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from peftlab.adapters import LoRAConfig, LoRALinear, apply_lora

    b = blocks("002")
    ns = run_block(b[12], lora_ns(LoRAConfig=LoRAConfig))  # LoRAConfig(rank=8, alpha=16.0, dropout=0.1)
    c = ns["config"]
    assert (c.rank, c.alpha, c.dropout, c.target_modules, c.bias) == (8, 16.0, 0.1, ["q_proj", "v_proj"], "none")

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ns = run_block(b[14], lora_ns(model=model, config=c, apply_lora=apply_lora))  # checkpointing, then apply_lora
    model = ns["model"]
    model.train()
    model(torch.randint(0, 128, (2, 6)), labels=torch.randint(0, 128, (2, 6))).loss.backward()
    grads = [m.lora_B.grad for m in model.modules() if isinstance(m, LoRALinear)]  # (B = 0: dL/dA = 0)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # checkpointing still trains them

    ns = run_block(b[18], lora_ns())  # target_modules=['.*q_proj', '.*v_proj']: regexes in a list
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    apply_lora(fresh, config=LoRAConfig(target_modules=ns["target_modules"]))
    assert sum(isinstance(m, LoRALinear) for m in fresh.modules()) == 4


def test_lora_seed_walkthrough_is_peftlabs_layer():
    """The document's LoRALinear, forward and merge_weights, executed as written, against peftlab's layer."""
    from peftlab.adapters import LoRALinear

    b = blocks("002")
    ns = run_block(b[9], lora_ns())  # class LoRALinear(NexusModule): ... (no super().__init__ call in the text)
    SeedLoRALinear = ns["LoRALinear"]
    seed = SeedLoRALinear.__new__(SeedLoRALinear)
    nn.Module.__init__(seed)  # what NexusModule's own __init__ would do
    SeedLoRALinear.__init__(seed, 12, 10, rank=4, alpha=8.0, dropout=0.0, bias=True)
    ours = LoRALinear(12, 10, rank=4, alpha=8.0, dropout=0.0, bias=True)  # the seed's signature
    assert ours.scaling == seed.scaling == 2.0 and ours.lora_B.abs().sum() == 0
    assert {k: tuple(p.shape) for k, p in ours.named_parameters() if k.startswith("lora")} == \
           {k: tuple(p.shape) for k, p in seed.named_parameters() if k.startswith("lora")}
    assert not ours.linear.weight.requires_grad and not seed.linear.weight.requires_grad

    forward = run_block(b[10], lora_ns())["forward"]
    merge_weights = run_block(b[11], lora_ns())["merge_weights"]
    nn.init.normal_(ours.lora_B)
    x = torch.randn(3, 12)
    torch.testing.assert_close(forward(ours, x), ours(x))  # the seed's forward on peftlab's layer
    y = ours(x)
    merge_weights(ours)  # the seed's merge on peftlab's layer: W0 + (alpha/r) B A, merged = True
    assert ours.merged
    torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
    twin = LoRALinear(12, 10, rank=4, alpha=8.0)
    twin.load_state_dict({**ours.state_dict(), "base.weight": ours.base.weight - ours.delta_weight()})
    twin.merge_weights()  # peftlab's own merge gives the same weight
    torch.testing.assert_close(twin.base.weight, ours.base.weight)


def test_lora_A_init_bound_is_peft_kaiming_not_the_seed_formula():
    """A departure, recorded in the README: the seed writes A ~ U(-sqrt(5/k), sqrt(5/k)); PEFT's (and peftlab's)
    kaiming_uniform(a=sqrt(5)) bound is sqrt(6 / ((1 + 5) k)) = 1/sqrt(k)."""
    from peftlab.adapters import LoRALinear

    k = 4096
    A = LoRALinear(k, 8, rank=8).lora_A
    assert A.abs().max() <= 1 / math.sqrt(k) and A.abs().max() > 0.99 / math.sqrt(k)


# ---- 000: GP-LoRA (loralib -> peftlab.adapters.gplora) --------------------------------------------------------------
class GPSeedModel(nn.Module):
    """The model of the seed's loop: lora.Linear layers, ``model(batch)`` returns the loss."""

    def __init__(self, lora):
        super().__init__()
        self.l1, self.l2 = lora.Linear(16, 32, r=8), lora.Linear(32, 8, r=8)
        for l in (self.l1, self.l2):
            nn.init.normal_(l.lora_B, std=0.3)  # a partly trained adapter (at B = 0 the guard waits: a departure)

    def forward(self, batch):
        x, y = batch
        return F.mse_loss(self.l2(torch.tanh(self.l1(x))), y)


def test_gplora_seed_blocks_run_as_written():
    import peftlab.adapters.gplora as gplora
    from peftlab.optim.gauge import imbalance

    torch.manual_seed(0)
    b = blocks("000")
    ns = run_block(b[0], {"torch": torch, "in_features": 16, "out_features": 32})  # lora.Linear(in, out, r=8)
    layer = ns["layer"]
    assert isinstance(layer, gplora.Linear) and layer.rank == 8 and layer.weight.shape == (32, 16)
    assert layer.scaling == 1 / 8  # loralib's lora_alpha=1 default

    model = GPSeedModel(gplora)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)) for _ in range(4)]
    ns = run_block(b[1], {"torch": torch, "model": model, "dataloader": batches})  # the wrapper and its loop
    opt = ns["optimizer"]
    for l in (model.l1, model.l2):  # every layer projected after the last step: A A^T = mu B^T B (up to eps)
        assert float(imbalance(l.lora_A.detach(), l.lora_B.detach(), 8 / l.out_features)) < 1e-3
        st = opt.base_optimizer.state[l.lora_A]  # AdamW's moments kept (the seed's wrapper never touches them)
        assert int(st["step"]) == 4 and st["exp_avg"].abs().sum() > 0
    BA = [l.delta_weight().detach() for l in (model.l1, model.l2)]
    run_block(b[2], ns)  # optimizer.step(); gauge_project_model(model, mu="auto", eps=1e-4); zero_grad
    for l, ba in zip((model.l1, model.l2), BA):
        torch.testing.assert_close(l.delta_weight(), ba, rtol=1e-4, atol=1e-6)
        assert float(imbalance(l.lora_A.detach(), l.lora_B.detach(), 8 / l.out_features)) < 1e-3


def test_gplora_seed_keywords_and_defaults():
    import peftlab.adapters.gplora as gplora

    model = GPSeedModel(gplora)
    base = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt = gplora.GaugeProjectedOptimizer(base_optimizer=base, model=model, mu="auto", eps=1e-4, eig_floor=1e-12,
                                         cast_fp32=True)
    assert opt.base_optimizer is base and opt.kwargs["moments"] == "keep" and opt.every == 1
    gplora.gauge_project_model(model, mu="auto", eps=1e-4, eig_floor=1e-12, cast_fp32=False)
    model.l1.gauge_project_(mu="auto", eps=1e-4, eig_floor=1e-12, cast_fp32=True)
    assert gplora.DEFAULTS["moments"] == "keep"


# ---- 001: GeoLoRA (geolora.* -> peftlab.geolora) --------------------------------------------------------------------
def test_geolora_seed_quick_start_runs_as_written():
    from peftlab.adapters.geolora import GeoLoRALinear

    ns = run_block(blocks("001")[1], {})  # the 784-512-256-10 MLP, GeoLoRAConfig, target_modules=["Linear"]
    model, config = ns["model"], ns["config"]
    assert (config.rank_init, config.learning_rate, config.tau, config.alpha) == (8, 1e-3, 1e-3, 1e-4)
    assert sorted(model.geolora_layers) == ["0", "2", "4"]  # every Linear, matched by its class name
    assert all(isinstance(l, GeoLoRALinear) and l.rank == 8 for l in model.geolora_layers.values())


def test_geolora_targets_by_class_and_a_listconfig_keeps_the_no_match_check():
    from omegaconf import OmegaConf

    from peftlab.geolora import GeoLoRAConfig, GeoLoRAModel

    mlp = lambda: nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))  # noqa: E731
    assert sorted(GeoLoRAModel(mlp(), GeoLoRAConfig(rank_init=2), OmegaConf.create(["Linear"])).geolora_layers) == \
        ["0", "2"]
    with pytest.raises(ValueError, match=r"\['1'\] match no Linear"):  # "1" is the ReLU: silently one layer before
        GeoLoRAModel(mlp(), GeoLoRAConfig(rank_init=2), OmegaConf.create(["1", "Linear"]))
    with pytest.raises(ValueError, match="ReLU"):  # a class that is not adaptable is not a target
        GeoLoRAModel(mlp(), GeoLoRAConfig(rank_init=2), ["ReLU"])
    with pytest.warns(UserWarning, match="starts at rank 4"):  # the seed's CLI --rank 16 meets a 10-wide head
        assert GeoLoRAModel(mlp(), GeoLoRAConfig(rank_init=5), ["Linear"]).ranks() == {"0": 5, "2": 4}
    # the seed's "use_small_matrix_optimizer: Enable Adam/SGD" as a switch
    assert GeoLoRAConfig(use_small_matrix_optimizer=True).use_small_matrix_optimizer == "adam"
    assert GeoLoRAConfig(use_small_matrix_optimizer=False).use_small_matrix_optimizer == "sgd"


@pytest.mark.slow
def test_geolora_seed_training_block_runs_as_written():
    ns = run_block(blocks("001")[1], {})
    with pytest.warns(UserWarning, match="offline stand-in"):  # get_dataloaders("mnist", batch_size=128)
        ns = run_block(blocks("001")[2], ns)  # GeoLoRATrainer(model, config).train(..., num_epochs=10)
    h = ns["history"]
    assert len(h["val_loss"]) == 10 and all(math.isfinite(v) for v in h["train_loss"])
    assert h["val_accuracy"][-1] > 0.5  # ten classes: the stand-in task is learnt, not guessed


@pytest.mark.slow
def test_geolora_seed_cli_commands(tmp_path):
    """`python geolora_main.py ARGS` is `python -m peftlab.geolora ARGS`; run in-process, the seed's flags with
    --epochs 1 (the only change: ten and twenty epochs are minutes on two shared cores)."""
    from peftlab.geolora import main

    commands = seedtext.shell_commands(blocks("001")[3].code)
    assert len(commands) == 2 and all(c.startswith("python geolora_main.py ") for c in commands)
    for i, cmd in enumerate(commands):
        argv = shlex.split(cmd)[2:]
        argv[argv.index("--epochs") + 1] = "1"
        with pytest.warns(UserWarning, match="offline stand-in"):
            h = main([*argv, "--output_dir", str(tmp_path / str(i))])
        assert (tmp_path / str(i) / "history.json").exists() and math.isfinite(h["val_loss"][-1])


# ---- 003: Rotational PiSSA (rotational_pissa_unified -> peftlab.adapters.rotational_pissa) -------------------------
def find_all_linear_modules(model):
    """The LoRA-GA code's helper the port calls (defined in its utils.py): every Linear's leaf name but lm_head."""
    return sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"})


class Recorder(dict):
    """The trainer's self.orig_A / orig_B: the seed writes self.orig_A[...] = ...; keep every assignment."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __setitem__(self, key, value):
        self.names.append(value)
        super().__setitem__(key, value)


@pytest.mark.parametrize("way", ["way0", "way2"])
def test_rotational_pissa_seed_port_runs_as_written(tiny_llama, tmp_path, way):
    from peftlab.adapters.rotational_pissa import RotationalPiSSALinear

    b = blocks("003")
    ns = {"torch": torch, "os": os, "model": tiny_llama, "config": {"r": 4, "a": 8, "s": 8},
          "find_all_linear_modules": find_all_linear_modules, "save_dir": str(tmp_path)}
    run_block(b[0], ns, "MODIFIED")  # the imports
    run_block(b[1], ns, "MODIFIED")  # RotationalPiSSAConfig(r=..., lora_alpha=..., method="way0", ...)
    c = ns["pissa_config"]
    assert (c.r, c.lora_alpha, c.way, c.orthogonality_reg_weight, c.freeze_singular_values) == \
           (4, 8, "way0", 1e-3, False)
    if way != "way0":  # the same port with another of the document's methods
        ns["pissa_config"] = type(c)(**{**c.__dict__, "method": way, "way": way})
    run_block(b[2], ns, "MODIFIED")  # replace_linear_with_rotational_pissa(model=..., target_modules=..., ...)
    adapters = ns["adapters"]
    assert len(adapters) == 2 * 7 and all(isinstance(l, RotationalPiSSALinear) for l in adapters.values())
    assert all(not p.requires_grad for n, p in tiny_llama.named_parameters() if ".rot_" not in n
               and not n.endswith(".S"))

    self = types.SimpleNamespace(orig_A=Recorder(), orig_B=Recorder())
    ns.update(self=self)
    run_block(b[6], ns, "MODIFIED", wrap="for name, param in model.named_parameters():")  # parameter detection
    # one per layer and side: way0's R_U -> orig_A, R_V -> orig_B; way2's B_U, B_V (C_U, C_V are not matched)
    assert len(self.orig_A.names) == len(self.orig_B.names) == len(adapters)

    ids = torch.randint(0, 128, (2, 6))
    run_block(b[3], ns, "MODIFIED")  # torch.save({... 'pissa_config': pissa_config, 'adapters': [...]}, init...)
    before = tiny_llama(ids).logits.detach()
    shutil.copy(tmp_path / "init_checkpoint.pt", tmp_path / "final_checkpoint.pt")  # what training would write
    with torch.no_grad():
        for p in tiny_llama.parameters():
            if p.requires_grad:
                p.add_(0.1)
    assert not torch.allclose(tiny_llama(ids).logits, before)
    run_block(b[4], ns, "MODIFIED")  # checkpoint = torch.load(...); model.load_state_dict(...)
    torch.testing.assert_close(tiny_llama(ids).logits, before)
    assert ns["checkpoint"]["pissa_config"] == ns["pissa_config"]


# ---- 004: LoRA-FA (run_exp.py, eval_gsm8k.py, config keys) ----------------------------------------------------------
def flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_lorafa_quick_start_config_keys_compose_and_validate():
    import yaml
    from omegaconf import OmegaConf

    from peftlab.config import resolve_config
    from test_config import compose_cfg

    keys = dict(flatten(yaml.safe_load(blocks("004")[0].code)))
    assert len(keys) == 11
    cfg = compose_cfg(["+init=gradient", *[f"++{k}={json.dumps(v)}" for k, v in keys.items()]])
    cfg = resolve_config(cfg)
    for k, v in keys.items():
        key = "init.scale" if k == "init.weight" else k
        assert OmegaConf.select(cfg, key) == v, k


# ---- shell blocks: their peftlab equivalents (slow) -----------------------------------------------------------------
@pytest.mark.slow
def test_gplora_experiment_scripts_equivalent(tmp_path):
    """The authors' GLUE / E2E scripts (roberta_base_mnli_gplora.sh, run_e2e_gplora.sh) have no peftlab copy; the
    equivalent is a run_exp.py run with method=gplora (here the embedded task, 2 steps)."""
    from test_train import run_inproc

    assert [c.split()[-1] for c in seedtext.shell_commands(blocks("000")[4].code + "\n" + blocks("000")[5].code)
            if c.startswith("bash")] == ["roberta_base_mnli_gplora.sh", "run_e2e_gplora.sh"]
    s = run_inproc(tmp_path, ["method=gplora", "train.max_steps=2"])
    assert s["method"] == "gplora" and s["steps"] == 2


ROTATIONAL_FLAGS = {"--lora_alpha": "++peft.lora_alpha", "--lora_rank": "++peft.lora_r", "--seed": "seed",
                    "--sample_size": None}  # sample_size feeds LoRA-GA's gradient estimate, which PiSSA does not use


@pytest.mark.slow
def test_rotational_pissa_training_command_equivalent(tmp_path):
    from test_train import run_inproc

    (cmd,) = [c for c in seedtext.shell_commands(blocks("003")[7].code) if c.startswith("python")]
    overrides = ["method=rotational_pissa", "train.max_steps=2"]
    for arg in shlex.split(cmd)[2:]:
        flag, value = arg.split("=", 1)
        if ROTATIONAL_FLAGS[flag]:
            overrides.append(f"{ROTATIONAL_FLAGS[flag]}={value}")
    s = run_inproc(tmp_path, overrides)
    assert (s["method"], s["seed"], s["steps"]) == ("rotational_pissa", 31, 2)


def shell_env(tmp_path) -> tuple[Path, dict]:
    """A folder where `python run_exp.py` and `eval_gsm8k.py` are this checkout's (symlinks), with $runname, $iters."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("run_exp.py", "eval_gsm8k.py", "conf"):
        (work / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "runname": "seedrun", "iters": "2"}
    return work, env


@pytest.mark.slow
def test_lorafa_commands_run_as_written_on_local_files(tmp_path, embedded_data_dir):
    """Both training commands of the LoRA-FA seed verbatim (bash, $runname and $iters set), followed by overrides for
    this machine (a local MetaMathQA-schema file, 2 steps); then the seed's eval command, which finds the run by its
    wandb name, on the embedded test split."""
    rows = [json.loads(l) for l in (embedded_data_dir / "train.jsonl").read_text().splitlines()[:128]]
    data = tmp_path / "MetaMathQA.jsonl"
    data.write_text("".join(json.dumps({"query": r["question"], "type": "GSM_AnsAug",
                                        "response": r["answer"].replace("####", "The answer is:")}) + "\n"
                            for r in rows))
    local = f" ++dataset.path={data} ++dataset.eval_samples=16 ++train.max_steps=2 ++wandb.mode=disabled"
    work, env = shell_env(tmp_path)
    b = blocks("004")
    for block, extra_env in ((b[1], {}), (b[2], {"ACCELERATE_USE_CPU": "1"})):
        (cmd,) = seedtext.shell_commands(block.code)
        out = subprocess.run(["bash", "-c", cmd + local], cwd=work, env={**env, **extra_env}, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, cmd + "\n" + out.stdout[-2000:] + out.stderr[-3000:]
    runs = sorted(work.glob("multirun/*/*/0/summary.json"))
    assert len(runs) == 2
    for summary in runs:
        cfg = json.loads((summary.parent / "summary.json").read_text())
        assert cfg["init"] == "gradient" and cfg["steps"] == 2
    (eval_cmd,) = re.findall(r"^torchrun .*eval_gsm8k\.py.*$", seedtext.seed_file("004").read_text(), re.M)
    extra = f" --limit 4 --max_new_tokens 16 --data {embedded_data_dir / 'test.jsonl'}"
    out = subprocess.run(["bash", "-c", eval_cmd + extra], cwd=work, env={**env, "ACCELERATE_USE_CPU": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    newest = max((s.parent for s in runs), key=lambda p: p.stat().st_mtime)
    assert json.loads((newest / "eval" / "results.json").read_text())


def test_eval_wandb_name_finds_the_newest_finished_run(tmp_path, monkeypatch):
    from peftlab.eval.gsm8k import run_dir_by_wandb_name

    def run(path, name, finished=True):
        (path / ".hydra").mkdir(parents=True)
        (path / ".hydra/config.yaml").write_text(f"wandb:\n  name: {name}\n")
        if finished:
            (path / "adapter").mkdir()
            (path / "adapter/adapter_config.json").write_text("{}")
        return path

    monkeypatch.chdir(tmp_path)
    old = run(tmp_path / "multirun/d/t1/0", "x")
    new = run(tmp_path / "outputs/d/t2", "x")
    os.utime(old, (1, 1))
    run(tmp_path / "outputs/d/t3", "x", finished=False)  # killed before its adapter: not scored
    run(tmp_path / "outputs/d/t4", "y")
    assert Path(run_dir_by_wandb_name("x")).resolve() == new.resolve()
    with pytest.raises(FileNotFoundError, match="no finished run with wandb.name='z'"):
        run_dir_by_wandb_name("z")
