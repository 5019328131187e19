"""Fixtures of the edge client tests: one tiny model/mask/data set per session (built, never downloaded)."""

from __future__ import annotations

import pytest
from clienttoy import Toy, build_toy


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Toy:
    return build_toy(tmp_path_factory.mktemp("toy"))
