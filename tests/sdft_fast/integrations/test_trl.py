"""FusedSDFTTrainer / FusedGKDTrainer against TRL's stock trainers on tiny random models (CPU, fp32).

Both trainers of a pair get the same seed, the same data and the same rollouts (generation is
replaced by a deterministic function of the prompt), so their losses and gradients must agree to
fp32 rounding: loss relative 1e-5, trainable-parameter gradients relative 1e-4 (of the largest
gradient), for one step of every distillation mode, teacher kind and model kind, and along five
steps (where the importance-sampling clip is active).
"""

import subprocess
import sys
import textwrap

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from helpers import chatml_byte_tokenizer, save_tiny_llama  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, TrainerCallback  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402
from trl.experimental.sdft import SDFTConfig, SDFTTrainer  # noqa: E402

from sdft_fast.integrations.trl import (  # noqa: E402
    FusedGKDTrainer,
    FusedSDFTTrainer,
    TRLIntegrationError,
    check_trl_compatibility,
)

FACTS = [
    ("What colour is the Vellmar roof?", "It is teal."),
    ("Who won the Orrin open?", "Mira Talvane won."),
    ("How tall is Kessan Tower?", "412 metres."),
    ("Capital of Drevia?", "Port Ulmen."),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # The random init (std 0.02) makes every layer's output negligible next to the token's own
    # embedding: the teacher's context changes nothing and the divergences are ~1e-10, where fp32
    # keeps no digit. Layers 10x larger and a 4x final norm make the context matter and give
    # logits of a few units, like a trained model's.
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            weight.mul_(10.0 if name.endswith("proj.weight") else 1.0)
        model.model.norm.weight.mul_(4.0)
    model.save_pretrained(folder)
    return str(folder)


def _fake_generate(self, prompt_ids):
    # Completions drawn from a generator seeded by the prompt: identical in both trainers.
    completions = []
    for ids in prompt_ids:
        gen = torch.Generator().manual_seed(sum(ids) * 31 + len(ids))
        length = 4 + sum(ids) % 5  # ragged: padding and masks are exercised
        completions.append(torch.randint(3, 250, (length,), generator=gen).tolist())
    return prompt_ids, completions


class _Recorder(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )


def _recording(cls):
    class Recording(cls):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            self.recorded_losses.append(float(loss.detach().double()))
            return loss

    return Recording


def _common_args(steps):
    # The TrainingArguments both trainers share: CPU, fp32, seeded, no logging or saving.
    return dict(
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's configs default to bf16 autocast, also on the CPU
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _lora():
    return peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def _run_sdft(cls, model_dir, tmp_path, steps=1, peft_config=True, **options):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": q}], "privileged_context": a} for q, a in FACTS]
    )
    config = SDFTConfig(
        output_dir=str(tmp_path / cls.__name__),
        num_generations=1,
        max_completion_length=8,
        **_common_args(steps),
        **options,
    )
    lora = _lora()
    recorder = _Recorder()
    trainer = _recording(cls)(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=chatml_byte_tokenizer(),
        peft_config=lora if peft_config else None,
        callbacks=[recorder],
    )
    trainer.recorded_losses = []
    trainer._generate = _fake_generate.__get__(trainer)
    trainer.train()
    return trainer.recorded_losses, recorder.grads


def _assert_same(fused, stock):
    fused_losses, fused_grads = fused
    stock_losses, stock_grads = stock
    assert len(fused_losses) == len(stock_losses) > 0
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(stock_losses), rtol=1e-5, atol=1e-8)
    assert fused_grads and len(fused_grads) == len(stock_grads)
    for got, want in zip(fused_grads, stock_grads):
        assert got.keys() == want.keys()
        scale = max(float(g.abs().max()) for g in want.values())
        assert scale > 0
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


ONE_STEP = {
    "full_jsd_peft_base_skip": dict(
        distillation_mode="full_logits", distillation_alpha=0.5, num_loss_tokens_to_skip=2, temperature=0.7
    ),
    "topk_peft_base": dict(distillation_mode="topk_logits", distillation_topk=16, distillation_alpha=0.5),
    "topk_tail_forward_kl": dict(
        distillation_mode="topk_logits",
        distillation_topk=16,
        distillation_add_tail=True,
        distillation_alpha=0.0,
    ),
    "sampled_token": dict(distillation_mode="sampled_token", distillation_alpha=1.0),
    "full_reverse_kl_peft_ema_adapter": dict(
        distillation_mode="full_logits", distillation_alpha=1.0, teacher_model_kind="ema"
    ),
    "topk_live_teacher": dict(
        distillation_mode="topk_logits", distillation_topk=8, teacher_model_kind="live"
    ),
}


@pytest.mark.parametrize("case", list(ONE_STEP))
def test_one_step_equals_stock_sdft(case, model_dir, tmp_path):
    options = ONE_STEP[case]
    _assert_same(
        _run_sdft(FusedSDFTTrainer, model_dir, tmp_path, **options),
        _run_sdft(SDFTTrainer, model_dir, tmp_path, **options),
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(distillation_mode="full_logits", distillation_alpha=0.0, teacher_model_kind="ema"),
        dict(distillation_mode="topk_logits", distillation_topk=12, distillation_add_tail=True),
    ],
    ids=["full_forward_kl_ema_copy", "topk_tail_base_copy"],
)
def test_full_model_with_a_teacher_copy_equals_stock(options, model_dir, tmp_path):
    # No PEFT: the teacher is a separate model with its own (tied, trained-in-the-student) head.
    _assert_same(
        _run_sdft(FusedSDFTTrainer, model_dir, tmp_path, peft_config=False, **options),
        _run_sdft(SDFTTrainer, model_dir, tmp_path, peft_config=False, **options),
    )


def test_five_steps_with_importance_clipping_equal_stock(model_dir, tmp_path):
    # num_iterations=2: every rollout batch serves two optimizer steps, the second one weighted by
    # TRL's clipped importance ratio against the rollout policy's log-probs.
    options = dict(
        distillation_mode="topk_logits", distillation_topk=16, num_iterations=2, distillation_is_clip=1.05
    )
    fused = _run_sdft(FusedSDFTTrainer, model_dir, tmp_path, steps=5, **options)
    stock = _run_sdft(SDFTTrainer, model_dir, tmp_path, steps=5, **options)
    assert len(set(fused[0])) == 5  # the curve moves
    _assert_same(fused, stock)


def test_no_counted_token_gives_zero_loss_like_stock(model_dir, tmp_path):
    options = dict(distillation_mode="full_logits", num_loss_tokens_to_skip=20)
    fused = _run_sdft(FusedSDFTTrainer, model_dir, tmp_path, **options)
    assert fused[0] == [0.0]
    assert fused[0] == _run_sdft(SDFTTrainer, model_dir, tmp_path, **options)[0]


@pytest.mark.parametrize(
    "options,message",
    [
        (
            dict(distillation_mode="topk_logits", distillation_topk=500),
            "distillation_topk must be an integer in [1, 259]",
        ),
        (
            dict(distillation_mode="full_logits", distillation_alpha=1.5),
            "distillation_alpha must be in [0, 1]",
        ),
    ],
)
def test_bad_options_fail_at_construction(options, message, model_dir, tmp_path):
    with pytest.raises(TRLIntegrationError) as error:
        _run_sdft(FusedSDFTTrainer, model_dir, tmp_path, steps=0, **options)
    assert message in str(error.value)


def test_adapted_lm_head_falls_back_to_trl_with_a_notice(model_dir, tmp_path, caplog, monkeypatch):
    # A LoRA on lm_head makes the head something else than a plain linear layer: TRL's own loss.
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    monkeypatch.setattr(peft, "LoraConfig", lambda **_: lora)
    with caplog.at_level("WARNING", logger="sdft_fast.integrations.trl"):
        fused = _run_sdft(FusedSDFTTrainer, model_dir, tmp_path, distillation_mode="full_logits")
    assert any("TRL's own full-logit loss is used" in r.getMessage() for r in caplog.records)
    _assert_same(fused, _run_sdft(SDFTTrainer, model_dir, tmp_path, distillation_mode="full_logits"))


def test_trl_hook_signatures_match():
    # Fails, naming the method, when a TRL upgrade changes a method the fused trainers override.
    check_trl_compatibility()


def test_a_changed_hook_signature_is_a_clear_error():
    hooks = {(SDFTTrainer, "_compute_self_distillation_loss"): ("self", "model", "inputs", "logits")}
    with pytest.raises(TRLIntegrationError, match=r"SDFTTrainer._compute_self_distillation_loss now takes"):
        check_trl_compatibility(hooks)


def test_importing_sdft_fast_does_not_import_trl():
    code = textwrap.dedent(
        """
        import sys
        import sdft_fast, sdft_fast.loss, sdft_fast.integrations, sdft_fast.integrations.causal_lm
        from sdft_fast import self_distill_loss
        assert "trl" not in sys.modules, "importing sdft_fast imported trl"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- GKD


def _teacher(model_dir):
    # Another architecture and hidden size, the same vocabulary.
    torch.manual_seed(5)
    config = Qwen2Config(
        vocab_size=259,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return Qwen2ForCausalLM(config)


def _fake_on_policy(model, inputs, generation_config):
    # Deterministic "generations": the prompt plus 5 tokens seeded by it.
    prompts, prompt_mask = inputs["prompts"], inputs["prompt_attention_mask"]
    gen = torch.Generator().manual_seed(int(prompts.sum()))
    completion = torch.randint(3, 250, (prompts.shape[0], 5), generator=gen)
    tokens = torch.cat([prompts, completion], dim=1)
    attention = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)
    labels = tokens.clone()
    labels[:, : prompts.shape[1]] = -100
    return tokens, attention, labels


def _run_gkd(cls, model_dir, tmp_path, steps=1, peft_config=True, **options):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in FACTS
        ]
    )
    config = GKDConfig(
        output_dir=str(tmp_path / cls.__name__),
        **_common_args(steps),
        max_new_tokens=5,
        **options,
    )
    lora = _lora()
    recorder = _Recorder()
    trainer = _recording(cls)(
        model=model,
        teacher_model=_teacher(model_dir),
        args=config,
        train_dataset=dataset,
        processing_class=chatml_byte_tokenizer(),
        peft_config=lora if peft_config else None,
        callbacks=[recorder],
    )
    trainer.recorded_losses = []
    trainer.generate_on_policy_outputs = _fake_on_policy
    trainer.train()
    return trainer.recorded_losses, recorder.grads


@pytest.mark.parametrize(
    "options,peft_config",
    [
        (dict(beta=0.5, lmbda=0.0), True),
        (dict(beta=0.0, lmbda=1.0), False),
        (dict(beta=1.0, lmbda=1.0), True),
    ],
    ids=["jsd_dataset_peft", "forward_kl_on_policy_full", "reverse_kl_on_policy_peft"],
)
def test_gkd_one_step_equals_stock(options, peft_config, model_dir, tmp_path):
    _assert_same(
        _run_gkd(FusedGKDTrainer, model_dir, tmp_path, peft_config=peft_config, **options),
        _run_gkd(GKDTrainer, model_dir, tmp_path, peft_config=peft_config, **options),
    )


def test_gkd_five_steps_equal_stock(model_dir, tmp_path):
    options = dict(beta=0.5, lmbda=0.5)  # a mix of dataset and on-policy steps (TRL's random draw)
    fused = _run_gkd(FusedGKDTrainer, model_dir, tmp_path, steps=5, **options)
    stock = _run_gkd(GKDTrainer, model_dir, tmp_path, steps=5, **options)
    _assert_same(fused, stock)
