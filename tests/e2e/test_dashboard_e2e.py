"""Watch a real fleet learn: coordinator + 2 clients over Mosquitto (the demo machinery, micro model).

While the fleet runs: /metrics (parsed with prometheus_client's parser) has the per-device and quality
series, /dashboard.json has both devices. After the run: the run's state_dir served by the coordinator's
own metrics/dashboard server, loaded in headless Chromium (`--dump-dom`): device rows, a loss value,
curve elements. The devices' held-out eval loss falls over the run, and `meerkat evaluate` on the export
agrees with the coordinator's last eval within 1e-4 (same data, same values).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.demo.demo import DemoConfig, run_demo
from coordinator.config import load_coordinator_config
from coordinator.dashboard import pages
from coordinator.evaluate_cli import evaluate_cmd
from coordinator.eventlog import EventLog
from coordinator.metrics import Metrics, MetricsServer
from coordinator.records import COORDINATOR_EVAL
from shared.cli import main as meerkat

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=20) as r:
        return str(r.read().decode())


def dump_dom(url: str, tmp: Path) -> str:
    assert CHROMIUM, "chromium is not installed (.ci/run installs it: apt-get install -y chromium)"
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'chromium'}",
         "--virtual-time-budget=3000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout


def test_fleet_dashboard_metrics_and_quality(broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = DemoConfig(clients=2, rounds=8, steps=4, broker=broker_url, workdir=tmp_path / "demo",
                     report=tmp_path / "report.json", size="micro", batch_size=8, seq_len=64, lr=5e-3,
                     timeout_s=600)  # fmt: skip
    live: dict[str, Any] = {}

    def on_round(r: int, url: str) -> None:
        if r >= 2 and "metrics" not in live:  # the coordinator is running: scrape it now
            live["metrics"] = _get(url + "metrics")
            live["json"] = json.loads(_get(url + "dashboard.json"))

    report = run_demo(cfg, on_round=on_round)
    assert report["exact"]["all_identical"], report["exact"]
    for name in ("client_00", "client_01"):  # each client process's high-water mark (Heartbeat key 19)
        mem = report["memory"][name]
        assert mem["peak_rss_bytes"] is not None and mem["peak_rss_bytes"] >= mem["max_rss_bytes"] > 50 << 20, mem

    # -- /metrics of the running coordinator --------------------------------------------------------
    fams = {f.name: f for f in text_string_to_metric_families(live["metrics"])}
    for name in ("meerkat_device_rss_bytes", "meerkat_device_cpu_percent", "meerkat_device_memory_budget_bytes",
                 "meerkat_device_peak_step_memory_bytes", "meerkat_device_last_seen_timestamp_seconds",
                 "meerkat_device_peak_rss_bytes",
                 "meerkat_device_train_loss", "meerkat_device_eval_loss"):  # fmt: skip
        devices = {s.labels["device"] for s in fams[name].samples}
        assert devices == {"client_00", "client_01"}, (name, devices)
    quality = {s.labels["source"]: s.value for s in fams["meerkat_eval_loss"].samples}
    assert set(quality) == {"devices", "coordinator"} and all(v > 0 for v in quality.values()), quality
    assert fams["meerkat_train_loss"].samples[0].value > 0
    up = {s.labels["kind"]: s.value for s in fams["meerkat_bytes_received"].samples if s.name.endswith("_total")}
    assert up["up"] > 0 and up["hb"] > 0
    assert fams["meerkat_round_duration_seconds"].samples
    assert {d["client"] for d in live["json"]["devices"]} == {"client_00", "client_01"}

    # -- the devices' held-out loss falls; the coordinator's eval matches `meerkat evaluate` on the export
    dev = report["quality"]["device_evals"]
    assert [p["round"] for p in dev] == list(range(cfg.rounds - 1)) or len(dev) >= cfg.rounds - 2, dev
    assert dev[-1]["loss"] < dev[0]["loss"], dev
    coord_cfg = cfg.workdir / "config" / "coordinator.toml"
    state = cfg.workdir / "demo-state-copy"
    shutil.copytree(cfg.workdir / "state" / "coordinator", state)
    log = EventLog(state, readonly=True)
    try:
        last = log.views.evals(source=COORDINATOR_EVAL)[-1]
    finally:
        log.close()
    assert last.round == cfg.rounds - 1
    export = tmp_path / "export"
    assert meerkat(["export", "--config", str(coord_cfg), "--state-dir", str(state), "--out", str(export)]) == 0
    task = Path(load_coordinator_config(coord_cfg).eval_data or "")
    got = evaluate_cmd(export, task)
    assert got["n"] == last.n
    assert abs(got["loss"] - last.loss) < 1e-4, (got, last)

    # -- the dashboard in headless Chromium (the coordinator's server code on the run's event log) -----
    m = Metrics()
    m.watch_fleet(state, per_device=True)
    server = MetricsServer(m, "127.0.0.1", 0, pages=pages(state))
    server.start()
    try:
        dom = dump_dom(f"http://127.0.0.1:{server.port}/", tmp_path)
    finally:
        server.stop()
    rows = re.findall(r'<tr class="device" data-device="([^"]+)"', dom)
    assert rows == ["client_00", "client_01"], dom[:2000]
    loss = re.search(r'<span id="eval-loss">([0-9.]+)</span>', dom)
    assert loss is not None and abs(float(loss.group(1)) - last.loss) < 1e-3
    assert len(re.findall(r'<polyline class="curve"', dom)) >= 4  # train, device eval, coordinator eval, GradIP...
