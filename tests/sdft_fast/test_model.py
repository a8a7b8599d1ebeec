"""SelfDistillModel: packed one-pass == separate forwards, student-only autograd, teachers,
PEFT round trip, generation, bad input. Tiny random models built from configs, CPU, fp32."""

import warnings

import pytest
import torch
from helpers import SMALL, VOCAB
from helpers import gpt2 as _gpt2
from helpers import llama as _llama
from helpers import mistral as _mistral
from helpers import qwen2 as _qwen2
from helpers import qwen3 as _qwen3
from helpers import random_ids as _ids
from helpers import randomize_adapters as _randomize_adapters
from transformers import (
    MistralConfig,
    MistralForCausalLM,
)

from sdft_fast import prefix_tree
from sdft_fast.lora import LoraConfig, lora_route
from sdft_fast.loss import self_distill_loss
from sdft_fast.model import PairBatch, PairHidden, SelfDistillModel


def _mixed_batch(seed=0):
    # Mixed lengths, including a one-token completion and an empty one (contributes no rows).
    gen = torch.Generator().manual_seed(seed)
    student = [_ids(gen, n) for n in (5, 2, 7, 3)]
    teacher = [_ids(gen, n) for n in (11, 9, 14, 6)]
    completions = [_ids(gen, n) for n in (4, 6, 1, 0)]
    return PairBatch(student, teacher, completions)


def _separate_hidden(model: SelfDistillModel, prompts, completions, route, grad=True) -> torch.Tensor:
    """Naive reference: one HF backbone forward per sequence, the given LoRA route."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        if not completion:
            continue
        ids = torch.tensor([prompt + completion[:-1]])
        with lora_route(route), torch.set_grad_enabled(grad):
            hidden = model.hf_model.base_model(input_ids=ids).last_hidden_state[0]  # [T, D]
        rows.append(hidden[len(prompt) - 1 : len(prompt) - 1 + len(completion)])
    return torch.cat(rows)


@pytest.mark.parametrize(
    "make, teacher",
    [
        (_llama, "ema"),
        (_llama, "base"),
        (_llama, "live"),
        (_qwen2, "ema"),
        (_qwen3, "live"),
        (_mistral, "ema"),
        (_gpt2, "ema"),
        (_gpt2, "base"),
    ],
    ids=[
        "llama-ema",
        "llama-base",
        "llama-live",
        "qwen2-ema",
        "qwen3-live",
        "mistral-ema",
        "gpt2-generic-ema",
        "gpt2-generic-base",
    ],
)
def test_forward_pair_equals_separate_forwards(make, teacher):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SelfDistillModel(make(), lora=LoraConfig(r=4, alpha=8), teacher=teacher)
    assert model.fast_path == (make is not _gpt2)
    _randomize_adapters(model)
    batch = _mixed_batch()
    out = model.forward_pair(batch)
    assert isinstance(out, PairHidden)
    n = sum(len(c) for c in batch.completions)
    assert out.student_hidden.shape == out.teacher_hidden.shape == (n, 32)
    assert out.student_hidden.requires_grad and not out.teacher_hidden.requires_grad
    assert out.sequence_ids.tolist() == [0] * 4 + [1] * 6 + [2]
    assert out.completion_positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0]
    assert out.targets.tolist() == [t for c in batch.completions for t in c]
    teacher_route = {"ema": "teacher", "base": "none", "live": "student"}[teacher]
    expected_student = _separate_hidden(model, batch.student_prompts, batch.completions, "student")
    expected_teacher = _separate_hidden(
        model, batch.teacher_prompts, batch.completions, teacher_route, grad=False
    )
    torch.testing.assert_close(out.student_hidden, expected_student, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.teacher_hidden, expected_teacher, rtol=1e-5, atol=1e-5)
    # the routes really differ (otherwise the checks above prove nothing about routing)
    other = _separate_hidden(
        model, batch.teacher_prompts, batch.completions, "none" if teacher != "base" else "student", False
    )
    assert (out.teacher_hidden - other).abs().max() > 1e-3


def test_forward_student_and_base_teacher_match_adapters_disabled():
    model = SelfDistillModel(_llama(), lora=LoraConfig(r=4, alpha=8), teacher="base")
    _randomize_adapters(model)
    batch = _mixed_batch(1)
    pair = model.forward_pair(batch)
    student_only = model.forward_student(batch.student_prompts, batch.completions)
    assert student_only.teacher_hidden is None
    torch.testing.assert_close(student_only.student_hidden, pair.student_hidden, rtol=1e-6, atol=1e-6)
    with model.adapters_disabled():
        base_rows = model.forward_student(batch.teacher_prompts, batch.completions).student_hidden
    torch.testing.assert_close(pair.teacher_hidden, base_rows.detach(), rtol=1e-5, atol=1e-5)


def _naive_two_pass_loss(model, batch, teacher_route):
    student = _separate_hidden(model, batch.student_prompts, batch.completions, "student")
    teacher = _separate_hidden(model, batch.teacher_prompts, batch.completions, teacher_route, grad=False)
    seq = torch.tensor([b for b, c in enumerate(batch.completions) for _ in c])
    return self_distill_loss(student, teacher, model.lm_head_weight, alpha=0.5, sequence_ids=seq)


@pytest.mark.parametrize("make", [_llama, _qwen3, _gpt2], ids=["llama", "qwen3", "gpt2-generic"])
def test_lora_gradients_equal_naive_two_pass(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SelfDistillModel(make(), lora=LoraConfig(r=4, alpha=8), teacher="ema")
    _randomize_adapters(model)
    batch = _mixed_batch(2)
    out = model.forward_pair(batch)
    loss = self_distill_loss(
        out.student_hidden, out.teacher_hidden, model.lm_head_weight, alpha=0.5, sequence_ids=out.sequence_ids
    )
    params = model.trainable_parameters()
    grads = torch.autograd.grad(loss, params)
    naive = _naive_two_pass_loss(model, batch, "teacher")
    naive_grads = torch.autograd.grad(naive, params)
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    for g, ng in zip(grads, naive_grads):
        torch.testing.assert_close(g, ng, rtol=1e-4, atol=1e-6)
    assert max(g.abs().max() for g in grads) > 0


def _saved_bytes(fn, exclude) -> int:
    """Bytes of distinct storages autograd saves for backward during fn(), parameters excluded."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(nbytes for ptr, nbytes in storages.items() if ptr not in exclude), out


@pytest.mark.parametrize("lora", [LoraConfig(r=4, alpha=8), None], ids=["lora", "full-ft"])
def test_teacher_tokens_save_nothing_for_backward(lora):
    model = SelfDistillModel(_llama(), lora=lora, teacher="live")
    model.hf_model.train()
    gen = torch.Generator().manual_seed(3)
    student = [_ids(gen, 8) for _ in range(3)]
    completions = [_ids(gen, 12) for _ in range(3)]
    teacher = [_ids(gen, 4 * 20 - 12) for _ in range(3)]  # teacher sequences 4x the student's 20 tokens
    exclude = {p.untyped_storage().data_ptr() for p in model.hf_model.parameters()}
    exclude |= {b.untyped_storage().data_ptr() for b in model.hf_model.buffers()}
    student_only, _ = _saved_bytes(lambda: model.forward_student(student, completions), exclude)
    pair, out = _saved_bytes(lambda: model.forward_pair(PairBatch(student, teacher, completions)), exclude)
    assert student_only > 0
    assert pair <= 1.10 * student_only, (pair, student_only)
    # the generic two-pass path keeps the same property (teacher pass under no_grad)
    assert out.teacher_hidden is not None and not out.teacher_hidden.requires_grad


def test_ema_update_moves_teacher_toward_student():
    model = SelfDistillModel(_llama(), lora=LoraConfig(r=4, alpha=8), teacher="ema")
    batch = _mixed_batch(4)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.lora_B.normal_(std=0.2)  # the student moved; the teacher slot still holds B = 0
    before = model.forward_pair(batch)
    with model.adapters_disabled():
        base = model.forward_student(batch.teacher_prompts, batch.completions).student_hidden.detach()
    torch.testing.assert_close(before.teacher_hidden, base, rtol=1e-5, atol=1e-5)
    state = model.teacher_state_dict()
    model.ema_update(1.0)  # teacher <- student
    after = model.forward_pair(batch)
    live = model.forward_student(batch.teacher_prompts, batch.completions).student_hidden.detach()
    torch.testing.assert_close(after.teacher_hidden, live, rtol=1e-5, atol=1e-5)
    model.load_teacher_state_dict(state)  # checkpoint restore brings the old teacher back
    torch.testing.assert_close(model.forward_pair(batch).teacher_hidden, base, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ema rate"):
        model.ema_update(1.5)
    with pytest.raises(RuntimeError, match="teacher='ema'"):
        SelfDistillModel(_llama(), lora=LoraConfig(r=2), teacher="base").ema_update(0.1)


@pytest.mark.parametrize("teacher", ["base", "ema"])
def test_merging_the_adapter_keeps_the_student_and_makes_it_the_base_teacher(teacher):
    """After merge_adapter_into_base the student computes what it did, its adapter is zero, and the
    base route (the 'base' teacher, or the restarted EMA slot) computes the same function."""
    model = SelfDistillModel(_llama(), lora=LoraConfig(r=4, alpha=8), teacher=teacher)
    _randomize_adapters(model)
    batch = _mixed_batch(2)
    before = model.forward_student(batch.teacher_prompts, batch.completions).student_hidden.detach()
    model.merge_adapter_into_base()
    assert all(not layer.lora_B.any() for layer in model.lora_layers.values())
    after = model.forward_student(batch.teacher_prompts, batch.completions).student_hidden.detach()
    # float32: the merged weight rounds W + s B A once; hidden states of O(1) agree to ~1e-6.
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.forward_pair(batch).teacher_hidden, before, rtol=1e-5, atol=1e-5)
    with model.adapters_disabled():
        base = model.forward_student(batch.teacher_prompts, batch.completions).student_hidden
    torch.testing.assert_close(base, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="full fine-tuning has no adapter"):
        SelfDistillModel(_llama(), lora=None, teacher="base").merge_adapter_into_base()


def test_full_finetuning_ema_teacher_packed_path():
    model = SelfDistillModel(_llama(), lora=None, teacher="ema")
    assert model.lora_layers == {} and len(model.trainable_parameters()) == len(
        list(model.hf_model.parameters())
    )
    with torch.no_grad():
        for p in model.hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the student drifts from its initial (teacher) copy
    batch = _mixed_batch(5)
    out = model.forward_pair(batch)
    teacher_params = model.teacher_state_dict()
    reference = _llama()  # same seed = the teacher's weights
    ref_model = SelfDistillModel(reference, lora=None, teacher="live")
    ref_model.load_trainable_state_dict(teacher_params)
    expected = ref_model.forward_student(batch.teacher_prompts, batch.completions).student_hidden
    torch.testing.assert_close(out.teacher_hidden, expected.detach(), rtol=1e-5, atol=1e-5)
    expected_student = _separate_hidden(model, batch.student_prompts, batch.completions, "student")
    torch.testing.assert_close(out.student_hidden, expected_student, rtol=1e-5, atol=1e-5)
    loss = out.student_hidden.square().mean()
    loss.backward()
    assert model.hf_model.model.embed_tokens.weight.grad is not None


def _logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([ids])).logits


def test_trainable_state_dict_round_trip():
    model = SelfDistillModel(_llama(), lora=LoraConfig(r=2, alpha=4))
    _randomize_adapters(model)
    state = model.trainable_state_dict()
    other = SelfDistillModel(_llama(), lora=LoraConfig(r=2, alpha=4))
    other.load_trainable_state_dict(state)
    for p, q in zip(model.trainable_parameters(), other.trainable_parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="missing keys"):
        other.load_trainable_state_dict({})


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_greedy_generation_equals_hf_generate(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SelfDistillModel(make(), lora=LoraConfig(r=4, alpha=8))
    _randomize_adapters(model)
    prompts = [[5, 9, 2, 14, 3], [7, 1], [11, 12, 13]]
    ours = model.generate(prompts, max_new_tokens=6, do_sample=False, pad_token_id=0)
    pad = 0
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with lora_route("student"):
        hf = model.hf_model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=pad,
        )
    assert ours == hf[:, width:].tolist()


def test_sampling_is_seeded_and_stops_at_eos():
    model = SelfDistillModel(_llama(), lora=LoraConfig(r=4, alpha=8))
    _randomize_adapters(model)
    prompts = [[5, 9, 2], [7, 1, 4, 4]]
    kwargs = dict(max_new_tokens=12, temperature=1.5, top_p=0.9, top_k=20)
    first = model.generate(prompts, seed=123, **kwargs)
    assert first == model.generate(prompts, seed=123, **kwargs)
    assert first != model.generate(prompts, seed=7, **kwargs)
    assert all(len(c) == 12 for c in first)
    # make a token from the first sample the EOS: the completion stops right after it
    eos = first[0][3]
    stopped = model.generate(prompts, seed=123, eos_token_id=[eos, VOCAB - 1], **kwargs)
    assert stopped[0] == first[0][: first[0].index(eos) + 1]
    # top_k=1 is greedy whatever the temperature
    greedy = model.generate(prompts, max_new_tokens=5, do_sample=False)
    assert model.generate(prompts, max_new_tokens=5, top_k=1, temperature=3.0, seed=1) == greedy


def test_bad_input_raises_clear_errors():
    model = SelfDistillModel(_llama(max_position_embeddings=64), lora=LoraConfig(r=2))
    with pytest.raises(ValueError, match="3 teacher_prompts vs 2 completions"):
        model.forward_pair(PairBatch([[1], [2]], [[1], [2], [3]], [[4], [5]]))
    with pytest.raises(ValueError, match="1 student_prompts vs 2 completions"):
        model.forward_pair(PairBatch([[1]], [[1], [2]], [[4], [5]]))
    with pytest.raises(ValueError, match=r"student_prompts\[1\] is empty"):
        model.forward_pair(PairBatch([[1], []], [[1], [2]], [[4], [5]]))
    with pytest.raises(ValueError, match=r"completions\[0\]\[1\] = 96 is outside the vocabulary"):
        model.forward_pair(PairBatch([[1], [2]], [[1], [2]], [[4, VOCAB], [5]]))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model.forward_pair(PairBatch([[1] * 40], [[1]], [[4] * 30]))
    with pytest.raises(TypeError, match="PairBatch"):
        model.forward_pair(([[1]], [[1]], [[1]]))
    with pytest.raises(ValueError, match="teacher must be one of"):
        SelfDistillModel(_llama(), teacher="frozen")
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1, 2]], max_new_tokens=2, top_p=0.0)


def test_sliding_window_longer_than_sequences_falls_back_with_equal_results():
    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, head_dim=8, sliding_window=4, **SMALL)).eval()
    model = SelfDistillModel(hf, lora=LoraConfig(r=2, alpha=4), teacher="base")
    assert model.fast_path
    _randomize_adapters(model)
    batch = _mixed_batch(6)
    with pytest.warns(UserWarning, match="sliding_window=4"):
        out = model.forward_pair(batch)
    expected = _separate_hidden(model, batch.student_prompts, batch.completions, "student")
    torch.testing.assert_close(out.student_hidden, expected, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_falls_back_and_says_so_once():
    with pytest.warns(UserWarning, match="fast path not used.*gpt2") as record:
        model = SelfDistillModel(_gpt2(), lora=LoraConfig(r=2))
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning on use
        out = model.forward_pair(_mixed_batch())
    assert not model.fast_path and out.student_hidden.requires_grad


# -- prefix sharing (fast path) ---------------------------------------------------------------------


def _shared_prefix_batch(seed=0):
    """Sequences that share prefixes every way the trainer produces them: one system prompt for all,
    one prompt with several rollouts, two identical rollouts, a rollout that repeats the start of
    another, an unrelated sequence, a prompt shorter than the shared prefix of the others."""
    gen = torch.Generator().manual_seed(seed)
    system = _ids(gen, 10)  # the chat template's system block: shared by every prompt below
    question_a, question_b = _ids(gen, 5), _ids(gen, 4)
    rollout = _ids(gen, 6)
    student = [system + question_a] * 3 + [system + question_b, _ids(gen, 3), system[:6]]
    completions = [rollout, rollout, rollout[:3] + _ids(gen, 4), _ids(gen, 5), _ids(gen, 2), _ids(gen, 3)]
    # The teacher's prompt: the same template with a demonstration before the question.
    demo = _ids(gen, 7)
    teacher = [system + demo + question_a] * 3 + [system + demo + question_b, _ids(gen, 4), system[:6] + demo]
    return PairBatch(student, teacher, completions)


@pytest.mark.parametrize("make, teacher", [(_llama, "ema"), (_qwen2, "base"), (_qwen3, "live")])
def test_prefix_sharing_equals_unshared_forward_and_gradients(make, teacher, monkeypatch):
    monkeypatch.setattr(prefix_tree, "MIN_SHARED_PREFIX", 3)
    model = SelfDistillModel(make(), lora=LoraConfig(r=4, alpha=8), teacher=teacher)
    _randomize_adapters(model)
    batch = _shared_prefix_batch()
    results = {}
    for sharing in (True, False):
        model.prefix_sharing = sharing
        for p in model.trainable_parameters():
            p.grad = None
        out = model.forward_pair(batch)
        loss = self_distill_loss(
            out.student_hidden,
            out.teacher_hidden,
            model.lm_head_weight,
            alpha=0.5,
            sequence_ids=out.sequence_ids,
            reduction="sequence_mean",
            impl="reference",
        )
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.trainable_parameters()])
        results[sharing] = (out, loss.detach(), grads)
    (shared, shared_loss, shared_grads), (plain, plain_loss, plain_grads) = results[True], results[False]
    torch.testing.assert_close(shared.student_hidden, plain.student_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.teacher_hidden, plain.teacher_hidden, rtol=1e-5, atol=1e-5)
    assert torch.equal(shared.sequence_ids, plain.sequence_ids) and torch.equal(shared.targets, plain.targets)
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.norm() > 0
    assert (shared_grads - plain_grads).norm() <= 1e-5 * plain_grads.norm()
    # and both equal the naive per-sequence HF forwards
    reference = _separate_hidden(model, batch.student_prompts, batch.completions, "student")
    torch.testing.assert_close(shared.student_hidden, reference, rtol=1e-4, atol=1e-4)


def test_prefix_sharing_computes_shared_rows_once(monkeypatch):
    """With 4 rollouts of one prompt, the packed student stream holds the prompt once."""
    import sdft_fast.packed_forward as packed_forward_module

    model = SelfDistillModel(_llama(), lora=LoraConfig(r=4, alpha=8))
    gen = torch.Generator().manual_seed(3)
    prompt = _ids(gen, prefix_tree.MIN_SHARED_PREFIX + 4)
    completions = [_ids(gen, 5) for _ in range(4)]
    seen = []
    original = packed_forward_module.prefix_tree_attention

    def spy(q, k, v, plan, scaling):
        seen.append(q.shape[0])
        return original(q, k, v, plan, scaling)

    monkeypatch.setattr(packed_forward_module, "prefix_tree_attention", spy)
    model.forward_student([prompt] * 4, completions)
    rows_shared = seen[0]
    model.prefix_sharing = False
    seen.clear()
    model.forward_student([prompt] * 4, completions)
    assert rows_shared == len(prompt) + 4 * 4  # the prompt once, then 4 completions minus their last token
    assert seen[0] == 4 * (len(prompt) + 4)


def test_gradient_checkpointing_keeps_less_and_gives_the_same_gradients():
    """gradient_checkpointing on the packed path: the same loss and gradients (the recompute runs
    the student rows through the same layer; fp32 summation order may differ, hence the bound of a
    few fp32 roundings), and fewer bytes saved for backward (each layer keeps its input only)."""
    gen = torch.Generator().manual_seed(0)
    batch = PairBatch(
        [_ids(gen, 7), _ids(gen, 9)], [_ids(gen, 15), _ids(gen, 12)], [_ids(gen, 5), _ids(gen, 6)]
    )
    results = {}
    for checkpointing in (False, True):
        model = SelfDistillModel(_llama(), lora=LoraConfig(r=4, alpha=8), teacher="ema")
        _randomize_adapters(model)
        model.gradient_checkpointing = checkpointing
        saved = [0]

        def pack(tensor, saved=saved):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model.forward_pair(batch)
            loss = self_distill_loss(
                out.student_hidden, out.teacher_hidden, model.lm_head_weight, sequence_ids=out.sequence_ids
            )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[checkpointing] = (loss.detach(), grads, saved[0])
    (loss_off, grads_off, saved_off), (loss_on, grads_on, saved_on) = results[False], results[True]
    assert torch.equal(loss_on, loss_off)  # the forward is the same computation
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == 2 * 7 * 2
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved_on < 0.6 * saved_off, (saved_on, saved_off)
