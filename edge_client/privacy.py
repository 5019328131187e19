"""The device's privacy budget: which DP rule the fleet set, what this device has spent, when it stops.

The fleet switch travels in the RoundPlan (keys 13-17, docs/PROTOCOL.md 1.3): clip C, noise multiplier
sigma (0 = derive it here from the target epsilon and the planned steps), target epsilon, delta (0 =
1 / n^1.1 of THIS device's n) and the planned steps. A device that cannot decode those keys cannot
decode the plan at all, so no device trains a DP round without DP.

`DeviceBudget` is pure (no I/O): the round core (edge_client/service/rounds.py) asks it whether a plan
fits (`refusal`), which parameters a step uses (`step`) and charges it when an Update is queued
(`charge`); the client persists the charge in the SAME transaction that queues the Update
(StateStore.finish_training), so what was published and what was accounted never disagree, whatever
kills the process. Only published steps cost privacy: steps of a round dropped before its Update was
queued never left the device. A restart or a re-Join reloads the ledger; nothing resets it.

The device secret (`SECRET_FILE` in the state directory) is 32 bytes of os.urandom written once (0600);
the Poisson sample and the noise of every step come from it (shared/dp.py `SecretStream`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from shared.accountant import AccountingError, Spend, default_delta, epsilon, noise_multiplier
from shared.dp import SECRET_BYTES, DpParams, sample_rate
from shared.fsio import atomic_write
from shared.messages import RoundPlan

log = logging.getLogger(__name__)

SECRET_FILE = "dp_secret.key"


class PrivacyError(RuntimeError):
    """The device secret is unreadable or malformed; the message names the file."""


def load_or_create_secret(state_dir: Path) -> bytes:
    """The device's DP secret: read it, or create it once (os.urandom, 0600, fsynced) on first use."""
    path = Path(state_dir) / SECRET_FILE
    if not path.exists():
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(path, os.urandom(SECRET_BYTES))
        log.info("created the device's differential-privacy secret %s", path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PrivacyError(f"{path}: cannot read the DP secret ({exc})") from exc
    if len(raw) != SECRET_BYTES:
        raise PrivacyError(f"{path} holds {len(raw)} bytes, expected {SECRET_BYTES}: restore it from a backup, or "
                           "remove it (a new secret is drawn; the spent budget is kept)")  # fmt: skip
    return raw


@dataclass(frozen=True)
class FleetDp:
    """The fleet's DP rule, as a RoundPlan states it."""

    clip: float
    noise_multiplier: float  # 0: derive from (epsilon, delta, q, steps)
    epsilon: float  # the target: the device stops before its spent epsilon would pass it
    delta: float  # 0: default_delta(n) of the device
    steps: int  # planned steps per device (for a derived noise multiplier)

    @classmethod
    def of(cls, plan: RoundPlan) -> FleetDp | None:
        if plan.dp_clip is None:
            return None
        assert plan.dp_noise is not None and plan.dp_epsilon is not None  # RoundPlan: all or none
        assert plan.dp_delta is not None and plan.dp_steps is not None
        return cls(plan.dp_clip, plan.dp_noise, plan.dp_epsilon, plan.dp_delta, plan.dp_steps)


@dataclass(frozen=True)
class DpStep:
    """What the trainer needs for one private step: the mechanism, the sampling rate, the stream path."""

    params: DpParams
    q: float
    path: tuple[int, ...]  # (round, msg_id, step): with the data pointer, the secret stream's coordinates


class DeviceBudget:
    """Spent privacy of one device: its ledger of spends and the rule of the latest DP plan."""

    def __init__(self, n_samples: int, spends: list[Spend] | None = None, *, max_epsilon: float = 0.0) -> None:
        self.n = n_samples
        self.max_epsilon = max_epsilon  # the owner's floor (client config dp_max_epsilon); 0 = the fleet's rule
        self.spends: list[Spend] = []
        for sp in spends or []:
            self.charge(sp)
        self.fleet: FleetDp | None = None  # the latest DP rule seen (for the heartbeat's delta)
        self.exhausted = False  # the latest DP plan did not fit the remaining budget
        self._spent: tuple[tuple[tuple[Spend, ...], float], float] | None = None

    def terms(self, fleet: FleetDp, batch_size: int) -> tuple[float, float, float]:
        """(q, sigma, delta) of this device under `fleet` with batches of `batch_size`."""
        q = sample_rate(batch_size, self.n)
        delta = fleet.delta or default_delta(self.n)
        sigma = fleet.noise_multiplier or noise_multiplier(fleet.epsilon, delta, q, fleet.steps)
        return q, sigma, delta

    def spent(self) -> tuple[float, float] | None:
        """(epsilon, delta) spent so far at the current fleet's delta; None before any DP plan or spend."""
        if self.fleet is None and not self.spends:
            return None
        try:
            delta = (self.fleet.delta if self.fleet else 0.0) or default_delta(self.n)
        except AccountingError:
            return None  # no delta to state epsilon at (n < 2 and the fleet's delta 0): refusal() said so
        key = (tuple(self.spends), delta)  # the heartbeat thread asks every period: compute once per change
        if self._spent is None or self._spent[0] != key:
            self._spent = (key, epsilon(key[0], delta))
        return self._spent[1], delta

    def refusal(self, plan: RoundPlan, steps: int) -> str | None:
        """Why this device must not train `steps` steps of `plan` (None: it may)."""
        fleet = FleetDp.of(plan)
        if fleet is None:
            if self.max_epsilon:
                return (f"this device trains only with differential privacy (dp_max_epsilon = {self.max_epsilon:g}) "
                        "and the fleet's plan has none")  # fmt: skip
            return None
        self.fleet = fleet
        target = min(fleet.epsilon, self.max_epsilon) if self.max_epsilon else fleet.epsilon
        try:
            q, sigma, delta = self.terms(fleet, plan.batch_size)
            after = epsilon([*self.spends, Spend(q, sigma, steps)], delta)
        except AccountingError as exc:  # e.g. 1 local example and delta 0: no default delta exists
            self.exhausted = True
            return f"cannot account for round {plan.round}'s DP rule on this device ({exc}); not training it"
        self.exhausted = after > target
        if not self.exhausted:
            return None
        now = epsilon(self.spends, delta)
        return (f"privacy budget spent: epsilon {now:.4g} of {target:g} (delta {delta:.3g}) used, round "
                f"{plan.round}'s {steps} step(s) would reach {after:.4g}; this device stops contributing")  # fmt: skip

    def step(self, plan: RoundPlan, msg_id: int, step: int) -> DpStep | None:
        fleet = FleetDp.of(plan)
        if fleet is None:
            return None
        q, sigma, _ = self.terms(fleet, plan.batch_size)
        return DpStep(DpParams(fleet.clip, sigma, plan.batch_size), q, (plan.round, msg_id, step))

    def spend_of(self, plan: RoundPlan, steps: int) -> Spend | None:
        fleet = FleetDp.of(plan)
        if fleet is None:
            return None
        q, sigma, _ = self.terms(fleet, plan.batch_size)
        return Spend(q, sigma, steps)

    def charge(self, spend: Spend) -> None:
        """Add `spend` to the ledger: steps of one (q, sigma) are summed, as StateStore keeps them, so the
        epsilon after a restart is computed from the very same terms as before it."""
        for i, old in enumerate(self.spends):
            if (old.q, old.sigma) == (spend.q, spend.sigma):
                self.spends[i] = Spend(old.q, old.sigma, old.steps + spend.steps)
                return
        self.spends.append(spend)


__all__ = ["SECRET_FILE", "DeviceBudget", "DpStep", "FleetDp", "PrivacyError", "load_or_create_secret"]


def dp_refusal(budget: DeviceBudget | None, plan: RoundPlan, steps: int) -> str | None:
    """Why this device does not train `steps` local steps of `plan` (None: it does): a DP plan on a device
    that cannot train privately (`budget` None), or one its privacy budget cannot pay."""
    if budget is None:
        return "this device cannot train privately" if plan.dp_clip is not None else None
    return budget.refusal(plan, steps)
