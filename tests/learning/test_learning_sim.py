"""Learning benchmark machinery on the micro tiny model: exact aggregation, JSON rows, determinism."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.learning import METHODS, LearningConfig, markdown_table, run_grid, runs_for
from bench.learning_sim import ZOSpec, make_data, run_zo
from coordinator.scheduler import round_seeds
from edge_client.engine.loss import batch_loss
from edge_client.engine.spsa import spsa_step
from edge_client.service.trainer import data_stream


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from bench.learning_masks import build_masks
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
    spec = ZOSpec(rounds=1, T=3, lr=0.5, eps=1e-2, batch_size=8, seed=11, n_evals=1)
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
            spsa_step(loaded.model, sidecar, lambda m, b=batch: batch_loss(m, b), seeds[t], spec.eps, spec.lr)
        avg += sidecar.get_values().double() * (len(ds) / total)
    moved = float((after.double() - v0.double()).abs().max())
    assert moved > 1e-4  # the round did move the values
    # equal up to float32 rounding of the wire grads and of the client's fp32 path
    assert torch.allclose(after.double(), avg, rtol=0, atol=1e-5 * max(1.0, moved))
    sidecar.set_values(v0)


def test_run_zo_is_deterministic(micro: dict[str, Any]) -> None:
    loaded, data, mask = micro["loaded"], micro["data"], micro["masks"]["pretrain-grad"]
    spec = ZOSpec(rounds=2, T=2, lr=0.5, eps=1e-2, batch_size=8, seed=5, vp=True, n_evals=2)
    outs = []
    for _ in range(2):
        Gs: list[list[float]] = []
        res = run_zo(loaded, data, spec, mask.flat_grad(), on_round=lambda r, G, Gs=Gs: Gs.append(G),
                     mask_id=mask.mask_id)
        outs.append((Gs, res.accuracy, res.bytes_up, res.bytes_down, res.gradip, loaded.sidecar.get_values()))
    assert outs[0][:5] == outs[1][:5]
    assert torch.equal(outs[0][5], outs[1][5])
    assert all(len(h) == 4 for h in outs[0][4].values())  # 2 rounds x 2 steps of GradIP per client
    loaded.sidecar.set_values(loaded.sidecar.initial_values())


def test_grid_json_has_one_row_per_method(tmp_path: Path) -> None:
    cfg = LearningConfig(size="micro", tasks=("sentiment",), seeds=2, Ts=(2,), budget=2, n_clients=4, n_single=1,
                         n_train=80, n_eval=16, calib_seqs=4, n_evals=1, fraction=0.01)
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
    assert "| sentiment | dirichlet | meerkat | 2 |" in markdown_table(res)
    assert res["vp_calibration"]["single"]["n"] + res["vp_calibration"]["other"]["n"] == 0  # too few steps
