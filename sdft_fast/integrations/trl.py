"""TRL's SDFT and GKD trainers with their distillation loss on sdft_fast's fused kernels.

Change one import and keep everything else (constructor, config, callbacks, PEFT, teachers)::

    from sdft_fast.integrations.trl import FusedSDFTTrainer as SDFTTrainer
    from sdft_fast.integrations.trl import FusedGKDTrainer as GKDTrainer

Both subclasses run the student's and the teacher's backbones instead of the full models, so no
[batch, tokens, vocab] logits are built, and hand the final hidden states with the LM heads to
``sdft_fast.self_distill_loss`` (``token_logprobs`` / ``linear_cross_entropy`` for sampled-token
terms and importance ratios). Everything else is TRL's own code: generation, rollout buffering,
teacher prompts and weights (base / EMA / live, the PEFT adapter switches), the callbacks, the
importance-sampling clip (TRL's function), the normalisation and the metrics.

``FusedSDFTTrainer`` hooks ``SDFTTrainer._compute_teacher_student_logits`` (hidden states instead
of logits), ``_compute_self_distillation_loss`` (the fused loss) and ``_compute_rollout_logps``
(rollout log-probs from hidden states), per ``distillation_mode``:

* ``full_logits``: the full-vocabulary divergence (``distillation_alpha``: forward KL, JSD,
  reverse KL);
* ``topk_logits``: ``topk=distillation_topk`` on the student's top-k ids, with
  ``distillation_add_tail``'s tail bucket;
* ``sampled_token``: TRL's token-level reverse-KL term from the student's (differentiable) and the
  teacher's log-probabilities of the sampled tokens.

``FusedGKDTrainer`` replaces ``GKDTrainer.compute_loss``: the generalized JSD with ``beta`` over
the label tokens, the teacher's own head (any hidden size, same vocabulary), TRL's token
normalisation (``num_items_in_batch`` or the label count).

What cannot be fused falls back to TRL's code with a one-time warning: the vLLM teacher server
(it returns top-k log-probs, not hidden states), distributed wrappers (DDP / DeepSpeed / FSDP: the
backbone is called directly, which they do not allow), heads that are not a plain linear layer
(soft-capping, logit scales, a PEFT adapter on ``lm_head``), and calls that want the logits
(``return_outputs=True``). An untested TRL whose hooks changed, or an option value TRL would only
trip over mid-training, is a ``TRLIntegrationError`` when the trainer is built.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

try:
    import trl
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.sdft import SDFTTrainer
    from trl.experimental.sdft.loss_utils import apply_importance_sampling_clipping
except ImportError as error:  # pragma: no cover - exercised only without TRL (or with an old one)
    import importlib.metadata

    try:
        found = f"trl {importlib.metadata.version('trl')} is installed but lacks {error.name or 'a module'}"
    except importlib.metadata.PackageNotFoundError:
        found = "trl is not installed"
    raise ImportError(
        f"sdft_fast.integrations.trl needs TRL's experimental SDFT and GKD trainers (tested: "
        f"trl>=1.16,<1.17); {found}: pip install 'sdft_fast[trl]'"
    ) from error

from packaging.version import Version

from sdft_fast.integrations.causal_lm import causal_lm_parts, last_hidden_states, plain_linear_head
from sdft_fast.loss import linear_cross_entropy, reduce_token_losses, self_distill_loss, token_logprobs

TESTED_TRL = ("1.16.0", "1.17.0")  # [low, high): the versions the tests ran against
logger = logging.getLogger(__name__)


class TRLIntegrationError(ValueError):
    """A TRL version or a trainer option the fused trainers cannot honour; raised at construction."""


# The TRL methods these subclasses override or call, with the parameters they rely on.
HOOKS = {
    (SDFTTrainer, "compute_loss"): ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
    (SDFTTrainer, "_compute_teacher_student_logits"): ("self", "model", "teacher_model", "inputs"),
    (SDFTTrainer, "_compute_self_distillation_loss"): ("self", "model", "inputs", "distillation_logits"),
    (SDFTTrainer, "_compute_server_distillation_loss"): ("self", "model", "inputs"),
    (SDFTTrainer, "_compute_rollout_logps"): (
        "self",
        "prompt_ids",
        "prompt_mask",
        "completion_ids",
        "completion_mask",
    ),
    (SDFTTrainer, "_get_teacher_context_for_self_distillation"): ("self",),
    (SDFTTrainer, "_log_self_distillation_metric"): ("self", "mode", "value"),
    (GKDTrainer, "compute_loss"): ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
    (GKDTrainer, "generalized_jsd_loss"): (
        "student_logits",
        "teacher_logits",
        "labels",
        "beta",
        "temperature",
        "reduction",
        "num_items_in_batch",
    ),
}
CALLED = {
    apply_importance_sampling_clipping: ("per_token_loss", "student_log_probs", "old_log_probs", "clip_coeff")
}


def check_trl_compatibility(hooks=None) -> None:
    """Raise ``TRLIntegrationError`` naming the first TRL method whose signature differs from the
    one these trainers were written against; warn once when the version is outside the tested
    range but every hook still matches."""
    installed = Version(trl.__version__)
    for (owner, name), expected in (hooks or HOOKS).items():
        method = getattr(owner, name, None)
        got = None if method is None else tuple(inspect.signature(method).parameters)
        if got != expected:
            raise TRLIntegrationError(
                f"trl {trl.__version__}: {owner.__name__}.{name} "
                + ("is gone" if got is None else f"now takes {got}, expected {expected}")
                + f"; sdft_fast.integrations.trl is tested with trl>={TESTED_TRL[0]},<{TESTED_TRL[1]} "
                "(pip install 'sdft_fast[trl]')"
            )
    for function, expected in CALLED.items():
        if tuple(inspect.signature(function).parameters) != expected:
            raise TRLIntegrationError(
                f"trl {trl.__version__}: {function.__name__} now takes "
                f"{tuple(inspect.signature(function).parameters)}, expected {expected}"
            )
    if not Version(TESTED_TRL[0]) <= installed < Version(TESTED_TRL[1]):
        _warn_once(
            f"trl {installed} is outside the tested range >={TESTED_TRL[0]},<{TESTED_TRL[1]}; its hooks "
            "match, so the fused loss is used"
        )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning("sdft_fast: %s", message)


class _FusionMixin:
    """What both trainers share: which models can be fused, and the one-time fallback notice."""

    def _fusion_blocker(self, models) -> str | None:
        """Why the fused loss cannot serve these models (None: it can)."""
        if self.accelerator.num_processes > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return "distributed training (DDP / DeepSpeed / FSDP)"
        for role, model in models:
            unwrapped = self.accelerator.unwrap_model(model)
            if not plain_linear_head(unwrapped, causal_lm_parts(unwrapped)):
                return (
                    f"the {role}'s logits are not a plain linear LM head over its backbone (a wrapped "
                    "or adapted lm_head, soft-capping or a logit scale)"
                )
        return None

    def _parts(self, model):
        return causal_lm_parts(self.accelerator.unwrap_model(model))

    def _hidden_states(self, parts, input_ids, attention_mask):
        # Under the accelerator's autocast, like the wrapped model.forward TRL calls (bf16 / fp16
        # mixed precision); the loss then runs on the hidden states in the head's dtype.
        with self.accelerator.autocast():
            hidden = last_hidden_states(parts, input_ids, attention_mask)
        return hidden.to(parts.weight.dtype)

    def _fallback(self, reason: str) -> None:
        _warn_once(f"{type(self).__name__}: {reason}: TRL's own full-logit loss is used there")

    def _check_alpha(self, name: str, value) -> None:
        if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
            raise TRLIntegrationError(
                f"{name} must be in [0, 1] (0 forward KL, 1 reverse KL, between: JSD), got {value!r}"
            )


@dataclass
class FusedDistillationInputs:
    """Hidden states and heads in place of TRL's ``DistillationLogits`` (same alignment)."""

    completion_ids: torch.Tensor  # [B, K]
    loss_mask: torch.Tensor  # [B, K] 0/1: completion tokens after num_loss_tokens_to_skip
    student_hidden: torch.Tensor  # [B, K, D]
    teacher_hidden: torch.Tensor  # [B, K, D_t]
    student_head: tuple  # (weight [V, D], bias [V] | None)
    teacher_head: tuple | None  # the teacher's own (weight, bias); None: the student's


class FusedSDFTTrainer(_FusionMixin, SDFTTrainer):
    """TRL's ``SDFTTrainer`` (same constructor, config and callbacks) with the fused loss."""

    def __init__(self, *args, **kwargs):
        check_trl_compatibility()
        super().__init__(*args, **kwargs)
        self._check_config()
        if self.args.use_teacher_server:
            self._blocker = "the vLLM teacher server (top-k log-probs, no hidden states)"
        else:
            models = [("student", self.model)]
            if self.teacher_model is not self.model:
                models.append(("teacher", self.teacher_model))
            self._blocker = self._fusion_blocker(models)

    def _check_config(self) -> None:
        args = self.args
        modes = ("full_logits", "topk_logits", "sampled_token")
        if args.distillation_mode not in modes:
            raise TRLIntegrationError(
                f"distillation_mode must be one of {modes}, got {args.distillation_mode!r}"
            )
        self._check_alpha("distillation_alpha", args.distillation_alpha)
        if not (isinstance(args.temperature, (int, float)) and args.temperature > 0):
            raise TRLIntegrationError(
                f"temperature must be > 0 (it divides the logits), got {args.temperature!r}"
            )
        if args.distillation_mode == "topk_logits":
            vocab = self.model.get_output_embeddings().weight.shape[0]
            topk = args.distillation_topk
            if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= vocab:
                raise TRLIntegrationError(
                    f"distillation_topk must be an integer in [1, {vocab}] (the vocabulary size) with "
                    f"distillation_mode='topk_logits', got {topk!r}"
                )
        if args.distillation_is_clip is not None and not args.distillation_is_clip > 0:
            raise TRLIntegrationError(
                f"distillation_is_clip must be > 0 or None, got {args.distillation_is_clip!r}"
            )

    # ------------------------------------------------------------------ hooks into SDFTTrainer

    def _forward_hidden(self, model, input_ids, attention_mask, logits_to_keep):
        """Hidden states aligned like TRL's ``_forward_logits`` ([B, K, D]) and the model's head."""
        parts = self._parts(model)
        hidden = self._hidden_states(parts, input_ids, attention_mask)
        return hidden[:, -(logits_to_keep + 1) : -1, :], (parts.weight, parts.bias)

    def _compute_teacher_student_logits(self, model, teacher_model, inputs):
        if self._blocker is not None:
            self._fallback(self._blocker)
            return super()._compute_teacher_student_logits(model, teacher_model, inputs)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        logits_to_keep = completion_ids.size(1)
        loss_mask = completion_mask
        if self.num_loss_tokens_to_skip > 0:  # SDFT's first-tokens skip, as in TRL
            positions = torch.arange(completion_mask.size(1), device=completion_mask.device)
            loss_mask = completion_mask * (positions[None, :] >= self.num_loss_tokens_to_skip).long()
        student_hidden, student_head = self._forward_hidden(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            logits_to_keep,
        )
        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            teacher_hidden, teacher_head = self._forward_hidden(
                teacher_model, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], logits_to_keep
            )
        if teacher_head[0] is student_head[0] and teacher_head[1] is student_head[1]:
            teacher_head = None  # one head (PEFT teachers, live teacher)
        return FusedDistillationInputs(
            completion_ids, loss_mask, student_hidden, teacher_hidden, student_head, teacher_head
        )

    def _compute_self_distillation_loss(self, model, inputs, distillation_logits):
        if not isinstance(distillation_logits, FusedDistillationInputs):
            return super()._compute_self_distillation_loss(model, inputs, distillation_logits)
        fused, args = distillation_logits, self.args
        mode = "train" if model.training else "eval"
        mask = fused.loss_mask.bool()
        weight, bias = fused.student_head
        teacher_weight, teacher_bias = fused.teacher_head or (weight, bias)
        if not bool(mask.any()):
            self._log_self_distillation_metric(mode, 0.0)
            # zero, attached to everything that trains so that backward gives zero gradients
            attached = [
                t.sum() for t in (fused.student_hidden, weight, bias) if t is not None and t.requires_grad
            ]
            return sum(attached) * 0.0 if attached else fused.student_hidden.sum() * 0.0
        tau = self.temperature
        student_logps = None
        if args.distillation_mode == "sampled_token":
            # reverse KL on the sampled tokens: d/dtheta of (log p_s - log p_t) log p_s, ratio detached
            student_logps = -linear_cross_entropy(
                fused.student_hidden,
                weight,
                bias,
                fused.completion_ids,
                loss_mask=mask,
                reduction="none",
                temperature=tau,
            )
            teacher_logps = token_logprobs(
                fused.teacher_hidden, teacher_weight, teacher_bias, fused.completion_ids, temperature=tau
            )
            per_token = (student_logps - teacher_logps).detach() * student_logps
            student_logps = student_logps.detach()
        else:
            teacher_weight, teacher_bias = fused.teacher_head or (None, None)
            topk = args.distillation_mode == "topk_logits"
            per_token = self_distill_loss(
                fused.student_hidden,
                fused.teacher_hidden,
                weight,
                bias,
                teacher_weight=teacher_weight,
                teacher_bias=teacher_bias,
                alpha=float(args.distillation_alpha),
                temperature=tau,
                loss_mask=mask,
                reduction="none",
                topk=args.distillation_topk if topk else None,
                topk_tail=bool(args.distillation_add_tail) if topk else False,
            )
        old_logps = inputs.get("old_per_token_logps")
        if args.distillation_is_clip is not None and old_logps is not None:
            if student_logps is None:
                student_logps = token_logprobs(
                    fused.student_hidden, weight, bias, fused.completion_ids, temperature=tau
                )
            per_token = apply_importance_sampling_clipping(
                per_token, student_logps, old_logps, args.distillation_is_clip
            )
        loss = reduce_token_losses(per_token, loss_mask=mask, reduction="sequence_mean")
        metric = reduce_token_losses(per_token.detach(), loss_mask=mask, reduction="token_mean")
        self._log_self_distillation_metric(mode, self.accelerator.gather(metric).mean().item())
        return loss

    def _compute_rollout_logps(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        if self._blocker is not None:
            return super()._compute_rollout_logps(prompt_ids, prompt_mask, completion_ids, completion_mask)
        # Rollouts reused by later optimizer steps (num_iterations > 1, or more generation than
        # accumulation steps) keep the log-probs of the policy that sampled them, as in TRL.
        if (
            self.args.gradient_accumulation_steps % (self.args.steps_per_generation * self.num_iterations)
            == 0
        ):
            return None
        with torch.no_grad():
            hidden, (weight, bias) = self._forward_hidden(
                self.model,
                torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([prompt_mask, completion_mask], dim=1),
                completion_ids.size(1),
            )
            return token_logprobs(hidden, weight, bias, completion_ids, temperature=self.temperature)

    def _compute_server_distillation_loss(self, model, inputs):
        self._fallback(self._blocker or "the vLLM teacher server")
        return super()._compute_server_distillation_loss(model, inputs)


class FusedGKDTrainer(_FusionMixin, GKDTrainer):
    """TRL's ``GKDTrainer`` (same constructor, config and callbacks) with the fused loss."""

    def __init__(self, *args, **kwargs):
        check_trl_compatibility()
        super().__init__(*args, **kwargs)
        self._check_alpha("beta", self.beta)
        self._blocker = self._fusion_blocker([("student", self.model), ("teacher", self.teacher_model)])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or self._blocker is not None:
            self._fallback("the caller asks for the logits" if return_outputs else self._blocker)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        student = self._parts(model)
        student_hidden = self._hidden_states(student, inputs["input_ids"], inputs["attention_mask"])
        self.teacher_model.eval()
        teacher = self._parts(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._hidden_states(teacher, inputs["input_ids"], inputs["attention_mask"])
        # position i predicts token i + 1; the labels' -100 marks prompt and padding
        mask = inputs["labels"][:, 1:] != -100
        total = self_distill_loss(
            student_hidden[:, :-1],
            teacher_hidden[:, :-1],
            student.weight,
            student.bias,
            teacher_weight=teacher.weight,
            teacher_bias=teacher.bias,
            alpha=float(self.beta),
            temperature=1.0,  # TRL's compute_loss leaves generalized_jsd_loss at temperature 1
            loss_mask=mask,
            reduction="sum",
        )
        if num_items_in_batch is not None:  # TRL: the global token count of the accumulated batch
            return total / torch.as_tensor(num_items_in_batch).to(total.device)
        return total / mask.sum().clamp_min(1)
