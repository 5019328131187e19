"""Our implementation (shared.codec + shared.apply) passes the conformance kit (docs/PROTOCOL.md §12).

The runner drives tests/conformance/reference_impl.py as a child process over the same JSON-lines
interface a third party implements, so the interface itself is exercised too. The transcripts are
recordings of the real coordinator (tests/conformance/record.py, run by hand).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import runner
import vectors

HERE = Path(__file__).resolve().parent
IMPL = [sys.executable, str(HERE / "reference_impl.py")]
SCENARIOS = ("baseline", "gaussian", "late_fold", "extension", "vp_limited", "replay", "checkpoint", "errors", "lr_auto")


@pytest.fixture(scope="module")
def results() -> dict[str, runner.Transcript]:
    paths = sorted(p for p in runner.TRANSCRIPTS.iterdir() if (p / "meta.json").is_file())
    return {t.name: t for t in runner.run(paths, IMPL)}


def test_every_scenario_is_in_the_kit(results: dict[str, runner.Transcript]) -> None:
    assert set(SCENARIOS) <= set(results)
    total = sum(len(t.lines) for t in results.values())
    assert total >= 200, total
    kit = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file() and f.suffix in (".jsonl", ".json", ".f32"))
    assert kit < 2 << 20, f"the kit is {kit} bytes: keep nnz small"


@pytest.mark.parametrize("name", SCENARIOS)
def test_reference_passes(results: dict[str, runner.Transcript], name: str) -> None:
    t = results[name]
    assert t.failures == [], t.failures
    assert t.checks > 20


def test_scenarios_show_what_they_claim(results: dict[str, runner.Transcript]) -> None:
    """Each transcript really contains its behaviour (a re-recording that lost it must fail here)."""
    def types(name: str) -> list[str]:
        return [ln.get("type") or ln["error"] for ln in results[name].lines]

    late = results["late_fold"].results()
    plan_len = len(next(results["late_fold"].of_type("RoundPlan"))["decoded"]["seeds"])
    assert any(len(ln["decoded"]["seeds"]) > plan_len for ln in late.values()), "no late pairs folded"
    plans0 = [p["decoded"] for p in results["extension"].of_type("RoundPlan") if p["decoded"]["round"] == 0]
    assert len(plans0) == 2 and plans0[1]["deadline"] > plans0[0]["deadline"]
    assert plans0[1]["sample_max"] > plans0[0]["sample_max"] and plans0[0]["steps"] == {}  # compact plans (1.3)
    vp = [{c: runner.plan_steps(p["decoded"], c) for c in ("dev-decay", "dev-steady")}
          for p in results["vp_limited"].of_type("RoundPlan")]
    assert vp[0]["dev-decay"] > 1 and vp[-1]["dev-decay"] == 1 and vp[-1]["dev-steady"] > 1
    assert "Replay" in types("replay") and "CheckpointChunk" in types("checkpoint")
    assert results["gaussian"].meta["dist"] == "gaussian" and results["baseline"].meta["dist"] == "rademacher"
    plan_lr = {p["decoded"]["round"]: p["decoded"]["lr"] for p in results["lr_auto"].of_type("RoundPlan")}
    res_lr = {r["decoded"]["round"]: r["decoded"]["lr"] for r in results["lr_auto"].of_type("RoundResult")}
    assert len(set(plan_lr.values())) >= 2 and any(res_lr[r] < plan_lr[r] for r in res_lr), (plan_lr, res_lr)
    res = {r["decoded"]["round"]: r["decoded"] for r in results["lr_auto"].of_type("RoundResult")}
    T = len(res[3]["seeds"])  # round 4 undoes round 3: its own seeds with scalar 0, then round 3's pairs negated
    assert res[4]["seeds"][T:] == res[3]["seeds"] and res[4]["scalars"] == [0.0] * T + [-g for g in res[3]["scalars"]]
    codes = {ln["decoded"]["code"] for ln in results["errors"].of_type("ErrorMsg")}
    assert {3, 32, 33, 35, 36, 38, 39, 40, 41, 42} <= codes, codes  # 39-41 (1.1), 42 PLAN_FORM (1.3)
    assert "BAD_MAGIC" in types("errors")
    kinds = {t for r in results.values() for t in (ln.get("type") for ln in r.lines) if t}
    assert len(kinds) == 11, kinds  # all eleven message types occur (RunState, 1.3: in the decode vectors)


def test_edge_vectors_pending_are_exactly_the_known_gaps(results: dict[str, runner.Transcript]) -> None:
    """The reference fails exactly the vectors marked `pending` (when a gap is fixed, drop its mark)."""
    t = results["decode_edge"]
    assert t.failures == [], t.failures
    marked = sorted(v["name"] for v in t.lines if v.get("pending"))
    assert sorted(t.meta["pending_failed"]) == marked


def test_vectors_file_is_current(tmp_path: Path) -> None:
    fresh, steps = tmp_path / "v.jsonl", tmp_path / "s.jsonl"
    vectors.write(fresh, steps)
    assert fresh.read_text() == runner.VECTORS.read_text(), "run tests/conformance/vectors.py"
    assert steps.read_text() == runner.STEPS_VECTORS.read_text(), "run tests/conformance/vectors.py"


def test_compact_plan_sampling_vectors(results: dict[str, runner.Transcript]) -> None:
    """1.3 compact plans: the reference computes every vector's T_client, and the vectors reach both sides
    of the threshold, its edge, the exceptions and the 1.2 list form."""
    t = results["plan_steps"]
    assert t.failures == [] and t.checks == len(t.lines) >= 20
    got = {v["steps"] for v in t.lines}
    assert {0, 1, 2, 3} <= got
    names = {v["name"] for v in t.lines}
    assert {"rule_key_equal", "rule_key_minus_one", "exception_limited", "all_sampled", "list_plan_unlisted"} <= names


def test_runner_catches_a_wrong_sampling_rule(tmp_path: Path) -> None:
    """An implementation that ignores sample_max (a 1.2 reading of `steps`) fails the sampling vectors."""
    lines = [json.loads(s) for s in runner.STEPS_VECTORS.read_text().splitlines()]
    wrong = tmp_path / "impl.py"
    wrong.write_text("import json, sys\nfor line in sys.stdin:\n    print(json.dumps({'steps': 0}), flush=True)\n")
    (t,) = runner.run([], [sys.executable, str(wrong)], vectors=None)
    assert len(t.failures) == sum(1 for v in lines if v["steps"]), t.failures[:3]


def test_runner_catches_a_wrong_apply() -> None:
    """An implementation that drops the folded late pairs fails late_fold (and only checks that need them)."""
    done = runner.run([runner.TRANSCRIPTS / "late_fold", runner.TRANSCRIPTS / "baseline"],
                      [*IMPL, "--broken-max-pairs", "4"], vectors=None)  # fmt: skip
    by = {t.name: t for t in done}
    assert by["baseline"].failures == []
    assert any("apply round 1" in f for f in by["late_fold"].failures)


def test_runner_catches_a_wrong_decode(tmp_path: Path) -> None:
    src = runner.TRANSCRIPTS / "baseline"
    dst = tmp_path / "baseline"
    dst.mkdir()
    for f in ("meta.json", "v0.f32"):
        (dst / f).write_bytes((src / f).read_bytes())
    lines = [json.loads(s) for s in (src / "messages.jsonl").read_text().splitlines()]
    plan = next(ln for ln in lines if ln.get("type") == "RoundPlan")
    plan["decoded"]["eps"] = plan["decoded"]["eps"] * 2  # the recording now disagrees with the bytes
    (dst / "messages.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    (t,) = runner.run([dst], IMPL, vectors=None, steps_vectors=None)
    assert any("eps" in f for f in t.failures), t.failures


def test_vectors_cover_every_code_limit_and_decision() -> None:
    """PROTOCOL.md §12 promises a vector for every decoding code, every §2 limit, every check of "Check
    order" and each 1.3 decision: a vectors.py that lost one must fail here."""
    from shared.messages import ErrorCode

    vs = vectors.vectors()
    names = {v["name"] for v in vs}
    refused = {v["error"] for v in vs if "error" in v}
    assert {c.name for c in ErrorCode if c.value < 32} <= refused, {c.name for c in ErrorCode} - refused
    carried = {v["decoded"]["code"] for v in vs if v.get("type") == "ErrorMsg" and "decoded" in v}
    assert {c.value for c in ErrorCode if c.value >= 32} <= carried
    limits = ("too_large_payload", "too_large_declared_size", "too_large_window", "too_large_stream",
              "str_over_max_str", "bin_over_max_bin", "array_over_max_array", "map_over_max_map",
              "containers_over", "depth_over")  # fmt: skip
    assert set(limits) <= names, set(limits) - names
    for d in ("d1_", "d2_", "d5_", "d6_", "d7_", "d8_", "order_", "retained_clear_", "compact_plan"):
        assert any(n.startswith(d) for n in names), d
    assert {"foreign_topic", "retained_clear"} == {v["ignored"] for v in vs if "ignored" in v}
    assert len(names) == len(vs), "vector names must be unique"
