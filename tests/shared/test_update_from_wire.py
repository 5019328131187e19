"""Update.from_wire: the decoder's constructor checks what the wire readers left (ranges, finiteness, the
float32 narrowing of `loss`) once, without the constructor's second pass over kinds it already knows;
anything off takes the constructor's path, so the errors stay the same (issue 31, the Update hot path)."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import pytest
from wire_checks import decode_without_post_init

from shared.codec import DecodeError, ErrorCode, decode, encode
from shared.messages import Update


def _raw(**kw: Any) -> bytes:
    body: dict[int, Any] = {0: 3, 1: 7, 2: struct.pack("<3f", 0.5, -1.25, 3.0), 3: 10, 4: 99, 5: 2.0}
    body.update({int(k[1:]): v for k, v in kw.items()})
    return bytes([0xB1, 0, 3]) + msgpack.packb(body, use_bin_type=True, use_single_float=False)


def test_a_valid_update_skips_the_constructor_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    u = Update(5, (1 << 64) - 1, (0.1, -2.5, 1e-30), 1 << 31, (1 << 32) - 1, 1.7, client="")
    got = decode_without_post_init(monkeypatch, encode(u), Update, "dev-a")
    assert got == Update(5, (1 << 64) - 1, (0.1, -2.5, 1e-30), 1 << 31, (1 << 32) - 1, 1.7, client="dev-a")
    assert type(got.grads) is tuple and all(type(g) is float for g in got.grads) and type(got.loss) is float


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"k0": 1 << 32}, "round"),
        ({"k1": -1}, "msg_id"),
        ({"k3": -5}, "n_samples"),
        ({"k4": 1 << 32}, "fp_tag"),
        ({"k2": b""}, "grads"),
        ({"k2": struct.pack("<2f", 1.0, math.nan)}, "grads[1]"),
        ({"k2": struct.pack("<2f", math.inf, -math.inf)}, "grads[0]"),
        ({"k5": 1e39}, "loss"),  # finite float64, overflows float32 (D2)
        ({"k5": math.nan}, "loss"),
    ],
)
def test_what_the_fast_path_does_not_take_is_refused_naming_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(DecodeError) as e:
        decode(_raw(**kw), Update, client="dev-a")
    assert e.value.code == ErrorCode.INVALID_FIELD and f"Update.{field}" in e.value.reason


def test_loss_as_int_or_float64_is_narrowed_as_before() -> None:
    assert decode(_raw(k5=3), Update).loss == 3.0
    assert decode(_raw(k5=0.1), Update).loss == struct.unpack("<f", struct.pack("<f", 0.1))[0]
    edge = 3.4028234663852886e38  # the largest float32: kept
    assert decode(_raw(k5=edge), Update).loss == edge
