"""Fixtures of the reliability tests: the tiny model of bench/demo/toy.py (what `meerkat bench chaos` runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.demo.toy import Toy, build_toy

# the storage-fault tests also use the client tests' config helpers (tests/client/clienttoy.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Toy:
    return build_toy(tmp_path_factory.mktemp("toy"))
