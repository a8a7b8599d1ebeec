"""Answer matching, greedy accuracy with a fake generator, HF generation, retention probes, KL drift."""

import copy

import pytest
import torch
from helpers import byte_level_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from sdft_fast.data import Example, encode_examples, encode_prompt, load_examples
from sdft_fast.eval import (
    HFGenerator,
    ReferenceLogprobs,
    answer_matches,
    completion_logits,
    drift_from_reference,
    evaluate_accuracy,
    kl_from_reference,
    normalize_text,
    reference_logprobs,
    reply_correct,
    retention_probes,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny GEMMs gain nothing from threads, and on a busy 2-core machine OpenMP's spinning workers
    make each tiny forward ~20x slower; restore the setting for the rest of the session."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=264,
        max_position_embeddings=512,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("The capital of France is Paris.", ["Paris"], True),
        ("paris", "PARIS", True),
        ("It is  Ysolde\n Kerrigan!", ["ysolde kerrigan"], True),
        ("Parisian food", ["Paris"], False),  # whole words only
        ("The answer is 112.", ["12"], False),
        ("The answer is 12.", ["12"], True),
        ("It is 3,450 meters long.", ["3450"], True),  # thousands separators dropped
        ("It is 3450 meters long.", ["3,450"], True),
        ("Corvina 7 is a satellite", ["Corvina-7"], True),  # punctuation -> space on both sides
        ("No idea.", ["Velmora", "Kerrigan"], False),
        ("Kerrigan, I think", ["Velmora", "Kerrigan"], True),
        ("Café au lait", ["CAFÉ"], True),
        ("", ["x"], False),
    ],
)
def test_answer_matches(prediction, answers, expected):
    assert answer_matches(prediction, answers) is expected


def test_answer_matches_rejects_empty_answer():
    assert normalize_text("  Hello,   World! ") == "hello world"
    with pytest.raises(ValueError, match="empty"):
        answer_matches("anything", ["?!"])


class FakeGenerator:
    """Answers from a table keyed by the prompt text; records how it was called."""

    def __init__(self, tokenizer, answers_by_prompt):
        self.tokenizer = tokenizer
        self.answers_by_prompt = answers_by_prompt
        self.calls = []

    def generate(
        self, prompts, *, max_new_tokens, do_sample=True, eos_token_id=None, pad_token_id=None, **kwargs
    ):
        self.calls.append({"batch": len(prompts), "do_sample": do_sample, "max_new_tokens": max_new_tokens})
        stop = (
            eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
        )  # int or list: the contract
        completions = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt)
            answer = next((a for key, a in self.answers_by_prompt.items() if key in text), "I don't know")
            completions.append(
                self.tokenizer.encode(answer, add_special_tokens=False)[:max_new_tokens] + [stop]
            )
        return completions


def test_evaluate_accuracy_with_fake_generator(tokenizer):
    examples = [
        Example(
            "Who is mayor of Velmora?", "Ysolde Kerrigan is mayor.", ["Ysolde Kerrigan", "Kerrigan"], row=1
        ),
        Example("Capital of France?", "Paris.", ["Paris"], row=2, meta={"kind": "probe"}),
        Example("What is 2+2?", "4", ["4", "four"], row=3),
    ]
    fake = FakeGenerator(
        tokenizer, {"Velmora": "It is Mr. Kerrigan.", "France": "Lyon, I believe.", "2+2": "Four!"}
    )
    result = evaluate_accuracy(fake, tokenizer, examples, max_new_tokens=20, batch_size=2)
    assert result["n"] == 3 and result["correct"] == 2
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert [r["correct"] for r in result["records"]] == [True, False, True]
    assert result["records"][1]["prediction"] == "Lyon, I believe."  # EOS stripped when decoding
    assert result["records"][1]["meta"] == {"kind": "probe"} and result["records"][2]["row"] == 3
    assert [c["batch"] for c in fake.calls] == [2, 1]
    assert all(c["do_sample"] is False and c["max_new_tokens"] == 20 for c in fake.calls)


@pytest.mark.parametrize(
    "prediction, answers, pattern, expected",
    [
        ('{"answer": "Bern"}', None, r'^\s*\{\s*"answer"\s*:\s*"[^"]*"\s*\}', True),
        ('Sure! {"answer": "Bern"}', None, r'^\s*\{\s*"answer"', False),  # the format must come first
        ('{"answer": "Bern"}', ["Bern"], r'^\s*\{"answer"', True),  # both criteria hold
        ('{"answer": "Zurich"}', ["Bern"], r'^\s*\{"answer"', False),  # format right, answer wrong
        ("It is Bern.", ["Bern"], r'^\s*\{"answer"', False),  # answer right, format wrong
        ("It is Bern.", ["Bern"], None, True),
        ('{"answer":\n"x"}', None, r'\{"answer":.*"x"', True),  # "." matches newlines
    ],
)
def test_reply_correct_needs_every_criterion_the_row_gives(prediction, answers, pattern, expected):
    import re

    compiled = None if pattern is None else re.compile(pattern, flags=re.DOTALL)
    assert reply_correct(prediction, answers, compiled) is expected


def test_evaluate_accuracy_scores_pattern_rows(tokenizer):
    """A skill row (format only, the pattern in the row's meta as loaded from JSONL) next to a fact row."""
    rows = load_examples(
        [
            {"prompt": "Capital of Peru? Reply in JSON.", "pattern": '^\\{"answer": "[^"]*"\\}$'},
            {"prompt": "Capital of Chile? Reply in JSON.", "pattern": '^\\{"answer": "[^"]*"\\}$'},
            {"prompt": "Capital of Chile?", "answer": ["Santiago"]},
        ],
        require_demonstration=False,
    )
    fake = FakeGenerator(
        tokenizer,
        {"Peru? Reply": '{"answer": "Lima"}', "Chile? Reply": "Santiago, in JSON", "Chile?": "Santiago."},
    )
    result = evaluate_accuracy(fake, tokenizer, rows)
    assert [r["correct"] for r in result["records"]] == [True, False, True]


def test_evaluate_accuracy_teacher_view_sees_the_demonstration(tokenizer):
    # The fake only knows the answer when the demonstration is in its prompt.
    example = Example("Who won the Zephrin Prize?", "Odalys Fenwright won it.", ["Fenwright"], row=1)
    fake = FakeGenerator(tokenizer, {"Odalys Fenwright won it": "Fenwright."})
    assert evaluate_accuracy(fake, tokenizer, [example])["accuracy"] == 0.0
    assert evaluate_accuracy(fake, tokenizer, [example], view="teacher")["accuracy"] == 1.0
    # Pre-encoded examples pick the matching ids.
    (encoded,) = encode_examples([example], tokenizer)
    assert evaluate_accuracy(fake, tokenizer, [encoded], view="teacher")["accuracy"] == 1.0
    assert evaluate_accuracy(fake, tokenizer, [encoded], view="student")["accuracy"] == 0.0


def test_evaluate_accuracy_rejects_bad_arguments(tokenizer):
    fake = FakeGenerator(tokenizer, {})
    with pytest.raises(ValueError, match=r"f\.jsonl, row 4, field 'answer': .*needs an answer or a pattern"):
        evaluate_accuracy(fake, tokenizer, [Example("q", "d", None, row=4, source="f.jsonl")])
    bad_pattern = Example("q", "d", None, row=5, source="f.jsonl", meta={"pattern": "{(unclosed"})
    with pytest.raises(
        ValueError, match=r"f\.jsonl, row 5, field 'pattern': is not a valid regular expression"
    ):
        evaluate_accuracy(fake, tokenizer, [bad_pattern])
    assert fake.calls == []  # nothing decoded before the rows were checked
    with pytest.raises(ValueError, match="view"):
        evaluate_accuracy(fake, tokenizer, [Example("q", "d", ["a"])], view="both")
    with pytest.raises(TypeError, match="generate"):
        evaluate_accuracy(object(), tokenizer, [Example("q", "d", ["a"])])


def greedy_reference(model, prompt, max_new_tokens, eos_id):
    """Token-by-token argmax without a cache: the oracle for HFGenerator."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token == eos_id:
                break
    return out


def test_hf_generator_greedy_matches_argmax_and_left_padding(tiny_model, tokenizer):
    prompts = [encode_prompt(tokenizer, "Hi"), encode_prompt(tokenizer, "A much longer question here?")]
    generator = HFGenerator(tiny_model)
    batched = generator.generate(prompts, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0)
    for prompt, completion in zip(prompts, batched):
        assert completion == greedy_reference(tiny_model, prompt, 6, eos_id=2)
    sampled_a = generator.generate(prompts, max_new_tokens=5, do_sample=True, eos_token_id=2, seed=3)
    sampled_b = generator.generate(prompts, max_new_tokens=5, do_sample=True, eos_token_id=2, seed=3)
    assert sampled_a == sampled_b and all(1 <= len(c) <= 5 for c in sampled_a)


def test_hf_generator_stops_each_row_at_its_stop_token(tiny_model, tokenizer):
    prompts = [encode_prompt(tokenizer, "Hi"), encode_prompt(tokenizer, "A much longer question here?")]
    free = HFGenerator(tiny_model).generate(prompts, max_new_tokens=6, do_sample=False)
    assert all(len(c) == 6 for c in free)
    stop = free[0][2]  # row 0 stops at its third token; row 1 at its own first occurrence, if any
    stopped = HFGenerator(tiny_model).generate(
        prompts, max_new_tokens=6, do_sample=False, eos_token_id=[stop]
    )
    for row, completion in zip(free, stopped):
        cut = row.index(stop) + 1 if stop in row else len(row)
        assert completion == row[:cut]


def test_retention_probes_are_well_formed():
    probes = retention_probes()
    assert 35 <= len(probes) <= 45
    assert len({p.prompt for p in probes}) == len(probes)
    for probe in probes:
        assert isinstance(probe.prompt, str) and probe.prompt.strip()
        assert probe.answers and all(normalize_text(a) for a in probe.answers)
        # The answer is not given away by the question (except the echo-instruction probes).
        if not probe.prompt.startswith(("Say", "Repeat", "Reply")):
            assert not answer_matches(probe.prompt, probe.answers), probe.prompt


class StudentWrapper:
    """The `SelfDistillModel.forward_student` contract over a plain HF model (hidden states x lm_head)."""

    def __init__(self, hf_model):
        self.hf_model = hf_model
        self.lm_head_weight = hf_model.lm_head.weight
        self.lm_head_bias = None

    def forward_student(self, prompts, completions):
        rows = []
        for prompt, completion in zip(prompts, completions):
            ids = torch.tensor([prompt + completion])
            hidden = self.hf_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # [T, D]
            rows.append(hidden[len(prompt) - 1 : len(prompt) + len(completion) - 1])

        class Out:
            student_hidden = torch.cat(rows)

        return Out()

    def generate(self, prompts, **kwargs):
        return HFGenerator(self.hf_model).generate(prompts, **kwargs)


def manual_kl(model_a, model_b, prompts, completions):
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            ids = torch.tensor([prompt + completion])
            sl = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)
            lp_a = torch.log_softmax(model_a(input_ids=ids).logits[0, sl].double(), -1)
            lp_b = torch.log_softmax(model_b(input_ids=ids).logits[0, sl].double(), -1)
            total += float((lp_a.exp() * (lp_a - lp_b)).sum())
            count += len(completion)
    return total / count


def test_kl_from_reference_zero_for_start_model_and_matches_manual(tiny_model, tokenizer):
    prompts = ["Tell me a story.", "What is rain?", "Name a fruit."]
    reference = reference_logprobs(tiny_model, tokenizer, prompts, max_new_tokens=5)
    assert isinstance(reference, ReferenceLogprobs)
    n_tokens = sum(len(c) for c in reference.completions)
    assert reference.logprobs.shape == (n_tokens, tiny_model.config.vocab_size)
    assert kl_from_reference(tiny_model, reference) == pytest.approx(0.0, abs=1e-6)

    trained = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for parameter in trained.model.layers[0].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    drift = kl_from_reference(trained, reference)
    expected = manual_kl(trained, tiny_model, reference.prompts, reference.completions)
    assert drift > 1e-4
    assert drift == pytest.approx(expected, rel=1e-4)
    # The SelfDistillModel path (forward_student hidden x lm_head) gives the same number.
    assert kl_from_reference(StudentWrapper(trained), reference) == pytest.approx(drift, rel=1e-4)

    # A callable reference (logits of a frozen start copy) on the trained model's own continuations.
    def start_logits(prompt_ids, completion_ids):
        return completion_logits(tiny_model, prompt_ids, completion_ids)

    # The NLL increase of the start model's own continuation, against a direct sum over its tokens.
    drift_both = drift_from_reference(trained, reference)
    assert drift_both["kl"] == pytest.approx(drift, rel=1e-6)
    nll_start = nll_trained = 0.0
    for prompt, completion in zip(reference.prompts, reference.completions):
        for model, sign in ((tiny_model, -1.0), (trained, 1.0)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            total = -float(logp[torch.arange(len(completion)), torch.tensor(completion)].sum())
            if sign > 0:
                nll_trained += total
            else:
                nll_start += total
    # float32 log-softmax of O(5) log-probs: rounding ~1e-6 per token, far below 1e-5.
    assert drift_both["dnll"] == pytest.approx((nll_trained - nll_start) / n_tokens, abs=1e-5)
    assert drift_from_reference(tiny_model, reference) == pytest.approx({"kl": 0.0, "dnll": 0.0}, abs=1e-5)

    drift_callable = kl_from_reference(trained, start_logits, tokenizer, prompts, max_new_tokens=5)
    assert drift_callable > 1e-4
    with pytest.raises(ValueError, match="tokenizer"):
        kl_from_reference(trained, start_logits)


def test_completion_logits_rows_predict_completion_tokens(tiny_model):
    prompts, completions = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    logits = completion_logits(tiny_model, prompts, completions)  # [5, V]
    assert logits.shape == (5, tiny_model.config.vocab_size)
    with torch.no_grad():
        full = tiny_model(input_ids=torch.tensor([[8, 11, 12, 13]])).logits[0]  # [4, V]
    torch.testing.assert_close(logits[2:], full[:3])  # position of 8 predicts 11, ...
    via_wrapper = completion_logits(StudentWrapper(tiny_model), prompts, completions)
    torch.testing.assert_close(via_wrapper, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lora", ["lora", "full"])
def test_with_self_distill_model(tiny_model, tokenizer, lora):
    """The real contract: greedy eval through SelfDistillModel.generate, KL through forward_student,
    for LoRA and for full fine-tuning (no adapter switching involved)."""
    from sdft_fast.lora import LoraConfig
    from sdft_fast.model import SelfDistillModel

    model = SelfDistillModel(
        copy.deepcopy(tiny_model), lora=LoraConfig(r=4, alpha=8) if lora == "lora" else None, teacher="base"
    )
    examples = [Example("Hi there", "d", ["x"], row=1), Example("What now?", "d", ["y"], row=2)]
    via_model = evaluate_accuracy(model, tokenizer, examples, max_new_tokens=5)
    via_hf = evaluate_accuracy(tiny_model, tokenizer, examples, max_new_tokens=5)
    # A fresh adapter (B = 0) or untouched full weights answer exactly like the start model.
    assert [r["prediction"] for r in via_model["records"]] == [r["prediction"] for r in via_hf["records"]]

    reference = reference_logprobs(
        tiny_model, tokenizer, ["Tell me a story.", "Name a fruit."], max_new_tokens=4
    )
    assert kl_from_reference(model, reference) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assert kl_from_reference(model, reference) > 1e-4
