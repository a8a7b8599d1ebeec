"""Adapters in PEFT's format: PEFT loads ours and we load them back; merged exports."""

import json

import pytest
import torch
from helpers import llama as _llama
from helpers import randomize_adapters as _randomize_adapters
from transformers import AutoModelForCausalLM

from sdft_fast.lora import LoraConfig, lora_route
from sdft_fast.model import SelfDistillModel


def _logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([ids])).logits


def test_peft_round_trip_and_merge(tmp_path):
    peft = pytest.importorskip("peft")
    model = SelfDistillModel(_llama(), lora=LoraConfig(r=4, alpha=8), teacher="ema")
    _randomize_adapters(model)
    ids = list(range(3, 20))
    with lora_route("student"):
        ours = _logits(model.hf_model, ids)
    model.save_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    peft_model = peft.PeftModel.from_pretrained(_llama(), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(peft_model, ids), ours, rtol=1e-5, atol=1e-5)
    # and back: a fresh model loads the adapter to the same logits
    fresh = SelfDistillModel(_llama(), lora=LoraConfig(r=4, alpha=8), teacher="ema")
    fresh.load_adapter(tmp_path / "adapter")
    with lora_route("student"):
        torch.testing.assert_close(_logits(fresh.hf_model, ids), ours, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="differ from this model's LoraConfig"):
        SelfDistillModel(_llama(), lora=LoraConfig(r=2, alpha=8)).load_adapter(tmp_path / "adapter")
    # merged plain HF model gives the same logits; the live model keeps its adapter unmerged
    model.merge_and_save(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged, ids), ours, rtol=1e-5, atol=1e-5)
    with lora_route("student"):
        torch.testing.assert_close(_logits(model.hf_model, ids), ours)
