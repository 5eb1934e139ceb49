"""Teacher alignment: each divergence against its closed form, the cycle, the least-squares map, teachers loaded from
run folders, identical teachers giving nothing, beta = 0 giving exactly nothing, clear errors, the dual-objective
gradient for inits, and (once the trainer calls the aligner) end-to-end runs."""
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from peftlab.align import Aligner, build_aligner, check_vocab, fit_linear_map, validate_align_cfg
from peftlab.config import CONF_DIR
from peftlab.data.datasets import collate
from peftlab.loss import token_loss_sum

BASE = OmegaConf.load(CONF_DIR / "align" / "teacher.yaml")


def acfg(**kw):
    return OmegaConf.merge(BASE, {"teacher": "embedded:tiny-llama", **kw})


class FakeLM(torch.nn.Module):
    """Returns fixed logits / hidden states, as a teacher would."""

    def __init__(self, logits=None, hidden=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.logits, self.hidden = logits, hidden

    def forward(self, input_ids, attention_mask, output_hidden_states=False, use_cache=False):
        return SimpleNamespace(logits=self.logits, hidden_states=self.hidden if output_hidden_states else None)


def masked_batch(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 50, (B, T), generator=g)
    labels[0, :3] = -100
    labels[1, :5] = -100
    labels[2, :] = -100  # a sequence with no targets contributes nothing
    labels[1, -1] = -100  # padding
    return {"input_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T, dtype=torch.long),
            "labels": labels}


def compared_positions(labels):
    return [(b, t) for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1) if labels[b, t + 1] != -100]


# ---- closed forms ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kl_on_logits_is_t_squared_forward_kl_over_answer_tokens(T):
    b = masked_batch()
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(3, 7, 11, generator=g) * 3, torch.randn(3, 7, 11, generator=g) * 3
    al = Aligner(FakeLM(logits=zt), acfg(divergence="kl", target="logits", temperature=T), "cpu")
    got = al.loss_sum(SimpleNamespace(logits=zs, hidden_states=None), b)
    want = 0.0
    for bi, t in compared_positions(b["labels"]):
        ps = [math.exp(v / T) for v in zs[bi, t].double().tolist()]
        pt = [math.exp(v / T) for v in zt[bi, t].double().tolist()]
        ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
        want += T ** 2 * sum(q * math.log(q / p) for p, q in zip(ps, pt))
    assert len(compared_positions(b["labels"])) == 5
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_mse_on_hidden_states_through_a_map_averaged_over_layers():
    b = masked_batch()
    g = torch.Generator().manual_seed(2)
    hs = tuple(torch.randn(3, 7, 4, generator=g) for _ in range(3))  # student width 4, 3 hidden states
    ht = tuple(torch.randn(3, 7, 6, generator=g) for _ in range(3))  # teacher width 6
    maps = [torch.randn(6, 4, generator=g) for _ in range(2)]
    al = Aligner(FakeLM(hidden=ht), acfg(divergence="mse", target="hidden", map="lstsq", layers=[1, -1],
                                         teacher_layers=[0, 2]), "cpu", maps=maps)
    got = al.loss_sum(SimpleNamespace(logits=None, hidden_states=hs), b)
    want = 0.0
    for k, (ls, lt) in enumerate([(1, 0), (-1, 2)]):
        for bi, t in compared_positions(b["labels"]):
            d = hs[ls][bi, t].double() - ht[lt][bi, t].double() @ maps[k].double()
            want += (d ** 2).sum().item() / 4
    assert got.item() == pytest.approx(want / 2, rel=1e-5)


def test_cosine_on_embeddings_pools_answer_tokens_and_weighs_sequences_by_their_count():
    b = masked_batch()
    g = torch.Generator().manual_seed(3)
    hs = (torch.randn(3, 7, 5, generator=g),)
    ht = (torch.randn(3, 7, 5, generator=g),)
    al = Aligner(FakeLM(hidden=ht), acfg(divergence="cosine", target="embeddings"), "cpu")
    got = al.loss_sum(SimpleNamespace(logits=None, hidden_states=hs), b)
    want = 0.0
    for bi in range(3):
        ts = [t for bb, t in compared_positions(b["labels"]) if bb == bi]
        if not ts:
            continue
        s = torch.stack([hs[0][bi, t] for t in ts]).double().mean(0)
        t_ = torch.stack([ht[0][bi, t] for t in ts]).double().mean(0)
        want += len(ts) * (1 - (s @ t_).item() / (s.norm() * t_.norm()).item())
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_cosine_and_mse_on_logits_per_token():
    b = masked_batch()
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(3, 7, 9, generator=g), torch.randn(3, 7, 9, generator=g)
    out = SimpleNamespace(logits=zs, hidden_states=None)
    pos = compared_positions(b["labels"])
    mse = Aligner(FakeLM(logits=zt), acfg(divergence="mse"), "cpu").loss_sum(out, b)
    cos = Aligner(FakeLM(logits=zt), acfg(divergence="cosine"), "cpu").loss_sum(out, b)
    assert mse.item() == pytest.approx(sum(((zs[i, t] - zt[i, t]) ** 2).mean().item() for i, t in pos), rel=1e-5)
    assert cos.item() == pytest.approx(sum(1 - torch.dot(zs[i, t], zt[i, t]).item() / (zs[i, t].norm() *
                                                                                       zt[i, t].norm()).item()
                                           for i, t in pos), rel=1e-5)


# ---- the cycle, the map, beta = 0 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("period, realign, active", [
    (10, 3, {7, 8, 9, 17, 18, 19, 27, 28, 29}),
    (4, 1, {3, 7, 11, 15, 19, 23, 27}),
    (5, 5, set(range(30))),
    (5, 0, set()),
    (0, 0, set(range(30))),  # period 0: always
])
def test_schedule_switches_phases_at_exactly_the_configured_steps(period, realign, active):
    al = Aligner(FakeLM(), acfg(period=period, realign_steps=realign), "cpu")
    assert {s for s in range(30) if al.active(s)} == active


def test_least_squares_map_is_exact_on_a_linear_image():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(300, 12, generator=g)
    M = torch.randn(12, 7, generator=g)
    torch.testing.assert_close(fit_linear_map(X, X @ M), M, rtol=1e-4, atol=1e-4)
    # rank-deficient inputs: the minimum-norm solution still reproduces Y exactly
    Xr = X[:, :6] @ torch.randn(6, 12, generator=g)
    Mr = fit_linear_map(Xr, Xr @ M)
    torch.testing.assert_close(Xr @ Mr, Xr @ M, rtol=1e-3, atol=1e-3)


# ---- models ----------------------------------------------------------------------------------------------------------
def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture(scope="module")
def examples(embedded_model_dir, embedded_data_dir):
    from peftlab.data.datasets import tokenize
    from peftlab.models import load_tokenizer

    tok = load_tokenizer(str(embedded_model_dir))
    rows = [json.loads(l) for l in (embedded_data_dir / "train.jsonl").read_text().splitlines()[:24]]
    return tok, [tokenize(f"Q: {r['question']}\nA: ", r["answer"], tok, 96) for r in rows]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, embedded_model_dir):
    """A fake peftlab run folder: run/adapter holds a PEFT LoRA adapter (random B) on the embedded model, named
    by its embedded name, and the tokenizer; returns (folder, the unmerged PEFT model as a student)."""
    from peft import LoraConfig, get_peft_model

    from peftlab.models import load_tokenizer

    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(embedded_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    run = tmp_path_factory.mktemp("teacher_run")
    peft_model.save_pretrained(run / "adapter")
    load_tokenizer(str(embedded_model_dir)).save_pretrained(run / "adapter")
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "embedded:tiny-llama"
    cfg_path.write_text(json.dumps(cfg))
    return run, peft_model


def build(align_cfg, student, tok, examples, **kw):
    cfg = OmegaConf.create({"align": align_cfg, "model": {"trust_remote_code": False}})
    return build_aligner(cfg, student, tok, examples, tok.pad_token_id, "cpu", **kw)


def test_run_folder_teacher_applies_its_adapter(run_folder, examples, embedded_model_dir):
    run, peft_model = run_folder
    tok, exs = examples
    al = build(acfg(teacher=str(run)), load_model(embedded_model_dir), tok, exs)
    b = collate(exs[:4], tok.pad_token_id)
    with torch.no_grad():
        ref = peft_model.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(al.teacher_states(b), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, ref, atol=1e-2)  # the adapter matters
    assert not al.teacher.training and not any(p.requires_grad for p in al.teacher.parameters())


def test_run_folder_with_a_merged_model_loads_that(run_folder, examples, tmp_path, embedded_model_dir):
    run, _ = run_folder
    tok, exs = examples
    fake = tmp_path / "run"
    shutil.copytree(run / "adapter", fake / "adapter")
    cfg = json.loads((fake / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "nowhere")  # would fail: merged/ must be used instead
    (fake / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    merged = load_model(embedded_model_dir)
    with torch.no_grad():
        merged.lm_head.weight.mul_(2)
    merged.save_pretrained(fake / "merged")
    al = build(acfg(teacher=str(fake)), merged, tok, exs)
    b = collate(exs[:2], tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(al.teacher_states(b), merged(**{k: b[k] for k in ("input_ids", "attention_mask")}
                                                                 ).logits)


@pytest.mark.parametrize("divergence, target", [("kl", "logits"), ("mse", "hidden"), ("cosine", "embeddings"),
                                                 ("mse", "embeddings")])
def test_teacher_identical_to_the_student_gives_zero_loss_and_no_extra_gradient(run_folder, examples, divergence,
                                                                                 target):
    """The student is the PEFT model (unmerged), the teacher the same adapter merged from the run folder."""
    run, student = run_folder
    tok, exs = examples
    al = build(acfg(teacher=str(run), divergence=divergence, target=target, layers=[1, -1]), student, tok, exs)
    b = collate(exs[:6], tok.pad_token_id)
    student.eval()
    params = [p for n, p in student.named_parameters() if "lora_" in n]
    out = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                  output_hidden_states=al.needs_hidden_states)
    align = al.loss_sum(out, b)
    task = token_loss_sum(out.logits, b["labels"])
    g_align = torch.autograd.grad(align, params, retain_graph=True)
    g_task = torch.autograd.grad(task, params)
    n_targets = int((b["labels"][:, 1:] != -100).sum())
    assert abs(align.item()) < 1e-6 * n_targets
    norm = lambda gs: torch.sqrt(sum((g.double() ** 2).sum() for g in gs)).item()
    assert norm(g_align) < 1e-4 * norm(g_task)


def test_beta_zero_gives_exactly_no_contribution(run_folder, examples, embedded_model_dir):
    run, _ = run_folder
    tok, exs = examples
    student = load_model(embedded_model_dir)
    b = collate(exs[:6], tok.pad_token_id)
    w = student.model.layers[0].self_attn.q_proj.weight

    def grad_of(fn):
        student.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), w.grad.clone()

    al0 = build(acfg(teacher=str(run), beta=0.0), student, tok, exs)
    al1 = build(acfg(teacher=str(run), beta=0.5), student, tok, exs)
    task = grad_of(lambda: token_loss_sum(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                          b["labels"]))
    dual0 = grad_of(lambda: al0.objective_sum(student, b))
    dual1 = grad_of(lambda: al1.objective_sum(student, b))
    assert torch.equal(task[0], dual0[0]) and torch.equal(task[1], dual0[1])
    assert al1.loss_sum(student(**{k: b[k] for k in ("input_ids", "attention_mask")}), b) > 0
    assert not torch.allclose(task[1], dual1[1])


def test_lstsq_map_fitted_on_a_teacher_equal_to_the_student_is_the_identity(examples, embedded_model_dir):
    """Fitted on the base student whatever its adapters hold, so a resumed run fits the same map."""
    from peftlab.adapters import adapter_layers, apply_adapters

    tok, exs = examples
    student = load_model(embedded_model_dir)
    apply_adapters(student, OmegaConf.create({"target_set": "qv", "lora_target_modules": None, "lora_r": 4,
                                              "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False}),
                   OmegaConf.create({"name": "lora"}))
    with torch.no_grad():
        for layer in adapter_layers(student).values():
            layer.lora_B.normal_(0, 0.5)
    al = build(acfg(divergence="mse", target="hidden", map="lstsq", layers=[1, -1], map_samples=16), student, tok,
               exs)
    for M in al.maps:
        torch.testing.assert_close(M, torch.eye(M.shape[0]), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def wide_teacher_dir(tmp_path_factory, embedded_model_dir):
    """A random Llama of another width with the embedded tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.models import load_tokenizer

    c = LlamaConfig.from_pretrained(embedded_model_dir)
    c.hidden_size, c.intermediate_size, c.num_hidden_layers = 64, 128, 3
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("wide_teacher")
    LlamaForCausalLM(c).save_pretrained(path)
    load_tokenizer(str(embedded_model_dir)).save_pretrained(path)
    return path


def test_other_widths_need_lstsq_which_then_aligns(examples, embedded_model_dir, wide_teacher_dir):
    tok, exs = examples
    student = load_model(embedded_model_dir)
    with pytest.raises(ValueError, match=r"student width 96 and teacher width 64: use align.map=lstsq"):
        build(acfg(teacher=str(wide_teacher_dir), divergence="mse", target="hidden"), student, tok, exs)
    al = build(acfg(teacher=str(wide_teacher_dir), divergence="cosine", target="hidden", map="lstsq",
                    layers=[-1], teacher_layers=[2]), student, tok, exs)
    assert al.maps[0].shape == (64, 96)
    b = collate(exs[:4], tok.pad_token_id)
    loss = al.loss_sum(student(**{k: b[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True), b)
    assert torch.isfinite(loss) and loss > 0
    with pytest.raises(ValueError, match=r"align.teacher_layers \[7\] out of range: the teacher has 4"):
        build(acfg(teacher=str(wide_teacher_dir), divergence="mse", target="hidden", map="lstsq", teacher_layers=[7]),
              student, tok, exs)


def test_a_teacher_with_another_vocabulary_fails_clearly(examples, embedded_model_dir, tmp_path):
    tok, exs = examples
    student = load_model(embedded_model_dir)
    # the same ids plus two tokens: hidden states can be compared, logits cannot
    teacher = load_model(embedded_model_dir)
    ttok = type(tok).from_pretrained(embedded_model_dir)
    ttok.add_tokens(["<extra_a>", "<extra_b>"])
    teacher.resize_token_embeddings(len(ttok))
    teacher.save_pretrained(tmp_path / "t")
    ttok.save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="align.target=logits needs identical vocabularies: student has 512"):
        build(acfg(teacher=str(tmp_path / "t")), student, tok, exs)
    assert build(acfg(teacher=str(tmp_path / "t"), divergence="mse", target="hidden"), student, tok, exs) is not None

    # another id for the student's tokens: nothing can be compared
    sv = {"a": 0, "b": 1, "c": 2}
    fake = lambda v: SimpleNamespace(get_vocab=lambda: v)
    with pytest.raises(ValueError, match=r"cannot read the student's token ids \(1 of 3"):
        check_vocab(acfg(target="hidden"), fake(sv), fake({"a": 0, "b": 1, "c": 5}), None, None)


def test_align_none_builds_nothing():
    assert build_aligner(OmegaConf.create({"align": {"name": "none"}}), None, None, [], 0, "cpu") is None
    assert build_aligner(OmegaConf.create({}), None, None, [], 0, "cpu") is None


@pytest.mark.parametrize("kw, message", [
    ({"name": "student"}, r"unknown align.name 'student'; allowed: \['none', 'teacher'\]"),
    ({"teacher": None}, r"align=teacher needs align.teacher"),
    ({"teacher": "/no/such/run"}, r"align.teacher '/no/such/run' does not exist"),
    ({"divergence": "js"}, r"unknown align.divergence 'js'; allowed: \['kl', 'mse', 'cosine'\]"),
    ({"target": "attention"}, r"unknown align.target 'attention'; allowed: \['logits', 'hidden', 'embeddings'\]"),
    ({"map": "procrustes"}, r"unknown align.map 'procrustes'; allowed: \['identity', 'lstsq'\]"),
    ({"teacher_device": "gpu"}, r"unknown align.teacher_device 'gpu'; allowed: \['same', 'cpu'\]"),
    ({"teacher_dtype": "int8"}, r"unknown align.teacher_dtype 'int8'; allowed: \['same'"),
    ({"target": "hidden"}, r"divergence=kl compares next-token distributions: it needs align.target=logits"),
    ({"map": "lstsq"}, r"use align.map=identity with align.target=logits"),
    ({"temperature": 0}, r"align.temperature must be > 0"),
    ({"beta": -1}, r"align.beta must be >= 0"),
    ({"period": 4, "realign_steps": 5}, r"align.realign_steps \(5\) must be <= align.period \(4\)"),
    ({"period": 2.5}, r"align.period must be an integer >= 0"),
    ({"map_samples": 0}, r"align.map_samples must be an integer >= 1"),
    ({"divergence": "mse", "target": "hidden", "layers": []}, r"align.layers must be a non-empty list"),
    ({"divergence": "mse", "target": "hidden", "teacher_layers": [1, 2]}, r"must pair one teacher layer"),
])
def test_bad_align_configs_fail_before_any_model_loads(kw, message):
    with pytest.raises(ValueError, match=message):
        validate_align_cfg(acfg(**kw))


def test_align_group_composes():
    from test_config import compose_cfg

    assert compose_cfg(["+align=none"]).align.name == "none"
    cfg = compose_cfg(["+align=teacher", "++align.teacher=embedded:tiny-llama", "++align.beta=0.5"])
    validate_align_cfg(cfg.align)
    assert cfg.align.beta == 0.5 and cfg.align.divergence == "kl"


# ---- the teacher-aware gradient init ---------------------------------------------------------------------------------
def test_gradient_estimation_of_the_dual_objective(run_folder, examples, embedded_model_dir):
    """G of task + beta * D is G_task + beta * (autograd of D summed / target tokens); an identical teacher adds ~0."""
    gradient = pytest.importorskip("peftlab.init.gradient")
    import inspect

    if "loss_sum" not in inspect.signature(gradient.estimate_gradient).parameters:
        pytest.skip("estimate_gradient takes no loss_sum")
    from peftlab.adapters import adapter_layers, apply_adapters

    run, _ = run_folder
    tok, exs = examples
    student = load_model(embedded_model_dir)
    peft = OmegaConf.create({"target_set": "qv", "lora_target_modules": None, "lora_r": 4, "lora_alpha": 8,
                             "lora_dropout": 0.0, "use_rslora": False})
    apply_adapters(student, peft, OmegaConf.create({"name": "lora"}))
    layers = adapter_layers(student)
    samples = exs[:8]
    al = build(acfg(teacher=str(run), beta=0.5, divergence="kl", temperature=2.0), student, tok, samples)
    g_task, _, n = gradient.estimate_gradient(student, layers, samples, tok.pad_token_id, 4, progress=False)
    g_dual, _, _ = gradient.estimate_gradient(student, layers, samples, tok.pad_token_id, 4, progress=False,
                                              loss_sum=al.objective_sum)
    # reference: D on the base model by plain autograd, one batch
    base = load_model(embedded_model_dir)
    name = next(iter(layers))
    w = base.get_submodule(name).weight
    b = collate(samples, tok.pad_token_id)
    d = al.loss_sum(base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b)
    (g_d,) = torch.autograd.grad(d, w)
    torch.testing.assert_close(g_dual[name], g_task[name] + 0.5 * g_d / n, rtol=1e-4, atol=1e-6)
    assert (g_dual[name] - g_task[name]).norm() > 1e-3 * g_task[name].norm()


# ---- end to end (needs the trainer's hook) ---------------------------------------------------------------------------
def trainer_has_align():
    import inspect

    import peftlab.train

    return "build_aligner" in inspect.getsource(peftlab.train)


needs_hook = pytest.mark.skipif(not trainer_has_align(), reason="peftlab.train does not call the aligner yet")


ALIGN_TASK = ["dataset_name=tiny"]  # the teacher and its students train on one task


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A short earlier run fine-tuned on the embedded task: the teacher. On `tiny`, the task these tests' thresholds
    were set on (on `inventory` a 40-step teacher is further from its students: the first realignment phase takes
    the alignment loss from 2.28 to 1.59, not below half)."""
    from test_train import run_inproc

    path = tmp_path_factory.mktemp("teacher_e2e")
    run_inproc(path, [*ALIGN_TASK, "train.max_steps=40", "+peft=qkvo", "++peft.lora_r=16"])
    return path


@pytest.mark.slow
@needs_hook
def test_beta_zero_reproduces_the_task_only_run_exactly(tmp_path, teacher_run):
    from test_train import adapter_tensors, run_inproc

    common = ["train.max_steps=12", "+init=gradient", "++init.direction=LoRA-FA", "++init.iters=2"]
    a = run_inproc(tmp_path / "a", common)
    b = run_inproc(tmp_path / "b", [*common, "+align=teacher", f"++align.teacher={teacher_run}", "++align.beta=0.0",
                                    "++align.period=4", "++align.realign_steps=2"])
    ta, tb = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a["final_eval_loss"] == b["final_eval_loss"]


def align_rows(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


@pytest.mark.slow
@needs_hook
def test_alignment_loss_falls_during_realignment_phases(tmp_path, teacher_run):
    """Against a control that only measures D (beta = 0) on the same steps: the aligned student gets closer."""
    from test_train import run_inproc

    cycle = [*ALIGN_TASK, "train.max_steps=40", "+align=teacher", f"++align.teacher={teacher_run}", "++align.period=10",
             "++align.realign_steps=5"]
    run_inproc(tmp_path / "aligned", [*cycle, "++align.beta=0.5"])
    run_inproc(tmp_path / "control", [*cycle, "++align.beta=0.0"])
    rows = align_rows(tmp_path / "aligned")
    assert [r["step"] for r in rows if r["align/active"]] == [s for s in range(1, 41) if (s - 1) % 10 >= 5]
    assert all(("train/align_loss" in r) == bool(r["align/active"]) for r in rows)  # rows count steps from 1

    def phases(rows):
        return [[r["train/align_loss"] for r in rows if r["align/active"] and (r["step"] - 1) // 10 == c]
                for c in range(4)]

    aligned, control = phases(rows), phases(align_rows(tmp_path / "control"))
    mean = lambda p: sum(p) / len(p)
    assert aligned[0][-1] < 0.5 * aligned[0][0], aligned[0]
    assert mean(aligned[-1]) < 0.2 * mean(aligned[0]), aligned
    assert mean(aligned[-1]) < 0.9 * mean(control[-1]), (aligned[-1], control[-1])


@pytest.mark.slow
@needs_hook
def test_two_processes_equal_one_with_a_teacher_aware_init_and_alignment(tmp_path, teacher_run):
    """Sums of D over shards and micro-batches, reduced once: the same run on 1 or 2 processes. (LoRA-One: LoRA-FA's
    inverse square root of a few-sample Sigma amplifies reduction-order rounding beyond this tolerance by itself.)"""
    from test_train import adapter_tensors, run_cli

    over = ["+peft=qv", "++peft.lora_dropout=0", "model.per_device_batch_size=8", "train.max_steps=8",
            "+init=gradient", "++init.direction=LoRA-One", "++init.iters=4", "++init.bsz=2", "+align=teacher",
            f"++align.teacher={teacher_run}", "++align.divergence=mse", "++align.target=hidden",
            "++align.layers=[1,-1]", "++align.map=lstsq", "++align.map_samples=16", "++align.beta=2.0",
            "++align.period=4", "++align.realign_steps=2"]
    one, two = run_cli(tmp_path / "one", over), run_cli(tmp_path / "two", over, nproc=2)
    out1, out2 = one.communicate(timeout=400)[0], two.communicate(timeout=400)[0]
    assert one.returncode == 0, out1
    assert two.returncode == 0, out2
    t1, t2 = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    for k in t1:  # scale-relative: Adam lifts the reduction-order rounding of near-zero gradient entries (an entry
        # 6e-4 off after 8 steps with length-sorted micro-batches); a real difference moves entries by the scale
        torch.testing.assert_close(t1[k], t2[k], rtol=1e-4, atol=1e-3 * float(t1[k].abs().max()))
    r1, r2 = align_rows(tmp_path / "one"), align_rows(tmp_path / "two")
    a1 = [r.get("train/align_loss") for r in r1]
    assert a1 == pytest.approx([r.get("train/align_loss") for r in r2], rel=1e-5)
    assert sum(a is not None for a in a1) == 4
