"""Typed wire messages: frozen dataclasses validated when built.

A bad value raises ValueError naming the field and what was expected, whether the message is built
by local code or by the decoder (which turns it into DecodeError). Encoding lives in shared/codec/;
field keys and byte layout are specified in docs/PROTOCOL.md.

The client id of Join/Update/Heartbeat/Status/SyncRequest is NOT sent in the body: the receiver fills
it from the topic (the broker ACL vouches for it). "" means "not filled in yet".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeAlias

from shared.fields import (
    F32_MAX,
    I64_MAX,
    I64_MIN,
    MAX_CAPS,
    MAX_CHUNK,
    MAX_PLAN_CLIENTS,
    MAX_REASON,
    MAX_REPLAY,
    MAX_SEEDS,
    MAX_STEPS,
    MAX_STR,
    PAUSE_REASONS,
    U32,
    U64,
    _client,
    _dist,
    _f32,
    _f32s,
    _float,
    _hex,
    _int,
    _opt_f32,
    _opt_float,
    _opt_int,
    _seeds,
    _seq,
    _set,
    _str,
    _to_f32,
)
from shared.prng import Dist

__all__ = [  # the limits are shared/fields.py's, re-exported: importers of shared.messages keep them
    "CheckpointChunk", "ErrorCode", "ErrorMsg", "Heartbeat", "I64_MAX", "I64_MIN", "Join", "MAX_CAPS", "MAX_CHUNK", "MAX_PLAN_CLIENTS", "MAX_REASON", "MAX_REPLAY", "MAX_SEEDS", "MAX_STEPS", "MAX_STR", "Message", "PAUSE_REASONS", "Replay", "RoundPlan", "RoundResult", "Status", "SyncRequest", "U32", "U64", "Update",
]  # fmt: skip


class ErrorCode(IntEnum):
    """Why a message was refused. 1-31: decoding (DecodeError); 32-63: protocol (ErrorMsg.code)."""

    TOO_LARGE = 1  # payload or decompressed body over the size limit
    TRUNCATED = 2  # shorter than the 3-byte header
    BAD_MAGIC = 3  # first byte's high nibble is not 0xB
    UNSUPPORTED_VERSION = 4  # schema version (low nibble of byte 0) not understood
    BAD_FLAGS = 5  # reserved flag bits set
    UNKNOWN_TYPE = 6  # type byte names no message type
    UNEXPECTED_TYPE = 7  # a valid type, but not the one the receiver expected on this topic
    DECOMPRESS_FAILED = 8  # zstd flag set but the body is not a valid zstd frame
    MALFORMED = 9  # body is not one msgpack map with int keys
    MISSING_FIELD = 10  # a required key is absent
    UNKNOWN_FIELD = 11  # a key this schema version does not define
    INVALID_FIELD = 12  # a value has the wrong type or is out of range
    BAD_CLIENT = 13  # the client id taken from the topic is not a valid id
    FINGERPRINT_MISMATCH = 32  # update/join for another base model
    MASK_MISMATCH = 33  # join with another mask
    STALE_ROUND = 34  # update for a round that is closed
    NOT_IN_ROUND = 35  # update from a client the round did not sample
    UNKNOWN_CLIENT = 36  # update/sync before join
    RATE_LIMITED = 37  # too many messages
    BAD_UPDATE = 38  # update fails a semantic check (wrong step count, clipped away, ...)
    UNKNOWN_ROUND = 39  # update for a round that was never planned
    CONFLICT = 40  # another update (other msg_id) of this client for this round is stored; first wins
    QUANT_MISMATCH = 41  # join whose capabilities name another quantization than the fleet's (quant_policy "same")
    PLAN_FORM = 42  # join of a device that does not read compact plans (1.3) while the fleet publishes them
    INTERNAL = 63  # the coordinator failed; retry later


# ---- messages -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Join:
    """client -> coordinator on join/{client}: who I am, which model and mask I hold, what I can do."""

    client: str
    fingerprint: str  # sha256 hex of the base model (shared.fingerprint)
    mask_id: str  # 16 hex chars (Mask.mask_id)
    n_samples: int  # local training examples (FedAvg weight)
    budget_gib: float  # memory budget the device offers
    capabilities: dict[str, str | int | float | bool] = field(default_factory=dict)
    last_round: int = -1  # last round whose result this device applied, -1 = none

    def __post_init__(self) -> None:
        o = "Join"
        _client(o, "client", self.client, allow_empty=True)
        _hex(o, "fingerprint", self.fingerprint, 64)
        _hex(o, "mask_id", self.mask_id, 16)
        _int(o, "n_samples", self.n_samples, 0, U32)
        _set(self, "budget_gib", _float(o, "budget_gib", self.budget_gib, 0.0, 1e6))
        if not isinstance(self.capabilities, dict) or len(self.capabilities) > MAX_CAPS:
            raise ValueError(f"{o}.capabilities: expected a dict of at most {MAX_CAPS} entries")
        caps: dict[str, str | int | float | bool] = {}
        for k, v in self.capabilities.items():
            key = _str(o, "capabilities key", k, 64)
            name = f"capabilities[{k!r}]"
            if isinstance(v, bool):
                caps[key] = v
            elif isinstance(v, int):
                caps[key] = _int(o, name, v, I64_MIN, I64_MAX)
            elif isinstance(v, float):
                caps[key] = _float(o, name, v)
            elif isinstance(v, str):
                caps[key] = _str(o, name, v, 256)
            else:
                raise ValueError(f"{o}.{name}: expected str, int, float or bool, got {type(v).__name__}")
        _set(self, "capabilities", caps)
        _int(o, "last_round", self.last_round, -1, U32)


@dataclass(frozen=True)
class RoundPlan:
    """coordinator -> all on plan (retained): the seeds of round `round` and who runs how many steps
    (shared/sampling.py `plan_steps`: the exceptions in `steps`, the rest by `sample_max`)."""

    fleet: str
    round: int
    seeds: tuple[int, ...]  # u64 each; step t of every sampled client uses seeds[t]
    lr: float
    eps: float
    dist: Dist  # "rademacher" | "gaussian"
    steps: dict[str, int]  # client -> T_k (1 <= T_k <= len(seeds)); compact plan: the exceptions only
    base_round: int  # the plan applies on top of the values after this round's result (-1 = initial values)
    deadline: float  # unix seconds; updates after it count as late
    fingerprint: str
    mask_id: str
    batch_size: int
    values_checksum: str  # sha256 hex of the values the plan starts from (after base_round)
    # v1.3: the fleet's differential-privacy rule (all five or none; docs/PRIVACY.md, edge_client/privacy.py)
    dp_clip: float | None = None  # C: each example's projected difference is clipped to [-C, C]
    dp_noise: float | None = None  # noise multiplier sigma (std sigma C); 0 = each device derives it
    dp_epsilon: float | None = None  # target epsilon: a device stops before passing it
    dp_delta: float | None = None  # delta; 0 = each device's 1 / n^1.1
    dp_steps: int | None = None  # planned steps per device (what a derived sigma is calibrated for)
    # v1.3 compact plan: a device not in `steps` runs len(seeds) steps iff its sampling key <= sample_max
    # (shared/sampling.py plan_steps); absent: `steps` lists every sampled client (the 1.2 form)
    sample_max: int | None = None

    def __post_init__(self) -> None:
        o = "RoundPlan"
        _client(o, "fleet", self.fleet, allow_empty=False)
        _int(o, "round", self.round, 0, U32)
        _set(self, "seeds", _seeds(o, "seeds", self.seeds, 1, MAX_STEPS))  # = an Update's max grads
        _set(self, "lr", _float(o, "lr", self.lr))
        _set(self, "eps", _float(o, "eps", self.eps, 0.0))
        if self.eps <= 0:
            raise ValueError(f"{o}.eps: expected > 0, got {self.eps}")
        _dist(o, self.dist)
        if not isinstance(self.steps, dict) or len(self.steps) > MAX_PLAN_CLIENTS:
            raise ValueError(
                f"{o}.steps: expected a dict client -> int of at most {MAX_PLAN_CLIENTS} entries"
            )
        for c, t in self.steps.items():
            _client(o, "steps key", c, allow_empty=False)
            _int(o, f"steps[{c!r}]", t, 1, len(self.seeds))
        _set(self, "steps", dict(self.steps))
        _int(o, "base_round", self.base_round, -1, U32)
        _set(self, "deadline", _float(o, "deadline", self.deadline, 0.0))
        _hex(o, "fingerprint", self.fingerprint, 64)
        _hex(o, "mask_id", self.mask_id, 16)
        _int(o, "batch_size", self.batch_size, 1, U32)
        _hex(o, "values_checksum", self.values_checksum, 64)
        dp = (self.dp_clip, self.dp_noise, self.dp_epsilon, self.dp_delta, self.dp_steps)
        if any(v is None for v in dp) and any(v is not None for v in dp):
            raise ValueError(f"{o}.dp_clip/dp_noise/dp_epsilon/dp_delta/dp_steps: set all five or none")
        _set(self, "dp_clip", _opt_float(o, "dp_clip", self.dp_clip, 0.0))
        if self.dp_clip is not None and self.dp_clip <= 0:
            raise ValueError(f"{o}.dp_clip: expected > 0, got {self.dp_clip}")
        _set(self, "dp_noise", _opt_float(o, "dp_noise", self.dp_noise, 0.0, 1e6))
        _set(self, "dp_epsilon", _opt_float(o, "dp_epsilon", self.dp_epsilon, 0.0, 1e6))
        if self.dp_epsilon is not None and self.dp_epsilon <= 0:
            raise ValueError(f"{o}.dp_epsilon: expected > 0, got {self.dp_epsilon}")
        _set(self, "dp_delta", _opt_float(o, "dp_delta", self.dp_delta, 0.0, 0.5))
        _opt_int(o, "dp_steps", self.dp_steps, 1, U32)
        _opt_int(o, "sample_max", self.sample_max, 0, U64)


@dataclass(frozen=True)
class Update:
    """client -> coordinator on up/{client} (QoS 1): one projected gradient per local step."""

    round: int
    msg_id: int  # u64, unique per (client, round); dedupe key (client, round, msg_id)
    grads: tuple[float, ...]  # g_1..g_Tk, float32 on the wire (rounded to float32 here)
    n_samples: int
    fp_tag: int  # u32 = shared.fingerprint.fp_tag(fingerprint)
    loss: float  # mean training loss of the round (float32 on the wire)
    client: str = ""  # from the topic, never from the body

    def __post_init__(self) -> None:
        o = "Update"
        _int(o, "round", self.round, 0, U32)
        _int(o, "msg_id", self.msg_id, 0, U64)
        items = _seq(o, "grads", self.grads, 1, MAX_STEPS)
        _set(self, "grads", _f32s(o, "grads", items))
        _int(o, "n_samples", self.n_samples, 0, U32)
        _int(o, "fp_tag", self.fp_tag, 0, U32)
        _set(self, "loss", _f32(o, "loss", self.loss))
        _client(o, "client", self.client, allow_empty=True)

    @classmethod
    def from_wire(
        cls, round: int, msg_id: int, grads: tuple[float, ...], n_samples: int, fp_tag: int, loss: float, client: str
    ) -> Update:
        """The decoder's constructor (shared/codec/schema.py; the coordinator decodes thousands a second). The
        wire readers already checked every kind (the ints are ints, `grads` a tuple of float32 values read
        from the bin, `loss` a number) and decode() the topic's client id (check 2): left are the ranges,
        1 <= len(grads) <= MAX_STEPS, finite grads (the sum of float32 values is finite iff each is: it
        cannot overflow float64) and `loss` narrowed to float32. Each is checked once; anything off goes
        through the constructor, whose error names the field."""
        if (
            0 <= round <= U32 and 0 <= msg_id <= U64 and 0 <= n_samples <= U32 and 0 <= fp_tag <= U32
            and 1 <= len(grads) <= MAX_STEPS and math.isfinite(sum(grads))
            and loss.__class__ is float and math.isfinite(loss) and abs(loss) <= F32_MAX
        ):  # fmt: skip
            u = object.__new__(cls)
            u.__dict__.update(round=round, msg_id=msg_id, grads=grads, n_samples=n_samples, fp_tag=fp_tag,
                              loss=_to_f32(loss), client=client)  # fmt: skip
            return u
        return cls(round, msg_id, grads, n_samples, fp_tag, loss, client)


@dataclass(frozen=True)
class RoundResult:
    """coordinator -> all on result/{round} and result/latest (retained): how to move the values.

    values_after = apply_round(values_before, seeds, scalars, lr, dist); may hold more pairs than the
    plan had seeds (late updates of an earlier round folded in). values_checksum = checksum AFTER.
    """

    round: int
    seeds: tuple[int, ...]
    scalars: tuple[float, ...]  # float64 on the wire
    lr: float
    dist: Dist
    n_clients: int
    values_checksum: str

    def __post_init__(self) -> None:
        o = "RoundResult"
        _int(o, "round", self.round, 0, U32)
        _set(self, "seeds", _seeds(o, "seeds", self.seeds))
        items = _seq(o, "scalars", self.scalars, 0, MAX_SEEDS)
        _set(self, "scalars", tuple(_float(o, f"scalars[{i}]", g) for i, g in enumerate(items)))
        if len(self.scalars) != len(self.seeds):
            raise ValueError(
                f"{o}.scalars: expected {len(self.seeds)} items (one per seed), got {len(self.scalars)}"
            )
        _set(self, "lr", _float(o, "lr", self.lr))
        _dist(o, self.dist)
        _int(o, "n_clients", self.n_clients, 0, U32)
        _hex(o, "values_checksum", self.values_checksum, 64)


@dataclass(frozen=True)
class Heartbeat:
    """client -> coordinator on hb/{client} (QoS 0): telemetry; optional fields None when unknown."""

    client: str
    ts: float  # unix seconds
    cpu_pct: float  # float32 on the wire (rounded here)
    rss_bytes: int
    gpu_mem_bytes: int | None = None
    temp_c: float | None = None
    power_w: float | None = None
    step_time_s: float | None = None
    peak_mem_bytes: int | None = None
    round: int = -1  # round the client is working on / last applied, -1 = none
    # v1.2: the device's latest evaluation on its held-out slice (all four or none): values at eval_round
    eval_round: int | None = None
    eval_loss: float | None = None  # mean per-example loss (float32 on the wire)
    eval_acc: float | None = None  # accuracy in [0, 1], labelled data only
    eval_n: int | None = None  # examples evaluated
    # v1.3: differential privacy spent by this device (both or none), and whether its budget stopped it
    dp_epsilon: float | None = None  # epsilon spent over every published step (f64)
    dp_delta: float | None = None  # the delta that epsilon is stated at
    dp_exhausted: bool | None = None  # True: the latest DP plan did not fit its budget, it no longer trains
    # v1.3 (issue 27): the device policy's word: False = paused (pause_reason says why); None = not said
    available: bool | None = None
    pause_reason: str | None = None  # PAUSE_REASONS (a newer device may name another: shown as it is)
    trained_share: float | None = None  # share of wall time since the client started spent in local steps
    # v1.3 (issue 30): the client process's peak resident memory since it started (VmHWM on Linux)
    peak_rss_bytes: int | None = None

    def __post_init__(self) -> None:
        o = "Heartbeat"
        _client(o, "client", self.client, allow_empty=True)
        _set(self, "ts", _float(o, "ts", self.ts, 0.0))
        _set(self, "cpu_pct", _f32(o, "cpu_pct", self.cpu_pct, 0.0, 1e5))
        _int(o, "rss_bytes", self.rss_bytes, 0, U64)
        _opt_int(o, "gpu_mem_bytes", self.gpu_mem_bytes, 0, U64)
        _set(self, "temp_c", _opt_f32(o, "temp_c", self.temp_c, -300.0, 1000.0))
        _set(self, "power_w", _opt_f32(o, "power_w", self.power_w, 0.0, 1e6))
        _set(self, "step_time_s", _opt_float(o, "step_time_s", self.step_time_s, 0.0))
        _opt_int(o, "peak_mem_bytes", self.peak_mem_bytes, 0, U64)
        _int(o, "round", self.round, -1, U32)
        _opt_int(o, "eval_round", self.eval_round, -1, U32)
        _set(self, "eval_loss", _opt_f32(o, "eval_loss", self.eval_loss, 0.0, 1e9))
        _set(self, "eval_acc", _opt_f32(o, "eval_acc", self.eval_acc, 0.0, 1.0))
        _opt_int(o, "eval_n", self.eval_n, 1, U32)
        if (self.eval_round is None) != (self.eval_loss is None) or (self.eval_round is None) != (self.eval_n is None):
            raise ValueError(f"{o}.eval_round/eval_loss/eval_n: set all three or none")
        if self.eval_acc is not None and self.eval_round is None:
            raise ValueError(f"{o}.eval_acc: needs eval_round/eval_loss/eval_n")
        _set(self, "dp_epsilon", _opt_float(o, "dp_epsilon", self.dp_epsilon, 0.0))
        _set(self, "dp_delta", _opt_float(o, "dp_delta", self.dp_delta, 0.0, 1.0))
        if (self.dp_epsilon is None) != (self.dp_delta is None):
            raise ValueError(f"{o}.dp_epsilon/dp_delta: set both or none")
        if self.dp_exhausted is not None and not isinstance(self.dp_exhausted, bool):
            raise ValueError(f"{o}.dp_exhausted: expected bool, got {type(self.dp_exhausted).__name__}")
        if self.available is not None and not isinstance(self.available, bool):
            raise ValueError(f"{o}.available: expected bool, got {type(self.available).__name__}")
        if self.pause_reason is not None:
            _str(o, "pause_reason", self.pause_reason, MAX_REASON)
            if self.available is not False:
                raise ValueError(f"{o}.pause_reason: only with available=false")
            if not self.pause_reason or not self.pause_reason.isascii() or not self.pause_reason.isprintable():
                raise ValueError(f"{o}.pause_reason: expected 1-{MAX_REASON} printable ASCII chars, got {self.pause_reason!r}")
        _set(self, "trained_share", _opt_f32(o, "trained_share", self.trained_share, 0.0, 1.0))
        _opt_int(o, "peak_rss_bytes", self.peak_rss_bytes, 0, U64)


@dataclass(frozen=True)
class Status:
    """client -> all on status/{client} (retained; the LWT publishes online=False)."""

    client: str
    online: bool
    ts: float

    def __post_init__(self) -> None:
        o = "Status"
        _client(o, "client", self.client, allow_empty=True)
        if not isinstance(self.online, bool):
            raise ValueError(f"{o}.online: expected bool, got {type(self.online).__name__}")
        _set(self, "ts", _float(o, "ts", self.ts, 0.0))


@dataclass(frozen=True)
class SyncRequest:
    """client -> coordinator on sync/{client}: I hold the values after `have_round`; bring me up to date."""

    client: str
    have_round: int  # -1 = initial values

    def __post_init__(self) -> None:
        _client("SyncRequest", "client", self.client, allow_empty=True)
        _int("SyncRequest", "have_round", self.have_round, -1, U32)


@dataclass(frozen=True)
class Replay:
    """coordinator -> client on to/{client}: the missed RoundResults, in round order."""

    results: tuple[RoundResult, ...]

    def __post_init__(self) -> None:
        items = _seq("Replay", "results", self.results, 0, MAX_REPLAY)
        for i, r in enumerate(items):
            if not isinstance(r, RoundResult):
                raise ValueError(f"Replay.results[{i}]: expected RoundResult, got {type(r).__name__}")
        _set(self, "results", items)


@dataclass(frozen=True)
class CheckpointChunk:
    """coordinator -> client on to/{client}: chunk `index` of `total` of the values after `round`.

    The concatenated data of chunks 0..total-1 is the little-endian float32 value buffer; `sha256` is
    the hash of that whole buffer (= values_checksum of the round).
    """

    round: int
    index: int
    total: int
    sha256: str
    data: bytes

    def __post_init__(self) -> None:
        o = "CheckpointChunk"
        _int(o, "round", self.round, -1, U32)
        _int(o, "total", self.total, 1, U32)
        _int(o, "index", self.index, 0, self.total - 1)
        _hex(o, "sha256", self.sha256, 64)
        if not isinstance(self.data, bytes) or len(self.data) > MAX_CHUNK:
            raise ValueError(f"{o}.data: expected bytes of at most {MAX_CHUNK}")


@dataclass(frozen=True)
class ErrorMsg:
    """coordinator -> client on to/{client}: why something the client sent was refused."""

    code: int  # an ErrorCode value (unknown codes must be tolerated)
    reason: str

    def __post_init__(self) -> None:
        _int("ErrorMsg", "code", self.code, 0, 0xFFFF)
        _str("ErrorMsg", "reason", self.reason)


RUN_STATES: tuple[str, ...] = ("running", "finishing", "finished", "stopped")
RUN_OVER: frozenset[str] = frozenset({"finished", "stopped"})


@dataclass(frozen=True)
class RunState:
    """coordinator -> all on run (retained; protocol 1.3): where the run is in its lifecycle.

    running: rounds open as usual. finishing: `meerkat stop` was asked: the open round closes, no new one
    opens. finished: the configured round count closed. stopped: ended by `meerkat stop`. In the last two
    `last_round` is the final round: a device at that round has the run's final values and idles."""

    state: str
    last_round: int  # -1 = no round closed yet
    ts: float
    reason: str = ""

    def __post_init__(self) -> None:
        o = "RunState"
        if self.state not in RUN_STATES:
            raise ValueError(f"{o}.state: expected one of {RUN_STATES}, got {self.state!r}")
        _int(o, "last_round", self.last_round, -1, U32)
        _set(self, "ts", _float(o, "ts", self.ts, 0.0))
        _str(o, "reason", self.reason)

    @property
    def over(self) -> bool:
        return self.state in RUN_OVER


Message: TypeAlias = (
    Join
    | RoundPlan
    | Update
    | RoundResult
    | Heartbeat
    | Status
    | SyncRequest
    | Replay
    | CheckpointChunk
    | ErrorMsg
    | RunState
)
CLIENT_FROM_TOPIC: tuple[type, ...] = (Join, Update, Heartbeat, Status, SyncRequest)

__all__ = [
    "CLIENT_FROM_TOPIC",
    "CheckpointChunk",
    "ErrorCode",
    "ErrorMsg",
    "Heartbeat",
    "Join",
    "MAX_CHUNK",
    "MAX_PLAN_CLIENTS",
    "MAX_REASON",
    "MAX_REPLAY",
    "MAX_SEEDS",
    "MAX_STEPS",
    "Message",
    "PAUSE_REASONS",
    "RUN_OVER",
    "RUN_STATES",
    "Replay",
    "RoundPlan",
    "RoundResult",
    "RunState",
    "Status",
    "SyncRequest",
    "Update",
]
