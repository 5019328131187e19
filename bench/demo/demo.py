"""`meerkat demo`: broker + coordinator + N edge clients on the project's tiny model, end to end.

What runs is the real path: the coordinator and every client are separate `meerkat` processes that
talk only over MQTT; clients load the model quantized with a sparse side-car and run forward-only SPSA
steps; the coordinator aggregates and broadcasts scalars. This module only prepares the inputs (cached
tiny model, mask, Non-IID task split, configs), watches the fleet's topics and writes the report:
loss / accuracy before vs after (with the values rebuilt from the broadcast scalars alone, which must
match every process's checksum), bytes up and down as measured on the wire, peak memory per client.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

if TYPE_CHECKING:
    from shared.modelload import Quant

from bench.cli import add_defaults
from bench.demo.toy import toml_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    clients: int = 3  # processes; each loads its own quantized copy of the tiny model
    rounds: int = 30  # closed rounds before the coordinator stops
    steps: int = 10  # local SPSA steps T per round
    broker: str | None = None  # None: 127.0.0.1:1883 if it answers, else a private mosquitto
    workdir: Path = Path("demo-out")
    report: Path = Path("demo-report.json")
    size: str = "demo"  # tiny-model recipe
    task: str = "topic"
    alpha: float = 0.5  # Dirichlet label skew over the clients
    quant: Quant = "nf4"
    fraction: float = 0.01  # mask fraction: a tiny model needs more than the 0.1% a 1B model uses
    lr: float = 2e-3
    eps: float = 1e-2
    batch_size: int = 16
    seq_len: int = 96
    seed: int = 0
    timeout_s: float = 600.0
    eval_every: int = 1  # devices evaluate on their held-out slice (and the coordinator on the task's eval file)
    dashboard_port: int = 0  # 0: a free port on 127.0.0.1 (the coordinator serves /, /metrics there)


def add_parser(sub: Any) -> None:
    d = DemoConfig()
    p = sub.add_parser("demo", help="run broker + coordinator + N clients on a tiny offline model; write a report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_defaults(
        p, d,
        ("--clients", "clients", "edge client processes"), ("--rounds", "rounds", "rounds to run"),
        ("--steps", "steps", "local SPSA steps per round"),
    )  # fmt: skip
    p.add_argument("--broker", default=None, help="mqtt://host:port (default: 127.0.0.1:1883 or a private mosquitto)")
    add_defaults(p, d, ("--workdir", "workdir", "configs, state and logs"), ("--report", "report", "report file"))
    p.add_argument("--quant", choices=("nf4", "int8", "none"), default=d.quant, help=f"client quantisation (default {d.quant})")
    add_defaults(
        p, d,
        ("--task", "task", "topic | sentiment | domain | claim"), ("--size", "size", "tiny-model size (demo | small)"),
        ("--fraction", "fraction", "mask fraction of the Linear weights"), ("--lr", "lr", "learning rate"),
        ("--eps", "eps", "SPSA perturbation size"), ("--timeout", "timeout_s", "give up after this many seconds"),
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.rounds < 1 or not 1 <= args.steps <= 100:
        raise SystemExit("demo: need --clients >= 1, --rounds >= 1 and --steps in 1..100")
    cfg = DemoConfig(clients=args.clients, rounds=args.rounds, steps=args.steps, broker=args.broker,
                     workdir=args.workdir, report=args.report, quant=args.quant, task=args.task, size=args.size,
                     fraction=args.fraction, lr=args.lr, eps=args.eps, timeout_s=args.timeout)
    _quiet_libraries()
    try:
        report = run_demo(cfg)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print_summary(report)
    return 0 if report["exact"]["all_identical"] else 1


class DemoError(RuntimeError):
    pass


def _quiet_libraries() -> None:
    """The demo prints its own progress; the libraries' load bars and info lines would bury it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels package notice


# --------------------------------------------------------------------------------------- preparation
def prepare(cfg: DemoConfig, model_dir: Path | None = None) -> dict[str, Path]:
    """Tiny model (cached; `model_dir`: this one instead), mask (cached per model/fraction), task split: the
    inputs every process reads."""
    from bench.tinylm.corpus import write_corpus
    from bench.tinylm.pretrain import get_model_dir
    from bench.tinylm.tasks import write_task
    from shared.cli import main as meerkat

    work = cfg.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] tiny model ({cfg.size}): building once, then cached ...", flush=True)
    model_dir = get_model_dir(cfg.size, seed=cfg.seed) if model_dir is None else Path(model_dir)
    mask = model_dir.parent / f"{model_dir.name}.mask-{cfg.fraction:g}.safetensors"
    if not mask.exists():
        print(f"[2/4] mask: top {cfg.fraction:.2%} of Linear weights by pre-training gradient ...", flush=True)
        calib = write_corpus(work / "calib", seed=cfg.seed + 1, docs_per_domain=60)
        rc = meerkat(["mask", "build", "--model", str(model_dir), "--calib", *map(str, calib),
                      "--fraction", str(cfg.fraction), "--seqs", "32", "--seq-len", "128", "--out", str(mask)])
        if rc != 0 or not mask.exists():  # the mask file is written atomically: complete or absent
            raise DemoError("mask build failed")
    else:
        print("[2/4] mask: cached", flush=True)
    print(f"[3/4] task {cfg.task}: Non-IID split over {cfg.clients} clients (Dirichlet alpha={cfg.alpha})", flush=True)
    task_json = write_task(work / "task", cfg.task, n_clients=cfg.clients, alpha=cfg.alpha, seed=cfg.seed,
                           n_train=120 * cfg.clients, n_eval=200)
    return {"model": model_dir, "mask": mask, "task": task_json}


def write_configs(cfg: DemoConfig, paths: dict[str, Path], broker: str, fleet: str) -> tuple[Path, list[Path]]:
    from bench.demo.broker import free_port

    work = cfg.workdir.resolve()
    (work / "config").mkdir(exist_ok=True)
    coord = work / "config" / "coordinator.toml"
    coord.write_text(toml_text({
        "broker": broker, "fleet": fleet, "state_dir": work / "state" / "coordinator", "model_dir": paths["model"],
        "mask": paths["mask"], "quant": cfg.quant, "master_seed": cfg.seed, "rounds": cfg.rounds,
        "steps": cfg.steps, "lr": cfg.lr, "eps": cfg.eps, "batch_size": cfg.batch_size,
        "min_clients": cfg.clients, "round_deadline_s": 120.0, "checkpoint_every": 5, "metrics": True,
        "metrics_host": "127.0.0.1", "metrics_port": cfg.dashboard_port or free_port(), "dashboard": True,
        "eval_data": paths["task"], "eval_every": cfg.eval_every,
    }))
    clients = []
    for k in range(cfg.clients):
        cid = f"client_{k:02d}"
        path = work / "config" / f"{cid}.toml"
        path.write_text(toml_text({
            "broker": broker, "fleet": fleet, "client_id": cid, "model_dir": paths["model"], "mask": paths["mask"],
            "quant": cfg.quant, "device": "cpu", "data": paths["task"], "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len, "memory_budget_gib": 2.0, "state_dir": work / "state" / cid, "heartbeat_s": 2.0,
            "eval_every": cfg.eval_every,
            # the demo's clients, coordinator and broker share one machine: with the device policy on, each
            # client would see the others' steps as the owner's load and pause (docs/CLIENT.md "Device policy")
            "policy": {"enabled": False},
        }))
        clients.append(path)
    return coord, clients


def dashboard_url(coord_cfg: Path) -> str:
    import tomllib

    conf = tomllib.loads(coord_cfg.read_text())
    return f"http://{conf['metrics_host']}:{conf['metrics_port']}/"


# --------------------------------------------------------------------------------------- running
def _spawn(args: list[str], log_path: Path, threads: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    out = log_path.open("ab")
    return subprocess.Popen([sys.executable, "-m", "shared.cli", "-v", *args], stdout=out, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def run_demo(cfg: DemoConfig, on_round: Callable[[int, str], None] | None = None) -> dict[str, Any]:
    """Run the fleet; `on_round(round, dashboard_url)` is called after each observed result (tests)."""
    from tqdm import tqdm

    from bench.demo.broker import find_or_start_broker
    from bench.demo.observer import FleetObserver

    t0 = time.monotonic()
    paths = prepare(cfg)
    work = cfg.workdir.resolve()
    for sub in ("state", "logs"):
        _rmtree(work / sub)
        (work / sub).mkdir(parents=True)
    broker = find_or_start_broker(cfg.broker, work / "broker")
    fleet = f"demo-{int(time.time())}-{os.getpid()}"  # a fresh fleet: no retained state of an earlier run
    coord_cfg, client_cfgs = write_configs(cfg, paths, broker.url, fleet)
    evaluator = Evaluator(paths, cfg)
    before = evaluator(evaluator.initial_values())
    print(f"[4/4] fleet {fleet} on {broker.url}: coordinator + {cfg.clients} clients, "
          f"{cfg.rounds} rounds x {cfg.steps} steps", flush=True)
    url = dashboard_url(coord_cfg)
    print(f"      live dashboard: {url}  (Prometheus: {url}metrics)", flush=True)
    observer = FleetObserver(broker.url, fleet)
    observer.start()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    threads = max(1, (os.cpu_count() or 2) // max(1, cfg.clients))
    try:
        procs["coordinator"] = _spawn(["coordinator", "--config", str(coord_cfg)], work / "logs" / "coordinator.log", 1)
        for path in client_cfgs:
            procs[path.stem] = _spawn(["client", "--config", str(path)], work / "logs" / f"{path.stem}.log", threads)
        bar = tqdm(total=cfg.rounds, desc="rounds", unit="round", file=sys.stdout, dynamic_ncols=True)
        seen: set[int] = set()
        deadline = time.monotonic() + cfg.timeout_s
        while len(seen) < cfg.rounds:
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {cfg.timeout_s:.0f} s with {len(seen)} of {cfg.rounds} rounds; "
                                f"logs in {work / 'logs'}")
            dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None and p.returncode != 0}
            if dead:
                raise DemoError(f"process exited early {dead}; logs in {work / 'logs'}")
            try:
                res = observer.new_results.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.add(res.round)
            ups = observer.traffic.updates.get(res.round, {})
            losses = [u.loss for u in ups.values()]
            bar.set_postfix(clients=res.n_clients, loss=f"{sum(losses) / len(losses):.3f}" if losses else "-")
            bar.update(1)
            if on_round is not None:
                on_round(res.round, url)
        bar.close()
        rc = procs["coordinator"].wait(60)
        time.sleep(1.0)  # let clients apply the last result before they are asked to stop
    finally:
        codes = {name: _stop(p) for name, p in procs.items()}
        observer.stop()
        broker.stop()
    if rc != 0:
        raise DemoError(f"coordinator exited with {rc}; see {work / 'logs' / 'coordinator.log'}")
    report = build_report(cfg, paths, observer.traffic, evaluator, before, codes, time.monotonic() - t0)
    report["dashboard_url"] = url
    report["quality"] = fleet_quality(work / "state" / "coordinator")
    cfg.report.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report


def fleet_quality(state_dir: Path) -> dict[str, Any]:
    """The quality curves of the coordinator's run report (coordinator/report.py, the one every fleet gets:
    the coordinator also wrote it to state_dir/report when its rounds ran out): devices' held-out evals and
    its own per round (round -1 = the baseline before round 0), and the mean training loss."""
    from coordinator.report import REPORT_JSON, run_report

    rep = run_report(state_dir)
    return {"device_evals": rep["evals"]["devices"], "coordinator_evals": rep["evals"]["coordinator"],
            "train_loss": [{"round": r["round"], "loss": r["mean_client_loss"]} for r in rep["rounds"]],
            "run": rep["run"], "fleet_report": str(state_dir / "report" / REPORT_JSON)}  # fmt: skip


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """The side-car model loaded ONCE (the demo's quantization, its mask) and the task's train/eval sets:
    loss and accuracy of any values, before and after the run."""

    def __init__(self, paths: dict[str, Path], cfg: DemoConfig) -> None:
        from shared.dataset import load_jsonl, load_task_config
        from shared.maskfile import load_mask
        from shared.modelload import load_model

        self.loaded = load_model(paths["model"], cfg.quant, "cpu", load_mask(paths["mask"]))
        assert self.loaded.sidecar is not None and self.loaded.tokenizer is not None
        task = load_task_config(paths["task"])
        meta = json.loads(paths["task"].read_text())
        root = paths["task"].parent
        self.train = [load_jsonl(root / f, self.loaded.tokenizer, task) for f in meta["train"]]
        self.eval = load_jsonl(root / meta["eval"], self.loaded.tokenizer, task)

    def initial_values(self) -> Any:
        assert self.loaded.sidecar is not None
        return self.loaded.sidecar.initial_values()

    def __call__(self, values: Any) -> dict[str, Any]:
        """Loss/accuracy with `values` on all clients' train data (weighted by size) and the eval data."""
        import torch

        from shared.loss import evaluate

        sidecar = self.loaded.sidecar
        assert sidecar is not None
        sidecar.set_values(values)
        out: dict[str, Any] = {}
        with torch.no_grad():
            agg = {"loss": 0.0, "correct": 0.0, "n": 0.0}
            for ds in self.train:
                r = evaluate(self.loaded.model, ds)
                agg["loss"] += float(r["loss"] or 0.0) * len(ds)
                agg["correct"] += float(r["accuracy"] or 0.0) * len(ds)
                agg["n"] += len(ds)
            out["train_loss"] = agg["loss"] / agg["n"]
            out["train_accuracy"] = agg["correct"] / agg["n"]
            ev = evaluate(self.loaded.model, self.eval)
            out["eval_loss"], out["eval_accuracy"] = ev["loss"], ev["accuracy"]
        out["values"] = values
        return out


def build_report(cfg: DemoConfig, paths: dict[str, Path], traffic: Any, evaluator: Evaluator, before: dict[str, Any],
                 exit_codes: dict[str, int | None], wall_s: float) -> dict[str, Any]:
    from shared.apply import apply_round, values_checksum

    v = before["values"]
    rounds = sorted(traffic.results)
    for r in rounds:
        res = traffic.results[r]
        v = apply_round(v, res.seeds, res.scalars, res.lr, res.dist)
        if values_checksum(v) != res.values_checksum:
            raise DemoError(f"round {r}: values rebuilt from the broadcast scalars do not match the coordinator")
    after = evaluator(v)
    final_ck = values_checksum(v)
    client_ck = {name: client_checksum(cfg.workdir.resolve() / "state" / name) for name in exit_codes if name != "coordinator"}
    per_round = []
    for r in rounds:
        ups = traffic.updates.get(r, {})
        per_round.append({"round": r, "clients": traffic.results[r].n_clients,
                          "mean_client_loss": sum(u.loss for u in ups.values()) / len(ups) if ups else None,
                          "result_sha256": traffic.result_sha256.get(r)})
    peak = {}
    for name, hbs in traffic.heartbeats.items():
        rss = [h.rss_bytes for h in hbs if h.rss_bytes]
        pk = [h.peak_mem_bytes for h in hbs if h.peak_mem_bytes]
        hwm = [h.peak_rss_bytes for h in hbs if h.peak_rss_bytes]  # the process's high-water mark (key 19)
        peak[name] = {"peak_rss_bytes": max(hwm + rss) if hwm else None, "max_rss_bytes": max(rss) if rss else None,
                      "peak_step_bytes": max(pk) if pk else None}  # fmt: skip
    n = cfg.clients
    report = {
        "config": {k: (str(v_) if isinstance(v_, Path) else v_) for k, v_ in cfg.__dict__.items()},
        "model": str(paths["model"]), "mask": str(paths["mask"]),
        "before": {k: val for k, val in before.items() if k != "values"},
        "after": {k: val for k, val in after.items() if k != "values"},
        "rounds": per_round,
        "bytes": {
            "uplink_total": traffic.uplink_bytes(),
            "uplink_updates": traffic.bytes_by_kind["up"],
            "downlink_published": traffic.downlink_bytes(),
            "downlink_delivered_estimate": traffic.downlink_bytes() * n,
            "by_kind": dict(traffic.bytes_by_kind),
            "messages_by_kind": dict(traffic.msgs_by_kind),
            "dense_fp32_model_bytes_for_comparison": None,
        },
        "memory": peak,
        "exact": {"final_checksum": final_ck, "clients": client_ck,
                  "all_identical": bool(client_ck) and all(c == final_ck for c in client_ck.values())},
        "exit_codes": exit_codes,
        "wall_s": round(wall_s, 1),
        "report": str(cfg.report.resolve()),
    }
    cfg.report.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    plot_report(report, cfg.report.with_suffix(".png"))
    return report


def client_checksum_and_round(state_dir: Path) -> tuple[int, str] | None:
    """(round, values checksum) a client persisted in its state (None when it has none yet)."""
    import sqlite3

    from edge_client.service.state import DB_NAME, StateStore

    if not (state_dir / DB_NAME).exists():
        return None
    try:
        store = StateStore(state_dir, read_only=True)
        try:
            st = store.load()
        finally:
            store.close()
    except sqlite3.OperationalError:  # being created or locked by the running client: ask again later
        return None
    return None if st is None else (st.round, st.checksum)


def client_checksum(state_dir: Path) -> str | None:
    """The values checksum a client persisted in its state (None when it has none)."""
    got = client_checksum_and_round(state_dir)
    return None if got is None else got[1]


def plot_report(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed (pip install 'meerkat-edge[plot]'): no PNG")
        return
    rows = [r for r in report["rounds"] if r["mean_client_loss"] is not None]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([r["round"] for r in rows], [r["mean_client_loss"] for r in rows], marker="o")
    ax[0].set_xlabel("round")
    ax[0].set_ylabel("mean client training loss (SPSA)")
    labels = ["train loss", "eval loss", "train acc", "eval acc"]
    keys = ["train_loss", "eval_loss", "train_accuracy", "eval_accuracy"]
    x = range(len(keys))
    ax[1].bar([i - 0.2 for i in x], [report["before"][k] for k in keys], 0.4, label="before")
    ax[1].bar([i + 0.2 for i in x], [report["after"][k] for k in keys], 0.4, label="after")
    ax[1].set_xticks(list(x), labels)
    ax[1].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(report: dict[str, Any]) -> None:
    b, a = report["before"], report["after"]
    print()
    print(f"{'':18}{'before':>10}{'after':>10}")
    for key in ("train_loss", "eval_loss", "train_accuracy", "eval_accuracy"):
        print(f"{key:18}{b[key]:>10.4f}{a[key]:>10.4f}")
    by = report["bytes"]
    print(f"bytes up (all)      {by['uplink_total']:>10}   updates only {by['uplink_updates']}")
    print(f"bytes down (sent)   {by['downlink_published']:>10}   delivered to clients ~{by['downlink_delivered_estimate']}")
    for name, m in sorted(report["memory"].items()):
        rss = m["peak_rss_bytes"] or m["max_rss_bytes"]
        what = "peak rss" if m["peak_rss_bytes"] else "largest rss sample"
        print(f"peak memory {name}: {what} {rss / 2**20:.0f} MiB" if rss else f"peak memory {name}: n/a")
    ex = report["exact"]
    print(f"bit-identical values on coordinator and all clients: {ex['all_identical']} ({ex['final_checksum'][:16]})")
    png = " (+ .png)" if Path(report["report"]).with_suffix(".png").exists() else ""
    print(f"wall time {report['wall_s']} s; report: {report['report']}{png}")
    q = report.get("quality", {})
    for key, label in (("device_evals", "devices' held-out eval loss"), ("coordinator_evals", "coordinator eval loss")):
        pts = q.get(key) or []
        if pts:
            print(f"{label}: round {pts[0]['round']} {pts[0]['loss']:.4f} -> round {pts[-1]['round']} {pts[-1]['loss']:.4f}")
