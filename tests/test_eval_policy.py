"""scripts/eval_policy.py reloads every algorithm's checkpoint: its deterministic mode repeats the
run's own last evaluation exactly, its stochastic mode samples (reproducibly for one seed)."""
import json

import pytest

from conftest import ALGORITHMS

EPISODES = 3


def read_modes(result) -> dict:
    assert result.returncode == 0, result.stderr[-2000:]
    return {row["mode"]: row for row in map(json.loads, result.stdout.splitlines())}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_deterministic_mode_repeats_the_runs_last_evaluation(name, train_script, run_script, tmp_path):
    result = train_script(name, tmp_path, "--eval_episodes", str(EPISODES), "--name", "run")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if "eval/return_mean" in r][-1]

    modes = read_modes(run_script("scripts/eval_policy.py", tmp_path / "run", "--episodes", EPISODES, "--json"))
    deterministic, stochastic = modes["deterministic"], modes["stochastic"]
    assert deterministic["iteration"] == last_eval["iteration"] == 120
    assert deterministic["return_mean"] == pytest.approx(last_eval["eval/return_mean"], rel=1e-9)
    assert deterministic["normalized_score"] == pytest.approx(last_eval["eval/normalized_score"], rel=1e-9)
    assert len(deterministic["normalized_scores"]) == EPISODES
    assert stochastic["return_mean"] != deterministic["return_mean"]  # sampled actions, same reset seeds

    again = read_modes(run_script("scripts/eval_policy.py", tmp_path / "run", "--episodes", EPISODES, "--json",
                                  "--modes", "stochastic", "--checkpoint", "checkpoint.pt"))
    assert again["stochastic"]["return_mean"] == stochastic["return_mean"]
    other_seed = read_modes(run_script("scripts/eval_policy.py", tmp_path / "run", "--episodes", EPISODES, "--json",
                                       "--modes", "deterministic", "--seed", "7"))
    assert other_seed["deterministic"]["seed"] == 7
    assert other_seed["deterministic"]["return_mean"] != deterministic["return_mean"]  # other initial states


def test_a_run_on_other_data_is_refused(train_script, run_script, tmp_path):
    assert train_script("iql", tmp_path, "--name", "run").returncode == 0
    (tmp_path / "run" / "provenance.json").write_text(json.dumps({"launches": [{"dataset_sha256": "0" * 64}]}))
    result = run_script("scripts/eval_policy.py", tmp_path / "run")
    assert result.returncode != 0 and "holds other data under that id (sha256" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_checkpoint_is_a_clear_error(run_script, tmp_path):
    result = run_script("scripts/eval_policy.py", tmp_path, "--checkpoint", "offline.pt")
    assert result.returncode != 0 and "offline.pt does not exist" in result.stderr
    assert "Traceback" not in result.stderr
