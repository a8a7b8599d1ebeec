"""TrainConfig: every bad value is refused naming its field; the derived step sizes."""

import pytest

from sdft_fast.config import ConfigError, TrainConfig, flag_fields, resume_differences


@pytest.mark.parametrize(
    "field, value",
    [
        ("method", "dpo"),
        ("teacher", "frozen"),
        ("alpha", 1.5),
        ("batch_size", 0),
        ("max_steps", 0),
        ("num_generations", 0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_num_generations_needs_sdft_and_whole_groups_per_micro_batch():
    with pytest.raises(ValueError, match=r"TrainConfig.num_generations=3: must divide batch_size=8"):
        TrainConfig(num_generations=3, batch_size=8)
    with pytest.raises(ValueError, match=r"TrainConfig.num_generations=2: only method='sdft'"):
        TrainConfig(method="sft", num_generations=2)
    config = TrainConfig(num_generations=4, batch_size=8, grad_accum=2)
    assert config.sequences_per_step == 16 and config.prompts_per_step == 4


def test_rollout_source_needs_sdft_and_a_proper_mix():
    with pytest.raises(ValueError, match=r"TrainConfig.rollout_source='shared': must be one of"):
        TrainConfig(rollout_source="shared")
    with pytest.raises(ValueError, match=r"TrainConfig.rollout_source='teacher': only method='sdft'"):
        TrainConfig(method="sft", rollout_source="teacher")
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"TrainConfig.teacher_rollout_fraction=.*strictly between"):
            TrainConfig(rollout_source="mix", teacher_rollout_fraction=fraction)
    with pytest.raises(ValueError, match=r"TrainConfig.teacher_rollout_fraction=1.5: must lie in \[0, 1\]"):
        TrainConfig(teacher_rollout_fraction=1.5)
    assert TrainConfig(rollout_source="mix", teacher_rollout_fraction=0.25).teacher_rollout_fraction == 0.25


def test_lr_must_be_finite():
    with pytest.raises(ValueError, match="TrainConfig.lr=inf: must be a finite number > 0"):
        TrainConfig(lr=float("inf"))


def test_nan_is_refused_in_every_float_setting_and_errors_speak_flags():
    """NaN passes `x < 0` style checks: every float field is checked for finiteness; the CLI shows
    the flag the user typed (`--weight-decay`), Python callers the field."""
    for name in ("weight_decay", "grad_clip", "lora_alpha"):
        with pytest.raises(ConfigError) as caught:
            TrainConfig(**{name: float("nan")})
        assert caught.value.field == name
        assert caught.value.as_flag().startswith("--" + name.replace("_", "-") + " nan: ")


def test_resume_differences_free_harmless_and_refused():
    saved = TrainConfig(max_steps=10, lr=1e-3).to_dict()
    now = TrainConfig(max_steps=20, lr=1e-3, log_every=5, output_dir="elsewhere")
    assert resume_differences(saved, now, allow_harmless=True) == {}
    assert resume_differences(saved, now, allow_harmless=False) == {"max_steps": (10, 20)}
    changed = TrainConfig(max_steps=10, lr=2e-3, seed=4)
    assert resume_differences(saved, changed, allow_harmless=True) == {"lr": (1e-3, 2e-3), "seed": (0, 4)}


def test_every_flag_field_has_help_and_a_type():
    for spec in flag_fields():
        assert spec.metadata["help"], spec.name
        assert spec.metadata.get("type") or spec.default is not None, spec.name


def test_lora_targets_groups_names_and_errors():
    assert TrainConfig().lora_target_modules is None
    assert TrainConfig(lora_targets="mlp").lora_target_modules == ["gate_proj", "up_proj", "down_proj"]
    assert TrainConfig(lora_targets="attention").lora_target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]
    assert TrainConfig(lora_targets=" down_proj, o_proj").lora_target_modules == ["down_proj", "o_proj"]
    for bad in ("", "q_proj,,v_proj"):
        with pytest.raises(ConfigError, match=r"TrainConfig.lora_targets=.*comma-separated module names"):
            TrainConfig(lora_targets=bad)
    TrainConfig(lora_targets="", lora_rank=0)  # full fine-tuning has no adapter to place


def test_optimizer_settings_and_rollout_model_are_checked():
    with pytest.raises(ConfigError, match=r"TrainConfig.adam_eps=0.0: must be > 0"):
        TrainConfig(adam_eps=0.0)
    with pytest.raises(ConfigError, match=r"TrainConfig.momentum=1.0: must lie in \[0, 1\)"):
        TrainConfig(momentum=1.0)
    with pytest.raises(ConfigError, match=r"TrainConfig.optimizer='adam': must be one of adamw, sgd"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ConfigError, match=r"TrainConfig.rollout_model='teacher': only method='sdft'"):
        TrainConfig(method="sft", rollout_model="teacher")
