"""scripts/famo2o_q_vs_beta.py reads both FamO2O files' runs and refuses other runs."""
import json
import math

import pytest
import torch

from conftest import ALGORITHMS

RANGES = {"iql_famo2o": (1.0, 5.0), "cql_famo2o": (0.5, 1.5)}


@pytest.mark.parametrize("name", ["iql_famo2o", "cql_famo2o"])
def test_q_by_beta_on_a_tiny_run(name, train_script, run_script, tmp_path):
    result = train_script(name, tmp_path, "--online_iterations", "20", "--name", "run")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_script("scripts/famo2o_q_vs_beta.py", tmp_path / "run", "--states", "64", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["checkpoint"], r["iteration"]) for r in rows] == [("offline.pt", 60), ("checkpoint.pt", 80)]
    low, high = RANGES[name]
    for row in rows:
        betas = [float(b) for b in row["q_by_beta"]]
        assert betas == pytest.approx(torch.linspace(low, high, 5).tolist())
        assert all(math.isfinite(q) for q in row["q_by_beta"].values())
        assert row["q_spread"] == pytest.approx(max(row["q_by_beta"].values()) - min(row["q_by_beta"].values()))
        assert low <= row["balance_beta_mean"] <= high
        # a state's spread is at least as large as the spread of the means over states
        assert row["q_spread_per_state"] >= row["q_spread"] - 1e-6
        assert 0.0 < row["action_distance"] <= 2.0 * math.sqrt(3)  # beta reaches the actor; Hopper: 3 actions in [-1, 1]
        assert math.isfinite(row["q_dataset_action"]) and math.isfinite(row["q_random_action"])
    assert rows[0]["q_by_beta"] != rows[1]["q_by_beta"]  # 20 online updates changed the critics


def test_refuses_a_run_of_another_algorithm(train_script, run_script, tmp_path):
    assert "iql" in ALGORITHMS
    assert train_script("iql", tmp_path, "--online_iterations", "0", "--name", "run").returncode == 0
    result = run_script("scripts/famo2o_q_vs_beta.py", tmp_path / "run")
    assert result.returncode != 0 and "reads iql_famo2o or cql_famo2o runs" in result.stderr
