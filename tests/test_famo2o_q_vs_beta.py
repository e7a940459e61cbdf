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
        # an adaptive run's balance model samples within its range: std at most half the range's width
        assert 0.0 < row["balance_sampled_beta_std_per_state"] <= (high - low) / 2
    assert rows[0]["q_by_beta"] != rows[1]["q_by_beta"]  # 20 online updates changed the critics


class _Agent:
    """A balance model whose pre-tanh mean differs per state and whose std is `scale` everywhere."""

    def __init__(self, scale, mode="adaptive"):
        self.balance_mode, self.scale = mode, scale

    def balance_model(self, states):
        return torch.distributions.Normal(states[:, 0], torch.full((states.shape[0],), self.scale))

    def to_beta(self, u):
        return 1.0 + (u + 1.0) / 2.0 * 4.0


def test_sampled_beta_spread_is_within_a_state_not_across_states():
    from famo2o_q_vs_beta import sampled_beta_std_per_state

    states = torch.linspace(-2.0, 2.0, 50).unsqueeze(-1)  # modes spread over most of [1, 5]
    generator = torch.Generator().manual_seed(0)
    assert sampled_beta_std_per_state(_Agent(1e-4), states, generator) < 1e-3
    # a narrow pre-tanh std s at mean 0 gives beta std ~ 2 s (d beta / d u = 2 at u = 0)
    assert sampled_beta_std_per_state(_Agent(0.05), torch.zeros(200, 1), generator, 4000) == pytest.approx(0.1, rel=0.05)
    assert sampled_beta_std_per_state(_Agent(1.0, mode="random"), states, generator) is None


def test_refuses_a_run_of_another_algorithm(train_script, run_script, tmp_path):
    assert "iql" in ALGORITHMS
    assert train_script("iql", tmp_path, "--online_iterations", "0", "--name", "run").returncode == 0
    result = run_script("scripts/famo2o_q_vs_beta.py", tmp_path / "run")
    assert result.returncode != 0 and "reads iql_famo2o or cql_famo2o runs" in result.stderr
