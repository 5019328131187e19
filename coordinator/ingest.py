"""Semantic checks of incoming messages (the message constructors already checked types, ranges and
finiteness: that is the one finiteness check; nothing here repeats it). Called by the round book.

A check returns None (accept) or a `Reject(reason, code, detail)`: `reason` is the counter label
(rejects table, Prometheus `meerkat_messages_rejected{reason}`), `code` travels to the client in an
ErrorMsg, `detail` goes to the log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from coordinator.records import PlanRow
from shared.codec import DecodeError
from shared.messages import ErrorCode, Join, Update
from shared.sampling import plan_steps


@dataclass(frozen=True)
class Reject:
    reason: str
    code: ErrorCode
    detail: str


def decode_reject(exc: DecodeError) -> Reject:
    return Reject(f"decode_{exc.code.name.lower()}", exc.code, exc.reason)


def check_join(
    j: Join, fingerprint: str, mask_id: str, quant: str | None = None, compact: bool = False
) -> Reject | None:
    """Fingerprint, then mask, then (quant given: quant_policy "same") the `quant` capability, then (`compact`:
    plan_form "compact") the `compact_plan` capability. A Join without a `quant` capability is not refused
    for it: capabilities are optional on the wire (§2); one without `compact_plan = true` cannot decode
    the fleet's plans (a 1.2 device: UNKNOWN_FIELD on key 18) and is refused with PLAN_FORM."""
    if j.fingerprint != fingerprint:
        return Reject(
            "fingerprint", ErrorCode.FINGERPRINT_MISMATCH,
            f"base model {j.fingerprint[:12]}... is not the fleet's {fingerprint[:12]}...",
        )  # fmt: skip
    if j.mask_id != mask_id:
        return Reject("mask", ErrorCode.MASK_MISMATCH, f"mask {j.mask_id} is not the fleet's {mask_id}")
    have = j.capabilities.get("quant")
    if quant is not None and have is not None and have != quant:
        return Reject(
            "quant", ErrorCode.QUANT_MISMATCH,
            f"quant {have!s:.16} is not the fleet's {quant}: set quant = \"{quant}\" on the device "
            "(or quant_policy = \"any\" on the coordinator)",
        )  # fmt: skip
    if compact and j.capabilities.get("compact_plan") is not True:
        return Reject(
            "plan_form", ErrorCode.PLAN_FORM,
            "the fleet publishes compact plans (protocol 1.3) and this Join has no compact_plan = true capability "
            "(a 1.2 device): upgrade the device, or run the coordinator with plan_form = \"list\"",
        )  # fmt: skip
    return None


def check_update(
    u: Update, plan: PlanRow | None, fp_tag: int, max_abs_grad: float, joined: Callable[[str], bool]
) -> Reject | None:
    """Checks that do not depend on what is already stored (dedupe is the caller's, in the same transaction).
    A device a compact plan's rule covers but the round did not expect (not in plan.steps: it was not
    eligible at the open) must be `joined` (UNKNOWN_CLIENT otherwise: a refused or unknown device is never
    in a round, whatever its key)."""
    if plan is None:
        return Reject("unknown_round", ErrorCode.UNKNOWN_ROUND, f"round {u.round} was never planned")
    want = plan_steps(plan, u.client)  # compact plans: the exceptions, else the sampling rule (shared/sampling.py)
    if not want:
        return Reject(
            "not_in_round", ErrorCode.NOT_IN_ROUND, f"{u.client} was not sampled in round {u.round}"
        )
    if u.client not in plan.steps and not joined(u.client):
        return Reject("unknown_client", ErrorCode.UNKNOWN_CLIENT, f"update for round {u.round} before Join: send Join")
    if u.fp_tag != fp_tag:
        return Reject(
            "fingerprint", ErrorCode.FINGERPRINT_MISMATCH, f"fp_tag {u.fp_tag:#010x} != {fp_tag:#010x}"
        )
    if len(u.grads) != want:
        return Reject("wrong_steps", ErrorCode.BAD_UPDATE, f"{len(u.grads)} grads, the plan asked for {want}")
    big = max(map(abs, u.grads))  # grads: floats (shared.messages.Update)
    if big > max_abs_grad:  # the fixed cap (the adaptive one clips, it never refuses: rounds.py on_update)
        return Reject("grad_too_large", ErrorCode.BAD_UPDATE, f"|g| = {big:.3g} > the cap {max_abs_grad:.3g}")
    if u.n_samples <= 0:
        return Reject("no_samples", ErrorCode.BAD_UPDATE, "n_samples must be > 0 (it is the FedAvg weight)")
    return None
