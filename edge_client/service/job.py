"""What a client's round work is: who it is (`Identity`), the round it trains (`Job`), the steps done
before a restart (`Progress`), the Update's msg_id, and which refusals end an Update for good. Pure data
for the round core (edge_client/service/rounds.py) and the state store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from edge_client.engine.spsa import StepResult
from shared.messages import ErrorCode, RoundPlan

FINAL_FOR_UPDATE = (  # an Update refused for good (PROTOCOL.md §2): stop re-sending it
    ErrorCode.STALE_ROUND, ErrorCode.NOT_IN_ROUND, ErrorCode.BAD_UPDATE, ErrorCode.UNKNOWN_ROUND, ErrorCode.CONFLICT,
)


@dataclass(frozen=True)
class Identity:
    """Who this client is: what its Join announces and its Updates carry."""

    client_id: str
    fleet: str
    fingerprint: str  # shared.fingerprint of the base model
    mask_id: str
    n_samples: int  # local training examples (FedAvg weight)
    quant: str = ""  # what the Join's capabilities say (only named in the exit message of a refused device)


@dataclass(frozen=True)
class Progress:
    """Steps of one round done before a restart (StateStore.progress): resumed when the same plan returns."""

    round: int
    msg_id: int
    results: tuple[StepResult, ...]  # steps 0..k-1, in order
    data_pointer: int  # pointer after step k-1


def update_msg_id(client: str, plan: RoundPlan) -> int:
    """The Update's msg_id (u64) for what `client` is asked to do in `plan`: the same after any restart,
    so a re-sent update is a duplicate the coordinator drops, and a re-issued plan is not trained twice."""
    h = hashlib.sha256()
    h.update(f"{client}|{plan.fleet}|{plan.round}|{plan.base_round}|{plan.steps.get(client, 0)}|".encode())
    h.update(f"{plan.lr!r}|{plan.eps!r}|{plan.dist}|{plan.batch_size}|{plan.values_checksum}|".encode())
    h.update(b",".join(str(s).encode() for s in plan.seeds))
    if plan.dp_clip is not None:  # another privacy rule is other work (1.3)
        h.update(f"|dp|{plan.dp_clip!r}|{plan.dp_noise!r}|{plan.dp_epsilon!r}|{plan.dp_delta!r}|{plan.dp_steps}".encode())
    return int.from_bytes(h.digest()[:8], "little")


@dataclass
class Job:
    """The round being trained: its plan, this client's step count T_k, the steps done so far."""

    plan: RoundPlan
    msg_id: int
    steps: int
    results: list[StepResult] = field(default_factory=list)
    data_pointer: int = 0  # where the next step's batch starts
