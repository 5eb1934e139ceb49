"""The run contract: every group composes and resolves; every invalid setting and every bad data file fails before
the model loads, with a message naming the key (or the file and line), the value and what is allowed."""
import json

import pytest
from omegaconf import OmegaConf

from peftlab.config import CONF_DIR, compose_config, group_options, resolve_config
from peftlab.schema import ConfigError

def compose_cfg(overrides=(), run_dir="/tmp/unused"):
    """The config run_exp.py would get for these overrides (other test modules import it)."""
    return compose_config(overrides, run_dir)


SEED_OVERRIDES = ["++dataset_name=meta_math", "++model.epochs=1", "++model.eval_epochs=1", "+init=gradient",
                  "++init.direction=LoRA-FA", "++init.weight=stable", "++init.stable_gamma=128", "+peft=qv",
                  "++peft.lora_r=8", "++peft.use_rslora=True", "++peft.lora_alpha=16", "++wandb.name=x",
                  "++wandb.project=lorafa", "++init.iters=8"]


def test_default_composes_with_fallback_groups():
    cfg = resolve_config(compose_cfg())
    assert cfg.model.name == "embedded:tiny-llama" and cfg.method.name == "lora"
    assert cfg.init.name == "default" and cfg.peft.target_set == "qv" and cfg.dataset.name == "inventory"
    assert cfg.align.name == "none" and OmegaConf.is_readonly(cfg)


@pytest.mark.parametrize("group", ["model", "dataset", "peft", "init", "method", "align"])
def test_every_option_of_every_group_composes(group):
    for option in group_options(group):
        if group == "dataset":
            overrides = [f"dataset_name={option}"]
        elif group == "align" and option == "teacher":
            overrides = ["+align=teacher", "++align.teacher=embedded:tiny-llama"]
        else:
            overrides = [f"{'+' if group in ('init', 'peft', 'align') else ''}{group}={option}"]
        cfg = resolve_config(compose_cfg(overrides))
        if group == "peft":
            assert cfg.peft.target_set == option
        elif group != "model":  # a model's name is its hub name
            assert cfg[group].name == option


def test_yaml_defaults_equal_the_schema_defaults():
    """conf/<group>/<name>.yaml and the schema dataclass hold the same keys and defaults (one contract)."""
    from peftlab.adapters import get_method
    from peftlab.align import ALIGNS
    from peftlab.config import DatasetConfig, ModelConfig, PeftConfig
    from peftlab.init import get_init
    from peftlab.schema import defaults_of

    def same(yaml_path, cls, keys_only=False):
        y = OmegaConf.to_container(OmegaConf.load(yaml_path))
        d = defaults_of(cls)
        if "name" in d:  # a method without options of its own shares MethodOptions: its name is the file's
            d["name"] = yaml_path.stem
        assert set(y) == set(d), f"{yaml_path}: keys differ from {cls.__name__}: {sorted(set(y) ^ set(d))}"
        if not keys_only:
            diff = {k: (y[k], d[k]) for k in y if y[k] != d[k]}
            assert not diff, f"{yaml_path}: defaults differ from {cls.__name__} (yaml, schema): {diff}"

    for name in group_options("method"):
        same(CONF_DIR / "method" / f"{name}.yaml", get_method(name).options)
    for name in group_options("init"):
        same(CONF_DIR / "init" / f"{name}.yaml", get_init(name).options)
    for name in group_options("align"):
        same(CONF_DIR / "align" / f"{name}.yaml", ALIGNS[name])
    for name in group_options("model"):
        same(CONF_DIR / "model" / f"{name}.yaml", ModelConfig, keys_only=True)
    for name in group_options("dataset"):
        same(CONF_DIR / "dataset" / f"{name}.yaml", DatasetConfig, keys_only=True)
    for name in group_options("peft"):
        same(CONF_DIR / "peft" / f"{name}.yaml", PeftConfig, keys_only=True)


def test_seed_command_composes_and_weight_is_scale():
    cfg = resolve_config(compose_cfg(SEED_OVERRIDES))
    assert cfg.dataset.name == "meta_math" and cfg.dataset.query_field == "query"
    assert cfg.init.scale == "stable" and "weight" not in cfg.init and cfg.init.iters == 8
    assert cfg.peft.lora_r == 8 and cfg.peft.use_rslora is True


def test_dataset_field_overrides_apply_on_top_of_the_selected_file():
    cfg = resolve_config(compose_cfg(["dataset_name=gsm8k", "++dataset.path=/data/gsm8k.jsonl"]))
    assert cfg.dataset.path == "/data/gsm8k.jsonl" and cfg.dataset.query_field == "question"


def test_target_list_is_a_plain_list_so_every_pattern_is_checked():
    cfg = resolve_config(compose_cfg(["+peft=qv", "++peft.lora_target_modules=[q_proj,typo]"]))
    assert isinstance(OmegaConf.to_container(cfg.peft)["lora_target_modules"], list)


TEACHER = ["+align=teacher", "++align.teacher=embedded:tiny-llama"]
GRAD = ["+init=gradient"]
# (overrides, text the message must contain: the key, or the key and the allowed values)
BAD = [
    # model
    (["model.lr=-1"], "model.lr = -1"), (["model.lr=abc"], "model.lr = 'abc'"), (["model.lr=0"], "model.lr"),
    (["model.lr=nan"], "model.lr"), (["model.epochs=-1"], "model.epochs"), (["model.epochs=0"], "model.epochs"),
    (["model.eval_epochs=-1"], "model.eval_epochs"), (["model.warmup=-0.1"], "model.warmup"),
    (["model.warmup=2.5"], "whole number"), (["model.per_device_batch_size=0"], "model.per_device_batch_size"),
    (["model.real_batch_size=30"], "must be a multiple of model.per_device_batch_size"),
    (["model.max_length=1"], "model.max_length"), (["model.weight_decay=-0.1"], "model.weight_decay"),
    (["model.prec_reg=-1"], "model.prec_reg"), (["model.dtype=float64"], "model.dtype = 'float64': allowed"),
    (["model.bf16=maybe"], "model.bf16 = 'maybe': must be true or false"), (["model.saving=2"], "model.saving"),
    (["++model.lrr=1"], "unknown key model.lrr = 1: model has"), (["model.per_device_batch_size=2.5"], "an integer"),
    # dataset
    (["dataset_name=nope"], "dataset_name = 'nope': allowed: ["), (["++dataset.eval_samples=-1"], "dataset.eval_samples"),
    (["++dataset.max_train_samples=0"], "dataset.max_train_samples"),
    (['++dataset.prompt="Q: {question}"'], "dataset.prompt"), (['++dataset.prompt="no query"'], "must contain {query}"),
    (["++dataset.name=gsm8k"], "dataset.name = 'gsm8k': is set by dataset_name"),
    (["++dataset.query=x"], "unknown key dataset.query = 'x'"),
    # peft
    (["+peft=qv", "++peft.lora_r=0"], "peft.lora_r = 0: must be an integer >= 1"),
    (["++peft.lora_r=2.5"], "peft.lora_r = 2.5"), (["++peft.lora_dropout=1.0"], "peft.lora_dropout"),
    (["++peft.lora_dropout=-0.1"], "peft.lora_dropout"), (["++peft.lora_alpha=0"], "peft.lora_alpha"),
    (["++peft.use_rslora=yes"], "peft.use_rslora"), (["++peft.target_set=qk"], "peft.target_set = 'qk': allowed"),
    (["++peft.lora_target_modules=[]"], "peft.lora_target_modules"),
    (['++peft.lora_target_modules="(q"'], "not a valid regex"), (["++peft.rank=4"], "unknown key peft.rank"),
    # init
    (["++init.direction=LoRA-GA"], "it is an option of init=gradient (+init=gradient)"),
    (["+init=default", "++init.name=nope"], "init.name = 'nope': allowed: ['default', 'gaussian'"),
    (GRAD + ["++init.direction=LoRA-XX"], "init.direction = 'LoRA-XX': allowed"),
    (GRAD + ["++init.bsz=0"], "init.bsz"), (GRAD + ["++init.iters=1.5"], "init.iters"),
    (GRAD + ["++init.stable_gamma=0"], "init.stable_gamma"), (GRAD + ["++init.scale=big"], "init.scale"),
    (GRAD + ["++init.dtype=float64"], "init.dtype"), (GRAD + ["++init.rank=auto"], "init.direction=LoRA-FA"),
    (GRAD + ["++init.rank=4"], "init.rank"), (GRAD + ["++init.energy=1.5"], "init.energy"),
    (GRAD + ["++init.damping=-1"], "init.damping"), (GRAD + ["++init.mode=svd"], "init.mode"),
    (GRAD + ["++init.metric=maybe"], "init.metric"), (["+init=pissa", "++init.niter=-1"], "init.niter"),
    (["+init=default", "++init.weight=stable", "++init.scale=gd"], "conflicts with init.scale"),
    (["+init=pissa", "method=geolora"], "init.name = 'pissa': sets LoRA factors"),
    (GRAD + ["method=rotational_pissa"], "init.name = 'gradient': sets LoRA factors"),
    (["+init=gaussian", "method=geolora"], "init.name = 'gaussian'"),
    # method
    (["++method.name=nope"], "method.name = 'nope': allowed: ["), (["++method.mu=1"], "it is an option of method=gplora"),
    (["method=gplora", "method.mu=banana"], "method.mu = 'banana'"), (["method=gplora", "method.mu=-1"], "method.mu"),
    (["method=gplora", "method.every=0"], "method.every"), (["method=gplora", "method.moments=forget"], "method.moments"),
    (["method=gplora", "method.guard=2"], "method.guard"), (["method=gplora", "method.eps=-1"], "method.eps"),
    (["method=gplora", "method.warmup_steps=-1"], "method.warmup_steps"),
    (["method=geolora", "method.lr=-1"], "method.lr = -1"), (["method=geolora", "method.tau=-1"], "method.tau"),
    (["method=geolora", "method.truncation_strategy=x"], "method.truncation_strategy"),
    (["method=geolora", "method.truncation_strategy=global_budget"], "method.budget"),
    (["method=geolora", "method.rmin=16"], "method.rmin = 16: must be <= the initial rank 8"),
    (["method=geolora", "method.rank_init=8", "method.rmax=4"], "method.rmax"),
    (["method=geolora", "method.use_small_matrix_optimizer=lion"], "method.use_small_matrix_optimizer"),
    (["method=geolora", "method.alpha=-1"], "method.alpha"),
    (["method=rotational_pissa", "method.way=way9"], "method.way = 'way9': allowed: ['way0'"),
    (["method=rotational_pissa", "method.low_rank_r=0"], "method.low_rank_r"),
    (["method=rotational_pissa", "method.merge_every=0"], "method.merge_every"),
    (["method=rotational_pissa", "method.svd_niter=-2"], "method.svd_niter"),
    (["method=rotational_pissa", "method.orthogonality_reg_weight=-1"], "method.orthogonality_reg_weight"),
    (["method=rotational_pissa", "++method.typo=1"], "unknown key method.typo"),
    (["method=rotational_pissa", "method.init_identity=2"], "method.init_identity"),
    # align
    (["+align=teacher"], "align=teacher needs align.teacher"),
    (TEACHER + ["++align.divergence=js"], "align.divergence"), (TEACHER + ["++align.temperature=0"], "align.temperature"),
    (TEACHER + ["++align.beta=-1"], "align.beta"), (TEACHER + ["++align.period=-1"], "align.period"),
    (TEACHER + ["++align.target=hidden"], "align.target=logits"),
    (TEACHER + ["++align.period=2", "++align.realign_steps=3"], "align.realign_steps"),
    (TEACHER + ["++align.layers=[a]"], "align.layers[0]"), (["+align=none", "++align.beta=1"], "unknown key align.beta"),
    # train
    (["train.max_grad_norm=-1"], "train.max_grad_norm = -1"), (["train.max_steps=0"], "train.max_steps"),
    (["train.save_every=-1"], "train.save_every"), (["train.log_every=0"], "train.log_every"),
    (["train.scheduler=step"], "train.scheduler = 'step': allowed: ['linear', 'cosine', 'constant']"),
    (["train.optimizer=sgd"], "train.optimizer"), (["train.adam_betas=[0.9]"], "train.adam_betas"),
    (["train.adam_betas=[0.9,1.5]"], "train.adam_betas"), (["train.adam_eps=0"], "train.adam_eps"),
    (["train.fsdp=ddp"], "train.fsdp"), (["++train.lr=1"], "unknown key train.lr"),
    # wandb and the top level
    (["wandb.mode=sometimes"], "wandb.mode = 'sometimes': allowed"), (["++wandb.team=x"], "unknown key wandb.team"),
    (["wandb.tags=x"], "wandb.tags"), (["seed=-1"], "seed = -1"), (["seed=abc"], "seed = 'abc'"),
    (["resume=maybe"], "resume = 'maybe'"), (["++sed=1"], "unknown top-level key sed"),
]


def test_the_table_is_large():
    assert len(BAD) >= 60


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model or a tokenizer fails the test: the error must come before."""
    import peftlab.train as T

    def loaded(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the error")

    monkeypatch.setattr(T, "load_model_and_tokenizer", loaded)
    monkeypatch.setattr(T, "load_tokenizer", loaded)
    monkeypatch.setattr(T, "resolve_model_path", loaded)


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_fails_before_anything_loads(no_loading, tmp_path, overrides, message):
    from peftlab.train import setup

    with pytest.raises(ConfigError) as e:
        setup(compose_cfg(overrides, run_dir=tmp_path / "run"))
    assert message in str(e.value), str(e.value)


def test_hydra_refuses_a_group_option_that_does_not_exist():
    with pytest.raises(Exception, match="nope"):
        compose_cfg(["method=nope"])


# ---- bad data: named file and line, before the model loads -----------------------------------------------------------
def _rows(n):
    return [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(n)]


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


BAD_DATA = [
    ("empty.jsonl", b"", "the file has no rows"),
    ("blank.jsonl", b"\n\n", "the file has no rows"),
    ("broken.jsonl", (_jsonl(_rows(2)) + '{"question": "x", "answer": \n' + _jsonl(_rows(40))).encode(),
     "broken.jsonl line 3: not valid JSON"),
    ("latin1.jsonl", _jsonl(_rows(1)).encode() + '{"question": "caf\xe9", "answer": "#### 1"}\n'.encode("latin-1"),
     "latin1.jsonl line 2: not UTF-8"),
    ("text.parquet", b"question,answer\n1,2\n", "text.parquet: not a readable parquet file"),
    ("missing.jsonl", (_jsonl(_rows(1)) + json.dumps({"question": "x"}) + "\n" + _jsonl(_rows(40))).encode(),
     "missing.jsonl line 2: no field 'answer'"),
    ("number.jsonl", (_jsonl(_rows(3)) + json.dumps({"question": "x", "answer": 5}) + "\n").encode(),
     "number.jsonl line 4: field 'answer' is int"),
    ("list.jsonl", b"[1, 2]\n", "list.jsonl: item 0 of the array is int, expected a JSON object"),
    ("nested.jsonl", (_jsonl(_rows(1)) + "[1, 2]\n").encode(), "nested.jsonl line 2: a JSON list"),
    ("array.json", json.dumps(_rows(2) + ["oops"]).encode(), "array.json: item 2 of the array is str"),
    ("broken_array.json", b'[{"question": "a",\n "answer": }]', "broken_array.json line 2: not valid JSON"),
    ("few.jsonl", _jsonl(_rows(5)).encode(), "fewer than one global batch"),
]


@pytest.mark.parametrize("name, content, message", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_fails_naming_file_and_line_before_the_model_loads(monkeypatch, tmp_path,
                                                                    embedded_model_dir, name, content, message):
    import peftlab.train as T
    from peftlab.data.datasets import DataError

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))  # no tokenised cache from another case
    monkeypatch.setattr(T, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    path = tmp_path / name
    path.write_bytes(content)
    cfg = compose_cfg(["dataset_name=gsm8k", f"++dataset.path={path}", "++dataset.eval_samples=2",
                       f"model.name={embedded_model_dir}"], run_dir=tmp_path / "run")
    with pytest.raises(DataError) as e:
        T.setup(cfg)
    assert message in str(e.value), str(e.value)


def test_missing_data_file_is_named(monkeypatch, tmp_path, embedded_model_dir):
    import peftlab.train as T

    monkeypatch.setattr(T, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = compose_cfg(["dataset_name=gsm8k", f"++dataset.path={tmp_path}/nope.jsonl",
                       f"model.name={embedded_model_dir}"], run_dir=tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        T.setup(cfg)


def test_a_target_that_matches_nothing_fails_before_the_weights_load(monkeypatch, tmp_path,
                                                                      embedded_model_dir):
    import peftlab.train as T

    monkeypatch.setattr(T, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = compose_cfg(["+peft=qv", "++peft.lora_target_modules=[q_proj,typo]", f"model.name={embedded_model_dir}"],
                      run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"peft.lora_target_modules.*\['typo'\] match no"):
        T.setup(cfg)


def test_sweep_check_validates_every_line(tmp_path):
    from peftlab.sweep import check_lines

    ok, bad = check_lines(["seed=1", "model.lr=-1", "method=gplora method.every=0"])
    assert ok == 1 and len(bad) == 2
    assert "model.lr = -1" in bad[0][1] and "method.every" in bad[1][1]
