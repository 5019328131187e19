"""`ClientConfig`: everything `meerkat client` needs, one frozen dataclass loaded from TOML + env.

Priority (lowest first): defaults below < `client.toml` (top level or `[client]`) < `MEERKAT_CLIENT_*`
environment variables < `--set key=value` on the command line. The device policy is the `[policy]`
table (edge_client/service/policy.py): `MEERKAT_CLIENT_POLICY_<KEY>`, `--set policy.<key>=value`. `load_client_config` checks every key
and every file before anything starts; a bad value raises `ConfigError` listing each problem.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_client.service.policy import PolicyConfig
from shared import config
from shared.config import ConfigError, load_config
from shared.mqtt import broker_settings_problems, read_secret

ENV_PREFIX = "MEERKAT_CLIENT_"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _ident(v: str) -> bool:
    return bool(_ID.match(v))


def _positive(v: float) -> bool:
    return v > 0


@dataclass(frozen=True)
class ClientConfig:
    # -- broker ----------------------------------------------------------------------------------
    broker: str = config.field(
        "mqtt://127.0.0.1:1883", "broker url, mqtt://host:port or mqtts://host:port (TLS); no password here"
    )
    fleet: str = config.field(
        "default", "fleet name: the topic namespace meerkat/v1/{fleet}/", check=(_ident, "must match [A-Za-z0-9_.-]{1,64}")
    )
    client_id: str = config.field(
        "", "this device's id: MQTT client id and topic segment (broker ACL %c)", check=(_ident, "must match [A-Za-z0-9_.-]{1,64}")
    )
    username: str | None = config.field(None, "broker user name (optional)")
    password_file: Path | None = config.field(None, "file holding the broker password (read at start, never logged)")
    tls_ca: Path | None = config.field(None, "CA bundle to verify the broker (enables TLS)")
    tls_cert: Path | None = config.field(None, "client certificate for mutual TLS (needs tls_key)")
    tls_key: Path | None = config.field(None, "private key of tls_cert")
    tls_insecure: bool = config.field(False, "skip the broker host name check (test setups only)")
    allow_plaintext_password: bool = config.field(
        False, "allow password_file with plain mqtt:// to a non-loopback host (the password crosses the network in clear)"
    )
    max_queued: int = config.field(
        1000, "bound on messages paho holds while offline (updates also stay in the outbox)", check=(_positive, "must be > 0")
    )
    # -- model + data ----------------------------------------------------------------------------
    model_dir: Path = config.field(Path("model"), "local HF causal-LM directory (config.json + safetensors)")
    mask: Path = config.field(Path("mask.safetensors"), "sparse mask file made by `meerkat mask build` for this model")
    quant: Literal["nf4", "int8", "none"] = config.field("nf4", "base weight quantisation (bitsandbytes)")
    device: Literal["auto", "cpu", "cuda"] = config.field("auto", "where the model runs; auto = cuda when available")
    data: Path = config.field(Path("data.jsonl"), "local training data: a task.json or a JSONL file")
    batch_size: int = config.field(8, "unused for training: every round plan sets its batch_size (kept so old configs load)", check=(_positive, "must be > 0"))
    seq_len: int = config.field(128, "max tokens per sequence (longer inputs are truncated)", check=(_positive, "must be > 0"))
    memory_budget_gib: float = config.field(
        4.0, "memory the model + activations may use; sets the micro-batch, refuses to start if one sequence does not fit",
        check=(_positive, "must be > 0"),
    )
    # -- evaluation ------------------------------------------------------------------------------
    eval_every: int = config.field(
        5, "evaluate on the held-out slice after every K-th applied round (round % K == 0); 0 = off, nothing held out",
        check=(lambda v: v >= 0, "must be >= 0"),
    )
    eval_fraction: float = config.field(
        0.1, "share of the local examples held out for evaluation (never trained on)",
        check=(lambda v: 0 < v < 1, "must be in (0, 1)"),
    )
    eval_max: int = config.field(64, "at most this many examples are held out", check=(_positive, "must be > 0"))
    # -- privacy (docs/PRIVACY.md) ---------------------------------------------------------------
    dp_max_epsilon: float = config.field(
        0.0, "the owner's floor: > 0 = train only DP rounds and stop at this epsilon even if the fleet allows more; "
        "0 = follow the fleet's rule", check=(lambda v: v >= 0, "must be >= 0"),
    )
    # -- service ---------------------------------------------------------------------------------
    state_dir: Path = config.field(Path("meerkat-state"), "durable state: SQLite (round, data pointer, outbox) + values files")
    heartbeat_s: float = config.field(15.0, "seconds between telemetry heartbeats (QoS0 on hb/{client})", check=(_positive, "must be > 0"))
    exit_when_run_over: bool = config.field(
        False, "exit 0 once the coordinator ended the run (finished/stopped) and this device holds the final round; "
        "false: stay connected and idle (a new run on the fleet starts it again)"
    )
    sync_retry_s: float = config.field(10.0, "seconds before asking the coordinator again for missed rounds", check=(_positive, "must be > 0"))
    resend_after_s: float = config.field(
        30.0, "re-publish an outbox update not PUBACKed after this many connected seconds", check=(_positive, "must be > 0")
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = config.field("INFO", "log level of the service")
    # -- device policy ([policy] table; env MEERKAT_CLIENT_POLICY_<KEY>; --set policy.key=value) ---
    policy: PolicyConfig = config.field(
        PolicyConfig(), "when the owner's machine can spare a step, and how hard to train (docs/CLIENT.md \"Device policy\")"
    )

    def validate(self) -> list[str]:
        """Cross-field and file-system checks; each problem names its key."""
        problems: list[str] = []
        if not self.client_id:
            problems.append("client_id: required (set it in the file or MEERKAT_CLIENT_CLIENT_ID)")
        problems += broker_settings_problems(
            self.broker, self.username, self.password_file, self.tls_ca, self.tls_cert, self.tls_key,
            self.allow_plaintext_password,
        )
        if not (self.model_dir / "config.json").is_file():
            problems.append(f"model_dir: {self.model_dir} has no config.json")
        for key in ("mask", "data"):
            p = getattr(self, key)
            if p is not None and not p.is_file():
                problems.append(f"{key}: file {p} does not exist")
        if self.state_dir.exists() and not self.state_dir.is_dir():
            problems.append(f"state_dir: {self.state_dir} exists and is not a directory")
        elif not _writable_dir_or_parent(self.state_dir):
            problems.append(f"state_dir: {self.state_dir} is not writable")
        return problems

    def read_password(self) -> str | None:
        return read_secret(self.password_file)


def _writable_dir_or_parent(p: Path) -> bool:
    p = p.absolute()
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def load_client_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> ClientConfig:
    """The validated config; raises ConfigError (every problem, each naming its key)."""
    return load_config(ClientConfig, path, section="client", env_prefix=ENV_PREFIX, overrides=overrides, environ=environ)


__all__ = ["ClientConfig", "ConfigError", "ENV_PREFIX", "load_client_config"]
