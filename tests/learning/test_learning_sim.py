"""Learning benchmark machinery on the micro tiny model: exact aggregation, JSON rows, determinism."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.learning.learning import METHODS, LearningConfig, markdown_table, run_grid, runs_for
from bench.learning.sim import ZOSpec, make_data, run_zo
from coordinator.scheduler import round_seeds
from edge_client.engine.spsa import spsa_step
from edge_client.service.trainer import data_stream
from shared.loss import batch_loss


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from bench.learning.masks import build_masks
    from bench.tinylm.pretrain import get_model_dir
    from shared.fingerprint import fingerprint_model_dir
    from shared.modelload import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a loaded 2-core box run ~20x slower
    model_dir = get_model_dir("micro", progress=False)
    fp = fingerprint_model_dir(model_dir)
    masks = build_masks(model_dir, fp, 0.01, seqs=4, seq_len=64)
    loaded = load_model(model_dir, "none", "cpu", masks["pretrain-grad"], fingerprint=fp)
    data = make_data("sentiment", tmp_path_factory.mktemp("d"), loaded.tokenizer, seed=3, n_clients=4,
                     n_train=120, n_eval=24)
    yield {"dir": model_dir, "masks": masks, "loaded": loaded, "data": data}
    torch.set_num_threads(threads)


def test_round_equals_weighted_average_of_client_paths(micro: dict[str, Any]) -> None:
    loaded, data, mask = micro["loaded"], micro["data"], micro["masks"]["pretrain-grad"]
    sidecar = loaded.sidecar
    # plain FedAvg with the devices' own weights: what this test recomputes (the default rule has its own tests)
    spec = ZOSpec(rounds=1, T=3, lr=0.5, eps=1e-2, batch_size=8, seed=11, n_evals=1, aggregation="fedavg",
                  weight_cap_factor=0.0)
    v0 = sidecar.initial_values()
    run_zo(loaded, data, spec, None, mask_id=mask.mask_id)
    after = sidecar.get_values()
    # each client's own local path, recomputed independently: the coordinator's seeds, the product's batches
    seeds = round_seeds(spec.seed, 0, spec.T)
    total = sum(len(ds) for ds in data.clients.values())
    avg = torch.zeros_like(v0, dtype=torch.float64)
    for c in sorted(data.clients):
        ds = data.clients[c]
        stream = data_stream(c, len(ds))
        sidecar.set_values(v0)
        for t in range(spec.T):
            batch = ds.batch(stream.take(spec.batch_size))
            spsa_step(loaded.model, sidecar, partial(batch_loss, batch=batch), seeds[t], spec.eps, float(spec.lr))
        avg += sidecar.get_values().double() * (len(ds) / total)
    moved = float((after.double() - v0.double()).abs().max())
    assert moved > 1e-4  # the round did move the values
    # equal up to float32 rounding of the wire grads and of the client's fp32 path
    assert torch.allclose(after.double(), avg, rtol=0, atol=1e-5 * max(1.0, moved))
    sidecar.set_values(v0)


def test_run_zo_builds_each_device_with_the_trainer_factory(micro: dict[str, Any]) -> None:
    from bench.learning.vp_probe import RecordingTrainer, Steps

    loaded, data, mask = micro["loaded"], micro["data"], micro["masks"]["pretrain-grad"]
    spec = ZOSpec(rounds=1, T=2, lr=0.5, eps=1e-2, batch_size=8, seed=5, n_evals=1)
    log: Steps = {}
    run_zo(loaded, data, spec, None, mask_id=mask.mask_id,
           trainer=lambda lm, ds, client, mask_id: RecordingTrainer(lm, ds, client, mask_id, log))
    seeds = list(round_seeds(spec.seed, 0, spec.T))
    assert sorted(log) == sorted(data.clients)  # every device ran the factory's trainer
    assert all([seed for seed, *_ in steps] == seeds for steps in log.values())
    assert all(math.isfinite(g) for steps in log.values() for _, g, _, _ in steps)
    loaded.sidecar.set_values(loaded.sidecar.initial_values())


def test_run_zo_is_deterministic(micro: dict[str, Any]) -> None:
    loaded, data, mask = micro["loaded"], micro["data"], micro["masks"]["pretrain-grad"]
    spec = ZOSpec(rounds=2, T=2, lr=0.5, eps=1e-2, batch_size=8, seed=5, vp=True, n_evals=2)

    def run_once() -> tuple[Any, ...]:
        Gs: list[list[float]] = []
        res = run_zo(loaded, data, spec, mask.flat_grad(), on_round=lambda r, G: Gs.append(G), mask_id=mask.mask_id)
        return Gs, res.accuracy, res.bytes_up, res.bytes_down, res.gradip, loaded.sidecar.get_values()

    outs = [run_once(), run_once()]
    assert outs[0][:5] == outs[1][:5]
    assert torch.equal(outs[0][5], outs[1][5])
    assert all(len(h) == 4 for h in outs[0][4].values())  # 2 rounds x 2 steps of GradIP per client
    loaded.sidecar.set_values(loaded.sidecar.initial_values())


def test_grid_json_has_one_row_per_method(tmp_path: Path) -> None:
    cfg = LearningConfig(size="micro", tasks=("sentiment",), seeds=2, Ts=(2,), budget=2, n_clients=4, n_single=1,
                         n_train=80, n_eval=16, calib_seqs=4, n_evals=1, fraction=0.01,
                         extreme_methods=("meerkat", "meerkat-vp"))
    res = run_grid(cfg, tmp_path, progress=False)
    json.dumps(res, allow_nan=False)  # serialisable
    for key in ("config", "model", "rows", "runs", "vp_calibration", "wall_s"):
        assert key in res
    rows = {(r["setting"], r["method"], r["T"]) for r in res["rows"]}
    assert len(rows) == len(res["rows"])
    assert {m for s, m, _ in rows if s == "dirichlet"} == set(METHODS)
    assert {m for s, m, _ in rows if s == "extreme"} == {"zero-shot", "meerkat", "meerkat-vp"}
    assert len(res["runs"]) == cfg.seeds * (len(runs_for(cfg)) + 2)  # + zero-shot per setting
    for r in res["rows"]:
        assert r["n_seeds"] == 2 and 0.0 <= r["acc_mean"] <= 1.0 and len(r["accs"]) == 2
        if r["method"] in ("zero-shot",):
            assert r["bytes"] == 0
        else:
            assert r["bytes"] > 0
    by = {(r["setting"], r["method"]): r for r in res["rows"]}
    # backprop ships dense fp32 models; ZO ships a few scalars: orders of magnitude apart
    assert by[("dirichlet", "backprop-fedavg")]["bytes"] > 100 * by[("dirichlet", "meerkat")]["bytes"]
    assert by[("dirichlet", "fedzo-dense")]["nnz"] > by[("dirichlet", "meerkat")]["nnz"]
    assert "| micro | sentiment | dirichlet | meerkat | 2 | 0.02 |" in markdown_table(res)
    assert res["cells"] == {"total": len(res["runs"]), "cached": 0, "computed": len(res["runs"]), "missing": 0}
    assert all(r["wall_s"] > 0 for r in res["runs"]) and "loadavg" in res["machine"]
    assert res["vp_calibration"]["single"]["n"] + res["vp_calibration"]["other"]["n"] == 0  # too few steps
    from bench.learning.plots import plot_results

    (tmp_path / "plots").mkdir()
    names = {p.name for p in plot_results(res, tmp_path / "plots")}
    assert {"learning_rounds.png", "learning_bytes.png", "learning_rounds_extreme.png", "learning_gap.png",
            "learning_gradip.png"} <= names


def test_gap_points_pair_meerkat_with_dense_per_size() -> None:
    from bench.learning.plots import gap_points

    def run(size: str, method: str, acc: float, nnz: int, seed: int = 0) -> dict[str, Any]:
        return {"size": size, "task": "topic", "setting": "dirichlet", "method": method, "T": 10, "seed": seed,
                "accuracy": acc, "nnz": nnz}

    runs = [run("demo", "meerkat", 0.9, 4260), run("demo", "fedzo-dense", 0.8, 425984),
            run("demo", "fedzo-dense", 0.6, 425984, seed=1), run("small", "meerkat", 0.95, 50000),
            run("small", "fedzo-dense", 0.5, 5000000), run("small", "random-mask", 0.1, 50000)]
    pts = gap_points(runs)
    assert list(pts) == [("topic", 10)]
    assert [(x, round(g, 6), s) for x, g, s in pts[("topic", 10)]] == [(425984, 0.2, "demo"), (5000000, 0.45, "small")]


def test_targets_check_the_issue_goals_from_the_t10_means() -> None:
    from bench.learning.learning import config_from_args, summarize, targets, targets_markdown

    def run(method: str, acc: float, setting: str = "dirichlet", seed: int = 0, **kw: Any) -> dict[str, Any]:
        T = 0 if method == "zero-shot" else 10
        return {"size": "small", "task": "topic", "setting": setting, "method": method, "T": T, "seed": seed,
                "accuracy": acc, "bytes_up": 1, "bytes_down": 1, "nnz": 1, "lr": 0.01, "seconds": 1.0} | kw

    drift = {"c0": {"single_label": True, "limited_round": 2}, "c1": {"single_label": False, "limited_round": 3},
             "c2": {"single_label": False, "limited_round": None}}
    runs = [run("zero-shot", 0.25), run("backprop-fedavg", 1.0), run("fedzo-dense", 0.90), run("meerkat", 0.96),
            run("meerkat", 0.98, seed=1), run("weight-magnitude", 0.95), run("random-mask", 0.99),
            run("meerkat-vp", 0.90, "extreme", drift=drift), run("meerkat", 0.5, setting="extreme"),
            run("meerkat", 0.2) | {"T": 1}]  # T = 1 rows do not enter the targets
    by = {c["check"]: c for c in targets(summarize(runs), runs)}
    assert by["meerkat - fedzo-dense (Dirichlet)"]["value"] == pytest.approx(0.07)  # mean of 0.96 and 0.98
    assert by["meerkat - fedzo-dense (Dirichlet)"]["met"] is True
    assert by["meerkat - weight-magnitude (Dirichlet)"]["met"] is True
    assert by["meerkat - random-mask (Dirichlet)"]["met"] is False  # 0.97 < 0.99
    assert by["meerkat-vp extreme / meerkat Dirichlet"]["value"] == pytest.approx(0.90 / 0.97)
    assert by["(meerkat - zero-shot) / (backprop - zero-shot)"]["value"] == pytest.approx(0.72 / 0.75)
    flags = by["meerkat-vp flags: single-label / other devices"]
    assert flags["value"] == [1, 1] and flags["met"] is True
    md = targets_markdown(list(by.values()))
    assert "| small | topic | meerkat - random-mask (Dirichlet) | -0.020 | > 0 | **no** |" in md
    no_vp = targets(summarize(runs[:3]), runs[:3])
    assert {c["check"]: c["met"] for c in no_vp}["meerkat-vp extreme / meerkat Dirichlet"] is None  # missing
    import argparse

    ns = argparse.Namespace(quick=False, tasks=None, seeds=None, tune_seeds=None, budget=None, methods=None, T=None,
                            fraction=None, lr_sparse=None, lr_dense=None, lr_backprop=None, no_extreme=False,
                            extreme_methods="meerkat,meerkat-vp", lrs=None)
    assert config_from_args(ns).extreme_methods == ("meerkat", "meerkat-vp")
    with pytest.raises(SystemExit, match="--extreme-methods: unknown"):
        config_from_args(argparse.Namespace(**{**vars(ns), "extreme_methods": "meerkat,mezo"}))


def _micro_cli(out: Path, *extra: str) -> list[str]:
    return ["--size", "micro", "--tasks", "sentiment", "--seeds", "2", "--T", "2", "--budget", "4", "--no-extreme",
            "--methods", "zero-shot,meerkat,fedzo-dense,random-mask", "--out", str(out), *extra]


def test_killed_grid_resumes_without_recomputing_finished_cells(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cells = out / "cells"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "bench", "learning", *_micro_cli(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (cells.is_dir() and list(cells.glob("*.json"))):
            assert proc.poll() is None, "the grid ended before writing a cell"
            assert time.monotonic() < deadline, "no cell written in 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = {p.name: p.read_text() for p in cells.glob("*.json")}
    # resume in-process: the finished cells are read, not recomputed; the rest are computed
    from shared.cli import main as cli_main

    assert cli_main(["bench", "learning", *_micro_cli(out, "--resume", "--json")]) == 0
    res = json.loads((out / "learning.json").read_text())
    total = res["cells"]["total"]
    assert total == 2 * 4  # 2 seeds x (zero-shot + 3 methods)
    assert 1 <= res["cells"]["cached"] == len(before) < total
    assert res["cells"]["computed"] == total - len(before)
    for name, text in before.items():  # finished cells untouched, and their rows are what the result holds
        assert (cells / name).read_text() == text
        row = json.loads(text)["row"]
        got = next(r for r in res["runs"] if r["key"] == row["key"])
        assert got["cached"] and got["accuracy"] == row["accuracy"] and got["wall_s"] == row["wall_s"]
    assert all(r["wall_s"] >= 0 for r in res["runs"])
    # a third run computes nothing; a different lr is a different cell
    assert cli_main(["bench", "learning", *_micro_cli(out, "--resume")]) == 0
    res2 = json.loads((out / "learning.json").read_text())
    assert res2["cells"]["computed"] == 0 and res2["cells"]["cached"] == total
    assert [r["accuracy"] for r in res2["runs"]] == [r["accuracy"] for r in res["runs"]]
    assert cli_main(["bench", "learning", *_micro_cli(out, "--resume", "--lr-sparse", "0.03")]) == 0
    res3 = json.loads((out / "learning.json").read_text())
    fresh = {(r["method"], r["seed"]) for r in res3["runs"] if not r["cached"]}
    assert fresh == {(m, s) for m in ("meerkat", "random-mask") for s in (0, 1)}  # the sparse-lr cells only
    assert res3["cells"]["computed"] == 4
    # --first-seed 1 --seeds 1: seed 1 alone, the very cells `--seeds 2` computed (the key holds the seed)
    cli = _micro_cli(out, "--resume", "--first-seed", "1")
    cli[cli.index("--seeds") + 1] = "1"
    assert cli_main(["bench", "learning", *cli]) == 0
    res4 = json.loads((out / "learning.json").read_text())
    assert res4["cells"] == {"total": 4, "cached": 4, "computed": 0, "missing": 0}
    assert {r["seed"] for r in res4["runs"]} == {1}
    assert [r["accuracy"] for r in res4["runs"]] == [r["accuracy"] for r in res2["runs"] if r["seed"] == 1]


def test_model_seed_runs_the_grid_on_another_pretrained_model(tmp_path: Path, micro: dict[str, Any]) -> None:
    """--model-seed N: the tiny model of recipe seed N (built once into the cache), its fingerprint in every cell's
    key: the same grid on seed 0's model and seed 1's is two sets of cells."""
    from bench.tinylm.pretrain import get_model_dir
    from shared.cli import main as cli_main
    from shared.fingerprint import fingerprint_model_dir

    out = tmp_path / "out"
    cli = ["--size", "micro", "--tasks", "sentiment", "--seeds", "1", "--no-extreme", "--methods", "zero-shot",
           "--out", str(out), "--resume"]
    assert cli_main(["bench", "learning", *cli]) == 0
    first = json.loads((out / "learning.json").read_text())
    assert first["model"]["seed"] == 0 and first["model"]["dir"] == str(micro["dir"])
    assert cli_main(["bench", "learning", *cli, "--model-seed", "1"]) == 0
    other = json.loads((out / "learning.json").read_text())
    seed1 = get_model_dir("micro", 1, progress=False)
    assert other["model"] == {"size": "micro", "seed": 1, "dir": str(seed1), "fingerprint": fingerprint_model_dir(seed1)}
    assert other["model"]["fingerprint"] != first["model"]["fingerprint"]
    assert other["cells"]["computed"] == 1 and other["runs"][0]["key"] != first["runs"][0]["key"]
    with pytest.raises(SystemExit, match="--model-seed must be in"):
        cli_main(["bench", "learning", *cli, "--model-seed", "-1"])


def test_lr_rule_picks_the_best_stable_lr() -> None:
    from bench.learning.cells import LrRule, choose_lr, run_stable

    rule = LrRule(drop_tol=0.1, tie_tol=0.005)

    def row(curve: list[float], loss: float | None = 0.5) -> dict[str, Any]:
        return {"accuracy": curve[-1], "final_loss": loss, "curve": {"accuracy": curve}}

    assert run_stable(row([0.3, 0.6, 0.9]), rule)
    assert not run_stable(row([0.3, 0.97, 0.85]), rule)  # learned, then fell 0.12 > drop_tol: collapsed
    assert run_stable(row([0.3, 0.97, 0.88]), rule)
    assert not run_stable(row([0.3, 0.6, 0.9], loss=None), rule)  # non-finite loss
    by = {1e-3: [row([0.3, 0.5]), row([0.3, 0.52])],
          1e-2: [row([0.3, 0.9]), row([0.3, 0.95])],
          2e-2: [row([0.3, 0.99, 0.99]), row([0.99, 1.0, 0.89])],  # one seed drops 0.11: the lr is unstable
          5e-2: [row([0.3, 0.25]), row([0.3, 0.25])]}  # stable but useless
    got = choose_lr(by, rule)
    assert got["lr"] == 1e-2 and got["stable"]
    assert got["tried"][2e-2]["stable"] is False and got["tried"][2e-2]["acc_mean"] > got["tried"][1e-2]["acc_mean"]
    tie = choose_lr({1e-2: [row([0.3, 0.9])], 2e-2: [row([0.3, 0.903])]}, rule)
    assert tie["lr"] == 2e-2  # within tie_tol on the final accuracy: the curve's mean decides (.6015 > .6)
    same = choose_lr({1e-2: [row([0.3, 1.0])], 2e-2: [row([0.3, 1.0])]}, rule)
    assert same["lr"] == 1e-2  # same curve: the smaller lr
    saturated = {5e-3: [row([0.3, 0.9, 1.0])], 1e-2: [row([0.8, 1.0, 1.0])], 2e-2: [row([0.3, 0.2, 0.25])]}
    assert choose_lr(saturated, rule)["lr"] == 1e-2  # both saturate: the one that learns sooner
    assert choose_lr(saturated, LrRule(tie_break="smaller"))["lr"] == 5e-3
    with pytest.raises(ValueError, match="tie_break"):
        LrRule(tie_break="largest")
    none = choose_lr({1e-2: [row([0.9, 0.3])], 2e-2: [row([0.9, 0.2])]}, rule)
    assert none == {"lr": 1e-2, "stable": False, "tried": none["tried"]}
    with pytest.raises(ValueError, match="tuning run"):
        choose_lr({1e-2: []}, rule)


def test_tune_writes_lrs_the_grid_reads(tmp_path: Path) -> None:
    import argparse

    from bench.learning.cells import lr_markdown
    from bench.learning.learning import config_from_args, lr_for, run_tune

    cfg = LearningConfig(size="micro", tasks=("sentiment",), seeds=2, tune_seeds=(7,), Ts=(2,), budget=2,
                         n_clients=4, n_train=80, n_eval=16, calib_seqs=4, n_evals=1, methods=("meerkat",))
    with pytest.raises(SystemExit, match="also evaluation seeds"):
        run_tune(LearningConfig(size="micro", seeds=3, tune_seeds=(2, 100)), tmp_path / "w0", progress=False)
    with pytest.raises(SystemExit, match=r"\[100\] are also evaluation seeds 99..100"):
        run_tune(LearningConfig(size="micro", seeds=2, first_seed=99, tune_seeds=(100, 101)), tmp_path / "w1",
                 progress=False)
    doc = run_tune(cfg, tmp_path / "w", progress=False, cells_dir=tmp_path / "cells",
                   grid={"meerkat": (1e-3, 5e-1)})
    entry = doc["chosen"]["micro/sentiment/meerkat"]
    assert entry["lr"] in (1e-3, 5e-1) and set(entry["tried"]) == {1e-3, 5e-1}
    assert doc["tuning_seeds"] == [7] and "micro/sentiment/meerkat" in lr_markdown(doc)
    path = tmp_path / "lrs.json"
    path.write_text(json.dumps(doc))
    ns = argparse.Namespace(quick=False, tasks="sentiment", seeds=1, tune_seeds=None, budget=2, methods=None, T="2",
                            fraction=None, lr_sparse=None, lr_dense=None, lr_backprop=None, no_extreme=True,
                            lrs=str(path))
    grid_cfg = config_from_args(ns, "micro")
    assert lr_for(grid_cfg, "sentiment", "meerkat") == entry["lr"]
    assert lr_for(grid_cfg, "sentiment", "meerkat-vp") == entry["lr"]  # VP inherits meerkat's lr
    assert lr_for(grid_cfg, "sentiment", "fedzo-dense") == grid_cfg.lr_dense  # not tuned: the default
    assert lr_for(config_from_args(ns, "demo"), "sentiment", "meerkat") == LearningConfig().lr_sparse  # other size


def test_lr_modes_run_the_controller_beside_the_tuned_rows(tmp_path: Path) -> None:
    """--lr tuned,auto,auto@4x,4x: every ZO cell once per mode (own rows; backprop and zero-shot once), the
    auto cells through the coordinator's controller (the lr per round is kept), the fixed 4x at 4 x tuned."""
    import argparse

    from bench.learning.learning import config_from_args, lr_of

    assert lr_of("tuned", 2e-2) == 2e-2 and lr_of("auto", 2e-2) == "auto" and lr_of("4x", 2e-2) == 8e-2
    assert lr_of("auto@4x", 2e-2) == "auto@0.08"
    for bad in ("fast", "auto@x", "4"):
        with pytest.raises(ValueError, match="lr mode"):
            lr_of(bad, 1e-3)
    ns = argparse.Namespace(quick=False, tasks=None, seeds=None, tune_seeds=None, budget=None, methods=None, T=None,
                            fraction=None, lr_sparse=None, lr_dense=None, lr_backprop=None, no_extreme=False,
                            extreme_methods=None, lrs=None, lr_modes="tuned,auto@2x")
    assert config_from_args(ns).lr_modes == ("tuned", "auto@2x")
    with pytest.raises(SystemExit, match="--lr: lr mode 'slow'"):
        config_from_args(argparse.Namespace(**{**vars(ns), "lr_modes": "tuned,slow"}))
    cfg = LearningConfig(size="micro", tasks=("sentiment",), seeds=1, Ts=(2,), budget=4, n_clients=4, n_train=80,
                         n_eval=16, calib_seqs=4, n_evals=1, extreme=False, methods=("zero-shot", "meerkat"),
                         lr_modes=("tuned", "auto", "auto@4x", "4x"))
    res = run_grid(cfg, tmp_path, progress=False)
    modes = {r["lr_mode"]: r for r in res["rows"] if r["method"] == "meerkat"}
    assert set(modes) == {"tuned", "auto", "auto@4x", "4x"} and len(res["runs"]) == 5
    runs = {r["lr_mode"]: r for r in res["runs"] if r["method"] == "meerkat"}
    assert runs["tuned"]["lrs"] == [2e-2, 2e-2] and runs["4x"]["lrs"] == [8e-2, 8e-2]
    assert runs["auto@4x"]["lr"] == "auto@0.08" and runs["auto@4x"]["lrs"][0] in (8e-2, 2e-2)  # damped or not
    assert runs["auto"]["lr"] == "auto" and len(runs["auto"]["lrs"]) == 2
    # the controller's record of every round (action: reason) and the fleet's mean loss, for auto cells only
    assert runs["auto"]["decisions"][0].startswith("start: first loss") and len(runs["auto"]["decisions"]) == 2
    assert len(runs["auto"]["losses"]) == 2 and all(x > 0 for x in runs["auto"]["losses"])
    assert "decisions" not in runs["tuned"] and "losses" not in runs["tuned"]
    assert "| micro | sentiment | dirichlet | meerkat | 2 | auto |" in markdown_table(res)
    from bench.learning.plots import plot_results

    runs["auto"]["decisions"][1] = "undo: round 0 damaged the fleet"  # the plot marks an undone round
    assert "learning_lr_modes.png" in {p.name for p in plot_results(res, tmp_path)}
