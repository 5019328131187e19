"""`meerkat client --check` against the coordinator: does the fleet on this broker run this model and mask?

The coordinator's retained messages on the fleet's topics say what it runs: the plan (`plan`, retained)
names the model fingerprint and mask id every device must hold; `result/latest` (retained) proves a
coordinator has closed rounds on that fleet name. The broker check (shared/preflight.py) captures both;
`fleet_check` compares them with what this device loaded, before the service ever joins:
- a plan of another model or mask: FAIL (the service would exit EXIT_MISMATCH at its first Join);
- nothing retained under the fleet name: n/a, and says so (a typo in `fleet`, or a coordinator that has
  not opened its first round yet: it does once `min_clients` devices joined).
"""

from __future__ import annotations

from shared.codec import DecodeError, decode
from shared.messages import RoundPlan, RoundResult
from shared.preflight import Check
from shared.topics import Topics


def fleet_check(fleet: str, retained: dict[str, bytes], fingerprint: str, mask_id: str) -> Check:
    """One report line: the coordinator's retained plan (or result) on `fleet` against this device's
    model `fingerprint` and `mask_id`. ok False = a mismatch, None = nothing to compare with."""
    t = Topics(fleet)
    name = f"fleet {fleet}"
    plan_raw, result_raw = retained.get(t.plan), retained.get(t.result_latest)
    if plan_raw is None:
        if result_raw is None:
            return Check(name, None, f"no coordinator answers on fleet {fleet!r}: nothing retained on {t.plan} or "
                         f"{t.result_latest}. Check `fleet` (a typo?) against the coordinator's; or its first "
                         "round has not opened yet (it opens once min_clients devices joined)")
        return Check(name, None, f"a coordinator ran fleet {fleet!r} ({_result_round(result_raw)}) but no plan is "
                     "retained: model and mask cannot be compared yet")
    try:
        plan = decode(plan_raw, RoundPlan)
    except (DecodeError, ValueError) as exc:
        return Check(name, False, f"the retained plan on {t.plan} does not decode ({exc}): another meerkat "
                     "version on the coordinator? Compare `meerkat --version` on both")
    wrong = []
    if plan.fingerprint != fingerprint:
        wrong.append(f"model {plan.fingerprint[:16]} (this device: {fingerprint[:16]}): model_dir must be the "
                     "coordinator's base model")
    if plan.mask_id != mask_id:
        wrong.append(f"mask {plan.mask_id} (this device: {mask_id}): copy the coordinator's mask file")
    if wrong:
        return Check(name, False, f"the coordinator runs {'; '.join(wrong)}")
    return Check(name, True, f"the coordinator's plan (round {plan.round}) has this model {fingerprint[:16]} and "
                 f"mask {mask_id}")


def _result_round(raw: bytes) -> str:
    try:
        return f"round {decode(raw, RoundResult).round} closed"
    except (DecodeError, ValueError):
        return "a result is retained"


__all__ = ["fleet_check"]
