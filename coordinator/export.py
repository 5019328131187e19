"""`meerkat export`: the base model with the fleet's learned side-car values merged, as a plain HF directory.

Two bases (`--base`), both written in the checkpoint's dtype by default (`--dtype` to change it):
- "dequantized" (default): the model the fleet computed with, W_eff = dequantize(quantized base with
  the mask zeroed) + side-car at the mask (shared/sidecar.py). Export rebuilds it
  (`shared.modelload.load_model` with the fleet's quantisation, fp32 compute), writes the values of
  the requested round into the side-car, replaces each wrapped layer by a dense Linear holding W_eff
  (`shared.sidecar.unwrap_dense`) and calls `save_pretrained`. Its numbers are the ones the fleet and
  the coordinator's evaluation measured (up to the dtype's rounding), which is why it is the default:
  the learned values were fitted against this base.
- "original": the untouched checkpoint weights with the learned values written at the masked
  positions (no quantisation rounding anywhere else). Closer to the pretrained model; not what the
  fleet evaluated.
AutoModelForCausalLM loads either without bitsandbytes or meerkat.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from coordinator.checkpoint import rebuild_values
from coordinator.eventlog import DB_NAME, EventLog
from shared.apply import values_checksum
from shared.fsio import share_tree
from shared.maskfile import Mask

if TYPE_CHECKING:
    from shared.modelload import Quant

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The export cannot be made (values do not fit the model, target exists, ...)."""


def values_from_state(
    state_dir: Path, mask: Mask, model_dir: Path, fingerprint: str, *, event_log: str = "sqlite"
) -> tuple[torch.Tensor, int]:
    """The coordinator's values after its last closed round, rebuilt from checkpoints + the event log."""
    from shared.sidecar import initial_values_from_dir

    if event_log == "sqlite" and not (Path(state_dir) / DB_NAME).is_file():
        raise ExportError(f"{state_dir} has no coordinator event log ({DB_NAME})")
    events = EventLog(state_dir, event_log=event_log)
    try:
        logged = events.get_meta("fingerprint"), events.get_meta("mask_id")
        if logged != (fingerprint, mask.mask_id):
            raise ExportError(
                f"{state_dir} belongs to model {str(logged[0])[:12]}... / mask {logged[1]}, "
                f"not {fingerprint[:12]}... / {mask.mask_id}"
            )
        v0 = initial_values_from_dir(model_dir, mask.layers)
        return rebuild_values(events, v0, mask.mask_id, fingerprint)
    finally:
        events.close()


# tokenizer classes transformers 5 writes that 4.x does not have, and the 4.x class that loads the same
# tokenizer.json (5.x knows it too): without this, 4.x fails with "Tokenizer class ... does not exist"
PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_tokenizer_config(out: Path) -> None:
    """Make the saved tokenizer_config.json loadable by transformers 4.4x as well as 5.x (tokenizer.json kept)."""
    path = Path(out) / "tokenizer_config.json"
    if not path.is_file() or not (Path(out) / "tokenizer.json").is_file():
        return
    conf = json.loads(path.read_text())
    cls = conf.get("tokenizer_class")
    if cls in PORTABLE_TOKENIZER_CLASS:
        conf["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS[cls]
        path.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")


BASES: tuple[str, ...] = ("dequantized", "original")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype of the checkpoint's floating-point weights (the first one in its safetensors files)."""
    from safetensors import safe_open

    from shared.sidecar import checkpoint_files

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for key, path in sorted(checkpoint_files(model_dir).items()):
        with safe_open(str(path), framework="pt") as f:
            kind = f.get_slice(key).get_dtype()
        if kind in names:
            return names[kind]
    raise ExportError(f"{model_dir}: no floating-point weights found in its safetensors files")


def export_merged(
    model_dir: Path,
    mask: Mask,
    values: torch.Tensor,
    quant: Quant,
    out_dir: Path,
    *,
    round: int = -1,
    overwrite: bool = False,
    base: str = "dequantized",
    dtype: str = "auto",
) -> Path:
    """Write the merged model to `out_dir` (save_pretrained + tokenizer + meerkat_export.json).

    `base`: "dequantized" (what the fleet computed with) or "original" (the checkpoint's own weights);
    `dtype`: "auto" (the checkpoint's) or float32 / bfloat16 / float16.
    """
    out = Path(out_dir)
    if base not in BASES:
        raise ExportError(f"--base must be one of {', '.join(BASES)}, got {base!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ExportError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    torch_dtype = checkpoint_dtype(Path(model_dir)) if dtype == "auto" else DTYPES[dtype]
    if tuple(values.shape) != (mask.nnz,):
        raise ExportError(f"values have shape {tuple(values.shape)}, the mask has {mask.nnz} entries")
    if base == "original":
        model, tokenizer, fingerprint = _original_base(Path(model_dir), mask, values, torch_dtype)
    else:
        model, tokenizer, fingerprint = _dequantized_base(Path(model_dir), mask, values, quant, torch_dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        portable_tokenizer_config(out)
    info = {
        "round": round, "values_checksum": values_checksum(values), "base_fingerprint": fingerprint,
        "mask_id": mask.mask_id, "quant": quant, "nnz": int(values.numel()), "base": base,
        "dtype": str(torch_dtype).replace("torch.", ""),
    }  # fmt: skip
    (out / "meerkat_export.json").write_text(json.dumps(info, indent=2) + "\n")
    share_tree(out)  # read by other users (a service, `meerkat evaluate`): weights 0644, not transformers' 0600
    log.info("exported round %d (%s base, %s-merged, %s) to %s", round, base, quant, info["dtype"], out)
    return out


def _dequantized_base(
    model_dir: Path, mask: Mask, values: torch.Tensor, quant: Quant, dtype: torch.dtype
) -> tuple[Any, Any, str]:
    from shared.modelload import load_model
    from shared.sidecar import unwrap_dense

    loaded = load_model(model_dir, quant, "cpu", mask, compute_dtype=torch.float32)
    if loaded.sidecar is None:
        raise ExportError("load_model returned no side-car for the mask")
    loaded.sidecar.set_values(values)
    model: Any = unwrap_dense(loaded.model, dtype).to(dtype)
    leftover = [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    if leftover:
        raise ExportError(f"quantized layers left after merging (not wrapped by the side-car): {leftover[:5]}")
    return model, loaded.tokenizer, loaded.fingerprint


def _original_base(model_dir: Path, mask: Mask, values: torch.Tensor, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """The checkpoint as it is, in `dtype`, with the learned values written at the mask."""
    from transformers import AutoModelForCausalLM

    from shared.architectures import check_model_dir
    from shared.fingerprint import fingerprint_model_dir
    from shared.modelload import load_tokenizer

    check_model_dir(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    with torch.no_grad():
        for name, (a, b) in mask.offsets().items():
            weight = model.get_submodule(name).weight
            weight.view(-1).index_copy_(0, mask.layers[name], values[a:b].to(weight.dtype))
    return model, load_tokenizer(model_dir), fingerprint_model_dir(model_dir)
