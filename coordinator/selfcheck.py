"""`meerkat coordinator --check`, the local half: what fails after start unless tested before it.

The broker half is shared/preflight.py. Here, with the Coordinator already built (config valid, mask
loaded, model fingerprinted and matched to the mask, v_0 read, state dir opened and its meta matched):
- model + mask: reported (building the Coordinator proved them);
- eval data (`eval_data`): the model's tokenizer reads it, as the first evaluation will;
- metrics port (`metrics`): bound and released, so a port another process holds is named now, not by an
  exit 9 after start (issue 30).
Each line is a shared.preflight.Check; `local_checks` returns them with the exit status they call for.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.httpserve import PortInUse, port_in_use_message
from coordinator.server_cli import EXIT_CONFIG, EXIT_PORT_IN_USE
from shared.preflight import Check


def local_checks(config: CoordinatorConfig, coord: Any) -> tuple[list[Check], int]:
    """(report lines, exit status: 0, EXIT_CONFIG for model/mask/eval data, EXIT_PORT_IN_USE)."""
    checks = [Check("model + mask", True, f"model {coord.fingerprint[:16]} mask {coord.mask_id} nnz {coord.nnz}, "
                    f"state {coord.state_dir} (round {coord.last_round})")]  # fmt: skip
    code = 0
    if config.eval_data is not None:
        checks.append(eval_data_check(config))
        code = EXIT_CONFIG if checks[-1].ok is False else code
    if config.metrics:
        checks.append(metrics_port_check(config.metrics_host, config.metrics_port))
        if checks[-1].ok is False and code == 0:
            code = EXIT_PORT_IN_USE
    return checks, code


def eval_data_check(config: CoordinatorConfig) -> Check:
    from shared.evaluation import load_eval_data
    from shared.modelload import _load_tokenizer

    name = f"eval_data {config.eval_data}"
    if config.model_dir is None:
        return Check(name, False, "needs model_dir (its tokenizer reads the eval data)")
    tokenizer = _load_tokenizer(config.model_dir)
    if tokenizer is None:
        return Check(name, False, f"model_dir {config.model_dir} has no tokenizer files to read it with")
    assert config.eval_data is not None
    try:
        data = load_eval_data(config.eval_data, tokenizer, config.eval_seq_len)
    except (OSError, ValueError) as exc:  # DataError is a ValueError: it names the file and line
        return Check(name, False, str(exc))
    if len(data) == 0:
        return Check(name, False, "holds no examples")
    return Check(name, True, f"{len(data)} examples (the coordinator evaluates at most eval_max = "
                 f"{config.eval_max} every {config.eval_every} round(s))")


def metrics_port_check(host: str, port: int) -> Check:
    """Bind host:port the way the metrics server will (SO_REUSEADDR), then release it."""
    name = f"metrics_port {port}"
    if port == 0:
        return Check(name, True, "0: any free port, chosen at start")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return Check(name, False, port_in_use_message(host, port))
            return Check(name, False, f"cannot bind {host}:{port} ({exc.strerror}): check metrics_host")
    return Check(name, True, f"{host}:{port} is free")


__all__ = ["PortInUse", "eval_data_check", "local_checks", "metrics_port_check"]
