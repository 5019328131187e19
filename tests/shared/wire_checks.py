"""Test helper: decode a message with its dataclass's `__post_init__` refused, to show a decode path skips it."""

from __future__ import annotations

from typing import TypeVar

import pytest

from shared.codec import decode

M = TypeVar("M")


def decode_without_post_init(monkeypatch: pytest.MonkeyPatch, wire: bytes, cls: type[M], client: str) -> M:
    """`decode(wire, cls, client=client)`, failing the test if `cls.__post_init__` runs."""

    def refuse(self: object) -> None:
        raise AssertionError("__post_init__ ran")

    with monkeypatch.context() as mp:
        mp.setattr(cls, "__post_init__", refuse)
        return decode(wire, cls, client=client)
