"""Shared fixtures: tiny random models saved with save_pretrained and loaded back by path; no network."""
from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random tiny Llama (fp32) saved to disk; load it with from_pretrained(path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The project's own pretrained tiny Llama + tokenizer (built once, cached in $PEFTLAB_CACHE)."""
    from peftlab.data.embedded import ensure_model

    return ensure_model()


@pytest.fixture(scope="session")
def embedded_data_dir():
    """train/validation/test .jsonl of the embedded GSM8K-style task (question, answer)."""
    from peftlab.data.embedded import ensure_dataset

    return ensure_dataset()
