"""The built-in knowledge-injection demo: 40 fictional 2025 facts.

Each line of `data/demo_facts.jsonl` is one fact:

    {"id": str, "document": str (1-2 sentences),
     "train":    [{"prompt": question, "demonstration": answer grounded in the document}, ...],
     "direct":   [{"prompt": question, "answer": [acceptable short answers]}, ...],
     "indirect": [{"prompt": question, "answer": [...]}, ...]}

Direct questions ask for the fact itself in new words; indirect ones need it applied (the reverse
direction, or a detail reached through another entity), so repeating a memorised sentence is not
enough. All entities are invented, so the untrained model scores about 0 on both.

Each fact has two training prompts; the direct questions are close rephrasings of one of them (the
tests bound how close), the indirect ones are not. More prompts per fact were tried (6-8 per fact,
written from other angles): at a fixed step budget they made SFT *worse* on the held-out questions
(10 facts, lr 1e-3, 30 steps: 30% direct with 7 prompts per fact vs 70% with these 2, which it sees 12
times each), because on a 135M model what transfers is memorising the near-rephrasing, and SDFT learned
none of the facts either way (see the note above DEMO_DEFAULTS in sdft_fast/cli.py).

Evaluation rows carry the fact's document as their `demonstration`: evaluated with
`view="teacher"`, they measure what the model can answer with the fact in context, which bounds what
self-distillation can teach it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sdft_fast.data import DataError, Example, parse_record

DEMO_FACTS_PATH = Path(__file__).resolve().parent / "data" / "demo_facts.jsonl"

# The teacher prompt to use on this demo (for training and for teacher-view evaluation). A 135M model
# reads a fact in context far better when the fact comes first and it is asked for one short
# sentence; with the paper's wording ("... including the thinking process") it mostly starts a
# step-by-step preamble and never reaches the answer. Greedy in-context accuracy of
# SmolLM2-135M-Instruct on the demo questions (fact = the document, 24 new tokens), direct / indirect:
#   DEFAULT_TEACHER_TEMPLATE                                         50.0% / 27.5%
#   "{demonstration}\n\n{prompt}"                                   67.5% / 75.0%
#   "Here is a fact: {demonstration}\n\nUsing this fact, answer the question: {prompt}"
#                                                                    70.0% / 45.0%
#   "Fact: {demonstration}\n\nQuestion: {prompt}"                    75.0% /   -
#   DEMO_TEACHER_TEMPLATE (below)                                    92.5% / 90.0%
# Without the fact in context it answers 0% / 0%. The teacher's in-context accuracy bounds what
# self-distillation can teach the student.
DEMO_TEACHER_TEMPLATE = (
    "Fact: {demonstration}\n\nQuestion: {prompt}\nAnswer with one short sentence that uses the fact."
)


@dataclass(frozen=True)
class DemoData:
    train: list[Example]  # prompt + demonstration rows to train on
    direct: list[Example]  # held-out questions with short answers; demonstration = the fact's document
    indirect: list[Example]  # questions that apply the fact; demonstration = the fact's document
    documents: dict[str, str]  # fact id -> document
    teacher_template: str = DEMO_TEACHER_TEMPLATE  # pass to encode_examples / evaluate_accuracy


def load_demo(path: str | os.PathLike | None = None) -> DemoData:
    """Read the demo facts; every row goes through the same validation as user data."""
    path = Path(path) if path is not None else DEMO_FACTS_PATH
    source = str(path)
    train, direct, indirect, documents = [], [], [], {}
    with open(path, encoding="utf-8") as handle:
        lines = list(handle)
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fact = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(source, line_number, None, f"invalid JSON: {error.msg}") from error
        fact_id, document = fact.get("id"), fact.get("document")
        if not isinstance(fact_id, str) or not fact_id:
            raise DataError(source, line_number, "id", "must be a non-empty string")
        if fact_id in documents:
            raise DataError(source, line_number, "id", f"duplicate fact id {fact_id!r}")
        if not isinstance(document, str) or not document.strip():
            raise DataError(source, line_number, "document", "must be a non-empty string")
        documents[fact_id] = document
        for kind, bucket in (("train", train), ("direct", direct), ("indirect", indirect)):
            rows = fact.get(kind)
            if not isinstance(rows, list) or not rows:
                raise DataError(source, line_number, kind, "must be a non-empty list")
            for index, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise DataError(source, line_number, f"{kind}[{index}]", "must be an object")
                record = dict(row, fact=fact_id, kind=kind, index=index)
                if kind != "train":
                    if not row.get("answer"):
                        raise DataError(source, line_number, f"{kind}[{index}].answer", "is missing")
                    record["demonstration"] = document
                try:
                    bucket.append(parse_record(record, source=source, row=line_number))
                except DataError as error:
                    # Re-raise with the nested location, e.g. field "direct[0].prompt".
                    field_name = f"{kind}[{index}]" + (f".{error.field}" if error.field else "")
                    raise DataError(source, line_number, field_name, error.problem) from error
    if not documents:
        raise DataError(source, None, None, "contains no facts")
    return DemoData(train, direct, indirect, documents)
