"""A causal LM as backbone + head: the split, the plain-head probe, and the README's plain
``transformers.Trainer`` example's loss against the full-logit formula."""

import pytest
import torch
from helpers import VOCAB, gpt2, llama, qwen2
from transformers import Gemma2Config, Gemma2ForCausalLM

from sdft_fast import self_distill_loss
from sdft_fast.integrations.causal_lm import causal_lm_parts, last_hidden_states, plain_linear_head


@pytest.mark.parametrize("build", [llama, qwen2, gpt2])
def test_logits_are_the_head_over_the_backbone(build):
    model = build()
    parts = causal_lm_parts(model)
    ids = torch.randint(0, VOCAB - 1, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    logits = model(input_ids=ids, attention_mask=mask).logits
    hidden = last_hidden_states(parts, ids, mask)
    torch.testing.assert_close(torch.nn.functional.linear(hidden, parts.weight, parts.bias), logits)
    assert plain_linear_head(model, parts)


def test_soft_capped_logits_are_not_a_plain_head():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=0.5,
    )
    model = Gemma2ForCausalLM(config).eval()
    assert not plain_linear_head(model, causal_lm_parts(model))


def test_an_adapted_head_is_not_split():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert causal_lm_parts(model) is None
    plain = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert causal_lm_parts(plain) is not None and plain_linear_head(plain, causal_lm_parts(plain))


def test_readme_trainer_example_equals_the_full_logit_formula():
    student, teacher = llama(seed=0), qwen2(seed=1)  # different hidden sizes would work too
    ids = torch.randint(0, VOCAB - 1, (2, 7))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = -100
    s_parts, t_parts = causal_lm_parts(student), causal_lm_parts(teacher)
    hidden_s = s_parts.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    with torch.no_grad():
        hidden_t = t_parts.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    loss_mask = labels[:, 1:] != -100
    ours = self_distill_loss(
        hidden_s,
        hidden_t,
        s_parts.weight,
        s_parts.bias,
        teacher_weight=t_parts.weight,
        teacher_bias=t_parts.bias,
        alpha=0.5,
        loss_mask=loss_mask,
        reduction="token_mean",
    )
    log_s = torch.log_softmax(student(input_ids=ids).logits[:, :-1].double(), -1)
    log_t = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].double(), -1)
    log_m = torch.logaddexp(log_s + torch.log(torch.tensor(0.5)), log_t + torch.log(torch.tensor(0.5)))
    jsd = 0.5 * (log_t.exp() * (log_t - log_m)).sum(-1) + 0.5 * (log_s.exp() * (log_s - log_m)).sum(-1)
    torch.testing.assert_close(ours.double(), jsd[loss_mask].mean().detach(), rtol=1e-5, atol=1e-7)
