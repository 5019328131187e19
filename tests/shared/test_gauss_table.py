"""The shipped Gaussian quantile table: pinned checksum, reproducible, well formed, checked on load."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from shared import gaussian

PINNED = "1cfbba1e07e34386a57626f82aeb43e6ed54ba70a3ea6b7d964dc66a841074a8"


def test_file_checksum_is_pinned() -> None:
    raw = gaussian.TABLE_FILE.read_bytes()
    assert len(raw) == 4 * 65536
    assert hashlib.sha256(raw).hexdigest() == PINNED == gaussian.TABLE_SHA256


def test_table_is_reproducible_from_its_definition() -> None:
    assert gaussian.table_bytes(gaussian.build_table()) == gaussian.TABLE_FILE.read_bytes()


def test_table_shape_and_symmetry() -> None:
    t = gaussian.gauss_table()
    assert t.dtype == np.float32 and t.shape == (65536,)
    assert not t.flags.writeable
    assert np.all(np.diff(t) > 0)  # strictly increasing quantiles
    assert np.array_equal(t, -t[::-1])  # Phi^-1(1-p) = -Phi^-1(p)
    assert abs(float(t.astype(np.float64).mean())) < 1e-9
    assert abs(float((t.astype(np.float64) ** 2).mean()) - 1.0) < 1e-4


def test_corrupt_table_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = bytearray(gaussian.TABLE_FILE.read_bytes())
    bad[100] ^= 1
    path = tmp_path / "gauss.bin"
    path.write_bytes(bytes(bad))
    monkeypatch.setattr(gaussian, "TABLE_FILE", path)
    gaussian.gauss_table.cache_clear()
    try:
        with pytest.raises(gaussian.GaussTableError, match="sha256"):
            gaussian.gauss_table()
        monkeypatch.setattr(gaussian, "TABLE_FILE", tmp_path / "missing.bin")
        with pytest.raises(gaussian.GaussTableError, match="cannot be read"):
            gaussian.gauss_table()
    finally:
        monkeypatch.undo()
        gaussian.gauss_table.cache_clear()
    assert gaussian.gauss_table().shape == (65536,)
