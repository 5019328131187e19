"""Check masks: where each mask sits (per-layer share), how masks overlap, how concentrated the gradient is.

    layer_shares(mask)        -> per layer: nnz, share of the mask, density inside the layer
    type_shares(mask)         -> the same summed by module type (q_proj, down_proj, ...)
    overlap(a, b)             -> |A n B|, Jaccard |A n B| / |A u B|, recall of A in B = |A n B| / |A|
    build_report(...)         -> one JSON-able dict; format_report(...) -> text tables; save_png(...)

The concentration numbers a builder measured are stored in the mask's `calibration` metadata (JSON,
see coordinator.mask.builder.describe); `recompute` measures them again on a model + calibration text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.mask.builder import concentration, mask_sq_stats, parse_description
from shared.maskfile import Mask, MaskError

log = logging.getLogger(__name__)


def natural_key(name: str) -> list[Any]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def module_type(layer: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj` (the name with the block index removed)."""
    m = re.search(r"\.\d+\.(.+)$", layer)
    return m.group(1) if m else layer


def layer_shares(mask: Mask) -> list[dict[str, Any]]:
    """Per masked layer (natural order): nnz, share of the whole mask, density inside the layer."""
    total = max(mask.nnz, 1)
    rows = []
    for name in sorted(mask.layers, key=natural_key):
        nnz = int(mask.layers[name].numel())
        rows_, cols = mask.shapes[name]
        rows.append({"layer": name, "nnz": nnz, "share": nnz / total, "density": nnz / (rows_ * cols)})
    return rows


def type_shares(mask: Mask) -> dict[str, float]:
    """Share of the mask per module type, summed over blocks."""
    out: dict[str, float] = {}
    for row in layer_shares(mask):
        key = module_type(row["layer"])
        out[key] = out.get(key, 0.0) + row["share"]
    return dict(sorted(out.items()))


def overlap(a: Mask, b: Mask) -> dict[str, Any]:
    """Set overlap of two masks over (layer, flat index) pairs; shapes of shared layers must agree."""
    inter = 0
    for name in sorted(set(a.layers) & set(b.layers)):
        if a.shapes[name] != b.shapes[name]:
            raise MaskError(
                f"layer {name}: shape {a.shapes[name]} in one mask, {b.shapes[name]} in the other"
            )
        ia = a.layers[name].cpu().numpy()
        ib = b.layers[name].cpu().numpy()
        inter += int(np.intersect1d(ia, ib, assume_unique=True).size)
    union = a.nnz + b.nnz - inter
    return {
        "intersection": inter,
        "jaccard": inter / union if union else 1.0,
        "recall_a_in_b": inter / a.nnz if a.nnz else 1.0,
        "recall_b_in_a": inter / b.nnz if b.nnz else 1.0,
    }


def recompute(masks: Sequence[Mask], sq: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Concentration at each mask's fraction and the g^2 each mask captures, from fresh statistics."""
    fractions = sorted({float(m.meta.fraction) for m in masks})
    conc = {repr(f): concentration(sq, f) for f in fractions}
    per_mask = [mask_sq_stats(m.layers, sq) for m in masks]
    return {"concentration": conc, "per_mask": per_mask}


def build_report(
    masks: Sequence[Mask], names: Sequence[str], recomputed: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Everything `meerkat mask report` shows, as one JSON-able dict."""
    if len(masks) != len(names):
        raise ValueError(f"{len(masks)} masks but {len(names)} names")
    entries = []
    for m, name in zip(masks, names, strict=True):
        body = parse_description(m.meta.calibration)
        entries.append(
            {
                "name": name,
                "mask_id": m.mask_id,
                "method": m.meta.method,
                "fraction": m.meta.fraction,
                "nnz": m.nnz,
                "fingerprint": m.meta.fingerprint,
                "created": m.meta.created,
                "has_grad": m.grad is not None,
                "calibration": body if body is not None else m.meta.calibration,
                "stored_stats": (body or {}).get("stats"),
                "layers": layer_shares(m),
                "types": type_shares(m),
            }
        )
    pairs = []
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            pairs.append({"a": names[i], "b": names[j], **overlap(masks[i], masks[j])})
    warnings = []
    if len({m.meta.fingerprint for m in masks}) > 1:
        warnings.append("masks were built for different base models (fingerprints differ)")
    report: dict[str, Any] = {"masks": entries, "overlap": pairs, "warnings": warnings}
    if recomputed is not None:
        report["recomputed"] = dict(recomputed)
    return report


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}x"


def _conc_lines(label: str, c: Mapping[str, Any]) -> list[str]:
    lo, hi = c["band"]
    return [
        f"{label}: top {100 * c['fraction']:.4g}% ({c['k']} of {c['n_weights']} weights) mean g^2 "
        f"{c['top_mean_sq']:.4g} = {_fmt_ratio(c['ratio_next_tier'])} the next tier of equal size, "
        f"{_fmt_ratio(c['ratio_band'])} the {100 * lo:.4g}%..{100 * hi:.4g}% band; "
        f"holds {100 * (c['top_mass_share'] or 0):.3g}% of all g^2"
    ]


def _mask_sq_line(label: str, s: Mapping[str, Any]) -> str:
    return (
        f"{label}: mask mean g^2 {s['mask_mean_sq']:.4g}, holds {100 * s['mask_mass_share']:.3g}% of all g^2"
    )


def format_report(report: Mapping[str, Any]) -> str:
    """Plain-text tables: masks, per-type and per-layer shares, overlaps, concentration."""
    masks = report["masks"]
    out = [f"warning: {w}" for w in report["warnings"]]
    out.append(f"{'#':>2}  {'mask':<30} {'method':<17} {'fraction':>9} {'nnz':>10}  {'id':<16}  grad")
    for i, m in enumerate(masks):
        grad = "yes" if m["has_grad"] else "no"
        out.append(
            f"{i:>2}  {m['name'][-30:]:<30} {m['method']:<17} {m['fraction']:>9.4g} {m['nnz']:>10}  {m['mask_id']}  {grad}"
        )
    head = "".join(f" {f'#{i} share':>10}" for i in range(len(masks)))
    types = sorted({t for m in masks for t in m["types"]}, key=natural_key)
    out += ["", f"{'module type':<36}{head}"]
    for t in types:
        out.append(f"{t[-36:]:<36}" + "".join(f" {100 * m['types'].get(t, 0.0):>9.2f}%" for m in masks))
    layers = sorted({r["layer"] for m in masks for r in m["layers"]}, key=natural_key)
    by = [{r["layer"]: r for r in m["layers"]} for m in masks]
    out += ["", f"{'layer':<48}{head}   density (#0)"]
    for name in layers:
        cells = "".join(f" {100 * b[name]['share'] if name in b else 0.0:>9.2f}%" for b in by)
        dens = by[0][name]["density"] if name in by[0] else 0.0
        out.append(f"{name[-48:]:<48}{cells}   {100 * dens:.3g}%")
    if report["overlap"]:
        out += [
            "",
            f"{'A':>3} {'B':>3} {'|A n B|':>10} {'Jaccard':>8} {'recall A in B':>14} {'recall B in A':>14}",
        ]
        idx = {m["name"]: i for i, m in enumerate(masks)}
        for p in report["overlap"]:
            out.append(
                f"{idx[p['a']]:>3} {idx[p['b']]:>3} {p['intersection']:>10} {p['jaccard']:>8.3f} "
                f"{p['recall_a_in_b']:>14.3f} {p['recall_b_in_a']:>14.3f}"
            )
    lines = []
    for i, m in enumerate(masks):
        stats = m["stored_stats"]
        if stats and "concentration" in stats:
            lines += _conc_lines(f"#{i} at build", stats["concentration"])
            lines.append(_mask_sq_line(f"#{i} at build", stats))
    rec = report.get("recomputed")
    if rec:
        for c in rec["concentration"].values():
            lines += _conc_lines("recomputed", c)
        for i, s in enumerate(rec["per_mask"]):
            lines.append(_mask_sq_line(f"#{i} recomputed", s))
    if lines:
        out += ["", *lines]
    return "\n".join(out)


def save_png(report: Mapping[str, Any], path: str | Path) -> None:
    """Share of each mask per layer (lines, blocks in order) and per module type (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = report["masks"]
    layers = sorted({r["layer"] for m in masks for r in m["layers"]}, key=natural_key)
    types = sorted({t for m in masks for t in m["types"]}, key=natural_key)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, 0.12 * len(layers)), 8))
    width = 0.8 / max(len(masks), 1)
    for i, m in enumerate(masks):
        by = {r["layer"]: r["share"] for r in m["layers"]}
        label = f"#{i} {m['method']} {Path(m['name']).name}"
        ax1.plot(range(len(layers)), [100 * by.get(n, 0.0) for n in layers], marker=".", label=label)
        ax2.bar(
            np.arange(len(types)) + i * width,
            [100 * m["types"].get(t, 0.0) for t in types],
            width,
            label=label,
        )
    ax1.set_xlabel("layer (natural order)")
    ax1.set_ylabel("share of mask (%)")
    ax1.legend(fontsize="small")
    ax2.set_xticks(np.arange(len(types)) + 0.4 - width / 2, types, rotation=30, ha="right", fontsize="small")
    ax2.set_ylabel("share of mask (%)")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
