"""Tiny random-initialised causal LMs built from configs (no downloads), shared by the model and
sampler tests: one per architecture family the fast path covers, plus GPT-2 for the generic path."""

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 96
SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def llama(seed=0, **extra):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **SMALL, **extra)).eval()


def qwen2(seed=0):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, **SMALL)).eval()  # q/k/v biases


def qwen3(seed=0):
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, head_dim=8, **SMALL)).eval()  # q_norm/k_norm


def mistral(seed=0, sliding_window=None):
    torch.manual_seed(seed)
    return MistralForCausalLM(
        MistralConfig(vocab_size=VOCAB, head_dim=8, sliding_window=sliding_window, **SMALL)
    ).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)
    config.bos_token_id = config.eos_token_id = VOCAB - 1
    return GPT2LMHeadModel(config).eval()


def randomize_adapters(model, seed=1):
    """LoRA B starts at 0; give both slots distinct non-zero values so every route (and the merged
    delta of the sampler) is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)
            if layer.has_teacher_slot:
                layer.ema_A.copy_(torch.randn(layer.ema_A.shape, generator=gen) * 0.2)
                layer.ema_B.copy_(torch.randn(layer.ema_B.shape, generator=gen) * 0.2)


def random_ids(gen, n):
    return torch.randint(0, VOCAB - 1, (n,), generator=gen).tolist()
