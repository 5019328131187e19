"""Attack strategies: what a hostile device sends instead of its honest Join / Update.

Each strategy is a `bench.inproc.Tamper`: the in-process fleet hands it what the device's real core would
send (the honest Update of the round, trained on the device's own data) and a `send` that delivers a
message to the real RoundBook and returns its refusal (ErrorMsg) or None. Hostile devices only ever send
well-formed messages (the codec checks them), as the issue's provisioned attacker did.

One strategy object serves every hostile device of a run: the colluders of "3 of 10" share it, so they
send ONE hostile vector per round (computed from the first colluder's honest g of that round) and, for
the ratchet, climb one shared level.

    scaling      g * SCALE                          (over-step; under the main branch's 50x |g| cap)
    sign-flip    -FLIP * g                          (pull the model back along the fleet's own direction)
    bias         g_t + BIAS * median_t |g_t|        (a constant offset on every step's scalar)
    rejoin       a re-Join with n_samples = 2^32 - 1 before its first Update, every Update claiming it,
                 carrying -g: the weight, not the scalar, is the lever
    alternating  honest on even rounds, -SCALE * g on odd ones (a reputation must not forget)
    absent       joins, never sends an Update: not an attack on the aggregate but the baseline that
                 tells the hostile devices' lost data apart from what their messages did
    ratchet      -g scaled to max |g| = level; refused (BAD_UPDATE) -> bisect the level down with fresh
                 msg_ids (at most PROBES a round); accepted -> next round starts at RAISE x level: it
                 finds an unannounced |g| cap and, if the cap follows what it accepted, climbs with it
    loss         honest g, the reported training loss x LOSS_X on odd rounds and / LOSS_X on even ones: what
                 the lr controller (`--lr auto`) reads of a device and nothing else does; under a plain mean
                 a fleet loss that jumps every other round (damps, backoffs, a step cap LOSS_X high). Not in
                 the default list (at a fixed lr nothing reads the loss): `--attacks loss --lr auto`
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace

from bench.inproc import Send
from shared.messages import U32, U64, ErrorCode, ErrorMsg, Join, Update

ATTACKS = ("ratchet", "scaling", "sign-flip", "bias", "rejoin", "alternating", "absent")  # the default list
KNOWN = (*ATTACKS, "loss")

SCALE = 20.0  # scaling / alternating: within the main branch's adaptive cap (50 x median |g|), so accepted there
FLIP = 4.0  # sign-flip: one device of ten at -4 g cancels ~half of the honest step under plain FedAvg
BIAS = 5.0  # bias: offset in units of the round's median honest |g|
RAISE = 2.0  # ratchet: next round's first probe, x the last accepted level
PROBES = 8  # ratchet: probes per round (well inside rate_burst: the rate limit is not what stops it)
START = 8.0  # ratchet: first level, x the honest max |g|
LOSS_X = 1000.0  # loss: the reported loss x this on odd rounds, / this on even ones


@dataclass
class Tally:
    """What the hostile devices' messages met at the coordinator, for the report."""

    sent: int = 0  # Updates and Joins sent by hostile devices
    refused: dict[str, int] = field(default_factory=dict)  # ErrorMsg reason (text before ':') -> count
    max_abs_sent: float = 0.0  # the largest |g| a hostile device sent
    max_abs_unrefused: float = 0.0  # ... and the largest that was not refused (stored; may be clipped there)

    def note(self, msg: Join | Update, refusal: ErrorMsg | None) -> None:
        self.sent += 1
        if refusal is not None:
            why = refusal.reason.split(":", 1)[0]
            self.refused[why] = self.refused.get(why, 0) + 1
        if isinstance(msg, Update):
            big = max(map(abs, msg.grads))
            self.max_abs_sent = max(self.max_abs_sent, big)
            if refusal is None:
                self.max_abs_unrefused = max(self.max_abs_unrefused, big)

    def to_json(self) -> dict[str, object]:
        return {"sent": self.sent, "refused": dict(sorted(self.refused.items())),
                "max_abs_sent": self.max_abs_sent, "max_abs_unrefused": self.max_abs_unrefused}


class Attack:
    """Base strategy: honest Join, one Update per round whose grads `vector` rewrites (shared by colluders)."""

    name = "none"

    def __init__(self) -> None:
        self.tally = Tally()
        self._vec: dict[int, tuple[float, ...]] = {}  # round -> the colluders' hostile grads

    def join(self, client: str, msg: Join, send: Send) -> None:
        self._send(send, msg)

    def update(self, client: str, msg: Update, send: Send) -> None:
        if msg.round not in self._vec:  # the first colluder of the round sets the shared vector
            self._vec[msg.round] = self.vector(msg.round, msg.grads)
        self._send(send, replace(msg, grads=self._vec[msg.round]))

    def vector(self, round: int, g: tuple[float, ...]) -> tuple[float, ...]:
        return g

    def _send(self, send: Send, msg: Join | Update) -> ErrorMsg | None:
        refusal = send(msg)
        self.tally.note(msg, refusal)
        return refusal


class Scaling(Attack):
    name = "scaling"

    def vector(self, round: int, g: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(SCALE * x for x in g)


class SignFlip(Attack):
    name = "sign-flip"

    def vector(self, round: int, g: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(-FLIP * x for x in g)


class Bias(Attack):
    name = "bias"

    def vector(self, round: int, g: tuple[float, ...]) -> tuple[float, ...]:
        b = BIAS * statistics.median(abs(x) for x in g)
        return tuple(x + b for x in g)


class Alternating(Attack):
    name = "alternating"

    def vector(self, round: int, g: tuple[float, ...]) -> tuple[float, ...]:
        return g if round % 2 == 0 else tuple(-SCALE * x for x in g)


class LossLie(Attack):
    """Honest g; the loss it reports alternates LOSS_X x and 1 / LOSS_X x its own."""

    name = "loss"

    def update(self, client: str, msg: Update, send: Send) -> None:
        self._send(send, replace(msg, loss=msg.loss * (LOSS_X if msg.round % 2 else 1 / LOSS_X)))


class Absent(Attack):
    name = "absent"

    def update(self, client: str, msg: Update, send: Send) -> None:
        pass  # silent: the round closes on the others (quorum), the device's data is never learnt from


class Rejoin(Attack):
    """Joins honestly; before its first Update a re-Join with the largest n_samples the wire allows."""

    name = "rejoin"

    def __init__(self) -> None:
        super().__init__()
        self._rejoined: set[str] = set()
        self._join: dict[str, Join] = {}

    def join(self, client: str, msg: Join, send: Send) -> None:
        self._join[client] = msg
        self._send(send, msg)

    def update(self, client: str, msg: Update, send: Send) -> None:
        if client not in self._rejoined and client in self._join:
            self._rejoined.add(client)
            self._send(send, replace(self._join[client], n_samples=U32, last_round=max(-1, msg.round - 1)))
        if msg.round not in self._vec:
            self._vec[msg.round] = tuple(-x for x in msg.grads)
        self._send(send, replace(msg, grads=self._vec[msg.round], n_samples=U32))


class Ratchet(Attack):
    """Bisects the coordinator's |g| cap with fresh msg_ids; the level is shared by colluders."""

    name = "ratchet"

    def __init__(self) -> None:
        super().__init__()
        self.level: float | None = None  # the next first probe's max |g|
        self.accepted: float = 0.0  # the last level that was not refused

    def update(self, client: str, msg: Update, send: Send) -> None:
        g = msg.grads
        top = max(map(abs, g)) or 1.0
        lo = self.accepted or top  # the largest level believed to pass the cap
        level = self.level if self.level is not None else START * top
        for k in range(PROBES):
            hostile = tuple(-x * (level / top) for x in g)
            refusal = self._send(send, replace(msg, grads=hostile, msg_id=(msg.msg_id + 7919 * k) % (U64 + 1)))
            if refusal is None:
                self.accepted = level
                self.level = RAISE * level
                return
            if refusal.code != int(ErrorCode.BAD_UPDATE):
                break  # rate-limited, stale, ...: not the cap; try again next round
            if level <= lo:  # what passed before is refused now: the cap fell, search lower
                lo = top if lo > top else lo / 2
            hi = level
            level = math.sqrt(lo * hi) if hi > 1.01 * lo else lo  # bisect in log |g|
        self.level = level


FACTORIES: dict[str, type[Attack]] = {
    "ratchet": Ratchet, "scaling": Scaling, "sign-flip": SignFlip, "bias": Bias, "rejoin": Rejoin,
    "alternating": Alternating, "absent": Absent, "loss": LossLie,
}  # fmt: skip


def make_attack(name: str) -> Attack:
    """A fresh strategy (one per run, shared by that run's hostile devices)."""
    if name not in FACTORIES:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(KNOWN)}")
    return FACTORIES[name]()


__all__ = ["ATTACKS", "KNOWN", "Attack", "Tally", "make_attack"]
