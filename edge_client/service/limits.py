"""Process-wide resource limits from `[policy]`, applied once at start: torch threads, niceness, IO class.

They make the client yield inside a step too (the policy only decides between steps): with half the
cores and nice 10 a foreground program that wakes up mid-step gets the CPU first. Niceness is only ever
raised (lowering it needs privileges); an OS without IO classes (macOS) keeps its default and says so.
"""

from __future__ import annotations

import logging
import os

import psutil
import torch

from edge_client.service.policy import PolicyConfig

log = logging.getLogger(__name__)


def thread_count(cfg: PolicyConfig, cores: int | None = None) -> int:
    """`max_threads`, or half of the cores (at least 1) when it is 0."""
    n = cores if cores is not None else (os.cpu_count() or 1)
    return cfg.max_threads if cfg.max_threads > 0 else max(1, n // 2)


def apply_limits(cfg: PolicyConfig) -> str:
    """Apply the limits to this process; returns what was set, for the start-up log line."""
    if not cfg.enabled:
        return "policy off: no thread limit, niceness or IO class"
    threads = thread_count(cfg)
    torch.set_num_threads(threads)
    done = [f"torch threads {threads}"]
    if cfg.nice > 0:
        now = os.getpriority(os.PRIO_PROCESS, 0)
        if cfg.nice > now:
            os.setpriority(os.PRIO_PROCESS, 0, cfg.nice)
        done.append(f"nice {max(now, cfg.nice)}")
    if cfg.io_class != "none":
        me = psutil.Process()
        if not hasattr(psutil, "IOPRIO_CLASS_IDLE"):
            done.append(f"io class {cfg.io_class} unsupported here")
        elif cfg.io_class == "idle":
            me.ionice(psutil.IOPRIO_CLASS_IDLE)
            done.append("io class idle")
        else:
            me.ionice(psutil.IOPRIO_CLASS_BE, value=7)  # best-effort, lowest of its 8 levels
            done.append("io class best-effort/7")
    return ", ".join(done)


__all__ = ["apply_limits", "thread_count"]
