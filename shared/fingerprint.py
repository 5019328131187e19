"""Base-model fingerprint: one sha256 that client, coordinator and mask builder agree on.

    sha256(  b"meerkat-fp-v1\\0"
           + canonical(config.json) + b"\\0"
           + for each tensor, sorted by name over all safetensors files of the model:
               name utf-8, b"\\0", dtype (safetensors code, e.g. "F32"), b"\\0",
               shape as JSON list without spaces, b"\\0", u64 LE byte length, raw bytes )

canonical(config) = json.dumps(config minus volatile keys, sort_keys=True, separators=(",", ":"),
ensure_ascii=True); volatile keys are `transformers_version` and every key starting with "_" (they
change when the same weights are re-saved by another library version). Tensors are streamed straight
from the files (header parsed by hand), never loaded as a model.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

_CHUNK = 1 << 22
_MAX_HEADER = 100 << 20
_VOLATILE = ("transformers_version",)


class FingerprintError(ValueError):
    """The directory is not a model this module can fingerprint; the message says which file and why."""


def canonical_config(config: dict[str, Any]) -> bytes:
    clean = {k: v for k, v in config.items() if k not in _VOLATILE and not k.startswith("_")}
    return json.dumps(clean, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FingerprintError(f"{index}: no readable 'weight_map': {exc}") from exc
        names = sorted(set(weight_map.values()))
        files = [root / n for n in names]
        for f in files:
            if not f.is_file():
                raise FingerprintError(f"{index} names shard {f.name}, which does not exist")
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    raise FingerprintError(f"{root}: no model.safetensors or model.safetensors.index.json")


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(tensor entries, data start offset, file size) of a safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise FingerprintError(f"{path}: too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise FingerprintError(f"{path}: header length {n} is invalid for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FingerprintError(f"{path}: header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise FingerprintError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n, size


def fingerprint_model_dir(path: str | Path) -> str:
    """sha256 hex of the model in `path` (config.json + all safetensors tensors); see module docstring."""
    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise FingerprintError(f"{root}: config.json not found")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise FingerprintError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise FingerprintError(f"{cfg_path}: expected a JSON object")
    h = hashlib.sha256(b"meerkat-fp-v1\0")
    h.update(canonical_config(config) + b"\0")

    entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
    for file in _weight_files(root):
        header, data_start, size = _read_header(file)
        for name, info in header.items():
            if name in entries:
                raise FingerprintError(f"{file}: tensor {name!r} also appears in {entries[name][0].name}")
            try:
                dtype, shape = str(info["dtype"]), [int(d) for d in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise FingerprintError(f"{file}: tensor {name!r} has a malformed header entry") from exc
            if not 0 <= begin <= end or data_start + end > size:
                raise FingerprintError(
                    f"{file}: tensor {name!r} data_offsets [{begin}, {end}) outside the file"
                )
            entries[name] = (file, dtype, shape, data_start + begin, end - begin)

    for name in sorted(entries):
        file, dtype, shape, start, length = entries[name]
        h.update(name.encode("utf-8") + b"\0" + dtype.encode("ascii") + b"\0")
        h.update(json.dumps(shape, separators=(",", ":")).encode("ascii") + b"\0")
        h.update(length.to_bytes(8, "little"))
        with file.open("rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise FingerprintError(f"{file}: truncated while reading tensor {name!r}")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def fp_tag(fingerprint: str) -> int:
    """u32 tag carried in every Update: crc32 of the fingerprint's 32 raw bytes."""
    if len(fingerprint) != 64:
        raise ValueError(f"fingerprint must be 64 hex chars, got {len(fingerprint)}")
    try:
        raw = bytes.fromhex(fingerprint)
    except ValueError as exc:
        raise ValueError(f"fingerprint is not hex: {fingerprint!r}") from exc
    return zlib.crc32(raw) & 0xFFFFFFFF


__all__ = ["FingerprintError", "canonical_config", "fingerprint_model_dir", "fp_tag"]
