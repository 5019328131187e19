"""The coordinator's one config: a frozen dataclass loaded from TOML (`[coordinator]` table or top level).

Priority: defaults < TOML < env `MEERKAT_COORD_<FIELD>` < CLI overrides. `load_coordinator_config` raises
`shared.config.ConfigError` listing every bad key at once. `meerkat coordinator --print-config` prints a
commented TOML of every field (see docs/COORDINATOR.md).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared import config as cfg
from shared.topics import ID_RE

if TYPE_CHECKING:
    from coordinator.drift import DriftThresholds

ENV_PREFIX = "MEERKAT_COORD_"
SECTION = "coordinator"

Aggregation = Literal["fedavg", "clipped", "median", "trimmed", "centered"]
Straggler = Literal["next", "drop"]
DecayRule = Literal["off", "fleet", "absolute"]  # = coordinator.drift.DecayRule (kept here: no torch at config load)


def _is_id(v: str) -> bool:
    return bool(ID_RE.match(v))


def _is_grant(entry: str) -> bool:
    client, sep, n = entry.partition("=")
    return bool(sep) and _is_id(client) and n.isdigit() and 1 <= int(n) < 2**32


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class CoordinatorConfig:
    # -- where things are -----------------------------------------------------------------------
    broker: str = cfg.field(
        "mqtt://127.0.0.1:1883", "MQTT broker url (mqtt:// or mqtts://; the password goes in password_file)"
    )
    username: str | None = cfg.field(None, "broker user name (deploy/mosquitto: must equal client_id)")
    password_file: Path | None = cfg.field(None, "file holding the broker password (read at start, never logged)")
    tls_ca: Path | None = cfg.field(None, "CA bundle to verify the broker (enables TLS)")
    tls_cert: Path | None = cfg.field(None, "client certificate for mutual TLS (needs tls_key)")
    tls_key: Path | None = cfg.field(None, "private key of tls_cert")
    allow_plaintext_password: bool = cfg.field(
        False, "allow password_file with plain mqtt:// to a non-loopback host (the password crosses the network in clear)"
    )
    telemetry_link: bool = cfg.field(
        True,
        "heartbeats on a second MQTT connection (client id and username + \"-hb\"): a heartbeat flood then never "
        "queues in front of updates at the broker or in TCP (the rendered ACL has that user; give it the "
        "coordinator's password). Off with tls_cert (the certificate may be the login); unreachable: main link",
    )
    fleet: str = cfg.field(
        "default", "fleet id: topics live under meerkat/v1/{fleet}/", (_is_id, "is not a valid id")
    )
    client_id: str = cfg.field(
        "coordinator", "MQTT client id of the coordinator", (_is_id, "is not a valid id")
    )
    state_dir: Path = cfg.field(Path("coordinator-state"), "SQLite event log + sparse checkpoints live here")
    model_dir: Path | None = cfg.field(None, "base model (HF dir): fingerprint, v_0 and `meerkat export`")
    mask: Path | None = cfg.field(None, "mask file from `meerkat mask build` (required)")
    quant: Literal["nf4", "int8", "none"] = cfg.field(
        "nf4", "quantisation the fleet runs: export merges into it"
    )
    quant_policy: Literal["same", "any"] = cfg.field(
        "same", "same: refuse a Join whose capabilities name another quant (QUANT_MISMATCH); any: a fleet that mixes quantizations"
    )
    plan_form: Literal["compact", "list"] = cfg.field(
        "compact", "compact (1.3): plans carry a sampling threshold, not the client list (size independent of the "
        "fleet); a Join without the compact_plan capability (a 1.2 device) is refused with PLAN_FORM. list: the 1.2 "
        "form, every sampled client listed (1.2 devices work; the plan grows with the fleet)"
    )
    # -- the optimisation -----------------------------------------------------------------------
    master_seed: int = cfg.field(
        0, "every seed (steps, sampling) derives from it", (lambda v: 0 <= v < 2**64, "must be in [0, 2**64)")
    )
    rounds: int = cfg.field(
        0, "stop after this many closed rounds (0 = run forever)", (lambda v: v >= 0, "must be >= 0")
    )
    steps: int = cfg.field(10, "local SPSA steps T per round", (lambda v: 1 <= v <= 100, "must be in 1..100"))
    lr: float | Literal["auto"] = cfg.field(
        "auto",
        "learning rate of the virtual path: \"auto\" (the fleet's loss steers it each round, coordinator/lrctl.py) "
        "or a fixed number in (0, 1) (docs/COORDINATOR.md 'Choosing lr')",
        (lambda v: v == "auto" or (not isinstance(v, str) and 0 < v < 1), "must be \"auto\" or in (0, 1)"),
    )
    lr_start: float = cfg.field(
        0.0, "lr = \"auto\": the first round's lr (0 = derived from the mask's size, coordinator/lrctl.py start_lr)",
        (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    )
    eps: float = cfg.field(1e-2, "SPSA perturbation size (the demo's)", (lambda v: 0 < v < 1, "must be in (0, 1)"))
    dist: Literal["rademacher", "gaussian"] = cfg.field("rademacher", "direction distribution z_t")
    batch_size: int = cfg.field(8, "sequences per SPSA step on a device", (lambda v: v >= 1, "must be >= 1"))
    # -- the round scheduler --------------------------------------------------------------------
    min_clients: int = cfg.field(
        1, "open a round only when this many joined clients are online", (lambda v: v >= 1, "must be >= 1")
    )
    clients_per_round: int = cfg.field(
        0, "clients sampled per round (0 = every online client)", (lambda v: v >= 0, "must be >= 0")
    )
    round_deadline_s: float = cfg.field(
        120.0, "seconds a round waits for its sampled clients", (lambda v: v > 0, "must be > 0")
    )
    min_updates: int = cfg.field(
        1, "updates needed to close a round at its deadline", (lambda v: v >= 1, "must be >= 1")
    )
    max_extensions: int = cfg.field(
        3,
        "deadline extensions (re-plans) before a short round closes with what it has",
        (lambda v: v >= 0, "must be >= 0"),
    )
    straggler: Straggler = cfg.field(
        "next", "late update of a closed round: fold into the next result, or drop"
    )
    offline_after_s: float = cfg.field(
        90.0,
        "a client with no heartbeat/status for this long counts as offline",
        (lambda v: v > 0, "must be > 0"),
    )
    # -- ingest and aggregation -----------------------------------------------------------------
    aggregation: Aggregation = cfg.field(
        "centered",
        "centered (FedAvg of the scalars clipped into median +- center_clip_k x MAD per step; a round of < 3 "
        "updates is plain FedAvg) | fedavg (weighted by n_samples, no outlier bound) | clipped | median | trimmed",
    )
    center_clip_k: float = cfg.field(
        2.0,
        "centered: the band is the step's median +- this x the median absolute deviation of its scalars",
        (lambda v: v >= 1, "must be >= 1"),
    )
    center_discount: bool = cfg.field(
        True,
        "centered: each update's FedAvg weight in a round is scaled by the share of its scalars that were inside "
        "their bands (a device whose every scalar is clipped weighs 0 that round)",
    )
    clip_norm: float = cfg.field(
        10.0,
        "clipped: each client's scalar vector is scaled to L2 norm <= clip_norm",
        (lambda v: v > 0, "must be > 0"),
    )
    trim_fraction: float = cfg.field(
        0.1,
        "trimmed: share of clients cut from each end, per step",
        (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    )
    max_abs_grad: float = cfg.field(
        1e6,
        "reject an update with any |g| above this (NaN/inf always rejected)",
        (lambda v: v > 0, "must be > 0"),
    )
    grad_cap_k: float = cfg.field(
        10.0,
        "adaptive |g| cap: an update's scalars are clipped (not refused) to k x the median over the OTHER "
        "clients of each one's median |g| of its last updates (0 = fixed max_abs_grad only; the lower applies)",
        (lambda v: v >= 0, "must be >= 0"),
    )
    grad_cap_window: int = cfg.field(
        16, "a client's |g| level: the median over its last this-many accepted updates", (lambda v: v >= 1, "must be >= 1")
    )
    grad_cap_min_updates: int = cfg.field(
        8,
        "the adaptive |g| cap of a client applies once the OTHER clients sent this many updates (since the start)",
        (lambda v: v >= 1, "must be >= 1"),
    )
    grad_cap_floor: float = cfg.field(
        1.0, "the adaptive |g| cap is never below this", (lambda v: v > 0, "must be > 0")
    )
    weight_cap_factor: float = cfg.field(
        2.0,
        "FedAvg weight = min(Update n_samples, first Join n_samples, this x the median Join n_samples of the "
        "OTHER joined clients); 0 = no fleet-wide cap",
        (lambda v: v >= 0, "must be >= 0"),
    )
    weight_grants: tuple[str, ...] = cfg.field(
        (),
        "\"client=n\" entries: the Join n_samples ceiling the operator grants a client (a re-Join can lower its "
        "n_samples, never raise it above its first accepted Join's; an entry here raises it)",
        (lambda v: all(_is_grant(x) for x in v), "entries must be \"client=n\" with a valid id and 1 <= n < 2**32"),
    )
    late_max_age: int = cfg.field(
        1,
        "a late update is folded only for the last this-many closed rounds (older: STALE_ROUND)",
        (lambda v: 1 <= v <= 64, "must be in 1..64"),
    )
    # -- hostile devices: liveness, quorum, rate limits ---------------------------------------------
    quorum: float = cfg.field(
        0.75,
        "close a round once this share of its sampled clients (and >= min_updates) reported and "
        "quorum_grace_s passed; 1.0 = wait for all (or the deadline)",
        (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    )
    quorum_grace_s: float = cfg.field(
        5.0, "seconds a round waits for the rest after reaching its quorum", (lambda v: v >= 0, "must be >= 0")
    )
    bench_after_misses: int = cfg.field(
        3,
        "a client sampled and silent this many rounds in a row is not sampled again until it sends a "
        "Heartbeat AND a Join (0 = never bench)",
        (lambda v: v >= 0, "must be >= 0"),
    )
    rate_per_s: float = cfg.field(
        20.0,
        "messages per second a client may send on each of up/join/hb/status/sync (token bucket)",
        (lambda v: v > 0, "must be > 0"),
    )
    rate_burst: int = cfg.field(
        100, "token bucket size of rate_per_s (a burst allowed at once)", (lambda v: v >= 1, "must be >= 1")
    )
    reply_bytes_per_min: int = cfg.field(
        8 << 20,
        "Replay / checkpoint bytes one client may be sent per minute (a reply is sent while its "
        "allowance is >= 0, then debited)",
        (lambda v: v >= 1024, "must be >= 1024"),
    )
    checkpoint_every_s: float = cfg.field(
        30.0,
        "a client is sent checkpoint chunks at most this often (in between: RATE_LIMITED)",
        (lambda v: v >= 0, "must be >= 0"),
    )
    sqlite_synchronous: Literal["full", "normal"] = cfg.field(
        "full", "SQLite fsync level of the event log (full survives power loss)"
    )
    event_log: str = cfg.field(
        "sqlite",
        "where the event log lives: \"sqlite\" (state_dir/events.sqlite) or a postgresql://user@host/db URL "
        "(psycopg 3; checkpoints stay in state_dir)",
        (lambda v: v == "sqlite" or v.startswith(("postgresql://", "postgres://")),
         "must be \"sqlite\" or a postgresql:// URL"),
    )
    # -- coordinator workers (docs/COORDINATOR.md "Coordinator workers"; coordinator/workers.py) ----------
    cluster: bool = cfg.field(
        False,
        "run as one of several coordinator workers: ingest shared through MQTT 5 shared subscriptions, one "
        "leader by a PostgreSQL advisory lock (needs event_log = postgresql://... and worker_id)",
    )
    worker_id: str = cfg.field(
        "",
        "this worker's name, unique in the fleet and kept across restarts: its MQTT client id is "
        "{client_id}-{worker_id}, so a restarted worker gets the messages its persistent session kept",
        (lambda v: v == "" or _is_id(v), "is not a valid id"),
    )
    worker_session_s: int = cfg.field(
        60,
        "MQTT 5 session expiry of a worker: how long the broker keeps a dead worker's share of the messages "
        "for it; a new leader re-publishes the open plan once more after it, so devices re-send lost updates",
        (lambda v: 1 <= v <= 86400, "must be in 1..86400"),
    )
    # -- MEERKAT-VP drift control (coordinator/drift.py; defaults = drift.DriftThresholds) ----------
    drift_control: bool = cfg.field(
        True,
        "limit clients whose GradIP decays (extreme Non-IID) to 1 local step; needs a mask with grad.* "
        "(without one GradIP cannot be computed and this is off)",
    )
    drift_window: int = cfg.field(
        20,
        "GradIP steps in the early and in the late window (10 is too noisy: c_t alone varies ~3x)",
        (lambda v: v >= 1, "must be >= 1"),
    )
    drift_min_steps: int = cfg.field(
        40,
        "observed steps before a client can be flagged (>= 2 * drift_window: both windows filled)",
        (lambda v: v >= 2, "must be >= 2"),
    )
    drift_later_min: float = cfg.field(
        3.0,
        "flag when rho_later = early / late mean |GradIP| reaches this (the magnitude decayed)",
        (lambda v: v >= 1, "must be >= 1"),
    )
    drift_quiet_ratio: float = cfg.field(
        0.25,
        "a step is quiet when |GradIP| < drift_quiet_ratio * early mean",
        (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    )
    drift_quie_min: float = cfg.field(
        0.6,
        "flag when rho_quie (share of quiet steps in the late window) reaches this (decayed, not just noisy)",
        (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    )
    drift_spike_ratio: float = cfg.field(
        15.0,
        "divergence: flag a client whose update's max |g| reaches this x the median |g| of its round's updates "
        "(limited to 1 local step, that update left out of the aggregate); 0 = off",
        (lambda v: v == 0 or v >= 1, "must be 0 (off) or >= 1"),
    )
    drift_spike_min_updates: int = cfg.field(
        5,
        "updates a round needs before the spike rule applies (the median of fewer is one or two devices' |g|: "
        "with 3 devices and one decayed, the two healthy ones looked like spikes)",
        (lambda v: v >= 2, "must be >= 2"),
    )
    drift_decay_rule: DecayRule = cfg.field(
        "off",
        "GradIP-decay rule: off (measured, never acted on: no threshold separated harmful from converged devices "
        "on real runs) | fleet (rho_later >= drift_fleet_ratio x the round's fleet median, at round close) | "
        "absolute (the paper's: drift_later_min and drift_quie_min per update)",
    )
    drift_fleet_ratio: float = cfg.field(
        3.0,
        "fleet decay rule: flag a client whose rho_later reaches this x the median rho_later of the round's "
        "clients (those with >= drift_min_steps values, not limited)",
        (lambda v: v >= 1, "must be >= 1"),
    )
    drift_fleet_min_clients: int = cfg.field(
        5,
        "fleet decay rule: clients with >= drift_min_steps values (not limited) a round needs before it applies",
        (lambda v: v >= 2, "must be >= 2"),
    )
    # -- history --------------------------------------------------------------------------------
    checkpoint_every: int = cfg.field(
        10, "write a sparse values checkpoint every K rounds", (lambda v: v >= 1, "must be >= 1")
    )
    keep_checkpoints: int = cfg.field(
        3, "checkpoints kept on disk (oldest removed)", (lambda v: v >= 1, "must be >= 1")
    )
    replay_max: int = cfg.field(
        50,
        "a client at most this many rounds behind gets a scalar Replay, else a checkpoint",
        (lambda v: v >= 1, "must be >= 1"),
    )
    retain_rounds: int = cfg.field(
        256,
        "event log retention (docs/COORDINATOR.md \"Retention\"): updates, plans, events and per-round counters "
        "of rounds older than this many are pruned at each checkpoint; results are kept back to the oldest "
        "checkpoint and replay_max (0 = keep everything)",
        (lambda v: v == 0 or v >= 64, "must be 0 (keep all) or >= 64 (the late/dedupe window)"),
    )
    chunk_bytes: int = cfg.field(
        256 * 1024,
        "checkpoint chunk size on to/{client}",
        (lambda v: 1024 <= v <= 2**20, "must be in 1 KiB..1 MiB"),
    )
    # -- observability --------------------------------------------------------------------------
    metrics: bool = cfg.field(True, "serve Prometheus /metrics")
    metrics_host: str = cfg.field("127.0.0.1", "metrics bind address (non-loopback needs metrics_token)")
    metrics_port: int = cfg.field(
        9464, "metrics port (0 = any free port)", (lambda v: 0 <= v < 65536, "must be in 0..65535")
    )
    metrics_token: str = cfg.field("", "bearer token required on /metrics (required when not on loopback)")
    metrics_per_device: bool = cfg.field(
        True, "per-device series on /metrics (about 15 per device; turn off for fleets of thousands)"
    )
    dashboard: bool = cfg.field(True, "serve the live dashboard on / of the metrics server (same bind, same token)")
    report: bool = cfg.field(True, "write the run report (JSON + plots) to state_dir/report when the run ends")
    # -- differential privacy (docs/PRIVACY.md; every device must honour it, RoundPlan keys 13-17) -------
    dp_epsilon: float = cfg.field(
        0.0, "device-level DP: each device's target epsilon (0 = off); it stops training before passing it",
        (lambda v: 0 <= v <= 1e6, "must be in 0..1e6"),
    )
    dp_clip: float = cfg.field(1.0, "DP: clip C of each example's projected difference (l+ - l-)/2eps",
                               (lambda v: 0 < v < float("inf"), "must be a finite float > 0"))
    dp_noise: float = cfg.field(0.0, "DP: noise multiplier sigma (0 = each device derives it from dp_epsilon, "
                                "dp_delta and dp_steps at its own sampling rate)", (lambda v: 0 <= v <= 1e6, "must be in 0..1e6"))
    dp_delta: float = cfg.field(0.0, "DP: delta (0 = each device's 1/n^1.1)", (lambda v: 0 <= v <= 0.5, "must be in 0..0.5"))
    dp_steps: int = cfg.field(0, "DP: steps per device the budget is planned for (0 = rounds * steps)",
                              (lambda v: 0 <= v < 2**32, "must be in 0..2**32-1"))
    # -- training quality -------------------------------------------------------------------------
    eval_data: Path | None = cfg.field(
        None, "the coordinator's own eval set (task.json with 'eval', or JSONL): evaluates its values on CPU between rounds"
    )
    eval_every: int = cfg.field(1, "evaluate after every K-th closed round (round % K == 0)", (lambda v: v >= 1, "must be >= 1"))
    eval_max: int = cfg.field(256, "evaluate on at most this many examples of eval_data", (lambda v: v >= 1, "must be >= 1"))
    eval_seq_len: int = cfg.field(256, "max tokens per eval example (as `meerkat evaluate --seq-len`)", (lambda v: v >= 2, "must be >= 2"))

    def grants(self) -> dict[str, int]:
        """weight_grants as client -> n_samples ceiling."""
        return {c: int(n) for c, _, n in (e.partition("=") for e in self.weight_grants)}

    def drift_thresholds(self) -> DriftThresholds:
        from coordinator.drift import DriftThresholds  # lazy: keeps torch out of config loading

        return DriftThresholds(
            self.drift_window,
            self.drift_min_steps,
            self.drift_later_min,
            self.drift_quiet_ratio,
            self.drift_quie_min,
            self.drift_spike_ratio,
            self.drift_spike_min_updates,
            self.drift_decay_rule,
            self.drift_fleet_ratio,
            self.drift_fleet_min_clients,
        )

    def validate(self) -> list[str]:
        """Cross-field checks (load_config calls it after the per-field ones)."""
        problems = []
        if self.mask is None:
            problems.append("mask: required (path of the mask file from `meerkat mask build`)")
        if self.clients_per_round and self.clients_per_round < self.min_updates:
            problems.append(
                f"clients_per_round: {self.clients_per_round} is below min_updates {self.min_updates}"
            )
        if self.metrics and not _is_loopback(self.metrics_host) and not self.metrics_token:
            problems.append(
                f"metrics_token: required when metrics_host {self.metrics_host!r} is not loopback"
            )
        if self.drift_min_steps < 2 * self.drift_window:
            problems.append(
                f"drift_min_steps: {self.drift_min_steps} is below 2 * drift_window = {2 * self.drift_window}"
            )
        if self.eval_data is not None and not Path(self.eval_data).is_file():
            problems.append(f"eval_data: file {self.eval_data} does not exist")
        if self.eval_data is not None and self.model_dir is None:
            problems.append("eval_data: needs model_dir (the coordinator evaluates the fleet's model)")
        if self.cluster and not self.event_log.startswith(("postgresql://", "postgres://")):
            problems.append("cluster: needs event_log = \"postgresql://...\" (the workers share the log and inbox)")
        if self.dp_epsilon and not self.dp_noise and not (self.dp_steps or self.rounds):
            problems.append("dp_steps: required with dp_epsilon when dp_noise = 0 and rounds = 0 (the noise is "
                            "calibrated for a planned number of steps)")
        from shared.mqtt import broker_settings_problems

        problems += broker_settings_problems(
            self.broker, self.username, self.password_file, self.tls_ca, self.tls_cert, self.tls_key,
            self.allow_plaintext_password,
        )
        return problems


def load_coordinator_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> CoordinatorConfig:
    """Load and validate; raises ConfigError naming each bad key."""
    return cfg.load_config(
        CoordinatorConfig, path, section=SECTION, env_prefix=ENV_PREFIX, overrides=overrides, environ=environ
    )


def describe() -> str:
    return "[coordinator]\n" + cfg.describe(CoordinatorConfig)
