"""Conformance runner: checks an implementation's decode and apply against the recorded transcripts.

    python tests/conformance/runner.py --impl "CMD ARGS..." [--transcripts DIR] [--only NAME ...]

The implementation is ANY program (docs/PROTOCOL.md §12) started once as `CMD ARGS...`. It reads
requests from stdin, one JSON object per line, and answers each with exactly one JSON line on stdout
(flush after every line); it exits at end of input.

    {"op": "decode", "topic": T, "payload": HEX}
        -> {"type": "<MessageType>", "fields": {...}}   the body in the JSON form of §12, or
        -> {"error": "<ERROR_CODE_NAME>"}                when the payload must be refused (§2), or
        -> {"ignored": "retained_clear" | "foreign_topic"}  when it must not be decoded at all (§2 "Check order")
    {"op": "load", "path": P}            the receiver's values := the LE float32 file P
        -> {"values_checksum": HEX}
    {"op": "apply", "payload": HEX}      decode a RoundResult payload and apply it to the held values (§5)
        -> {"round": R, "values_checksum": HEX}         checksum the implementation COMPUTED (not copied)
    {"op": "steps", "topic": T, "payload": HEX, "client": C}   decode a RoundPlan and say what C runs (1.3)
        -> {"steps": N}                                  T_C of §2 RoundPlan (0: not sampled)

What the runner checks, per transcript: every payload decodes to the recorded type and fields (or is
refused with the recorded code); v_0 loads with meta's checksum; every RoundResult applied in round
order gives meta's checksum; every Replay's results equal the RoundResults of those rounds; checkpoint
chunks reassemble to the values of their round (sha256 = checksum), load, and the following results
apply on top of them; the protocol rules a transcript must obey (Update length = the plan's steps,
plan base checksum = the checksum after base_round, ...). Exit 0 when all pass; each failure is printed.
`tests/conformance/reference_impl.py` is our implementation of the interface.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TRANSCRIPTS = HERE / "transcripts"
VECTORS = HERE / "vectors" / "decode_edge.jsonl"
STEPS_VECTORS = HERE / "vectors" / "plan_steps.jsonl"  # 1.3 compact plans: who runs how many steps


class Impl:
    """The implementation under test: one child process speaking JSON lines."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"implementation exited (rc {self.proc.poll()}) on {req['op']}")
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


@dataclass
class Transcript:
    name: str
    path: Path
    meta: dict[str, Any]
    lines: list[dict[str, Any]]
    failures: list[str] = field(default_factory=list)
    checks: int = 0

    def check(self, ok: bool, what: str) -> bool:
        self.checks += 1
        if not ok:
            self.failures.append(f"{self.name}: {what}")
        return ok

    def of_type(self, name: str) -> Iterator[dict[str, Any]]:
        return (ln for ln in self.lines if ln.get("type") == name)

    def results(self) -> dict[int, dict[str, Any]]:
        """round -> the RoundResult line from result/{round} (result/latest repeats them)."""
        return {ln["decoded"]["round"]: ln for ln in self.of_type("RoundResult") if not ln["topic"].endswith("/latest")}


def load(path: Path) -> Transcript:
    meta = json.loads((path / "meta.json").read_text())
    lines = [json.loads(s) for s in (path / "messages.jsonl").read_text().splitlines() if s.strip()]
    return Transcript(path.name, path, meta, lines)


def check_decode(t: Transcript, impl: Impl) -> None:
    for ln in t.lines:
        got = impl.ask({"op": "decode", "topic": ln["topic"], "payload": ln["payload"]})
        where = f"message {ln['seq']} on {ln['topic']}"
        if "error" in ln:
            t.check(got.get("error") == ln["error"], f"{where}: expected refusal {ln['error']}, got {got}")
            continue
        if not t.check(got.get("type") == ln["type"], f"{where}: expected type {ln['type']}, got {got}"):
            continue
        t.check(got.get("fields") == ln["decoded"], f"{where}: fields differ: {_diff(ln['decoded'], got.get('fields'))}")


def _diff(want: Any, got: Any) -> str:
    if not isinstance(want, dict) or not isinstance(got, dict):
        return f"expected {want!r}, got {got!r}"
    keys = sorted(set(want) | set(got))
    return "; ".join(f"{k}: expected {want.get(k, '<absent>')!r}, got {got.get(k, '<absent>')!r}"
                     for k in keys if want.get(k) != got.get(k))  # fmt: skip


def check_apply(t: Transcript, impl: Impl) -> None:
    m = t.meta
    v0 = t.path / m["v0_file"]
    t.check(hashlib.sha256(v0.read_bytes()).hexdigest() == m["v0_checksum"], "v0.f32 does not hash to v0_checksum")
    t.check(v0.stat().st_size == 4 * m["nnz"], f"v0.f32 is not 4 * nnz = {4 * m['nnz']} bytes")
    got = impl.ask({"op": "load", "path": str(v0)})
    t.check(got.get("values_checksum") == m["v0_checksum"], f"load v0: checksum {got}")
    results = t.results()
    t.check(sorted(results) == list(range(len(results))), f"results not for rounds 0..n-1: {sorted(results)}")
    t.check(sorted(int(r) for r in m["checksums"]) == sorted(results), "meta checksums do not cover the results")
    for r in sorted(results):
        got = impl.ask({"op": "apply", "payload": results[r]["payload"]})
        want = m["checksums"][str(r)]
        t.check(got.get("round") == r and got.get("values_checksum") == want,
                f"apply round {r}: expected checksum {want}, got {got}")  # fmt: skip
        t.check(results[r]["decoded"]["values_checksum"] == want, f"result {r} carries another checksum than meta")


def check_replays(t: Transcript) -> None:
    results = t.results()
    for ln in t.of_type("Replay"):
        for res in ln["decoded"]["results"]:
            r = res["round"]
            t.check(r in results and results[r]["decoded"] == res, f"Replay (message {ln['seq']}) round {r} differs "
                    "from result/{r}")  # fmt: skip
        rounds = [x["round"] for x in ln["decoded"]["results"]]
        t.check(rounds == sorted(rounds) and rounds == list(range(rounds[0], rounds[0] + len(rounds))) if rounds
                else True, f"Replay (message {ln['seq']}) rounds not consecutive ascending: {rounds}")  # fmt: skip


def check_checkpoints(t: Transcript, impl: Impl) -> None:
    chunks: dict[tuple[int, str], dict[int, dict[str, Any]]] = {}
    for ln in t.of_type("CheckpointChunk"):
        d = ln["decoded"]
        chunks.setdefault((d["round"], d["sha256"]), {})[d["index"]] = d
    results = t.results()
    for (r, sha), parts in chunks.items():
        total = next(iter(parts.values()))["total"]
        if not t.check(sorted(parts) == list(range(total)), f"checkpoint of round {r}: chunks {sorted(parts)} of {total}"):
            continue
        data = b"".join(bytes.fromhex(parts[i]["data"]) for i in range(total))
        t.check(hashlib.sha256(data).hexdigest() == sha, f"checkpoint of round {r}: data does not hash to sha256")
        t.check(t.meta["checksums"].get(str(r)) == sha, f"checkpoint of round {r}: sha256 is not that round's checksum")
        t.check(len(data) == 4 * t.meta["nnz"], f"checkpoint of round {r}: {len(data)} bytes, not 4 * nnz")
        with tempfile.NamedTemporaryFile(suffix=".f32") as f:  # install it, then apply what follows
            f.write(data)
            f.flush()
            got = impl.ask({"op": "load", "path": f.name})
        t.check(got.get("values_checksum") == sha, f"load checkpoint of round {r}: {got}")
        for nxt in sorted(x for x in results if x > r):
            got = impl.ask({"op": "apply", "payload": results[nxt]["payload"]})
            t.check(got.get("values_checksum") == t.meta["checksums"][str(nxt)],
                    f"apply round {nxt} on the checkpoint of round {r}: {got}")  # fmt: skip


def check_rules(t: Transcript) -> None:
    """Rules of docs/PROTOCOL.md that a recorded run must obey (the kit checks the coordinator too)."""
    m = t.meta
    plans: dict[int, list[dict[str, Any]]] = {}
    for ln in t.of_type("RoundPlan"):
        p = ln["decoded"]
        plans.setdefault(p["round"], []).append(p)
        base = m["v0_checksum"] if p["base_round"] == -1 else m["checksums"].get(str(p["base_round"]))
        t.check(p["values_checksum"] == base, f"plan {p['round']}: values_checksum is not the checksum after base_round")
        t.check(p["base_round"] == p["round"] - 1, f"plan {p['round']}: base_round {p['base_round']}")
        t.check(p["fingerprint"] == m["fingerprint"] and p["mask_id"] == m["mask_id"], f"plan {p['round']}: identity")
        t.check(all(1 <= n <= len(p["seeds"]) for n in p["steps"].values()), f"plan {p['round']}: steps out of range")
    for r, ps in plans.items():  # a re-issued plan (extension) keeps the round's seeds and every sampled client
        t.check(all(q["seeds"] == ps[0]["seeds"] and set(ps[0]["steps"]) <= set(q["steps"]) for q in ps),
                f"plan {r}: a re-issued plan changed the seeds or dropped a client")  # fmt: skip
        t.check(all(("sample_max" in q) == ("sample_max" in ps[0]) and q.get("sample_max", 0) >= ps[0].get("sample_max", 0)
                    for q in ps), f"plan {r}: a re-issued compact plan lowered sample_max")  # fmt: skip
    for ln in t.of_type("Update"):  # an accepted Update has the length its plan gives its client (§2 RoundPlan)
        latest = plans.get(ln["decoded"]["round"])
        p = latest[-1] if latest else None
        refused = any(x["topic"] == ln["topic"].replace("/up/", "/to/") and x["seq"] > ln["seq"]
                      and x.get("type") == "ErrorMsg" for x in t.lines)  # fmt: skip
        if p is not None and not refused:
            n = plan_steps(p, ln["topic"].rsplit("/", 1)[1])
            t.check(len(ln["decoded"]["grads"]) == n, f"update {ln['seq']}: {len(ln['decoded']['grads'])} grads, its plan gives {n}")
    for ln in t.of_type("Update"):  # another model's fp_tag must be refused with FINGERPRINT_MISMATCH (32)
        if ln["decoded"]["fp_tag"] != m["fp_tag"]:
            to = ln["topic"].replace("/up/", "/to/")
            t.check(any(x["topic"] == to and x["seq"] > ln["seq"] and x.get("type") == "ErrorMsg"
                        and x["decoded"]["code"] == 32 for x in t.lines),
                    f"update {ln['seq']}: a foreign fp_tag was not refused with FINGERPRINT_MISMATCH")  # fmt: skip
    for r, ln in t.results().items():
        res, plan = ln["decoded"], plans.get(r, [None])[-1]
        t.check(len(res["seeds"]) == len(res["scalars"]), f"result {r}: seeds/scalars lengths differ")
        if plan is not None:
            T = len(plan["seeds"])
            t.check(res["seeds"][:T] == plan["seeds"], f"result {r}: does not start with its plan's seeds")
            t.check(res["dist"] == plan["dist"], f"result {r}: dist differs from the plan")
            # 1.3 (issue 32): the coordinator may apply a round at a smaller lr than its plan's (a damped round)
            t.check(0 < res["lr"] <= plan["lr"], f"result {r}: lr {res['lr']} not in (0, the plan's {plan['lr']}]")


def sample_key(seed0: int, client: str) -> int:
    """§2 RoundPlan (1.3): the first 8 bytes, little-endian, of sha256(le64(seeds[0]) || utf8(client))."""
    return int.from_bytes(hashlib.sha256(seed0.to_bytes(8, "little") + client.encode()).digest()[:8], "little")


def plan_steps(plan: dict[str, Any], client: str) -> int:
    """T_client of a decoded plan (JSON form): steps[client], else len(seeds) under sample_max, else 0."""
    if client in plan["steps"]:
        return int(plan["steps"][client])
    if "sample_max" in plan and sample_key(plan["seeds"][0], client) <= plan["sample_max"]:
        return len(plan["seeds"])
    return 0


def check_steps(path: Path, impl: Impl) -> Transcript:
    """The 1.3 sampling vectors: each names a plan payload, a client, its key and the steps it runs."""
    t = Transcript(path.stem, path, {}, [json.loads(s) for s in path.read_text().splitlines() if s.strip()])
    for v in t.lines:
        got = impl.ask({"op": "steps", "topic": v["topic"], "payload": v["payload"], "client": v["client"]})
        t.check(got == {"steps": v["steps"]}, f"{v['name']} ({v['rule']}): expected steps {v['steps']} (key {v['key']}), got {str(got)[:200]}")
    return t


def check_vectors(path: Path, impl: Impl) -> tuple[Transcript, list[str]]:
    """The edge-case vectors: (result, names of `pending` vectors that failed, reported but not counted)."""
    t = Transcript(path.stem, path, {}, [json.loads(s) for s in path.read_text().splitlines() if s.strip()])
    pending_failed = []
    for v in t.lines:
        got = impl.ask({"op": "decode", "topic": v["topic"], "payload": v["payload"]})
        if "error" in v:
            ok = got.get("error") == v["error"]
        elif "ignored" in v:
            ok = got.get("ignored") == v["ignored"]
        else:
            ok = got.get("type") == v["type"] and ("decoded" not in v or got.get("fields") == v["decoded"])
        if not ok and v.get("pending"):
            pending_failed.append(v["name"])
            continue
        t.check(ok, f"{v['name']} ({v['rule']}): expected {v.get('error') or v.get('ignored') or v.get('type')}, got {str(got)[:200]}")
    return t, pending_failed


def run(transcripts: list[Path], impl_argv: list[str], vectors: Path | None = VECTORS,
        steps_vectors: Path | None = STEPS_VECTORS) -> list[Transcript]:  # fmt: skip
    impl = Impl(impl_argv)
    done = []
    try:
        if vectors is not None:
            t, pending = check_vectors(vectors, impl)
            t.meta["pending_failed"] = pending
            done.append(t)
        if steps_vectors is not None:
            done.append(check_steps(steps_vectors, impl))
        for path in transcripts:
            t = load(path)
            check_decode(t, impl)
            check_apply(t, impl)
            check_replays(t)
            check_checkpoints(t, impl)
            check_rules(t)
            done.append(t)
    finally:
        impl.close()
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", required=True, help='the implementation command, e.g. "./my-client conformance"')
    ap.add_argument("--transcripts", type=Path, default=TRANSCRIPTS)
    ap.add_argument("--only", nargs="*", help="scenario names (default: all)")
    a = ap.parse_args(argv)
    paths = sorted(p for p in a.transcripts.iterdir() if (p / "meta.json").is_file() and (not a.only or p.name in a.only))
    if not paths:
        print(f"no transcripts under {a.transcripts}", file=sys.stderr)
        return 2
    done = run(paths, shlex.split(a.impl))
    for t in done:
        print(f"{'PASS' if not t.failures else 'FAIL'} {t.name}: {t.checks} checks, {len(t.failures)} failed")
        if t.meta.get("pending_failed"):
            print(f"  pending (a known gap of this implementation, see the vector's 'pending'): {t.meta['pending_failed']}")
        for f in t.failures[:20]:
            print(f"  {f}")
    return 0 if all(not t.failures for t in done) else 1


if __name__ == "__main__":
    raise SystemExit(main())
