"""Config errors are specific (they name the key); a state_dir of another run is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from coordfakes import make_config, synthetic_mask, synthetic_v0

from coordinator.config import CoordinatorConfig, describe, load_coordinator_config
from coordinator.server import Coordinator, StateMismatch
from shared.cli import main
from shared.config import ConfigError


def _write(tmp: Path, body: str) -> Path:
    p = tmp / "c.toml"
    p.write_text(body)
    return p


def test_defaults_env_and_overrides(tmp_path: Path) -> None:
    p = _write(tmp_path, '[coordinator]\nmask = "m.safetensors"\nsteps = 7\naggregation = "median"\n')
    c = load_coordinator_config(p, environ={"MEERKAT_COORD_LR": "0.001", "MEERKAT_COORD_STEPS": "9"})
    assert c.steps == 9 and c.lr == 0.001 and c.aggregation == "median" and c.metrics_host == "127.0.0.1"
    c = load_coordinator_config(p, overrides={"steps": "3"}, environ={"MEERKAT_COORD_STEPS": "9"})
    assert c.steps == 3
    assert "round_deadline_s = 120.0" in describe() and "# local SPSA steps T per round" in describe()


@pytest.mark.parametrize(
    "body, needle",
    [
        ('mask = "m"\nsteps = 0', "steps: 0 must be in 1..100"),
        ('mask = "m"\nsteps = 101', "steps: 101 must be in 1..100"),
        ('mask = "m"\nstepz = 3', "unknown key 'stepz'"),
        ('mask = "m"\naggregation = "mean"', "aggregation: 'mean' is not one of"),
        ('mask = "m"\nstraggler = "wait"', "straggler: 'wait' is not one of"),
        (
            'mask = "m"\nmetrics_host = "0.0.0.0"',
            "metrics_token: required when metrics_host '0.0.0.0' is not loopback",
        ),
        ('mask = "m"\nlr = "fast"', "lr: expected a number"),
        ('mask = "m"\ntrim_fraction = 0.5', "trim_fraction: 0.5 must be in [0, 0.5)"),
        ('mask = "m"\nbroker = "http://x"', "broker: 'http://x': scheme http:// is not supported"),
        ('mask = "m"\nclients_per_round = 1\nmin_updates = 2', "clients_per_round: 1 is below min_updates 2"),
        ('fleet = "a/b"\nmask = "m"', "fleet: 'a/b' is not a valid id"),
        ("steps = 3", "mask: required"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, body: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_coordinator_config(_write(tmp_path, "[coordinator]\n" + body + "\n"))
    assert needle in str(ei.value)


def test_metrics_on_public_address_with_token_is_fine(tmp_path: Path) -> None:
    c = load_coordinator_config(
        _write(tmp_path, '[coordinator]\nmask = "m"\nmetrics_host = "0.0.0.0"\nmetrics_token = "s3cret"\n')
    )
    assert isinstance(c, CoordinatorConfig) and c.metrics_token == "s3cret"


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write(tmp_path, '[coordinator]\nmask = "m"\nsteps = 0\nmin_clients = 0\n')
    assert main(["coordinator", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "steps: 0 must be in 1..100" in err and "min_clients: 0 must be >= 1" in err
    assert main(["coordinator", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(["coordinator", "--config", str(_write(tmp_path, '[coordinator]\nmask = "missing.st"\n'))]) == 2
    )
    assert "mask file not found" in capsys.readouterr().err


def test_state_dir_of_another_run_is_refused(tmp_path: Path) -> None:
    mask = synthetic_mask((50,))
    v0 = synthetic_v0(mask.nnz)
    kw = {"fleet": "fleet1"}
    Coordinator(
        make_config(tmp_path, "mqtt://127.0.0.1:1", master_seed=1, **kw), mask=mask, initial_values=v0
    ).log.close()
    with pytest.raises(StateMismatch, match="logged master_seed is '1' but this coordinator has '2'"):
        Coordinator(
            make_config(tmp_path, "mqtt://127.0.0.1:1", master_seed=2, **kw), mask=mask, initial_values=v0
        )
    with pytest.raises(StateMismatch, match="logged fingerprint"):
        Coordinator(make_config(tmp_path, "mqtt://127.0.0.1:1", master_seed=1, **kw), mask=synthetic_mask((50,), seed=1),
                    initial_values=v0)  # fmt: skip
    with pytest.raises(ValueError, match="initial values must be float32"):
        Coordinator(make_config(tmp_path, "mqtt://127.0.0.1:1", **kw), mask=mask, initial_values=v0[:10])


def test_example_deploy_config_loads() -> None:
    c = load_coordinator_config(Path(__file__).resolve().parents[2] / "deploy" / "coordinator.toml")
    assert c.fleet == "sst2-pilot" and c.quant_policy == "same" and c.aggregation == "centered" and c.metrics_host == "127.0.0.1"
    import tomllib

    client = tomllib.loads((Path(__file__).resolve().parents[2] / "deploy" / "client.toml").read_text())
    assert client.get("client", client)["fleet"] == c.fleet  # issue 16: the two examples named different fleets
    assert client.get("client", client)["quant"] == c.quant


def test_weight_grants_parse_and_name_a_bad_entry() -> None:
    c = load_coordinator_config(None, {"mask": "m", "weight_grants": "dev-7=500,dev-8=20"}, environ={})
    assert c.grants() == {"dev-7": 500, "dev-8": 20} and c.aggregation == "centered"
    for bad in ("dev-7=0", "dev-7", "dev 7=5", "dev-7=4294967296"):
        with pytest.raises(ConfigError, match="weight_grants"):
            load_coordinator_config(None, {"mask": "m", "weight_grants": bad}, environ={})


def test_the_default_lr_is_auto_and_eps_is_the_one_the_demo_learns_with() -> None:
    """Issue 30: the default lr was 1e-6, which does not move the demo model; issue 32: the default is now
    "auto" (coordinator/lrctl.py steers it from the fleet's loss), the demo keeps its measured fixed lr
    (BENCHMARKS.md "Demo": 0.575 -> 0.880 in 30 rounds), and deploy/coordinator.toml shows the defaults."""
    import tomllib

    from bench.demo.demo import DemoConfig

    c, demo = CoordinatorConfig(), DemoConfig()
    assert (c.lr, c.eps, c.lr_start) == ("auto", demo.eps, 0.0) and (demo.lr, demo.eps) == (2e-3, 1e-2)
    shipped = tomllib.loads((Path(__file__).resolve().parents[2] / "deploy" / "coordinator.toml").read_text())
    table = shipped.get("coordinator", shipped)
    assert (table["lr"], table["eps"]) == (c.lr, c.eps)


def test_the_shipped_toml_states_the_default_robust_rule() -> None:
    """Issue 26: the default rule is centred clipping at 2 MAD with the per-round discount; the shipped file
    says so, and the discount is a true/false key that names a bad value."""
    c = load_coordinator_config(Path(__file__).resolve().parents[2] / "deploy" / "coordinator.toml", {"mask": "m"},
                                environ={})  # fmt: skip
    d = CoordinatorConfig()
    assert (c.aggregation, c.center_clip_k, c.center_discount) == (d.aggregation, d.center_clip_k, d.center_discount)
    assert (d.aggregation, d.center_clip_k, d.center_discount) == ("centered", 2.0, True)
    assert not load_coordinator_config(None, {"mask": "m", "center_discount": "false"}, environ={}).center_discount
    with pytest.raises(ConfigError, match="center_discount"):
        load_coordinator_config(None, {"mask": "m", "center_discount": "maybe"}, environ={})
