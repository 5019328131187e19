"""The model families meerkat supports, checked from config.json before any weight is read.

One list (docs/MASK.md "Supported architectures" shows the same): decoder-only causal LMs whose
trainable layers are `nn.Linear` with an (out, in) weight that only their own forward reads. Mask
build, the client, export, evaluate and `bench step --model` call `check_model_dir` first, so an
unsupported model is refused in ONE line that names the architecture and the layer type in the way,
instead of failing deep inside transformers, bitsandbytes or the side-car.
"""

from __future__ import annotations

import json
from pathlib import Path

# model_type -> family name; each is tested end to end on a tiny random-init config
# (tests/engine/test_architectures.py: mask build, load in nf4/int8/none, SPSA rounds, export, evaluate)
SUPPORTED: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "gemma": "Gemma",
    "gemma2": "Gemma-2",
    "gemma3_text": "Gemma-3",
    "opt": "OPT",
    "gpt_neox": "GPT-NeoX",
}
# families whose mixer reads its projection weights directly (not through the Linear's forward): a
# quantized or wrapped weight breaks them, so they run unquantized only (quant "none")
WEIGHT_READERS: dict[str, tuple[str, str]] = {
    "mamba": ("Mamba", "MambaMixer"),
    "mamba2": ("Mamba-2", "Mamba2Mixer"),
    "falcon_mamba": ("Falcon-Mamba", "FalconMambaMixer"),
}
# known families that cannot work, with the layer type that is the reason
REFUSED: dict[str, tuple[str, str]] = {
    "gpt2": ("GPT-2", "transformers Conv1D (weight stored (in, out), not an nn.Linear)"),
    "gpt_bigcode": ("GPT-BigCode", "transformers Conv1D-style fused attention"),
    "t5": ("T5", "encoder-decoder T5Block (not a causal LM)"),
    "mt5": ("mT5", "encoder-decoder T5Block (not a causal LM)"),
    "bart": ("BART", "encoder-decoder BartEncoderLayer (not a causal LM)"),
    "bert": ("BERT", "encoder-only BertLayer (not a causal LM)"),
}
CONVERT_HINT = (
    "python -c \"import sys; from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1], safe_serialization=True)\" DIR"
)


class UnsupportedModelError(ValueError):
    """The model directory holds an architecture or a weight format meerkat cannot use (one line)."""


def supported_list() -> str:
    """'Llama, Mistral, ...' for messages."""
    return ", ".join(SUPPORTED.values())


def check_model_dir(model_dir: str | Path, quant: str | None = None) -> str:
    """The directory's model_type, or UnsupportedModelError naming the architecture and the layer type.

    `quant` is the client's quantization ("nf4", "int8", "none"); None (mask build) skips the check
    that only quantized layers need. A directory without config.json is left to the caller's own
    error.
    """
    root = Path(model_dir)
    path = root / "config.json"
    if not path.is_file():
        return ""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"{path}: cannot read the model config ({exc})") from exc
    model_type = str(config.get("model_type", ""))
    arch = ",".join(config.get("architectures") or []) or model_type or "unknown"
    if model_type in REFUSED:
        family, layer = REFUSED[model_type]
        raise UnsupportedModelError(
            f"{root}: {family} ({arch}) is not supported: its layers are {layer}; supported: {supported_list()}"
        )
    if config.get("is_encoder_decoder"):
        raise UnsupportedModelError(
            f"{root}: {arch} is an encoder-decoder model, not a causal LM; supported: {supported_list()}"
        )
    if model_type in WEIGHT_READERS:
        family, mixer = WEIGHT_READERS[model_type]
        if quant not in (None, "none"):
            raise UnsupportedModelError(
                f"{root}: {family} ({arch}) cannot be quantized ({quant}): its {mixer} reads its projection "
                f"weights directly, not through nn.Linear; use quant 'none'"
            )
    elif model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"{root}: model_type {model_type!r} ({arch}) is not in the supported list: {supported_list()}"
        )
    _check_weight_files(root)
    return model_type


def _check_weight_files(root: Path) -> None:
    if any(root.glob("*.safetensors")):
        return
    if any(root.glob("pytorch_model*.bin")):
        raise UnsupportedModelError(
            f"{root}: only pytorch_model.bin weights (pickle); meerkat reads safetensors. Convert once with: "
            + CONVERT_HINT
        )


__all__ = [
    "CONVERT_HINT",
    "REFUSED",
    "SUPPORTED",
    "WEIGHT_READERS",
    "UnsupportedModelError",
    "check_model_dir",
    "supported_list",
]
