"""Integrity of the built-in demo facts (the 40 facts the demo plan and the recipe benchmark draw from)."""

import json
from collections import Counter

import pytest
from helpers import byte_level_tokenizer

from sdft_fast.data import DataError, DataLimits, encode_examples
from sdft_fast.demo import DEMO_FACTS_PATH, load_demo_facts
from sdft_fast.eval import answer_matches, normalize_text


@pytest.fixture(scope="module")
def demo():
    return load_demo_facts()


def test_every_fact_has_training_rows_and_both_question_kinds(demo):
    assert 35 <= len(demo.documents) <= 45
    for name, rows in (("train", demo.train), ("direct", demo.direct), ("indirect", demo.indirect)):
        per_fact = Counter(row.meta["fact"] for row in rows)
        assert set(per_fact) == set(demo.documents), name
        if name == "train":
            assert all(1 <= count <= 3 for count in per_fact.values())
    ids = [
        json.loads(line)["id"] for line in DEMO_FACTS_PATH.read_text(encoding="utf-8").splitlines() if line
    ]
    assert len(ids) == len(set(ids)) == len(demo.documents)
    assert all(row.source == str(DEMO_FACTS_PATH) and row.row >= 1 for row in demo.train + demo.direct)


def test_answers_are_short_grounded_and_not_given_away(demo):
    for row in demo.direct + demo.indirect:
        document = demo.documents[row.meta["fact"]]
        assert row.answers and all(normalize_text(a) for a in row.answers)
        assert all(len(a.split()) <= 4 for a in row.answers), row.answers
        assert row.demonstration == document  # teacher-view evaluation reads the fact
        # The fact supports the answer, and the question alone does not contain it.
        assert answer_matches(document, row.answers), (row.prompt, row.answers)
        assert not answer_matches(row.prompt, row.answers), (row.prompt, row.answers)


def test_training_rows_are_short_and_teach_the_direct_answer(demo):
    for row in demo.train:
        assert row.answers is None and row.demonstration.strip()
        assert row.demonstration.count(". ") <= 1 and len(row.demonstration.split()) <= 30
    for direct in demo.direct:
        demonstrations = [t.demonstration for t in demo.train if t.meta["fact"] == direct.meta["fact"]]
        assert any(answer_matches(d, direct.answers) for d in demonstrations), direct.prompt


def test_questions_are_unique_and_distinct_from_training_prompts(demo):
    questions = [row.prompt for row in demo.direct + demo.indirect]
    assert len(set(questions)) == len(questions)
    assert not set(questions) & {row.prompt for row in demo.train}


_FUNCTION_WORDS = set(
    "a an the of in on at to for by with is was were are did do does what which who whom whose how when where "
    "why would could can you your it its from and or that this be been has have had me tell give one about".split()
)


def _content_words(text: str) -> set[str]:
    return {word for word in normalize_text(text).split() if word not in _FUNCTION_WORDS}


def test_no_training_prompt_is_a_copy_or_reordering_of_a_held_out_question(demo):
    """The held-out questions stay held out: no training prompt of the same fact uses (nearly) the same
    content words as a direct or indirect question. Sharing the entity names cannot be avoided, so the
    bound is on the word-set overlap (Jaccard), not on any shared word."""
    for question in demo.direct + demo.indirect:
        asked = _content_words(question.prompt)
        for row in demo.train:
            if row.meta["fact"] != question.meta["fact"]:
                continue
            words = _content_words(row.prompt)
            overlap = len(words & asked) / len(words | asked)
            assert overlap < 0.85, (row.prompt, question.prompt, overlap)


def test_entity_answers_do_not_collide_across_facts(demo):
    # A distinctive answer for one fact must not be the answer to another fact's direct question.
    owner = {}
    for row in demo.direct:
        for answer in row.answers:
            key = normalize_text(answer)
            assert owner.setdefault(key, row.meta["fact"]) == row.meta["fact"], answer


def test_demo_fits_default_limits():
    demo = load_demo_facts()
    tokenizer = byte_level_tokenizer()  # bytes: a pessimistic token count
    encoded = encode_examples(demo.train, tokenizer, limits=DataLimits())
    assert len(encoded) == len(demo.train)
    assert max(len(e.demonstration_ids) for e in encoded) <= 128


def test_malformed_demo_file_names_the_nested_field(tmp_path):
    good = DEMO_FACTS_PATH.read_text(encoding="utf-8").splitlines()[0]
    fact = json.loads(good)
    fact["id"] = "other"
    del fact["direct"][0]["answer"]
    path = tmp_path / "facts.jsonl"
    path.write_text(good + "\n" + json.dumps(fact) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_demo_facts(path)
    assert (caught.value.source, caught.value.row, caught.value.field) == (str(path), 2, "direct[0].answer")
    fact = json.loads(good)
    fact["id"], fact["train"][0]["demonstration"] = "other", ""
    path.write_text(good + "\n" + json.dumps(fact) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_demo_facts(path)
    assert caught.value.field == "train[0].demonstration" and "empty" in str(caught.value)
    path.write_text(good + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="duplicate"):
        load_demo_facts(path)
