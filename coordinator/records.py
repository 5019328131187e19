"""What the coordinator remembers: the rows the event log stores and the records the round book emits.

`coordinator/rounds.py` (the round book) decides; each decision that must survive a kill -9 comes out as
one of the `*Record` types below inside a `Persist` action, and `EventLog.persist(record)` writes it.
The `*Row` types are what the log hands back (recovery, `meerkat status`, tests). Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.prng import Dist


@dataclass(frozen=True)
class PlanRow:
    """A round plan plus the bookkeeping the wire `RoundPlan` does not carry (opened_at, extensions)."""

    round: int
    state: str  # open | closed
    opened_at: float
    deadline: float
    seeds: tuple[int, ...]
    steps: dict[str, int]
    lr: float
    eps: float
    dist: Dist
    batch_size: int
    base_round: int
    base_checksum: str  # = RoundPlan.values_checksum: the values at base_round
    extensions: int
    # compact plan (1.3): the sampling threshold the wire plan carries; `steps` still holds every client the
    # round expects (the wire plan lists only those whose T_k != len(seeds)). None: a 1.2 list plan
    sample_max: int | None = None


@dataclass(frozen=True)
class UpdateRow:
    client: str
    round: int
    msg_id: int
    grads: tuple[float, ...]
    n_samples: int
    loss: float
    received_at: float
    status: str  # accepted | late | dropped | folded
    used_in: int | None


@dataclass(frozen=True)
class ResultRow:
    round: int
    seeds: tuple[int, ...]
    scalars: tuple[float, ...]
    lr: float
    dist: Dist
    n_clients: int
    values_checksum: str
    closed_at: float
    duration_s: float


@dataclass(frozen=True)
class ClientRow:
    """The registry entry of one client as the round book needs it."""

    client: str
    state: str  # joined | rejected | unknown (seen, never joined)
    fingerprint: str = ""
    mask_id: str = ""
    n_samples: int = 0
    online: bool = False
    seen_at: float | None = None


@dataclass(frozen=True)
class ClientStatusRow:
    """Everything `meerkat status` shows about one client."""

    client: str
    state: str
    reason: str
    online: bool
    n_samples: int
    last_round: int
    seen_at: float | None
    hb_at: float | None
    telemetry: dict[str, Any]
    last_update_at: float | None
    updates: int


@dataclass(frozen=True)
class DriftRow:
    client: str
    n_steps: int
    early: float | None
    late: float | None
    rho_later: float | None
    rho_quie: float | None
    limited_round: int | None


@dataclass(frozen=True)
class OpenRoundRow:
    round: int
    opened_at: float
    deadline: float
    sampled: int
    reported: int
    extensions: int


@dataclass(frozen=True)
class EventRow:
    ts: float
    round: int | None
    kind: str
    detail: str


@dataclass(frozen=True)
class EvalRow:
    """One evaluation: a device's on its held-out slice (Heartbeat eval keys) or the coordinator's own."""

    source: str  # client id, or COORDINATOR_EVAL
    round: int  # the values evaluated are those after this round (-1 = v_0)
    loss: float
    accuracy: float | None
    n: int
    ts: float


@dataclass(frozen=True)
class ResourcePoint:
    """A device's resources in one round (its last heartbeat of that round)."""

    client: str
    round: int
    ts: float
    rss_bytes: int | None  # the process's resident memory
    peak_mem_bytes: int | None  # the training step's peak (CUDA allocator / CPU VmHWM)
    cpu_pct: float | None
    step_time_s: float | None
    peak_rss_bytes: int | None = None  # the process's peak RSS since it started (Heartbeat key 19, 1.3)


@dataclass(frozen=True)
class RoundPoint:
    """One closed round for curves: when, how long, how many clients, mean training loss of its updates."""

    round: int
    closed_at: float
    duration_s: float
    n_clients: int
    train_loss: float | None  # n_samples-weighted mean Update.loss of the round's updates (None: none stored)
    lr: float | None = None  # the lr its result was applied with (RoundResult.lr)


COORDINATOR_EVAL = "@coordinator"  # EvalRow.source of the coordinator's own evaluation (not a legal client id)


# -- records: one per durable decision (EventLog.persist writes each) -------------------------------
@dataclass(frozen=True)
class JoinRecord:
    client: str
    state: str  # joined | rejected
    reason: str
    fingerprint: str
    mask_id: str
    n_samples: int
    budget_gib: float
    capabilities: dict[str, Any]
    last_round: int
    now: float


@dataclass(frozen=True)
class OnlineRecord:
    client: str
    online: bool
    now: float


@dataclass(frozen=True)
class HeartbeatRecord:
    client: str
    telemetry: dict[str, Any]
    now: float


@dataclass(frozen=True)
class SeenRecord:
    client: str
    now: float


@dataclass(frozen=True)
class OfflineRecord:
    clients: tuple[str, ...]


@dataclass(frozen=True)
class PlanRecord:
    plan: PlanRow


@dataclass(frozen=True)
class ReplanRecord:
    round: int
    steps: dict[str, int]
    deadline: float
    extensions: int
    sample_max: int | None = None  # the re-issued plan's (an extension may raise it)


@dataclass(frozen=True)
class UpdateRecord:
    update: UpdateRow
    gradip: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ResultRecord:
    result: ResultRow
    used: tuple[tuple[str, int, str], ...] = field(default=())  # (client, round, accepted | folded)
    # `used` names every update stored `accepted` for result.round (none was left out): the writer marks
    # them with one statement over the round instead of one row lookup each
    all_accepted: bool = False


@dataclass(frozen=True)
class DriftRecord:
    client: str
    n_steps: int
    early: float | None
    late: float | None
    rho_later: float | None
    rho_quie: float | None
    now: float


@dataclass(frozen=True)
class LimitRecord:
    client: str
    round: int
    now: float


@dataclass(frozen=True)
class RejectRecord:
    reason: str
    client: str
    topic: str  # the topic kind ("up", "join", ...) or the raw topic when it did not parse
    detail: str
    now: float


@dataclass(frozen=True)
class EventRecord:
    kind: str  # open | extend | close | late | drift_limit | grad_clipped | ...
    detail: str
    round: int | None
    now: float


@dataclass(frozen=True)
class DuplicateRecord:
    """A re-sent update of `round` was acked and ignored: counted per round for `meerkat status`."""

    round: int


@dataclass(frozen=True)
class EvalRecord:
    """The coordinator evaluated its values after `round` on its eval set (`eval_data`)."""

    round: int
    loss: float
    accuracy: float | None
    n: int
    now: float


@dataclass(frozen=True)
class LrRecord:
    """The step-size controller's decision after a round (coordinator/lrctl.py) and its whole state then:
    a restarted coordinator resumes the controller from the newest one (only the newest keeps its state)."""

    round: int
    lr_used: float  # the plan's (the devices' local steps)
    lr_step: float  # the result's (less than lr_used when the controller damped the round)
    lr_next: float
    action: str  # start | grow | hold | cap | backoff | damp | undo | skip
    reason: str
    loss: float  # the round's mean device loss (nan: none)
    state: dict[str, Any]  # LrController.state()
    now: float


@dataclass(frozen=True)
class LrRow:
    """One logged lr decision as `meerkat status` and the dashboard show it."""

    round: int
    lr_used: float
    lr_step: float
    lr_next: float
    action: str
    reason: str
    loss: float | None
    ts: float


Record = (
    JoinRecord | OnlineRecord | HeartbeatRecord | SeenRecord | OfflineRecord | PlanRecord | ReplanRecord
    | UpdateRecord | ResultRecord | DriftRecord | LimitRecord | RejectRecord | EventRecord | EvalRecord
    | DuplicateRecord | LrRecord
)  # fmt: skip
