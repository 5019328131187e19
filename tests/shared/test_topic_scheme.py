"""Topic names, parse, QoS/retain table and id validation."""

from __future__ import annotations

import pytest

from shared.topics import KINDS, Topics, check_id

T = Topics("fleet-1")


def test_names_and_parse_round_trip() -> None:
    cases = [
        (T.plan, "plan", None),
        (T.result(0), "result", 0),
        (T.result(123456), "result", 123456),
        (T.result_latest, "result_latest", None),
        (T.up("dev_01.a"), "up", "dev_01.a"),
        (T.join("c"), "join", "c"),
        (T.hb("c"), "hb", "c"),
        (T.status("c"), "status", "c"),
        (T.sync("c"), "sync", "c"),
        (T.to("c"), "to", "c"),
        (T.run, "run", None),
    ]
    assert {k for _, k, _ in cases} == set(KINDS)
    for topic, kind, arg in cases:
        assert topic.startswith("meerkat/v1/fleet-1/")
        assert T.parse(topic) == (kind, arg)
    assert T.up("c") == "meerkat/v1/fleet-1/up/c"
    assert T.result(7) == "meerkat/v1/fleet-1/result/7"


def test_qos_and_retain() -> None:
    assert {k: (Topics.qos(k), Topics.retain(k)) for k in KINDS} == {
        "plan": (1, True), "result": (1, False), "result_latest": (1, True), "up": (1, False),
        "join": (1, False), "hb": (0, False), "status": (1, True), "sync": (1, False), "to": (1, False),
        "run": (1, True),
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown topic kind"):
        Topics.qos("down")


def test_filters() -> None:
    assert T.filter("up") == "meerkat/v1/fleet-1/up/+"
    assert T.filter("result") == "meerkat/v1/fleet-1/result/+"
    assert T.filter("plan") == T.plan and T.filter("result_latest") == T.result_latest


@pytest.mark.parametrize(
    "bad", ["", "a/b", "+", "#", "a+", "a#", "$SYS", "-a", ".a", "a b", "é", "x" * 65, None, 5]
)
def test_bad_ids_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="client id"):
        check_id(bad)
    with pytest.raises(ValueError, match="fleet id"):
        Topics(bad)  # type: ignore[arg-type]
    if isinstance(bad, str):
        with pytest.raises(ValueError):
            T.up(bad)


@pytest.mark.parametrize(
    "topic",
    [
        "meerkat/v1/other/plan",
        "meerkat/v2/fleet-1/plan",
        "meerkat/v1/fleet-1",
        "meerkat/v1/fleet-1/plan/x",
        "meerkat/v1/fleet-1/down/c",
        "meerkat/v1/fleet-1/up",
        "meerkat/v1/fleet-1/up/a/b",
        "meerkat/v1/fleet-1/up/+",
        "meerkat/v1/fleet-1/result/01",
        "meerkat/v1/fleet-1/result/-1",
        "meerkat/v1/fleet-1/result/١",
        "meerkat/v1/fleet-1/result/",
    ],
)
def test_parse_refuses_foreign_or_malformed_topics(topic: str) -> None:
    with pytest.raises(ValueError, match="topic|id"):
        T.parse(topic)


def test_result_round_must_be_non_negative_int() -> None:
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="round"):
            T.result(bad)  # type: ignore[arg-type]
