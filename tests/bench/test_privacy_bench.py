"""`meerkat bench privacy` on the micro tiny model: one row per DP setting, every device spends its
calibrated budget (close to, never above, the target), and the non-private run spends nothing."""

from __future__ import annotations

import pytest
import torch

from bench.privacy import PrivacyConfig, markdown, run_bench


@pytest.mark.slow
def test_rows_and_budgets_on_micro() -> None:
    torch.set_num_threads(1)
    cfg = PrivacyConfig(size="micro", seeds=1, budget=4, T=2, clients=2, n_train=200, n_eval=40, n_evals=1,
                        epsilons=(2.0, 8.0))  # fmt: skip
    res = run_bench(cfg)
    assert [r["epsilon"] for r in res["rows"]] == [None, 2.0, 8.0]
    by_eps = {r["epsilon"]: r for r in res["runs"]}
    assert by_eps[None]["dp_spent"] == {}
    for target in (2.0, 8.0):
        spent = by_eps[target]["dp_spent"]
        assert len(spent) == 2 and all(0.95 * target <= e <= target for e in spent.values()), spent
    assert "| ε = 8 |" in markdown(res)
