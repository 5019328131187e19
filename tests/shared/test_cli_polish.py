"""The `meerkat` command itself: --version, -v/-q after the subcommand, INFO by default, type names in
--print-config, a quiet exit on a closed pipe, known third-party noise filtered (and only that)."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from shared.cli import EXIT_BROKEN_PIPE, build_parser, command_of, filter_known_noise, log_level

REPO = Path(__file__).resolve().parents[2]


def _meerkat(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, **kw)  # type: ignore[call-overload]


def test_version() -> None:
    r = _meerkat("--version")
    assert r.returncode == 0 and r.stdout.startswith("meerkat-edge 0.")


@pytest.mark.parametrize("argv,level", [
    (["coordinator"], logging.INFO),
    (["coordinator", "-v"], logging.DEBUG),
    (["-v", "coordinator"], logging.DEBUG),
    (["coordinator", "-q"], logging.WARNING),
    (["-q", "status", "-q"], logging.ERROR),
    (["client", "--quiet"], logging.WARNING),
])
def test_log_flags_before_or_after_the_subcommand(argv: list[str], level: int) -> None:
    assert log_level(build_parser().parse_args(argv)) == level


def test_coordinator_accepts_v_after_the_subcommand_and_logs_info_by_default(tmp_path: Path) -> None:
    r = _meerkat("coordinator", "-v", "--print-config")
    assert r.returncode == 0 and "unrecognized" not in r.stderr
    r = _meerkat("coordinator", "-q", "--broker", "mqtt//127.0.0.1:18883", "--set", "mask=m")
    assert r.returncode == 2 and "broker: 'mqtt//127.0.0.1:18883' is not a url" in r.stderr, r.stderr


def test_print_config_names_types() -> None:
    out = _meerkat("client", "--print-config").stdout
    assert "(str)" in out and "(Path | None)" in out and "(int)" in out and "('nf4' | 'int8' | 'none')" in out
    assert "<class" not in out


def test_closed_pipe_exits_quietly() -> None:
    p = subprocess.Popen([sys.executable, "-m", "shared.cli", "client", "--print-config"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read().decode()
    assert p.wait(60) == EXIT_BROKEN_PIPE and "Traceback" not in err and "BrokenPipe" not in err, err


def test_status_piped_into_head(tmp_path: Path) -> None:
    from coordinator.eventlog import EventLog

    EventLog(tmp_path).close()
    r = subprocess.run(f"{sys.executable} -m shared.cli status --state-dir {tmp_path} | head -1", shell=True,
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() and "Traceback" not in r.stderr, r.stderr


def test_known_noise_is_filtered_and_other_warnings_are_not(caplog: pytest.LogCaptureFixture) -> None:
    filter_known_noise()
    caplog.set_level(logging.INFO)
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
    bnb.warning("something else went wrong")
    logging.getLogger("bitsandbytes.autograd._functions").warning(
        "MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["something else went wrong"]


@pytest.mark.parametrize("filtered", [True, False])
def test_bitsandbytes_import_noise(filtered: bool) -> None:
    """bitsandbytes logs the kernels-community line at import only on a CPU with AVX512-BF16 (its
    `has_avx512bf16()` gate); elsewhere there is no noise to filter and the unfiltered case cannot be shown."""
    if not filtered:
        from bitsandbytes.functional import has_avx512bf16

        if not has_avx512bf16():
            pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not log the kernels-community line here")
    undo = "" if filtered else "logging.getLogger('bitsandbytes.backends.cpu.ops').filters.clear(); "
    code = f"import logging; from shared.cli import setup_logging; setup_logging(logging.INFO); {undo}import bitsandbytes"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ("kernels-community" in r.stderr) is not filtered, r.stderr


def test_a_command_needs_only_the_rooms_up_to_its_own() -> None:
    """`meerkat coordinator` imports no benchmark module; every command parses as with every room loaded
    (the same help, options and defaults), and no command or a misspelled one gets them all."""
    code = ("import sys; from shared.cli import build_parser; build_parser('coordinator'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'bench'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    subs = _commands(build_parser())
    assert {"coordinator", "client", "bench", "status"} <= set(subs)
    for name, sub in subs.items():
        assert _commands(build_parser(name))[name].format_help() == sub.format_help(), name
    assert command_of(["-v", "coordinator", "-q"]) == "coordinator" and command_of(["--version"]) is None
    for command in (None, "no-such-command"):
        assert set(_commands(build_parser(command))) == set(subs)


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action._name_parser_map)
