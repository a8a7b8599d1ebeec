"""Test helpers, shared by every test module: tiny random-initialised causal LMs built from configs
(no downloads) — one per architecture family the fast path covers, plus GPT-2 for the generic
path — and a byte-level tokenizer built in memory."""

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


BYTE_TOKENIZER_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def byte_level_tokenizer(chat_template: bool = True):
    """A 259-token byte-level `PreTrainedTokenizerFast` built in memory: <pad>=0, <s>=1, </s>=2, then bytes.

    Every string round-trips, so tiny random models (vocab_size >= 259) can be trained and evaluated
    end to end without hub access. With `chat_template`, a ChatML-like template using <s>/</s> is set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {
        token: index for index, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))
    }
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template:
        tokenizer.chat_template = BYTE_TOKENIZER_CHAT_TEMPLATE
    return tokenizer


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <|endoftext|>, <|im_start|>, <|im_end|>) with a
    ChatML chat template: the shape of SmolLM2's, with no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def save_tiny_llama(folder, seed: int = 0):
    """A random 2-layer Llama + :func:`chatml_byte_tokenizer`, saved as a local HF model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chatml_byte_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_ranks(
    fn,
    world_size: int,
    tmp_path,
    *args,
    timeout_s: float = 120.0,
    group_timeout_s: float = 600.0,
    wait_for=None,
):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` forked processes joined by a gloo
    process group (a file store under ``tmp_path``, collectives timing out after
    ``group_timeout_s``); return each rank's return value in rank order, None for a rank that was
    killed. ``wait_for``: the ranks to wait for (default all); the others are killed once they end. Forked, not spawned: the children inherit the imported torch and transformers (a fresh
    interpreter costs seconds on the shared CI machine). A rank that raises fails the call with its
    traceback; ranks still running after ``timeout_s`` are killed and fail it too.
    """
    import datetime
    import multiprocessing
    import os
    import time
    import traceback
    from pathlib import Path

    import torch.distributed as dist

    folder = Path(tmp_path) / f"ranks-{time.monotonic_ns()}"
    folder.mkdir(parents=True)

    def main(rank):
        try:
            torch.set_num_threads(1)
            dist.init_process_group(
                "gloo",
                rank=rank,
                world_size=world_size,
                init_method=f"file://{folder / 'store'}",
                timeout=datetime.timedelta(seconds=group_timeout_s),
            )
            torch.save(fn(rank, world_size, *args), folder / f"result-{rank}.pt")
            if dist.is_initialized():  # fn may have left the group itself (the CLI does)
                dist.destroy_process_group()
        except BaseException:
            (folder / f"error-{rank}.txt").write_text(traceback.format_exc())
            os._exit(1)
        os._exit(0)

    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=main, args=(rank,), daemon=True) for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    waited = range(world_size) if wait_for is None else wait_for
    for rank in waited:
        processes[rank].join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank in waited if processes[rank].is_alive()]
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, 9)
    errors = [(folder / f"error-{rank}.txt") for rank in range(world_size)]
    failures = [f"rank {rank}:\n{e.read_text()}" for rank, e in enumerate(errors) if e.exists()]
    if failures:
        raise AssertionError("\n".join(failures))
    if hung:
        raise TimeoutError(f"run_ranks: ranks {hung} still running after {timeout_s} s")
    return [
        torch.load(folder / f"result-{rank}.pt", weights_only=False)
        if (folder / f"result-{rank}.pt").exists()
        else None
        for rank in range(world_size)
    ]


def tiny_training_setup(folder, rows):
    """A tiny Llama folder (:func:`save_tiny_llama`), its tokenizer, and ``rows`` written as JSONL and
    encoded for training: (model_dir, tokenizer, encoded examples)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from sdft_fast.data import DEFAULT_TEACHER_TEMPLATE, DataLimits, encode_examples, load_examples

    folder = Path(folder)
    model_dir = save_tiny_llama(folder / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    encoded = encode_examples(
        load_examples(folder / "data.jsonl"),
        tokenizer,
        limits=DataLimits(max_prompt_tokens=128, max_teacher_prompt_tokens=512, max_completion_tokens=64),
        teacher_template=DEFAULT_TEACHER_TEMPLATE,
    )
    return model_dir, tokenizer, encoded
