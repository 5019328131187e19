"""Hypothesis strategies for every wire message (valid by construction)."""

from __future__ import annotations

import string

from hypothesis import strategies as st

from shared.messages import (
    RUN_STATES,
    CheckpointChunk,
    ErrorMsg,
    Heartbeat,
    Join,
    Replay,
    RoundPlan,
    RoundResult,
    RunState,
    Status,
    SyncRequest,
    Update,
)
from shared.prng import Dist

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]{0,20}\Z")
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
hex16 = st.text("0123456789abcdef", min_size=16, max_size=16)
finite = st.floats(allow_nan=False, allow_infinity=False)
f32 = st.floats(-3e38, 3e38, allow_nan=False)  # any float32-range value: messages round it to float32
nonneg = st.floats(min_value=0.0, max_value=1e12, allow_nan=False)
rounds = st.integers(0, U32)
seeds = st.lists(st.integers(0, U64), min_size=1, max_size=40).map(tuple)
dists: st.SearchStrategy[Dist] = st.sampled_from(["rademacher", "gaussian"])
text = st.text(string.printable + "äß→😀", max_size=60)


joins = st.builds(
    Join,
    client=ids,
    fingerprint=hex64,
    mask_id=hex16,
    n_samples=st.integers(0, U32),
    budget_gib=st.floats(0, 1e6),
    capabilities=st.dictionaries(
        st.text(max_size=10),
        st.one_of(st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1), finite, text),
        max_size=6,
    ),
    last_round=st.integers(-1, U32),
)


@st.composite
def plans(draw: st.DrawFn) -> RoundPlan:
    s = draw(seeds)
    steps = draw(st.dictionaries(ids, st.integers(1, len(s)), max_size=12))
    return RoundPlan(
        fleet=draw(ids),
        round=draw(rounds),
        seeds=s,
        lr=draw(finite),
        eps=draw(st.floats(min_value=1e-12, max_value=10)),
        dist=draw(dists),
        steps=steps,
        base_round=draw(st.integers(-1, U32)),
        deadline=draw(nonneg),
        fingerprint=draw(hex64),
        mask_id=draw(hex16),
        batch_size=draw(st.integers(1, U32)),
        values_checksum=draw(hex64),
    )


updates = st.builds(
    Update,
    round=rounds,
    msg_id=st.integers(0, U64),
    grads=st.lists(f32, min_size=1, max_size=100).map(tuple),
    n_samples=st.integers(0, U32),
    fp_tag=st.integers(0, U32),
    loss=f32,
    client=ids,
)


@st.composite
def results(draw: st.DrawFn) -> RoundResult:
    s = draw(st.lists(st.integers(0, U64), max_size=40).map(tuple))
    sc = draw(st.lists(finite, min_size=len(s), max_size=len(s)).map(tuple))
    return RoundResult(
        round=draw(rounds),
        seeds=s,
        scalars=sc,
        lr=draw(finite),
        dist=draw(dists),
        n_clients=draw(st.integers(0, U32)),
        values_checksum=draw(hex64),
    )


heartbeats = st.builds(
    Heartbeat,
    client=ids,
    ts=nonneg,
    cpu_pct=st.floats(0, 1e5),
    rss_bytes=st.integers(0, U64),
    gpu_mem_bytes=st.none() | st.integers(0, U64),
    temp_c=st.none() | st.floats(-300, 1000),
    power_w=st.none() | st.floats(0, 1e6),
    step_time_s=st.none() | nonneg,
    peak_mem_bytes=st.none() | st.integers(0, U64),
    round=st.integers(-1, U32),
    peak_rss_bytes=st.none() | st.integers(0, U64),
)
statuses = st.builds(Status, client=ids, online=st.booleans(), ts=nonneg)
syncs = st.builds(SyncRequest, client=ids, have_round=st.integers(-1, U32))
replays = st.builds(Replay, results=st.lists(results(), max_size=4).map(tuple))


@st.composite
def chunks(draw: st.DrawFn) -> CheckpointChunk:
    total = draw(st.integers(1, U32))
    return CheckpointChunk(
        round=draw(st.integers(-1, U32)),
        index=draw(st.integers(0, total - 1)),
        total=total,
        sha256=draw(hex64),
        data=draw(st.binary(max_size=3000)),
    )


errors = st.builds(ErrorMsg, code=st.integers(0, 0xFFFF), reason=st.text(max_size=200))
run_states = st.builds(RunState, state=st.sampled_from(RUN_STATES), last_round=st.integers(-1, U32),
                       ts=st.floats(0, 1e10), reason=st.text(max_size=200))  # fmt: skip

ALL = {
    "Join": joins,
    "RoundPlan": plans(),
    "Update": updates,
    "RoundResult": results(),
    "Heartbeat": heartbeats,
    "Status": statuses,
    "SyncRequest": syncs,
    "Replay": replays,
    "CheckpointChunk": chunks(),
    "ErrorMsg": errors,
    "RunState": run_states,
}
any_message = st.one_of(*ALL.values())
