"""sdft_fast.fast_sampler.fast_generate: same tokens as HF generate / SelfDistillModel.generate, logits equal
to a teacher-forced HF forward, EOS handling, seeded sampling, no leaked merged weights, support check.
Tiny random models built from configs, CPU."""

import warnings

import pytest
import torch
from helpers import VOCAB
from helpers import gpt2 as _gpt2
from helpers import llama as _llama
from helpers import mistral as _mistral
from helpers import qwen2 as _qwen2
from helpers import qwen3 as _qwen3
from helpers import random_ids as _ids
from helpers import randomize_adapters as _randomize_adapters

import sdft_fast.fast_sampler as fast_sampler
from sdft_fast import sampling
from sdft_fast.fast_sampler import fast_generate, supports_fast_generate
from sdft_fast.lora import ROUTE_STUDENT, LoraConfig, lora_route
from sdft_fast.model import SelfDistillModel


def _model(make, lora=True, **kwargs) -> SelfDistillModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SelfDistillModel(make(**kwargs), lora=LoraConfig(r=4, alpha=8) if lora else None)
    if lora:
        _randomize_adapters(model)
    return model


def _prompt_set() -> list[list[int]]:
    """Different lengths, a long common prefix, duplicates, a prompt equal to the common prefix + 1."""
    gen = torch.Generator().manual_seed(5)
    prefix = _ids(gen, 9)
    a, b = prefix + _ids(gen, 4), prefix + _ids(gen, 1)
    return [a, prefix + _ids(gen, 7), b, a, prefix + _ids(gen, 2), a]


def _hf_greedy(model: SelfDistillModel, prompts, max_new_tokens, pad=0, eos=None) -> list[list[int]]:
    """HF generate, left padded, student adapter on: the reference for greedy decoding."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with lora_route("student"):
        out = model.hf_model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0 if eos is not None else max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
    return out[:, width:].tolist()


def _reference_generate(model: SelfDistillModel, prompts, **kwargs) -> list[list[int]]:
    """SelfDistillModel.generate on its HF-forward path (its dispatch to fast_generate switched off)."""
    saved = model.__dict__.get("fast_sampling", True)
    model.fast_sampling = False
    try:
        return model.generate(prompts, **kwargs)
    finally:
        model.fast_sampling = saved


def _teacher_forced_logits(model: SelfDistillModel, prompt, completion) -> torch.Tensor:
    """[len(completion), V] fp32 logits of one unpadded HF forward over prompt + completion."""
    with torch.no_grad(), lora_route("student"):
        logits = model.hf_model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)]


def _run(model, prompts, **kwargs):
    """fast_generate, plus the fp32 logits [B, V] each step sampled from (recorded at pick_next)."""
    seen_logits = []
    pick_next = sampling.pick_next

    def recording_pick_next(logits, *args):
        seen_logits.append(logits.clone())
        return pick_next(logits, *args)

    args = dict(
        max_new_tokens=6,
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_token_id=None,
        pad_token_id=None,
        seed=None,
    )
    args.update(kwargs)
    sampling.pick_next = recording_pick_next
    try:
        return fast_generate(model, prompts, **args), seen_logits
    finally:
        sampling.pick_next = pick_next


# ------------------------------------------------------------------------------ greedy == HF
@pytest.mark.parametrize(
    "make", [_llama, _qwen2, _qwen3, _mistral], ids=["llama", "qwen2", "qwen3", "mistral"]
)
def test_greedy_equals_hf_generate_and_logits_equal_teacher_forced(make):
    model = _model(make)
    prompts = _prompt_set()
    ours, step_logits = _run(model, prompts, max_new_tokens=7)
    assert ours == _hf_greedy(model, prompts, 7)
    assert ours == _reference_generate(model, prompts, max_new_tokens=7, do_sample=False)
    assert len(step_logits) == 7
    for b, (prompt, completion) in enumerate(zip(prompts, ours)):
        ref = _teacher_forced_logits(model, prompt, completion)  # [7, V]
        got = torch.stack([step[b] for step in step_logits])  # [7, V]
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_full_fine_tuning_uses_the_current_weights():
    model = _model(_llama, lora=False)
    with torch.no_grad():  # a "training step": the fast sampler must see the new weights
        for p in model.hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = _prompt_set()
    ours, step_logits = _run(model, prompts, max_new_tokens=5)
    assert ours == _hf_greedy(model, prompts, 5)
    for b, (prompt, completion) in enumerate(zip(prompts, ours)):
        got = torch.stack([step[b] for step in step_logits])
        torch.testing.assert_close(
            got, _teacher_forced_logits(model, prompt, completion), atol=2e-5, rtol=1e-5
        )


def test_lora_delta_matters_and_merged_weights_do_not_leak():
    model = _model(_qwen2)
    prompts = _prompt_set()
    params_before = {n: p.detach().clone() for n, p in model.hf_model.named_parameters()}
    with torch.no_grad(), lora_route("student"):
        forward_before = model.hf_model(input_ids=torch.tensor([prompts[0]])).logits
    ours, step_logits = _run(model, prompts, max_new_tokens=5)
    for n, p in model.hf_model.named_parameters():
        assert torch.equal(p, params_before[n]), n
    with torch.no_grad(), lora_route("student"):
        assert torch.equal(model.hf_model(input_ids=torch.tensor([prompts[0]])).logits, forward_before)
    # The student delta is really applied: the base model's logits are far away.
    with torch.no_grad(), lora_route("none"):
        base_logits = model.hf_model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    assert (step_logits[0][0] - base_logits).abs().max() > 1e-2
    # A later change of the adapter shows up in the next call (nothing cached across calls).
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.lora_B.mul_(-1.0)
    again, again_logits = _run(model, prompts, max_new_tokens=5)
    assert again == _hf_greedy(model, prompts, 5)
    assert (again_logits[0] - step_logits[0]).abs().max() > 1e-2


def test_merged_weights_equal_base_plus_student_delta():
    model = _model(_llama)
    layers = fast_sampler._merge_layers(model, batch_hint=2, pack=False)
    attn = model.hf_model.model.layers[1].self_attn
    expected = torch.cat(
        [m.base_weight + m.delta_weight(ROUTE_STUDENT) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    )
    torch.testing.assert_close(layers[1].qkv.weight, expected, atol=1e-6, rtol=1e-6)
    mlp = model.hf_model.model.layers[0].mlp
    expected = torch.cat(
        [m.base_weight + m.delta_weight(ROUTE_STUDENT) for m in (mlp.gate_proj, mlp.up_proj)]
    )
    torch.testing.assert_close(layers[0].gate_up.weight, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pack", [False, True], ids=["F.linear", "onednn-packed"])
def test_both_linear_backends_give_the_same_result(pack, monkeypatch):
    model = _model(_qwen3)
    prompts = _prompt_set()
    original_init = fast_sampler._Decoder.__init__
    built = []

    def init(self, model, rows, slots, pack=True, _force=pack):
        original_init(self, model, rows, slots, pack=_force)
        built.append(self)

    monkeypatch.setattr(fast_sampler._Decoder, "__init__", init)
    ours, step_logits = _run(model, prompts, max_new_tokens=4)
    # the packed path really runs where this CPU has oneDNN (the dev box does)
    expect_packed = pack and fast_sampler._onednn_available(torch.zeros(1))
    assert (built[0].layers[0].qkv.packed is not None) == expect_packed
    assert (built[0].lm_head.packed is not None) == expect_packed
    assert ours == _hf_greedy(model, prompts, 4)
    for b, (prompt, completion) in enumerate(zip(prompts, ours)):
        got = torch.stack([step[b] for step in step_logits])
        torch.testing.assert_close(
            got, _teacher_forced_logits(model, prompt, completion), atol=2e-5, rtol=1e-5
        )


def test_no_shared_prefix_and_single_prompt():
    model = _model(_llama)
    prompts = [[3, 4, 5, 6], [9], [70, 71, 72, 73, 74, 75, 76, 77, 78]]
    assert _run(model, prompts, max_new_tokens=5)[0] == _hf_greedy(model, prompts, 5)
    assert _run(model, [[1, 2, 3]], max_new_tokens=5)[0] == _hf_greedy(model, [[1, 2, 3]], 5)
    # all rows the same prompt (several rollouts of one prompt)
    same = [[8, 7, 6, 5]] * 4
    assert _run(model, same, max_new_tokens=5)[0] == _hf_greedy(model, same, 5)


# ------------------------------------------------------------------------------ contract
def test_max_new_tokens_zero_and_one():
    model = _model(_llama)
    prompts = _prompt_set()
    assert fast_generate(model, prompts, max_new_tokens=0) == [[] for _ in prompts]
    assert fast_generate(model, [], max_new_tokens=3) == []
    one = fast_generate(model, prompts, max_new_tokens=1, do_sample=False)
    assert one == [c[:1] for c in _hf_greedy(model, prompts, 3)]
    assert all(len(c) == 1 for c in one)


def test_eos_stops_a_row_and_nothing_follows_it():
    model = _model(_llama)
    prompts = _prompt_set()
    free = fast_generate(model, prompts, max_new_tokens=8, do_sample=False)
    # an EOS that row 1 produces at some step but other rows do not produce first
    eos = free[1][2]
    ours, step_logits = _run(model, prompts, max_new_tokens=8, eos_token_id=[eos, VOCAB - 1], pad_token_id=0)
    for row_free, row in zip(free, ours):
        expected = row_free[: row_free.index(eos) + 1] if eos in row_free else row_free
        assert row == expected
    assert ours[1][-1] == eos and len(ours[1]) == 3
    assert ours == _reference_generate(
        model, prompts, max_new_tokens=8, do_sample=False, eos_token_id=[eos, VOCAB - 1]
    )
    # rows still running keep the right logits after finished rows left the batch
    for b, (prompt, completion) in enumerate(zip(prompts, ours)):
        got = torch.stack([step_logits[j][b] for j in range(len(completion))])
        torch.testing.assert_close(
            got, _teacher_forced_logits(model, prompt, completion), atol=2e-5, rtol=1e-5
        )
    # every row stops: the loop ends early, the EOS is included
    eos_all = {row[0] for row in free}
    stopped = fast_generate(model, prompts, max_new_tokens=8, do_sample=False, eos_token_id=sorted(eos_all))
    assert all(len(row) == 1 for row in stopped)


def test_seeded_sampling_is_deterministic_and_matches_generate():
    model = _model(_llama)
    prompts = _prompt_set()
    kwargs = dict(max_new_tokens=12, temperature=1.5, top_p=0.9, top_k=20)
    first = fast_generate(model, prompts, seed=123, **kwargs)
    assert first == fast_generate(model, prompts, seed=123, **kwargs)
    assert first != fast_generate(model, prompts, seed=7, **kwargs)
    assert all(len(c) == 12 for c in first)
    # Logits agree with the HF path to ~1e-6 on this model and the draw is one exponential per
    # vocabulary entry whatever the values, so the same seed gives the same tokens.
    assert first == _reference_generate(model, prompts, seed=123, **kwargs)
    eos = first[0][3]
    stopped = fast_generate(model, prompts, seed=123, eos_token_id=[eos, VOCAB - 1], **kwargs)
    assert stopped == _reference_generate(model, prompts, seed=123, eos_token_id=[eos, VOCAB - 1], **kwargs)
    assert stopped[0] == first[0][: first[0].index(eos) + 1]
    # plain temperature-1 sampling as the trainer uses it
    plain = dict(max_new_tokens=10, temperature=1.0)
    assert fast_generate(model, prompts, seed=9, **plain) == _reference_generate(
        model, prompts, seed=9, **plain
    )


def test_reference_is_the_hf_path(monkeypatch):
    # The comparisons above must not compare fast_generate with itself through generate's dispatch.
    model = _model(_llama)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference went through the fast sampler")

    import sdft_fast.model as model_module

    monkeypatch.setattr(model_module, "fast_generate", refuse)
    monkeypatch.setattr(fast_sampler, "fast_generate", refuse)
    assert len(_reference_generate(model, [[1, 2, 3]], max_new_tokens=3, seed=0)[0]) == 3
    assert model.__dict__.get("fast_sampling", True) is True  # restored


def test_unseeded_sampling_varies():
    model = _model(_llama)
    outs = {tuple(map(tuple, fast_generate(model, [[1, 2, 3]] * 3, max_new_tokens=10))) for _ in range(3)}
    assert len(outs) > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_tracks_fp32(dtype):
    model = _model(_llama)
    prompts = _prompt_set()
    reference = _model(_llama)  # same seeds: same weights in fp32
    model.hf_model.to(dtype)
    ours, step_logits = _run(model, prompts, max_new_tokens=4)
    assert all(len(c) == 4 and all(0 <= t < VOCAB for t in c) for c in ours)
    assert all(step.dtype == torch.float32 for step in step_logits)
    for b, (prompt, completion) in enumerate(zip(prompts, ours)):
        got = torch.stack([step[b] for step in step_logits])
        ref = _teacher_forced_logits(reference, prompt, completion)
        assert (got - ref).abs().max() < 0.1  # half-precision rounding, not a wrong model
    sampled = fast_generate(model, prompts, max_new_tokens=4, seed=3)
    assert sampled == fast_generate(model, prompts, max_new_tokens=4, seed=3)


def test_validation_matches_generate():
    model = _model(_llama)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fast_generate(model, [[1, 2]], max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        fast_generate(model, [[1, 2]], max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        fast_generate(model, [[1, 2]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="empty"):
        fast_generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fast_generate(model, [[1, VOCAB]], max_new_tokens=2)


# ------------------------------------------------------------------------------ support check
def test_supports_fast_generate():
    assert supports_fast_generate(_model(_llama)) == (True, "")
    assert supports_fast_generate(_model(_qwen3, lora=False)) == (True, "")

    gpt2 = _model(_gpt2)
    ok, reason = supports_fast_generate(gpt2)
    assert not ok and "Llama-family" in reason
    with pytest.raises(NotImplementedError, match="Llama-family"):
        fast_generate(gpt2, [[1, 2]], max_new_tokens=2)

    dynamic = _model(_llama, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    ok, reason = supports_fast_generate(dynamic)
    assert not ok and "dynamic" in reason

    windowed = _model(_mistral, sliding_window=16)
    assert supports_fast_generate(windowed, max_len=16) == (True, "")
    ok, reason = supports_fast_generate(windowed, max_len=17)
    assert not ok and "sliding_window=16" in reason
    assert not supports_fast_generate(windowed)[0]  # a window and no length: cannot tell
    with pytest.raises(NotImplementedError, match="sliding_window"):
        fast_generate(windowed, [[1] * 10], max_new_tokens=8)
    # within the window it is the plain model
    prompts = [[1, 2, 3, 4], [5, 6]]
    assert fast_generate(windowed, prompts, max_new_tokens=6, do_sample=False) == _hf_greedy(
        windowed, prompts, 6
    )


# ------------------------------------------------------------------------------ the teacher's weights
def _hf_greedy_route(model: SelfDistillModel, prompt, max_new_tokens, route) -> list[int]:
    """Greedy tokens of one unpadded HF forward per step under a LoRA route (the reference)."""
    ids = list(prompt)
    with torch.no_grad(), lora_route(route):
        for _ in range(max_new_tokens):
            ids.append(int(model.hf_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("teacher,route", [("ema", "teacher"), ("base", "none"), ("live", "student")])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_policy_teacher_samples_with_the_teachers_weights(teacher, route, fast):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SelfDistillModel(_llama(), lora=LoraConfig(r=4, alpha=8), teacher=teacher)
    _randomize_adapters(model)
    model.fast_sampling = fast
    prompts = _prompt_set()
    ours = model.generate(prompts, max_new_tokens=5, do_sample=False, policy="teacher")
    assert ours == [_hf_greedy_route(model, p, 5, route) for p in prompts]
    student = model.generate(prompts, max_new_tokens=5, do_sample=False)
    assert student == [_hf_greedy_route(model, p, 5, "student") for p in prompts]
    if teacher != "live":  # the two policies really differ on these random adapters
        assert ours != student


def test_policy_teacher_full_fine_tuning_uses_the_base_copy_and_restores_the_weights():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SelfDistillModel(_llama(), lora=None, teacher="base")
    base = SelfDistillModel(_llama(), lora=None, teacher="live")  # same seed: the start weights
    with torch.no_grad():
        for p in model.hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trained = {n: p.detach().clone() for n, p in model.hf_model.named_parameters()}
    prompts = _prompt_set()
    ours = model.generate(prompts, max_new_tokens=5, do_sample=False, policy="teacher")
    assert ours == base.generate(prompts, max_new_tokens=5, do_sample=False)
    for n, p in model.hf_model.named_parameters():
        assert torch.equal(p, trained[n]), n
    with pytest.raises(ValueError, match="policy"):
        model.generate(prompts, max_new_tokens=2, policy="base")
