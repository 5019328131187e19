"""`meerkat export`: the base model with the fleet's learned side-car values merged, as a plain HF directory.

The fleet computes with W_eff = dequantize(quantized base with the mask zeroed) + side-car at the mask
(shared/sidecar.py). Export rebuilds exactly that model (`shared.modelload.load_model` with the fleet's
quantisation, fp32 compute), writes the values of the requested round into the side-car, replaces each
wrapped layer by a dense fp32 Linear holding W_eff (`shared.sidecar.unwrap_dense`) and calls
`save_pretrained`. AutoModelForCausalLM loads the result without bitsandbytes or meerkat, and its
logits match the side-car model's.
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


def export_merged(
    model_dir: Path,
    mask: Mask,
    values: torch.Tensor,
    quant: Quant,
    out_dir: Path,
    *,
    round: int = -1,
    overwrite: bool = False,
) -> Path:
    """Write the merged fp32 model to `out_dir` (save_pretrained + tokenizer + meerkat_export.json)."""
    from shared.modelload import load_model
    from shared.sidecar import unwrap_dense

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    loaded = load_model(model_dir, quant, "cpu", mask, compute_dtype=torch.float32)
    if loaded.sidecar is None:
        raise ExportError("load_model returned no side-car for the mask")
    if tuple(values.shape) != (loaded.sidecar.nnz,):
        raise ExportError(
            f"values have shape {tuple(values.shape)}, the mask has {loaded.sidecar.nnz} entries"
        )
    loaded.sidecar.set_values(values)
    model: Any = unwrap_dense(loaded.model, torch.float32).to(torch.float32)
    leftover = [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    if leftover:
        raise ExportError(
            f"quantized layers left after merging (not wrapped by the side-car): {leftover[:5]}"
        )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(out))
        portable_tokenizer_config(out)
    info = {
        "round": round, "values_checksum": values_checksum(values), "base_fingerprint": loaded.fingerprint,
        "mask_id": mask.mask_id, "quant": quant, "nnz": int(values.numel()),
    }  # fmt: skip
    (out / "meerkat_export.json").write_text(json.dumps(info, indent=2) + "\n")
    share_tree(out)  # read by other users (a service, `meerkat evaluate`): weights 0644, not transformers' 0600
    log.info("exported round %d (%s-merged, fp32) to %s", round, quant, out)
    return out
