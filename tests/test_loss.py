"""The chunked answer-token loss equals the plain full-logits loss and its gradient to fp32 rounding, applies the head
only to answer positions in chunks, and falls back where a family post-processes the logits."""
import pytest
import torch
from omegaconf import OmegaConf

from peftlab.adapters import apply_adapters
from peftlab.loss import head_slot, loss_sum, token_loss_sum


def batch(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 14), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[1, 9:] = -100  # padding of a shorter row
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, b, chunk):
    model.zero_grad(set_to_none=True)
    s, _ = loss_sum(model, b, chunk)
    s.backward()
    return s.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_equal(model, b, chunk):
    plain, gp = loss_and_grads(model, b, 0)
    chunked, gc = loss_and_grads(model, b, chunk)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    assert gp.keys() == gc.keys() and gp
    for n in gp:
        torch.testing.assert_close(gc[n], gp[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_chunked_equals_plain_loss_and_gradient_full_model(tiny_llama, chunk):
    for p in tiny_llama.parameters():
        p.requires_grad_(True)
    check_equal(tiny_llama, batch(), chunk)


def test_chunked_equals_plain_with_an_adapted_head_and_tied_gpt2(tiny_llama, tiny_gpt2_dir):
    apply_adapters(tiny_llama, OmegaConf.create({"lora_target_modules": ["q_proj", "v_proj", "lm_head"], "lora_r": 4,
                                                 "lora_alpha": 8, "lora_dropout": 0.0}))
    with torch.no_grad():  # B = 0 at init would leave the adapted head's gradient trivial
        for n, p in tiny_llama.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    from peftlab.adapters import AdapterLayer

    assert isinstance(tiny_llama.get_output_embeddings(), AdapterLayer)
    check_equal(tiny_llama, batch(), 5)
    assert any("lm_head" in n for n, p in tiny_llama.named_parameters() if p.requires_grad)

    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()  # tied input/output embeddings
    assert head_slot(gpt2) is not None
    check_equal(gpt2, batch(), 3)


def test_head_sees_only_answer_positions_in_chunks(tiny_llama):
    b = batch()
    rows = []
    h = tiny_llama.lm_head.register_forward_hook(lambda m, a, o: rows.append(a[0].shape))
    s, _ = loss_sum(tiny_llama, b, 4)
    s.backward()  # recomputes every chunk's logits
    h.remove()
    n_answer = int((b["labels"][:, 1:] != -100).sum())
    assert all(len(r) == 2 and r[0] <= 4 for r in rows)  # never B x T x V: (positions, hidden) of one chunk
    assert sum(r[0] for r in rows) == 2 * n_answer  # forward + backward recomputation, answer positions only


def test_no_answer_tokens_gives_zero_loss_with_a_gradient_for_the_head(tiny_llama):
    for p in tiny_llama.parameters():
        p.requires_grad_(True)
    b = batch()
    b["labels"][:] = -100
    s, _ = loss_sum(tiny_llama, b, 4)
    s.backward()
    assert float(s.detach()) == 0.0
    assert tiny_llama.lm_head.weight.grad is not None and not tiny_llama.lm_head.weight.grad.any()


def test_softcapping_family_falls_back_to_the_plain_loss():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    m = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=16, vocab_size=128,
                                       final_logit_softcapping=30.0)).eval()
    assert head_slot(m) is None
    b = batch()
    s, out = loss_sum(m, b, 4)
    torch.testing.assert_close(s, token_loss_sum(out.logits, b["labels"]))
    assert out.logits.shape == (3, 14, 128)


def test_plain_path_keeps_logits_and_matches_the_closed_form(tiny_llama):
    b = batch()
    s, out = loss_sum(tiny_llama, b, 0)
    logp = torch.log_softmax(out.logits[:, :-1].double(), -1)
    t = b["labels"][:, 1:]
    ref = -sum(logp[i, j, t[i, j]] for i in range(3) for j in range(13) if t[i, j] != -100)
    torch.testing.assert_close(s.double(), ref, rtol=1e-6, atol=1e-6)
