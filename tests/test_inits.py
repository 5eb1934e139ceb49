"""Data-aware inits: the full-batch gradient, each direction against its closed form, PiSSA and LoRA-GA against
HF PEFT, unchanged outputs, PEFT export round trips and the preconditioned optimizer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from peftlab.adapters import apply_adapters
from peftlab.data.datasets import Example, collate
from peftlab.export import save_peft_adapter
from peftlab.init import InitContext, get_init
from peftlab.init.directions import inverse_sqrt_metric, lora_fa, lora_ga, lora_one, rank_by_energy
from peftlab.init.gradient import estimate_gradient
from peftlab.train import token_loss_sum

ROOT = Path(__file__).resolve().parents[1]


def peft_cfg(**kw):
    return OmegaConf.create({"target_set": "qv", "lora_target_modules": None, "lora_r": 4, "lora_alpha": 8,
                             "lora_dropout": 0.0, "use_rslora": False, **kw})


def random_examples(n, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(1, vocab, (L,), generator=g).tolist()
        p = int(torch.randint(2, L - 2, (1,), generator=g))
        out.append(Example(ids, [-100] * p + ids[p:]))
    return out


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def init_cfg(**kw):
    base = OmegaConf.load(ROOT / "conf/init/gradient.yaml")
    return OmegaConf.create({"init": OmegaConf.merge(base, kw), "seed": 0, "model": {"name": "x", "max_length": 64},
                             "dataset": {}, "method": {"name": "lora"}})


def full_batch_reference(model, names, examples):
    """Autograd of the mean token loss over all examples at once."""
    model.zero_grad()
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    b = collate(examples, 0)
    loss = token_loss_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    n = (b["labels"][:, 1:] != -100).sum()
    grads = torch.autograd.grad(loss / n, list(weights.values()))
    return dict(zip(names, grads))


@pytest.mark.parametrize("bsz", [8, 3, 1])
def test_gradient_equals_autograd_of_the_full_mean_loss(tiny_llama_dir, bsz):
    examples = random_examples(8)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.1.self_attn.q_proj"]
    ref = full_batch_reference(load(tiny_llama_dir), names, examples)
    model = load(tiny_llama_dir)
    layers = apply_adapters(model, peft_cfg())
    grads, sigmas, tokens = estimate_gradient(model, layers, examples, 0, bsz, second_moments=True, progress=False)
    for n in names:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    assert all(not l.base.weight.requires_grad and l.lora_A.requires_grad for l in layers.values())
    # q and v of a block read the same input: one shared second moment, equal to E[x x^T] over non-pad tokens
    assert sigmas["model.layers.0.self_attn.q_proj"] is sigmas["model.layers.0.self_attn.v_proj"]
    xs = []
    h = model.get_submodule("model.layers.0.self_attn.q_proj").register_forward_pre_hook(
        lambda m, a: xs.append(a[0].detach()))
    b = collate(examples, 0)
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    h.remove()
    x = xs[0][b["attention_mask"].bool()]
    torch.testing.assert_close(sigmas["model.layers.0.self_attn.q_proj"], x.T @ x / len(x), rtol=1e-4, atol=1e-6)


def svd(M):
    return torch.linalg.svd(M, full_matrices=False)


def test_lora_one_closed_form():
    torch.manual_seed(0)
    G, r, s, gamma = torch.randn(20, 12), 3, 2.0, 16.0
    A, B = lora_one(G, r, s, "stable", gamma)
    U, S, Vh = svd(-G)
    target = (s / gamma) * (U[:, :r] * S[:r]) @ Vh[:r] / S[0]
    torch.testing.assert_close(s * B @ A, target, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B.norm(), A.norm())
    A1, B1 = lora_one(G, r, s, "gd", gamma)
    torch.testing.assert_close(s * B1 @ A1, target * gamma / s, rtol=1e-5, atol=1e-6)
    A2, B2 = lora_one(G, r, s, "unit", gamma)
    torch.testing.assert_close(B2 @ A2, target * gamma / s, rtol=1e-5, atol=1e-6)


def test_lora_ga_closed_form_paper_and_peft_conventions():
    torch.manual_seed(0)
    G, r, s, gamma = torch.randn(16, 10), 2, 4.0, 9.0
    U, S, Vh = svd(G)
    stable = 16 ** 0.25 / 3.0
    A, B = lora_ga(G, r, s, "stable", gamma)
    torch.testing.assert_close(A, Vh[:r] * stable)
    torch.testing.assert_close(B, U[:, r:2 * r] * stable)
    A, B = lora_ga(G, r, s, "gd", gamma)
    torch.testing.assert_close(s * B @ A, U[:, r:2 * r] @ Vh[:r] / s)
    A, B = lora_ga(G, r, s, "stable", gamma, convention="peft")
    torch.testing.assert_close(B @ A, (U[:, r:2 * r] * S[r:2 * r]) @ Vh[:r] * stable)
    with pytest.raises(ValueError, match="2r <= min"):
        lora_ga(G, 6, s)


def test_lora_fa_without_metric_or_with_isotropic_inputs_is_lora_one():
    torch.manual_seed(0)
    G, r, s = torch.randn(14, 9), 3, 2.0
    A1, B1 = lora_one(G, r, s, "stable", 16.0)
    A2, B2 = lora_fa(G, r, s, sigma=None, scale="stable", gamma=16.0)
    torch.testing.assert_close(A2, A1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B2, B1, rtol=1e-5, atol=1e-6)
    A3, B3 = lora_fa(G, r, s, sigma=3.7 * torch.eye(9), damping=0.1, scale="stable", gamma=16.0)
    torch.testing.assert_close(A3, A1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(B3, B1, rtol=1e-4, atol=1e-6)


def test_lora_fa_closed_form_with_anisotropic_metric():
    torch.manual_seed(0)
    G, r, s, gamma, damping = torch.randn(12, 8), 2, 1.5, 4.0, 0.01
    X = torch.randn(200, 8) * torch.linspace(0.1, 3, 8)
    sigma = X.T @ X / 200
    A, B = lora_fa(G, r, s, sigma=sigma, damping=damping, scale="stable", gamma=gamma)
    P = sigma + damping * torch.trace(sigma) / 8 * torch.eye(8)
    ev, Q = torch.linalg.eigh(P.double())
    p_is = (Q * ev.rsqrt()) @ Q.T
    U, S, Vh = svd((-G.double()) @ p_is)
    dW = (U[:, :r] * S[:r]) @ Vh[:r] @ p_is  # [-G P^-1/2]_r P^-1/2
    dW = dW / torch.linalg.matrix_norm(dW, ord=2)
    torch.testing.assert_close((gamma * B @ A).double(), dW, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(A.norm(), B.norm(), rtol=1e-5, atol=0)
    torch.testing.assert_close(inverse_sqrt_metric(sigma, damping).double(), p_is, rtol=1e-4, atol=1e-6)


def test_rank_by_energy():
    S = torch.tensor([3.0, 2.0, 1.0, 0.5])
    assert rank_by_energy(S, 9 / 14.25, 4) == 1
    assert rank_by_energy(S, 0.91, 4) == 2 and rank_by_energy(S, 0.92, 4) == 3 and rank_by_energy(S, 0.99, 4) == 4 and rank_by_energy(S, 0.99, 3) == 3


def test_pissa_matches_peft_and_keeps_the_output(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    ours = load(tiny_llama_dir)
    x = torch.randint(0, 128, (2, 9))
    before = ours(x).logits
    layers = apply_adapters(ours, peft_cfg(lora_r=4, lora_alpha=8))
    get_init("pissa").run(InitContext(ours, layers, OmegaConf.create({"init": {"name": "pissa", "niter": None}})))
    torch.testing.assert_close(ours(x).logits, before, rtol=1e-4, atol=1e-5)
    ref = get_peft_model(load(tiny_llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights="pissa"))
    for name, layer in layers.items():
        m = ref.base_model.model.get_submodule(name)
        BA_ref = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        torch.testing.assert_close(layer.delta_weight(), BA_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.base.weight, m.base_layer.weight, rtol=1e-4, atol=1e-5)


def test_pissa_fast_svd_is_close_to_full(tiny_llama_dir):
    from peftlab.init.pissa import pissa_factors

    W = load(tiny_llama_dir).model.layers[0].self_attn.q_proj.weight.detach()
    A, B = pissa_factors(W, 4, 2.0, None)
    A4, B4 = pissa_factors(W, 4, 2.0, 4)
    torch.testing.assert_close(B4 @ A4, B @ A, rtol=1e-3, atol=1e-3)


def test_lora_ga_matches_peft_lora_ga(tiny_llama_dir, monkeypatch):
    """Same model, same data, same G: PEFT's lora_ga and ours (convention=peft) give the same s B A and base."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    examples = random_examples(6)
    ours = load(tiny_llama_dir)
    x = torch.randint(0, 128, (2, 9))
    before = ours(x).logits
    layers = apply_adapters(ours, peft_cfg(lora_r=2, lora_alpha=4))
    cfg = init_cfg(direction="LoRA-GA", ga_convention="peft", stable_gamma=16, bsz=6, iters=1)
    get_init("gradient").run(InitContext(ours, layers, cfg, examples, 0))
    torch.testing.assert_close(ours(x).logits, before, rtol=1e-4, atol=1e-5)  # output unchanged

    def full_svd(M, q=None, niter=None):  # PEFT calls the randomized SVD; make it exact so signs agree
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U, S, Vh.T

    monkeypatch.setattr(torch, "svd_lowrank", full_svd)
    ref_model = load(tiny_llama_dir)
    # PEFT sees the same calibration samples in the same (seeded) order through our sampler
    from peftlab.init.gradient import calibration_samples

    b = collate(calibration_samples(examples, 6, 0, None), 0)

    def train_step():
        logits = ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        (token_loss_sum(logits, b["labels"]) / (b["labels"][:, 1:] != -100).sum()).backward()

    lcfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
                      lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16))
    preprocess_loraga(ref_model, lcfg, train_step)
    ref = get_peft_model(ref_model, lcfg)
    for name, layer in layers.items():
        m = ref.base_model.model.get_submodule(name)
        BA_ref = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        torch.testing.assert_close(layer.delta_weight(), BA_ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.base.weight, m.base_layer.weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "LoRA-GA", "LoRA-FA-auto"])
def test_export_round_trips_through_peft(tmp_path, tiny_llama_dir, init):
    from peft import PeftModel

    examples = random_examples(8)
    ours = load(tiny_llama_dir)
    layers = apply_adapters(ours, peft_cfg(target_set="all", lora_r=4, lora_alpha=8, use_rslora=True))
    if init == "pissa":
        cfg = OmegaConf.create({"init": {"name": "pissa", "niter": None}})
        get_init("pissa").run(InitContext(ours, layers, cfg))
    else:
        kw = {"direction": "LoRA-GA"} if init == "LoRA-GA" else {"direction": "LoRA-FA", "rank": "auto",
                                                                  "energy": 0.5}
        get_init("gradient").run(InitContext(ours, layers, init_cfg(bsz=4, iters=2, **kw), examples, 0))
    from peftlab.adapters import adapter_layers

    for layer in adapter_layers(ours).values():  # move away from the init so the export is non-trivial
        layer.lora_B.data += 0.01 * torch.randn_like(layer.lora_B)
    save_peft_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(tiny_llama_dir))
    cfg = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    if init == "LoRA-FA-auto":
        assert cfg["rank_pattern"]  # ranks chosen per layer
    else:
        assert cfg["r"] == 8  # the init's move of the base is exported too: rank 2r
    peft_model = PeftModel.from_pretrained(load(tiny_llama_dir), tmp_path / "ad").eval()
    x = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(peft_model(x).logits, ours(x).logits, rtol=1e-4, atol=1e-5)


def test_bad_init_values_fail_early():
    from peftlab.init.gradient import validate

    with pytest.raises(ValueError, match=r"unknown init.direction 'LoRA-XX'; allowed: \['LoRA-GA', 'LoRA-One', 'LoRA-FA'\]"):
        validate(init_cfg(direction="LoRA-XX").init)
    with pytest.raises(ValueError, match=r"unknown init.scale 'big'; allowed: \['stable', 'gd', 'unit'\]"):
        validate(init_cfg(scale="big").init)
    with pytest.raises(ValueError, match="use direction=LoRA-FA"):
        validate(init_cfg(rank="auto").init)


def test_precond_adamw_against_closed_form():
    from torch import nn

    from peftlab.adapters import LoRALinear
    from peftlab.optim.precond import PrecondAdamW

    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(6, 5), 3, 3))
    layer = model[0]
    nn.init.normal_(layer.lora_B)
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    layer.lora_A.grad, layer.lora_B.grad = gA.clone(), gB.clone()
    lam = 0.1
    opt = PrecondAdamW(model, [layer.lora_A, layer.lora_B], prec_reg=lam, lr=0.1)
    opt.precondition_()
    torch.testing.assert_close(layer.lora_A.grad, torch.linalg.inv(B.T @ B + lam * torch.eye(3)) @ gA, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.grad, gB @ torch.linalg.inv(A @ A.T + lam * torch.eye(3)), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_gradient_is_the_same_on_one_and_two_processes(tmp_path, tiny_llama_dir):
    script = tmp_path / "g.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {str(ROOT / 'tests')!r})
from accelerate import Accelerator
from test_inits import random_examples, load, peft_cfg
from peftlab.adapters import apply_adapters
from peftlab.init.gradient import estimate_gradient
acc = Accelerator(cpu=True)
model = load({str(tiny_llama_dir)!r})
layers = apply_adapters(model, peft_cfg())
g, s, n = estimate_gradient(model, layers, random_examples(10), 0, 4, acc, second_moments=True, progress=False)
if acc.is_main_process:
    torch.save({{"g": g, "s": s, "n": n}}, sys.argv[1])
acc.wait_for_everyone()
if acc.num_processes > 1:
    torch.distributed.destroy_process_group()
""")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    for nproc in (1, 2):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={nproc}", str(script), str(tmp_path / f"{nproc}.pt")],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    one, two = torch.load(tmp_path / "1.pt"), torch.load(tmp_path / "2.pt")
    assert one["n"] == two["n"]
    for k in one["g"]:
        torch.testing.assert_close(one["g"][k], two["g"][k], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(one["s"][k], two["s"][k], rtol=1e-4, atol=1e-6)


SEED = ["-m", "++dataset_name=meta_math", "++model.epochs=1", "++model.eval_epochs=1", "+init=gradient",
        "++init.direction=LoRA-FA", "++init.weight=stable", "++init.stable_gamma=128", "+peft=qv", "++peft.lora_r=8",
        "++peft.use_rslora=True", "++peft.lora_alpha=16", "++wandb.name=x", "++wandb.project=lorafa", "++init.iters=8"]


@pytest.mark.slow
def test_seed_command_on_a_local_metamath_file(tmp_path, embedded_data_dir):
    rows = [json.loads(l) for l in (embedded_data_dir / "train.jsonl").read_text().splitlines()[:200]]
    f = tmp_path / "MetaMathQA.json"
    f.write_text(json.dumps([{"query": r["question"], "response": r["answer"].replace("####", "The answer is:"),
                              "type": "GSM_AnsAug"} for r in rows]))
    cmd = [sys.executable, str(ROOT / "run_exp.py"), *SEED, f"++dataset.path={f}", "++dataset.eval_samples=32",
           "++wandb.mode=disabled", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    s = json.loads((tmp_path / "sweep/0/summary.json").read_text())
    assert s["init"] == "gradient" and s["dataset"] == "meta_math" and s["final_eval_loss"] < s["initial_eval_loss"]
    cfg = OmegaConf.load(tmp_path / "sweep/0/.hydra/config.yaml")
    assert cfg.init.weight == "stable" and cfg.wandb.project == "lorafa"
