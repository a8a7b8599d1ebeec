"""Prompt/demonstration rows: loading, validation, teacher templates and tokenization.

A row has a `prompt` (a string, or a list of chat messages `{role, content}` ending with a user turn),
a `demonstration` (string; TRL's name `privileged_context` is accepted too) and an optional `answer`
(string or list of acceptable strings, used only by evaluation).

The student sees the prompt; the teacher (the same network) sees the prompt and the demonstration,
joined by a template (`DEFAULT_TEACHER_TEMPLATE`, the reference implementation's wording). With a
chat tokenizer both become one user turn rendered by `tokenizer.apply_chat_template(...,
add_generation_prompt=True)`; without one the text is tokenized as is.

Every row is checked before any training starts. A bad row raises `DataError`, whose message names
the file, the row (1-based line number in a JSONL file, 1-based index in a dataset) and the field; a
byte that is not UTF-8 is named by its line and its byte offset. By default nothing is truncated: a
row over a token limit is an error, because cutting the teacher's prompt would cut the demonstration
it is supposed to condition on. `encode_examples(overlong="truncate")` cuts the demonstration to fit
(and skips rows whose prompt alone is too long), `overlong="skip"` leaves such rows out; an
`EncodeReport` lists them. A row far over its limit is refused from its length in characters,
before the tokenizer spends time and memory on it (`max_row_chars`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "This is an example for a response to the question:\n"
    "{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process."
)

TEMPLATE_FIELDS = ("prompt", "demonstration")
DEMONSTRATION_ALIASES = ("demonstration", "privileged_context")
CHAT_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A malformed data row. `source`, `row` and `field` say where; the message says what is wrong."""

    def __init__(self, source: str, row: int | None, field_name: str | None, problem: str):
        self.source = source
        self.row = row
        self.field = field_name
        self.problem = problem
        where = str(source)
        if row is not None:
            where += f", row {row}"
        if field_name is not None:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Example:
    """One validated row. `prompt` is a string or a list of `{role, content}` dicts (last is user)."""

    prompt: str | list[dict]
    demonstration: str
    answers: list[str] | None = None
    row: int = 0
    source: str = "<memory>"
    # Extra row fields (e.g. the demo's fact id and question kind); never used for training.
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DataLimits:
    """Token limits, checked (never enforced by truncation) in `encode_examples`.

    max_prompt_tokens: the student prompt (after the chat template).
    max_teacher_prompt_tokens: the teacher prompt (prompt + demonstration + template); longer by nature.
    max_completion_tokens: sampled completions, and the SFT target (`demonstration_ids`, EOS included).
    """

    max_prompt_tokens: int = 256
    max_teacher_prompt_tokens: int = 1024
    max_completion_tokens: int = 128

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_teacher_prompt_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DataLimits.{name} must be a positive int, got {value!r}")


@dataclass
class EncodeReport:
    """Rows `encode_examples` truncated or skipped (``overlong``): (source, row, what happened)."""

    truncated: list[tuple[str, int, str]] = field(default_factory=list)
    skipped: list[tuple[str, int, str]] = field(default_factory=list)

    def notices(self) -> list[str]:
        """One line per kind, naming the first rows."""
        lines = []
        for kind, entries in (("truncated", self.truncated), ("skipped", self.skipped)):
            if entries:
                shown = "; ".join(f"{source} row {row}: {what}" for source, row, what in entries[:3])
                more = f"; {len(entries) - 3} more" if len(entries) > 3 else ""
                lines.append(f"{len(entries)} row(s) over a token limit {kind}: {shown}{more}")
        return lines


# A token stands for at most its vocabulary entry's characters (byte-level vocabularies spell one
# byte per character; SentencePiece one character per character), so a text longer than
# limit x longest entry cannot fit `limit` tokens. The margin covers tokenizers whose normalizer
# merges or drops characters; the exact token count is checked after tokenizing anyway.
ROW_CHARS_MARGIN = 4


def max_row_chars(tokenizer, token_limit: int) -> int:
    """Characters beyond which a text cannot fit ``token_limit`` tokens (see ROW_CHARS_MARGIN)."""
    longest = getattr(tokenizer, "_sdft_longest_token", None)
    if longest is None:
        longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
        try:
            tokenizer._sdft_longest_token = longest  # get_vocab() of a 150k vocabulary takes ~50 ms
        except AttributeError:
            pass
    return token_limit * max(1, longest) * ROW_CHARS_MARGIN


def _chars(prompt: str | list[dict]) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


@dataclass(frozen=True)
class EncodedExample:
    """Token ids for one row (no padding, no batch dimension)."""

    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    demonstration_ids: list[int]  # the demonstration as the assistant's answer, EOS appended (SFT target)
    answers: list[str] | None
    row: int
    source: str
    meta: dict = field(default_factory=dict, compare=False)


# ----------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------


def _check_prompt(value: Any, source: str, row: int) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(source, row, "prompt", "is empty")
        return value
    if isinstance(value, list):
        if not value:
            raise DataError(source, row, "prompt", "is an empty list of chat messages")
        messages = []
        for index, message in enumerate(value):
            where = f"prompt[{index}]"
            if not isinstance(message, Mapping):
                raise DataError(
                    source, row, where, f"a chat message must be an object, got {type(message).__name__}"
                )
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or role not in CHAT_ROLES:
                raise DataError(source, row, f"{where}.role", f"must be one of {CHAT_ROLES}, got {role!r}")
            if not isinstance(content, str):
                raise DataError(
                    source, row, f"{where}.content", f"must be a string, got {type(content).__name__}"
                )
            messages.append({"role": role, "content": content})
        if messages[-1]["role"] != "user":
            # The teacher template wraps the last user turn, and the model answers after it.
            raise DataError(
                source,
                row,
                f"prompt[{len(messages) - 1}].role",
                f"the last chat message must be 'user', got {messages[-1]['role']!r}",
            )
        if not messages[-1]["content"].strip():
            raise DataError(source, row, f"prompt[{len(messages) - 1}].content", "is empty")
        return messages
    raise DataError(
        source, row, "prompt", f"must be a string or a list of chat messages, got {type(value).__name__}"
    )


def _check_demonstration(record: Mapping, source: str, row: int, required: bool) -> str:
    present = [name for name in DEMONSTRATION_ALIASES if name in record and record[name] is not None]
    if not present:
        if not required:
            return ""
        raise DataError(source, row, "demonstration", "is missing (also looked for 'privileged_context')")
    if len(present) > 1 and record[present[0]] != record[present[1]]:
        raise DataError(
            source, row, "demonstration", "both 'demonstration' and 'privileged_context' are given and differ"
        )
    name = present[0]
    value = record[name]
    if not isinstance(value, str):
        raise DataError(source, row, name, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(source, row, name, "is empty")
    return value


def _check_answers(value: Any, source: str, row: int) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(
            source, row, "answer", f"must be a string or a non-empty list of strings, got {value!r}"
        )
    for index, answer in enumerate(value):
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(source, row, f"answer[{index}]", f"must be a non-empty string, got {answer!r}")
    return list(value)


def parse_record(record: Any, *, source: str, row: int, require_demonstration: bool = True) -> Example:
    """Validate one row (a mapping) into an `Example`; raises `DataError` naming source/row/field."""
    if not isinstance(record, Mapping):
        raise DataError(source, row, None, f"a row must be a JSON object, got {type(record).__name__}")
    if "prompt" not in record or record["prompt"] is None:
        raise DataError(source, row, "prompt", "is missing")
    prompt = _check_prompt(record["prompt"], source, row)
    demonstration = _check_demonstration(record, source, row, require_demonstration)
    answers = _check_answers(record.get("answer"), source, row)
    known = {"prompt", "answer", *DEMONSTRATION_ALIASES}
    meta = {key: value for key, value in record.items() if key not in known}
    return Example(prompt, demonstration, answers, row, source, meta)


def _read_jsonl(path: Path, require_demonstration: bool) -> list[Example]:
    source = str(path)
    examples = []
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(source, None, None, f"cannot open: {error}") from error
    offset = 0  # of the current line in the file
    for line_number, raw_line in enumerate(raw.split(b"\n"), start=1):
        line_offset, offset = offset, offset + len(raw_line) + 1
        try:
            # A byte-order mark may open the file; it is no part of the first row.
            line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                source,
                line_number,
                None,
                f"byte {error.start + 1} of the line (file offset {line_offset + error.start}) is not valid "
                f"UTF-8 (0x{raw_line[error.start]:02x}); save the file as UTF-8",
            ) from None
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                source, line_number, None, f"invalid JSON: {error.msg} (column {error.colno})"
            ) from error
        examples.append(
            parse_record(record, source=source, row=line_number, require_demonstration=require_demonstration)
        )
    if not examples:
        raise DataError(source, None, None, "contains no rows")
    return examples


def _is_dataset_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, "column_names") for v in obj.values())


def _read_dataset(dataset: Any, source: str, split: str | None, require_demonstration: bool) -> list[Example]:
    if _is_dataset_dict(dataset):
        names = list(dataset.keys())
        chosen = split or ("train" if "train" in dataset else (names[0] if len(names) == 1 else None))
        if chosen is None or chosen not in dataset:
            raise DataError(source, None, None, f"choose a split (split=...) among {names}")
        dataset, source = dataset[chosen], f"{source}[{chosen}]"
    columns = list(getattr(dataset, "column_names", []) or [])
    if "prompt" not in columns:
        raise DataError(source, None, "prompt", f"column is missing (columns: {columns})")
    examples = [
        parse_record(record, source=source, row=index, require_demonstration=require_demonstration)
        for index, record in enumerate(dataset, start=1)
    ]
    if not examples:
        raise DataError(source, None, None, "contains no rows")
    return examples


def load_examples(
    data: str | os.PathLike | Any,
    *,
    split: str | None = None,
    require_demonstration: bool = True,
) -> list[Example]:
    """Load and validate rows from a JSONL file, a saved `datasets` folder, or an in-memory dataset.

    data: a `.jsonl` path (UTF-8, one JSON object per line); a folder written by
      `datasets.Dataset.save_to_disk` (needs the optional `datasets` package); a `datasets.Dataset` /
      `DatasetDict` object (anything with `column_names` that iterates over dict rows); or a list of
      dicts (rows numbered from 1).
    split: which split of a DatasetDict (default "train").
    require_demonstration: False for evaluation-only files whose rows carry just prompt and answer.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            try:
                import datasets  # optional: only needed for saved dataset folders
            except ImportError as error:
                raise DataError(
                    str(path), None, None, "is a folder; reading a saved dataset needs: pip install datasets"
                ) from error
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as error:  # noqa: BLE001 - re-raised with the path named
                raise DataError(str(path), None, None, f"cannot load as a saved dataset: {error}") from error
            return _read_dataset(loaded, str(path), split, require_demonstration)
        if not path.exists():
            raise DataError(str(path), None, None, "does not exist")
        return _read_jsonl(path, require_demonstration)
    if hasattr(data, "column_names") or _is_dataset_dict(data):
        name = getattr(getattr(data, "info", None), "dataset_name", None) or type(data).__name__
        return _read_dataset(data, f"<dataset {name}>", split, require_demonstration)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        examples = [
            parse_record(record, source="<list>", row=index, require_demonstration=require_demonstration)
            for index, record in enumerate(data, start=1)
        ]
        if not examples:
            raise DataError("<list>", None, None, "contains no rows")
        return examples
    raise TypeError(
        f"load_examples: data must be a path, a datasets.Dataset or a list of dicts, got {type(data).__name__}"
    )


# ----------------------------------------------------------------------------------------------------
# Templates and tokenization
# ----------------------------------------------------------------------------------------------------


def validate_teacher_template(template: str) -> str:
    """Check that `template` uses exactly the placeholders {prompt} and {demonstration}.

    Literal braces must be doubled ({{ }}), as in `str.format`.
    """
    if not isinstance(template, str):
        raise ValueError(f"teacher_template must be a string, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"teacher_template is not a valid format string ({error}): {template!r}") from error
    fields = [name for _, name, spec, conversion in parsed if name is not None]
    unknown = sorted({name for name in fields if name not in TEMPLATE_FIELDS})
    if unknown:
        raise ValueError(
            f"teacher_template has unknown placeholder(s) {unknown}; only {{prompt}} and {{demonstration}} "
            "are allowed (write literal braces as {{ and }})"
        )
    for name in TEMPLATE_FIELDS:
        if name not in fields:
            raise ValueError(f"teacher_template must contain {{{name}}}: {template!r}")
    return template


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def _as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def _last_user_text(prompt: str | list[dict]) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def teacher_prompt(prompt: str | list[dict], demonstration: str, template: str) -> str | list[dict]:
    """The teacher's prompt: the last user turn rewritten by `template`; earlier turns kept."""
    text = template.format(prompt=_last_user_text(prompt), demonstration=demonstration)
    if isinstance(prompt, str):
        return text
    return [dict(m) for m in prompt[:-1]] + [{"role": "user", "content": text}]


def _plain_text(prompt: str | list[dict]) -> str:
    """A tokenizer without a chat template gets the prompt as plain text.

    Message lists become a role-labelled transcript ending with "assistant:", the same shape for
    student and teacher, so the two contexts differ only by the demonstration.
    """
    if isinstance(prompt, str):
        return prompt
    lines = [f"{m['role']}: {m['content']}" for m in prompt]
    return "\n".join(lines) + "\nassistant:"


def _encode_text(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return [int(i) for i in ids]


def encode_prompt(tokenizer, prompt: str | list[dict], use_chat_template: bool | None = None) -> list[int]:
    """Token ids of a prompt, ready for generation (chat template + generation prompt when available)."""
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    if use_chat_template:
        text = tokenizer.apply_chat_template(_as_messages(prompt), add_generation_prompt=True, tokenize=False)
        # The rendered template already holds any BOS/special tokens it wants.
        return _encode_text(tokenizer, text, add_special_tokens=False)
    return _encode_text(tokenizer, _plain_text(prompt), add_special_tokens=True)


def _eos_token_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError("encode_examples: the tokenizer has no eos_token_id; SFT targets need one")
    return int(eos)


class _Overlong(Exception):
    """A row over a limit: the DataError to raise, whether cutting the demonstration can help, and
    by how much it is over (characters, before tokenizing; else tokens)."""

    def __init__(self, error: DataError, demonstration_fits: bool, excess_chars: int, excess_tokens: int):
        self.error = error
        self.demonstration_fits = demonstration_fits
        self.excess_chars = excess_chars
        self.excess_tokens = excess_tokens


def encode_examples(
    examples: Iterable[Example],
    tokenizer,
    *,
    limits: DataLimits | None = None,
    teacher_template: str = DEFAULT_TEACHER_TEMPLATE,
    use_chat_template: bool | None = None,
    check_demonstration_length: bool = True,
    overlong: str = "error",
    report: EncodeReport | None = None,
) -> list[EncodedExample]:
    """Tokenize student prompts, teacher prompts and SFT targets; check every limit first.

    use_chat_template: None = use the tokenizer's chat template when it has one.
    check_demonstration_length: the demonstration (+EOS) is the SFT target and must fit
      `max_completion_tokens`. SDFT never trains on it (the teacher only reads it, within the teacher
      prompt limit), so an SDFT run with long demonstrations may pass False.
    overlong: a row over a limit raises DataError (file, row, field) with "error"; "truncate" cuts
      its demonstration until the teacher prompt and the SFT target fit (a cut SFT target gets no
      EOS: the answer was cut, not finished) and skips a row whose student prompt alone is too long;
      "skip" leaves every such row out. `report` (an EncodeReport) receives what was cut or skipped.
    """
    if overlong not in ("error", "truncate", "skip"):
        raise ValueError(f"overlong must be 'error', 'truncate' or 'skip', got {overlong!r}")
    limits = limits or DataLimits()
    report = report if report is not None else EncodeReport()
    validate_teacher_template(teacher_template)
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    eos_id = _eos_token_id(tokenizer)
    encoded = []
    for example in examples:
        demonstration = example.demonstration
        cut = ""
        for _ in range(8):  # each pass cuts the demonstration by the tokens it was over
            try:
                item = _encode_one(
                    example, demonstration, tokenizer, limits, teacher_template, use_chat_template, eos_id
                )
                break
            except _Overlong as over:
                if overlong == "error":
                    raise over.error from None
                if overlong == "skip" or not over.demonstration_fits:
                    report.skipped.append((example.source, example.row, over.error.problem))
                    item = None
                    break
                demonstration, cut = _cut_demonstration(tokenizer, demonstration, over), over.error.problem
        else:  # pragma: no cover - the cut converges in one or two passes
            report.skipped.append((example.source, example.row, "demonstration could not be cut to fit"))
            continue
        if item is None:
            continue
        if check_demonstration_length and len(item.demonstration_ids) > limits.max_completion_tokens:
            problem = (
                f"demonstration has {len(item.demonstration_ids)} tokens with EOS, more than "
                f"max_completion_tokens={limits.max_completion_tokens} (the SFT target)"
            )
            if overlong == "error":
                raise DataError(example.source, example.row, "demonstration", problem)
            if overlong == "skip":
                report.skipped.append((example.source, example.row, problem))
                continue
            cut = cut or problem
            item = dataclasses.replace(
                item, demonstration_ids=item.demonstration_ids[: limits.max_completion_tokens]
            )
        if cut:
            report.truncated.append((example.source, example.row, f"demonstration cut: {cut}"))
        encoded.append(item)
    return encoded


def _cut_demonstration(tokenizer, demonstration: str, over: _Overlong) -> str:
    """The demonstration shortened by what the teacher prompt was over (its start kept): by
    characters while it is too long to tokenize, then by tokens."""
    if over.excess_chars:
        return demonstration[: max(0, len(demonstration) - over.excess_chars)]
    ids = _encode_text(tokenizer, demonstration, add_special_tokens=False)
    keep = max(0, len(ids) - max(1, over.excess_tokens))
    return tokenizer.decode(ids[:keep]).rstrip("\ufffd")  # no half character at the cut


def _encode_one(example, demonstration, tokenizer, limits, teacher_template, use_chat_template, eos_id):
    """One row's encodings, or _Overlong for its first limit it does not fit."""
    source, row = example.source, example.row

    def overlong(field_name, problem, demonstration_fits, *, excess_chars=0, excess_tokens=0) -> _Overlong:
        problem += " (--overlong truncate or skip lets such rows through)"
        error = DataError(source, row, field_name, problem)
        return _Overlong(error, demonstration_fits, excess_chars, excess_tokens)

    prompt_chars = _chars(example.prompt)
    bound = max_row_chars(tokenizer, limits.max_prompt_tokens)
    if prompt_chars > bound:
        raise overlong(
            "prompt",
            f"has {prompt_chars:,} characters: more than max_prompt_tokens={limits.max_prompt_tokens} "
            f"tokens can hold ({bound:,}), refused before tokenizing",
            False,
        )
    bound = max_row_chars(tokenizer, limits.max_teacher_prompt_tokens)
    if prompt_chars + len(demonstration) > bound:
        # Cheap first cut: the characters over the bound (then the token count decides).
        raise overlong(
            "demonstration",
            f"prompt + demonstration have {prompt_chars + len(demonstration):,} characters: more than "
            f"max_teacher_prompt_tokens={limits.max_teacher_prompt_tokens} tokens can hold ({bound:,}), "
            "refused before tokenizing",
            prompt_chars < bound,
            excess_chars=prompt_chars + len(demonstration) - bound,
        )
    student_ids = encode_prompt(tokenizer, example.prompt, use_chat_template)
    if len(student_ids) > limits.max_prompt_tokens:
        raise overlong(
            "prompt",
            f"student prompt has {len(student_ids)} tokens, more than max_prompt_tokens={limits.max_prompt_tokens}",
            False,
        )
    teacher_ids = encode_prompt(
        tokenizer, teacher_prompt(example.prompt, demonstration, teacher_template), use_chat_template
    )
    if len(teacher_ids) > limits.max_teacher_prompt_tokens:
        excess = len(teacher_ids) - limits.max_teacher_prompt_tokens
        raise overlong(
            "demonstration",
            f"teacher prompt (prompt + demonstration + template) has {len(teacher_ids)} tokens, more than "
            f"max_teacher_prompt_tokens={limits.max_teacher_prompt_tokens}",
            len(teacher_ids) - len(_encode_text(tokenizer, demonstration, add_special_tokens=False))
            < limits.max_teacher_prompt_tokens,
            excess_tokens=excess,
        )
    demonstration_ids = _encode_text(tokenizer, demonstration, add_special_tokens=False) + [eos_id]
    return EncodedExample(
        student_prompt_ids=student_ids,
        teacher_prompt_ids=teacher_ids,
        demonstration_ids=demonstration_ids,
        answers=example.answers,
        row=row,
        source=source,
        meta=dict(example.meta),
    )
