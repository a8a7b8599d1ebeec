"""Evaluation: new-task accuracy, retention probes and KL drift from the starting model.

- `answer_matches`: an answer counts when its normalised form is a whole-word span of the normalised
  prediction (case, whitespace and punctuation ignored).
- `reply_correct`: a row's reply is correct when it contains one of the row's accepted answers
  (`answer_matches`) and, where the row has a `pattern` (a regular expression, e.g. an output format),
  the raw reply matches it (`re.search`, `.` matching newlines); a row needs an answer or a pattern.
- `evaluate_accuracy`: greedy answers (`generate(..., do_sample=False)`) scored by `reply_correct`.
  Works on a `SelfDistillModel` (student adapter active), on any object with the same `generate`
  method, and on a plain Hugging Face causal LM (wrapped by `HFGenerator`).
- `retention_probes`: a built-in set of general questions that SmolLM2-135M-Instruct answers
  correctly before training; forgetting shows as a drop in this accuracy.
- `reference_logprobs` + `kl_from_reference` / `drift_from_reference`: the mean per-token KL(trained ||
  start) on general prompts followed by the start model's own greedy continuations, and how much
  less likely the trained model finds those continuations (mean NLL increase per token). The start model's log-probs are
  computed once before training and cached, so the comparison works the same for LoRA and for full
  fine-tuning (nothing relies on switching adapters off).
"""

from __future__ import annotations

import os
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sdft_fast.data import (
    DEFAULT_TEACHER_TEMPLATE,
    DataError,
    EncodedExample,
    Example,
    encode_prompt,
    load_examples,
    teacher_prompt,
)
from sdft_fast.sampling import pad_token_id, reference_generate, stop_token_ids

# ----------------------------------------------------------------------------------------------------
# Answer matching
# ----------------------------------------------------------------------------------------------------

_DIGIT_GROUP_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")  # "1,200" -> "1200"
_NON_WORD = re.compile(r"[^\w]+|_")


def normalize_text(text: str) -> str:
    """Lower-case, NFKC, drop thousands separators, punctuation -> space, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _DIGIT_GROUP_COMMA.sub("", text)
    return " ".join(_NON_WORD.sub(" ", text).split())


def answer_matches(prediction: str, answers: str | Sequence[str]) -> bool:
    """True when any answer's normalised form occurs in the normalised prediction as whole words.

    "paris" matches "The capital is Paris." but not "Parisian"; "12" does not match "112".
    """
    if isinstance(answers, str):
        answers = [answers]
    normalized_prediction = f" {normalize_text(prediction)} "
    for answer in answers:
        normalized_answer = normalize_text(answer)
        if not normalized_answer:
            raise ValueError(f"answer_matches: answer {answer!r} is empty after normalisation")
        if f" {normalized_answer} " in normalized_prediction:
            return True
    return False


PATTERN_FIELD = "pattern"  # an evaluation row's optional regular expression (kept in Example.meta)


def reply_pattern(example: Example | EncodedExample) -> re.Pattern | None:
    """The row's compiled ``pattern``, None without one; `DataError` (file, row, field) when it is not
    a valid regular expression or the row has neither a pattern nor an answer to score by."""
    pattern = example.meta.get(PATTERN_FIELD)
    if pattern is None:
        if not example.answers:
            raise DataError(
                example.source, example.row, "answer", "an evaluation row needs an answer or a pattern"
            )
        return None
    if not isinstance(pattern, str) or not pattern:
        raise DataError(
            example.source, example.row, PATTERN_FIELD, f"must be a non-empty string, got {pattern!r}"
        )
    try:
        return re.compile(pattern, flags=re.DOTALL)
    except re.error as error:
        raise DataError(
            example.source, example.row, PATTERN_FIELD, f"is not a valid regular expression: {error}"
        ) from error


def reply_correct(prediction: str, answers: Sequence[str] | None, pattern: re.Pattern | None = None) -> bool:
    """Every criterion the row gives holds: one of ``answers`` occurs (`answer_matches`), and the raw
    reply matches ``pattern`` (`re.search`). A row with neither criterion is an error upstream."""
    if answers and not answer_matches(prediction, answers):
        return False
    return pattern is None or pattern.search(prediction) is not None


# ----------------------------------------------------------------------------------------------------
# Generation on a plain Hugging Face model
# ----------------------------------------------------------------------------------------------------


class HFGenerator:
    """The `SelfDistillModel.generate` contract on a plain HF causal LM (the reference decode loop).

    Used to evaluate a model that is not wrapped (the starting checkpoint, a merged export).
    """

    def __init__(self, hf_model):
        self.hf_model = hf_model

    @property
    def device(self):
        return next(self.hf_model.parameters()).device

    def generate(self, prompts: list[list[int]], **kwargs) -> list[list[int]]:
        return reference_generate(self.hf_model, prompts, **kwargs)


def _as_generator(model):
    """A plain HF model gets wrapped; anything else must already have the contract's `generate`."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        return HFGenerator(model)
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"model must have a generate(prompts, ...) method, got {type(model).__name__}")
    return model


def greedy_completions(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: str | None = None,
):
    """Greedy completions of ``prompt_ids``, ``batch_size`` at a time, stopping on the training
    rollouts' stop tokens (``sampling.stop_token_ids``). ``progress``: a tqdm bar on stderr with
    this label."""
    generator = _as_generator(model)
    stop_ids = stop_token_ids(tokenizer, getattr(generator, "hf_model", None))
    completions: list[list[int]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompt_ids), desc=progress, unit="prompt", file=sys.stderr, dynamic_ncols=True)
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        completions += generator.generate(
            batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids or None,
            pad_token_id=pad_token_id(tokenizer, stop_ids),
        )
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return completions


# ----------------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------------


def evaluate_accuracy(
    model,
    tokenizer,
    examples: Sequence[Example | EncodedExample],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    view: str = "student",
    teacher_template: str = DEFAULT_TEACHER_TEMPLATE,
    use_chat_template: bool | None = None,
    progress: str | None = None,
) -> dict:
    """Greedy-decode an answer to each example and score it with `reply_correct` (its accepted
    answers and, where the row has one, its pattern).

    view: "student" answers the bare prompt (what training should teach); "teacher" answers the teacher
      prompt (prompt + demonstration in context), i.e. what the teacher can do in-context, an upper
      bound for what self-distillation can transfer.
    Returns {"accuracy", "n", "correct", "records": [{row, source, answers, prediction, correct, meta}]}.
    """
    if view not in ("student", "teacher"):
        raise ValueError(f"evaluate_accuracy: view must be 'student' or 'teacher', got {view!r}")
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError(
            f"evaluate_accuracy: batch_size and max_new_tokens must be positive, got {batch_size}, {max_new_tokens}"
        )
    _as_generator(model)  # fail early for an object without generate
    prompts_ids = []
    patterns = [reply_pattern(example) for example in examples]  # DataError before any decoding
    for example in examples:
        if isinstance(example, EncodedExample):
            ids = example.teacher_prompt_ids if view == "teacher" else example.student_prompt_ids
        else:
            prompt = example.prompt
            if view == "teacher":
                prompt = teacher_prompt(example.prompt, example.demonstration, teacher_template)
            ids = encode_prompt(tokenizer, prompt, use_chat_template)
        prompts_ids.append(ids)

    # Each distinct prompt is decoded once (probe sets may share questions); every row keeps its own scoring.
    distinct: dict[tuple[int, ...], int] = {}
    for ids in prompts_ids:
        distinct.setdefault(tuple(ids), len(distinct))
    unique = [list(ids) for ids in distinct]
    decoded = greedy_completions(
        model, tokenizer, unique, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    completions = [decoded[distinct[tuple(ids)]] for ids in prompts_ids]
    records = []
    for example, pattern, completion in zip(examples, patterns, completions):
        prediction = tokenizer.decode(completion, skip_special_tokens=True)
        records.append(
            {
                "row": example.row,
                "source": example.source,
                "answers": list(example.answers or []),
                "prediction": prediction,
                "correct": reply_correct(prediction, example.answers, pattern),
                "meta": dict(example.meta),
            }
        )
    correct = sum(record["correct"] for record in records)
    return {
        "accuracy": correct / len(records) if records else 0.0,
        "n": len(records),
        "correct": correct,
        "records": records,
    }


# ----------------------------------------------------------------------------------------------------
# Retention probes
# ----------------------------------------------------------------------------------------------------

RETENTION_PROBES_PATH = Path(__file__).resolve().parent / "assets" / "retention_probes.jsonl"


def retention_probes(path: str | os.PathLike | None = None) -> list[Example]:
    """General-knowledge probes (built in: ``assets/retention_probes.jsonl``) as `Example`s.

    The built-in rows are questions SmolLM2-135M-Instruct answers correctly with greedy decoding
    before any training, so a drop means forgetting rather than noise around a guess; a few it
    gets wrong are kept on purpose (``"start_model_correct": false``), so the set can show gains
    as well as losses. The demonstration of each row is its canonical answer.
    """
    rows = load_examples(path or RETENTION_PROBES_PATH, require_demonstration=False)
    return [
        Example(
            prompt=row.prompt,
            demonstration=row.answers[0],
            answers=row.answers,
            row=row.row,
            source=row.source,
            meta={"kind": "retention", **row.meta},
        )
        for row in rows
    ]


# ----------------------------------------------------------------------------------------------------
# KL from the starting model
# ----------------------------------------------------------------------------------------------------

# Open-ended prompts: the continuation the start model writes for each is the text on which drift is
# measured. Different from the probes on purpose: this measures the output distribution as a whole.
GENERAL_PROMPTS: tuple[str, ...] = (
    "Write one sentence about the ocean.",
    "Give me a tip for sleeping better.",
    "What is photosynthesis?",
    "Describe a cat in a few words.",
    "How do I boil an egg?",
    "Name three colors of the rainbow.",
    "Why is exercise good for health?",
    "Tell me a fun fact about space.",
    "What does a computer do?",
    "Write a short greeting for a friend.",
    "Explain what rain is.",
    "What is the opposite of hot?",
    "List two fruits that are red.",
    "How many days are in a week?",
    "What is a verb?",
    "Suggest a name for a pet dog.",
)


@dataclass
class ReferenceLogprobs:
    """The start model's next-token log-probs on fixed sequences, cached before training.

    prompts / completions: token ids (the completion is the start model's greedy continuation).
    logprobs: [N, V] fp32 on CPU, one row per completion token, in (sequence, position) order; the row
      for completion token j is the distribution at the position that predicts it.
    """

    prompts: list[list[int]]
    completions: list[list[int]]
    logprobs: torch.Tensor  # [N, V]


@torch.no_grad()
def completion_logits(model, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
    """Next-token logits at every completion position, [N, V] fp32 (N = total completion tokens).

    A `SelfDistillModel` goes through its contract (`forward_student` hidden states x lm_head), so its
    student adapter is active; a plain HF model runs one forward per sequence.
    """
    if hasattr(model, "forward_student") and hasattr(model, "lm_head_weight"):
        out = model.forward_student(prompts, completions)
        hidden = out.student_hidden.float()  # [N, D]
        logits = hidden @ model.lm_head_weight.float().T  # [N, V]
        if model.lm_head_bias is not None:
            logits = logits + model.lm_head_bias.float()
        return logits
    hf_model = getattr(model, "hf_model", model)
    device = next(hf_model.parameters()).device
    rows = []
    for prompt, completion in zip(prompts, completions):
        if not completion:
            continue
        ids = torch.tensor([prompt + completion], dtype=torch.long, device=device)  # [1, T]
        logits = hf_model(input_ids=ids).logits[0].float()  # [T, V]
        # Position t predicts token t+1: completion token j sits at len(prompt)+j.
        rows.append(logits[len(prompt) - 1 : len(prompt) + len(completion) - 1].cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 0)


@torch.no_grad()
def reference_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]] | None = None,
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    use_chat_template: bool | None = None,
    progress: str | None = None,
) -> ReferenceLogprobs:
    """Cache the start model's log-probs on general prompts + its own greedy continuations.

    Call this before training; pass the result to `kl_from_reference` afterwards. Memory is
    N x V x 4 bytes (default 16 prompts x 16 tokens x 49k vocab = 50 MB).
    """
    prompts = list(prompts) if prompts is not None else list(GENERAL_PROMPTS)
    prompt_ids = [encode_prompt(tokenizer, p, use_chat_template) for p in prompts]
    completions = greedy_completions(
        model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    keep = [i for i, c in enumerate(completions) if c]
    prompt_ids = [prompt_ids[i] for i in keep]
    completions = [completions[i] for i in keep]
    logits = completion_logits(model, prompt_ids, completions)  # [N, V]
    return ReferenceLogprobs(prompt_ids, completions, torch.log_softmax(logits.float(), dim=-1).cpu())


@torch.no_grad()
def kl_from_reference(
    model,
    reference: ReferenceLogprobs | Callable[[list[list[int]], list[list[int]]], torch.Tensor],
    tokenizer=None,
    prompts: Sequence[str | list[dict]] | None = None,
    *,
    max_new_tokens: int = 16,
) -> float:
    """Mean per-token KL(model || reference) = sum_v p_model (log p_model - log p_ref), averaged over tokens.

    reference: a `ReferenceLogprobs` cached from the start model (the usual case; `tokenizer` and
      `prompts` are then unused), or a callable `(prompts_ids, completions_ids) -> [N, V] logits` for
      the start model (e.g. a frozen copy). The sequences are then the `prompts` (default
      `GENERAL_PROMPTS`) followed by `model`'s own greedy continuations, which needs `tokenizer`.
    """
    if isinstance(reference, ReferenceLogprobs):
        prompt_ids, completions = reference.prompts, reference.completions
        reference_lp = reference.logprobs  # [N, V]
    elif callable(reference):
        if tokenizer is None:
            raise ValueError("kl_from_reference: a callable reference needs the tokenizer to build sequences")
        prompts = list(prompts) if prompts is not None else list(GENERAL_PROMPTS)
        prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
        completions = greedy_completions(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens)
        keep = [i for i, c in enumerate(completions) if c]
        prompt_ids = [prompt_ids[i] for i in keep]
        completions = [completions[i] for i in keep]
        reference_lp = torch.log_softmax(reference(prompt_ids, completions).float().cpu(), dim=-1)
    else:
        raise TypeError(
            f"kl_from_reference: reference must be ReferenceLogprobs or a callable, got {type(reference).__name__}"
        )
    return _drift(model, prompt_ids, completions, reference_lp)["kl"]


@torch.no_grad()
def drift_from_reference(model, reference: ReferenceLogprobs) -> dict[str, float]:
    """How far ``model`` moved from the start model on the cached general prompts, two ways:

    kl: mean per-token KL(model || start), as `kl_from_reference`;
    dnll: mean per-token increase of the negative log-likelihood of the start model's own greedy
      continuation, NLL_model - NLL_start: a direct measure of how much less likely the trained model
      finds what the start model would have said (0 unchanged, > 0 forgetting).
    """
    if not isinstance(reference, ReferenceLogprobs):
        raise TypeError(
            f"drift_from_reference: reference must be ReferenceLogprobs, got {type(reference).__name__}"
        )
    return _drift(model, reference.prompts, reference.completions, reference.logprobs)


def _drift(model, prompt_ids, completions, reference_lp: torch.Tensor) -> dict[str, float]:
    model_lp = torch.log_softmax(completion_logits(model, prompt_ids, completions).float().cpu(), dim=-1)
    if model_lp.shape != reference_lp.shape:
        raise ValueError(
            f"kl_from_reference: model log-probs {tuple(model_lp.shape)} and reference "
            f"{tuple(reference_lp.shape)} differ in shape (different vocabulary or sequences?)"
        )
    if model_lp.shape[0] == 0:
        return {"kl": 0.0, "dnll": 0.0}
    per_token = (model_lp.exp() * (model_lp - reference_lp)).sum(dim=-1)  # [N]
    targets = torch.tensor([token for completion in completions for token in completion])  # [N]
    rows = torch.arange(targets.numel())
    dnll = reference_lp[rows, targets] - model_lp[rows, targets]  # [N]
    return {"kl": float(per_token.mean()), "dnll": float(dnll.mean())}


# ----------------------------------------------------------------------------------------------------
# What the CLI shows: a table, and the evaluation a training run does every eval_every steps
# ----------------------------------------------------------------------------------------------------


def format_report(report: dict, *, data_name: str | None = None) -> str:
    """The table ``sdft-fast eval`` prints: one metric a line, with its count."""
    rows = [("metric", "value", "n")]
    if "accuracy" in report:
        rows.append(
            (
                f"accuracy ({data_name or 'data'})",
                f"{report['accuracy']:.3f}",
                f"{report['correct']}/{report['n']}",
            )
        )
    if "retention_accuracy" in report:
        rows.append(
            (
                "retention probes",
                f"{report['retention_accuracy']:.3f}",
                f"{report['retention_correct']}/{report['retention_n']}",
            )
        )
    if "kl_from_start" in report:
        rows.append(("KL from the start model", f"{report['kl_from_start']:.5f}", "per token"))
    elif report.get("adapter") is None:
        rows.append(("KL from the start model", "-", "(no --adapter: this is the start model)"))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]}" for row in rows]
    lines.insert(1, "-" * (widths[0] + widths[1] + 12))
    return "\n".join(lines)


def make_eval_fn(
    model,
    tokenizer,
    examples: Sequence[Example | EncodedExample],
    *,
    retention: bool = True,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> Callable[[object, int], dict]:
    """``eval_fn(model, step)`` for ``train``: accuracy on ``examples``, the retention probes and
    the drift from the start model, as one metrics row (``eval_accuracy``, ``retention_accuracy``,
    ``kl_from_start``, ``dnll_from_start``). Call it before training: it caches the start model's
    log-probs now."""
    reference = reference_logprobs(model, tokenizer)
    probes = retention_probes() if retention else None

    def eval_fn(current, step: int) -> dict:
        kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
        row = {}
        result = evaluate_accuracy(current, tokenizer, examples, **kwargs)
        row.update(eval_accuracy=result["accuracy"], eval_n=result["n"])
        if probes is not None:
            row["retention_accuracy"] = evaluate_accuracy(current, tokenizer, probes, **kwargs)["accuracy"]
        drift = drift_from_reference(current, reference)
        row.update(kl_from_start=drift["kl"], dnll_from_start=drift["dnll"])
        return row

    return eval_fn
