"""Data loading, validation (file/row/field in every error), templates, chat vs plain, limits."""

import json

import pytest
from helpers import byte_level_tokenizer

from sdft_fast.data import (
    DEFAULT_TEACHER_TEMPLATE,
    DataError,
    DataLimits,
    EncodedExample,
    Example,
    encode_examples,
    load_examples,
    teacher_prompt,
    validate_teacher_template,
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    return byte_level_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return byte_level_tokenizer(chat_template=False)


def write_jsonl(path, lines):
    """`lines` are dicts (dumped as JSON) or raw strings (written as is)."""
    with open(path, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


GOOD = {"prompt": "What is 2+2?", "demonstration": "2+2 is 4."}


def test_load_jsonl_fields_aliases_and_line_numbers(tmp_path):
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"prompt": "Capital of France?", "demonstration": "Paris.", "answer": "Paris", "topic": "geo"},
            "",  # a blank line is skipped but still counts as a line
            {
                "prompt": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Name a colour."},
                ],
                "privileged_context": "Blue is a colour.",
                "answer": ["blue", "red"],
            },
            {"prompt": "Say hi.", "demonstration": "Hi!"},
        ],
    )
    examples = load_examples(path)
    assert [e.row for e in examples] == [1, 3, 4]
    assert all(e.source == str(path) for e in examples)
    assert examples[0].answers == ["Paris"] and examples[0].meta == {"topic": "geo"}
    assert examples[1].demonstration == "Blue is a colour."  # alias accepted
    assert examples[1].prompt[0] == {"role": "system", "content": "Be brief."}
    assert examples[1].answers == ["blue", "red"]
    assert examples[2].answers is None


MALFORMED = [
    # (bad line, expected field (None = whole row), words the message must contain)
    ('{"prompt": "x", "demonstration": ', None, "invalid JSON"),
    ('["prompt", "demonstration"]', None, "JSON object"),
    ({"demonstration": "d"}, "prompt", "missing"),
    ({"prompt": 7, "demonstration": "d"}, "prompt", "string or a list"),
    ({"prompt": "   ", "demonstration": "d"}, "prompt", "empty"),
    ({"prompt": "q"}, "demonstration", "missing"),
    ({"prompt": "q", "demonstration": ""}, "demonstration", "empty"),
    ({"prompt": "q", "demonstration": "  \n"}, "demonstration", "empty"),
    ({"prompt": "q", "demonstration": ["a"]}, "demonstration", "must be a string"),
    ({"prompt": "q", "privileged_context": 3}, "privileged_context", "must be a string"),
    ({"prompt": "q", "demonstration": "a", "privileged_context": "b"}, "demonstration", "differ"),
    ({"prompt": "q", "demonstration": "d", "answer": 5}, "answer", "string"),
    ({"prompt": "q", "demonstration": "d", "answer": ["ok", ""]}, "answer[1]", "non-empty"),
    ({"prompt": [{"content": "hi"}], "demonstration": "d"}, "prompt[0].role", "must be one of"),
    ({"prompt": [{"role": "user", "content": 1}], "demonstration": "d"}, "prompt[0].content", "string"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "demonstration": "d"},
     "prompt[1].role", "last chat message"),
    ({"prompt": [], "demonstration": "d"}, "prompt", "empty list"),
]  # fmt: skip


@pytest.mark.parametrize("bad_line, field_name, words", MALFORMED)
def test_malformed_row_names_file_row_and_field(tmp_path, bad_line, field_name, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(DataError) as caught:
        load_examples(path)
    error = caught.value
    assert error.source == str(path) and error.row == 3 and error.field == field_name
    message = str(error)
    assert str(path) in message and "row 3" in message and words in message
    if field_name is not None:
        assert f"field '{field_name}'" in message


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_examples(empty)


def test_invalid_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\xe9", "demonstration": "d"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8") as caught:
        load_examples(path)
    assert caught.value.source == str(path)


class FakeDataset:
    """The part of `datasets.Dataset` that `load_examples` uses: column_names and row iteration."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = sorted({key for row in rows for key in row})

    def __iter__(self):
        return iter(self.rows)


def test_dataset_object_rows_are_numbered_from_one():
    rows = [GOOD, {"prompt": "q", "privileged_context": "c"}, {"prompt": "q", "demonstration": ""}]
    with pytest.raises(DataError) as caught:
        load_examples(FakeDataset(rows))
    assert caught.value.row == 3 and caught.value.field == "demonstration"
    assert "FakeDataset" in caught.value.source
    examples = load_examples(FakeDataset(rows[:2]))
    assert [e.demonstration for e in examples] == ["2+2 is 4.", "c"]
    # A DatasetDict-like mapping: "train" is the default split, others by name.
    splits = {"train": FakeDataset(rows[:1]), "test": FakeDataset(rows[1:2])}
    assert load_examples(splits)[0].demonstration == "2+2 is 4."
    assert load_examples(splits, split="test")[0].demonstration == "c"
    with pytest.raises(DataError, match="prompt"):
        load_examples(FakeDataset([{"question": "q", "demonstration": "d"}]))


def test_saved_dataset_folder(tmp_path):
    try:
        import datasets
    except ImportError:
        # Without the optional package the error says how to get it, naming the folder.
        with pytest.raises(DataError, match="pip install datasets") as caught:
            load_examples(tmp_path)
        assert caught.value.source == str(tmp_path)
        return
    rows = [{"prompt": "q1", "privileged_context": "c1"}, {"prompt": "q2", "privileged_context": ""}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    with pytest.raises(DataError) as caught:  # row 2's context is empty
        load_examples(tmp_path / "ds")
    assert (caught.value.source, caught.value.row, caught.value.field) == (
        str(tmp_path / "ds"),
        2,
        "privileged_context",
    )
    datasets.Dataset.from_list(rows[:1]).save_to_disk(tmp_path / "ok")
    assert [e.demonstration for e in load_examples(tmp_path / "ok")] == ["c1"]
    assert [e.demonstration for e in load_examples(datasets.Dataset.from_list(rows[:1]))] == ["c1"]


def test_require_demonstration_false_allows_eval_only_rows(tmp_path):
    path = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(DataError, match="demonstration"):
        load_examples(path)
    (example,) = load_examples(path, require_demonstration=False)
    assert example.demonstration == "" and example.answers == ["a"]


def test_teacher_template_validation():
    assert validate_teacher_template(DEFAULT_TEACHER_TEMPLATE) == DEFAULT_TEACHER_TEMPLATE
    validate_teacher_template("Fact {{literal}}: {demonstration}\nQ: {prompt}")
    with pytest.raises(ValueError, match="must contain \\{demonstration\\}"):
        validate_teacher_template("{prompt} only")
    with pytest.raises(ValueError, match="unknown placeholder"):
        validate_teacher_template("{prompt} {demonstration} {answer}")
    with pytest.raises(ValueError, match="not a valid format string"):
        validate_teacher_template("{prompt} {demonstration} {")


def test_teacher_prompt_wraps_last_user_turn_and_keeps_braces():
    text = teacher_prompt("Solve {x}", "x is 3", "Q: {prompt}\nExample: {demonstration}")
    assert text == "Q: Solve {x}\nExample: x is 3"  # braces inside the data are not format fields
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}]
    wrapped = teacher_prompt(chat, "D", "{prompt} / {demonstration}")
    assert wrapped == [{"role": "system", "content": "S"}, {"role": "user", "content": "U1 / D"}]
    assert chat[1]["content"] == "U1"  # the input is not mutated


def test_encode_chat_prompts_use_the_template(chat_tokenizer):
    examples = [
        Example("What is 2+2?", "2+2 is 4.", ["4"], row=1, source="mem"),
        Example(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
            "Hello.",
            None,
            2,
        ),
    ]
    encoded = encode_examples(examples, chat_tokenizer)
    assert all(isinstance(e, EncodedExample) for e in encoded)
    first = encoded[0]
    expected_student = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat_tokenizer.decode(first.student_prompt_ids) == expected_student
    teacher_text = chat_tokenizer.decode(first.teacher_prompt_ids)
    assert teacher_text.startswith(
        "<s>user\nWhat is 2+2?\n\nThis is an example for a response to the question:\n2+2 is 4."
    )
    assert teacher_text.endswith("</s>\n<s>assistant\n")
    # SFT target: the demonstration as the assistant's answer, then EOS.
    assert first.demonstration_ids[-1] == chat_tokenizer.eos_token_id
    assert chat_tokenizer.decode(first.demonstration_ids[:-1]) == "2+2 is 4."
    assert (first.answers, first.row, first.source) == (["4"], 1, "mem")
    second_student = chat_tokenizer.decode(encoded[1].student_prompt_ids)
    second_teacher = chat_tokenizer.decode(encoded[1].teacher_prompt_ids)
    assert second_student.startswith("<s>system\nBe brief.</s>\n<s>user\nHi?</s>")
    assert second_teacher.startswith("<s>system\nBe brief.</s>\n<s>user\nHi?\n\nThis is an example")


def test_encode_plain_prompts_without_chat_template(plain_tokenizer):
    (encoded,) = encode_examples([Example("Q: 2+2?\nA:", " 4", row=1)], plain_tokenizer)
    assert plain_tokenizer.decode(encoded.student_prompt_ids) == "Q: 2+2?\nA:"
    assert "<s>" not in plain_tokenizer.decode(encoded.teacher_prompt_ids)
    assert plain_tokenizer.decode(encoded.teacher_prompt_ids).endswith("including the thinking process.")
    assert encoded.demonstration_ids == plain_tokenizer.encode(" 4", add_special_tokens=False) + [2]
    # A message list without a chat template becomes a role-labelled transcript.
    chat = [{"role": "user", "content": "Hi"}]
    (from_chat,) = encode_examples([Example(chat, "Hello", row=1)], plain_tokenizer)
    assert plain_tokenizer.decode(from_chat.student_prompt_ids) == "user: Hi\nassistant:"
    # Forcing the chat template off on a chat tokenizer gives the same plain encoding.
    (forced,) = encode_examples(
        [Example(chat, "Hello", row=1)], byte_level_tokenizer(), use_chat_template=False
    )
    assert forced.student_prompt_ids == from_chat.student_prompt_ids


def test_custom_teacher_template(chat_tokenizer):
    template = "Fact: {demonstration}\nQuestion: {prompt}"
    (encoded,) = encode_examples(
        [Example("Who?", "Ann did it.", row=1)], chat_tokenizer, teacher_template=template
    )
    assert "<s>user\nFact: Ann did it.\nQuestion: Who?</s>" in chat_tokenizer.decode(
        encoded.teacher_prompt_ids
    )
    with pytest.raises(ValueError, match="demonstration"):
        encode_examples([Example("Who?", "Ann.", row=1)], chat_tokenizer, teacher_template="{prompt}")


def test_limits_are_separate_and_never_truncate(chat_tokenizer):
    prompt, demonstration = "Q" * 10, "D" * 200
    example = Example(prompt, demonstration, row=7, source="data.jsonl")
    student_length = len(
        encode_examples([example], chat_tokenizer, check_demonstration_length=False)[0].student_prompt_ids
    )
    limits = DataLimits(
        max_prompt_tokens=student_length, max_teacher_prompt_tokens=400, max_completion_tokens=256
    )
    (encoded,) = encode_examples([example], chat_tokenizer, limits=limits)
    # The teacher prompt is far longer than the student limit and kept whole (demonstration included).
    assert len(encoded.student_prompt_ids) == student_length
    assert len(encoded.teacher_prompt_ids) > 200 + student_length
    assert demonstration in chat_tokenizer.decode(encoded.teacher_prompt_ids)

    tight_student = DataLimits(max_prompt_tokens=student_length - 1, max_teacher_prompt_tokens=400)
    with pytest.raises(DataError) as caught:
        encode_examples([example], chat_tokenizer, limits=tight_student)
    assert (caught.value.source, caught.value.row, caught.value.field) == ("data.jsonl", 7, "prompt")
    assert "max_prompt_tokens" in str(caught.value)

    tight_teacher = DataLimits(
        max_prompt_tokens=256, max_teacher_prompt_tokens=200, max_completion_tokens=256
    )
    with pytest.raises(DataError, match="max_teacher_prompt_tokens") as caught:
        encode_examples([example], chat_tokenizer, limits=tight_teacher)
    assert (caught.value.row, caught.value.field) == (7, "demonstration")

    tight_completion = DataLimits(
        max_prompt_tokens=256, max_teacher_prompt_tokens=400, max_completion_tokens=200
    )
    with pytest.raises(DataError, match="max_completion_tokens") as caught:
        encode_examples([example], chat_tokenizer, limits=tight_completion)
    assert caught.value.field == "demonstration"
    # SDFT never trains on the demonstration itself, so that check can be switched off.
    (kept,) = encode_examples(
        [example], chat_tokenizer, limits=tight_completion, check_demonstration_length=False
    )
    assert len(kept.demonstration_ids) == 201


@pytest.mark.parametrize(
    "kwargs", [{"max_prompt_tokens": 0}, {"max_teacher_prompt_tokens": -1}, {"max_completion_tokens": 2.5}]
)
def test_data_limits_reject_non_positive(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DataLimits(**kwargs)


def test_tokenizer_without_eos_is_rejected():
    class NoEos:
        eos_token_id = None

        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    with pytest.raises(ValueError, match="eos_token_id"):
        encode_examples([Example("q", "d", row=1)], NoEos())
