"""Coordinator fixtures: a tiny random Llama on disk with a mask file built for it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from shared.fingerprint import fingerprint_model_dir
from shared.maskfile import Mask, MaskMeta, save_mask
from shared.prng import raw_u64


@dataclass(frozen=True)
class TinyModel:
    model_dir: Path
    mask_path: Path
    mask: Mask
    fingerprint: str


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)  # a local generator: no global RNG state
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(str(model_dir), safe_serialization=True)
    fp = fingerprint_model_dir(model_dir)
    layers, shapes, grad = {}, {}, {}
    for i, (name, shape) in enumerate(
        [("model.layers.0.mlp.down_proj", (64, 128)), ("model.layers.1.self_attn.q_proj", (64, 64))]
    ):
        size = shape[0] * shape[1]
        keys = torch.from_numpy((raw_u64(50 + i, size) >> 1).astype("int64"))
        layers[name] = torch.sort(torch.argsort(keys)[: size // 50]).values
        shapes[name] = shape
        grad[name] = torch.from_numpy(
            ((raw_u64(60 + i, size // 50) >> 40).astype("float64") / 2**24 - 0.5).astype("float32")
        )
    mask = Mask(layers=layers, shapes=shapes, grad=grad, meta=MaskMeta(1, "test", 0.02, "synthetic", fp))
    mask_path = root / "mask.safetensors"
    save_mask(mask, mask_path)
    return TinyModel(model_dir, mask_path, mask, fp)


# -- event log backends: the same tests against SQLite and the real PostgreSQL -----------------------
PG_URL = os.environ.get("MEERKAT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema in the local PostgreSQL (this machine and CI start one: trust auth, database `test`);
    the URL selects it through search_path. Skipped, with the reason, where none is reachable."""
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg not installed (pip install 'psycopg[binary]')")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {PG_URL} (set MEERKAT_TEST_PG): {str(exc).strip()[:200]}")
    schema = f"meerkat_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}".encode())
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE".encode())
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def event_log(request: pytest.FixtureRequest) -> str:
    """The `event_log` config value of each backend (the PostgreSQL one skips where none runs)."""
    if request.param == "sqlite":
        return "sqlite"
    url: str = request.getfixturevalue("pg_url")
    return url
