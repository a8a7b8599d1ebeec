"""Adapters on disk in PEFT's format, and merged Hugging Face exports.

A LoRA run saves the student adapter as PEFT does (``adapter_config.json`` +
``adapter_model.safetensors`` with keys ``base_model.model.<path>.lora_A|B.weight``), so
``peft.PeftModel.from_pretrained`` loads it and we load PEFT's adapters back. Full fine-tuning
saves a plain Hugging Face folder. :func:`merge_and_save` writes the base model with the student
delta merged in. Safetensors only: nothing here unpickles.

The functions take a ``SelfDistillModel`` (they read ``hf_model``, ``lora_config``,
``lora_layers``, ``config`` and ``device``) and import nothing from :mod:`sdft_fast.model`.
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from sdft_fast.lora import ROUTE_STUDENT, LoraLinear, is_linear_like

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.safetensors"


def peft_target_modules(model: nn.Module, wrapped_paths: list[str]) -> list[str]:
    """The shortest PEFT ``target_modules`` list that selects exactly ``wrapped_paths``.

    Leaf names (``q_proj``...) when they pick out exactly our set; full paths otherwise.
    """
    leaf_names = sorted({p.rpartition(".")[2] for p in wrapped_paths})
    all_linear = [n for n, m in model.named_modules() if isinstance(m, LoraLinear) or is_linear_like(m)]
    # A LoraLinear's inner base module is "<path>.base": exclude those.
    all_linear = [n for n in all_linear if not n.endswith(".base")]
    by_leaf = {n for n in all_linear if n.rpartition(".")[2] in leaf_names}
    if by_leaf == set(wrapped_paths):
        return leaf_names
    return list(wrapped_paths)


_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<factor>[AB])\.weight$")


def peft_key(path: str, factor: str) -> str:
    return f"base_model.model.{path}.lora_{factor}.weight"


def parse_peft_key(key: str) -> tuple[str, str]:
    match = _PEFT_KEY.match(key)
    if match is None:
        raise ValueError(
            f"adapter key {key!r} is not a PEFT LoRA key 'base_model.model.<path>.lora_A|B.weight'"
        )
    return match.group("path"), match.group("factor")


def save_adapter(model, directory: str | os.PathLike) -> None:
    """Student adapter in PEFT format (or the full weights when lora_config is None)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    if model.lora_config is None:
        model.hf_model.save_pretrained(directory, safe_serialization=True)
        return
    tensors = {}
    for path, layer in model.lora_layers.items():
        tensors[peft_key(path, "A")] = layer.lora_A.detach().contiguous().cpu()
        tensors[peft_key(path, "B")] = layer.lora_B.detach().contiguous().cpu()
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = model.lora_config
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(model.hf_model, list(model.lora_layers)),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in model.lora_layers.values()),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config, f, indent=2)


@torch.no_grad()
def load_adapter(model, directory: str | os.PathLike) -> None:
    """Load a PEFT LoRA adapter (ours or PEFT's) into the student slot; full weights when lora_config is None."""
    from safetensors.torch import load_file

    if model.lora_config is None:
        weights_path = os.path.join(directory, FULL_WEIGHTS)
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"{weights_path} not found (full fine-tuning saves {FULL_WEIGHTS})")
        state = load_file(weights_path, device=str(model.device))
        params = dict(model.hf_model.named_parameters())
        missing = [n for n in params if n not in state]
        if missing:
            raise ValueError(
                f"{weights_path} lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}"
            )
        for name, p in params.items():
            p.copy_(state[name])
        return
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    for needed in (config_path, weights_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(
                f"{needed} not found (a PEFT adapter folder has {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
            )
    with open(config_path) as f:
        adapter_config = json.load(f)
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {adapter_config.get('peft_type')!r} is not 'LORA'")
    lora = model.lora_config
    if adapter_config.get("r") != lora.r or float(adapter_config.get("lora_alpha")) != float(lora.alpha):
        raise ValueError(
            f"{config_path}: r={adapter_config.get('r')}, lora_alpha={adapter_config.get('lora_alpha')} differ "
            f"from this model's LoraConfig r={lora.r}, alpha={lora.alpha}"
        )
    if adapter_config.get("use_rslora") or adapter_config.get("use_dora"):
        raise ValueError(f"{config_path}: rsLoRA / DoRA adapters are not supported")
    state = load_file(weights_path)
    seen = set()
    for key, tensor in state.items():
        path, factor = parse_peft_key(key.replace(".default.", "."))
        layer = model.lora_layers.get(path)
        if layer is None:
            raise ValueError(
                f"{weights_path}: key {key!r} names module {path!r}, which has no LoRA layer here"
            )
        target = layer.lora_A if factor == "A" else layer.lora_B
        if target.shape != tensor.shape:
            raise ValueError(
                f"{weights_path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(tensor)
        seen.add((path, factor))
    missing = [p for p in model.lora_layers if (p, "A") not in seen or (p, "B") not in seen]
    if missing:
        raise ValueError(f"{weights_path} has no factors for LoRA layers {missing[:5]}")


@torch.no_grad()
def merge_and_save(model, directory: str | os.PathLike) -> None:
    """A plain Hugging Face model folder (config + safetensors) with the student adapter merged in.

    The live model is untouched afterwards: base weights are restored from copies (not by
    subtracting the delta, which would round).
    """
    if model.lora_config is None:
        model.hf_model.save_pretrained(directory, safe_serialization=True)
        return
    restore = []
    try:
        for path, layer in model.lora_layers.items():
            parent_path, _, child = path.rpartition(".")
            parent = model.hf_model.get_submodule(parent_path) if parent_path else model.hf_model
            original = layer.base.weight.detach().clone()
            restore.append((parent, child, layer, original))
            delta = layer.delta_weight(ROUTE_STUDENT).to(layer.base.weight.dtype)  # [out, in]
            layer.base.weight.add_(delta.t() if layer.fan_in_fan_out else delta)
            setattr(parent, child, layer.base)
        model.hf_model.save_pretrained(directory, safe_serialization=True)
    finally:
        for parent, child, layer, original in restore:
            layer.base.weight.copy_(original)
            setattr(parent, child, layer)
