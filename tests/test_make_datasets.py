"""Tests of scripts/make_datasets.py and of the tiny datasets the harness builds with it."""

from __future__ import annotations

import gymnasium as gym
import minari
import numpy as np
import pytest
from make_datasets import D4RL_REF_SCORES, UserError, build_dataset, dataset_id_for

from conftest import TINY_SEED, TINY_SIZE

SCRIPT = "scripts/make_datasets.py"
FIELDS = ("observations", "actions", "rewards", "terminations", "truncations")


def load_episodes(dataset_id: str) -> list:
    return list(minari.load_dataset(dataset_id).iterate_episodes())


def assert_same_episodes(dataset_a: str, dataset_b: str) -> None:
    episodes_a, episodes_b = load_episodes(dataset_a), load_episodes(dataset_b)
    assert len(episodes_a) == len(episodes_b)
    for a, b in zip(episodes_a, episodes_b):
        for field in FIELDS:
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def assert_user_error(result, *fragments: str) -> None:
    """A CLI user error: exit code 2, a message on stderr, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


# --- the tiny Hopper dataset --------------------------------------------------------------------


def test_dataset_ids():
    assert dataset_id_for("o2o", "Hopper-v5", "random") == "o2o/hopper/random-v0"
    assert dataset_id_for("o2o", "HalfCheetah-v5", "random") == "o2o/halfcheetah/random-v0"


def test_dataset_loads_with_metadata(hopper_dataset):
    dataset = minari.load_dataset(hopper_dataset)
    assert hopper_dataset == "o2o-test/hopper/random-v0"
    assert dataset.id == hopper_dataset
    assert dataset.total_steps == TINY_SIZE
    assert dataset.env_spec.id == "Hopper-v5"
    assert dataset.storage.metadata["author"] == {"o2o project"}
    assert dataset.storage.metadata["algorithm_name"]
    assert dataset.storage.metadata["description"]
    env = dataset.recover_environment(eval_env=True)
    assert env.spec.id == "Hopper-v5"
    assert dataset.observation_space == env.observation_space
    assert dataset.action_space == env.action_space


def test_arrays_match_the_spaces(hopper_dataset):
    dataset = minari.load_dataset(hopper_dataset)
    for episode in dataset.iterate_episodes():
        assert episode.observations.dtype == dataset.observation_space.dtype  # float64 for MuJoCo
        assert episode.actions.dtype == dataset.action_space.dtype  # float32
        assert np.all(np.abs(episode.actions) <= 1.0)


def test_episode_boundaries(hopper_dataset):
    episodes = load_episodes(hopper_dataset)
    assert sum(len(episode) for episode in episodes) == TINY_SIZE
    for episode in episodes:
        steps = len(episode)
        assert steps > 0
        assert episode.observations.shape[0] == steps + 1
        for field in ("actions", "rewards", "terminations", "truncations"):
            assert len(getattr(episode, field)) == steps
        # exactly one of terminated/truncated at the last step, neither before
        assert episode.terminations[-1] != episode.truncations[-1]
        assert not episode.terminations[:-1].any() and not episode.truncations[:-1].any()
    assert not episodes[-1].terminations[-1] and episodes[-1].truncations[-1]  # cut by the budget


def test_replaying_actions_reproduces_every_episode(hopper_dataset):
    """MuJoCo is deterministic: reset with the stored seed, step the stored actions."""
    dataset = minari.load_dataset(hopper_dataset)
    seeds = [meta["seed"] for meta in dataset.storage.get_episode_metadata(dataset.episode_indices)]
    assert seeds == [TINY_SEED + i for i in range(dataset.total_episodes)]
    env = gym.make("Hopper-v5")
    for seed, episode in zip(seeds, dataset.iterate_episodes()):
        obs, _ = env.reset(seed=seed)
        np.testing.assert_array_equal(obs, episode.observations[0])
        for t, action in enumerate(episode.actions):
            obs, reward, terminated, truncated, _ = env.step(action)
            np.testing.assert_array_equal(obs, episode.observations[t + 1])
            assert reward == episode.rewards[t]
            assert terminated == episode.terminations[t]
            assert truncated == episode.truncations[t] or t == len(episode) - 1  # the cut last step


def test_reference_scores_and_normalization(hopper_dataset):
    dataset = minari.load_dataset(hopper_dataset)
    ref_min, ref_max = D4RL_REF_SCORES["hopper"]
    assert dataset.storage.metadata["ref_min_score"] == ref_min
    assert dataset.storage.metadata["ref_max_score"] == ref_max
    returns = np.array([episode.rewards.sum() for episode in dataset.iterate_episodes()])
    np.testing.assert_allclose(minari.get_normalized_score(dataset, returns), (returns - ref_min) / (ref_max - ref_min))


# --- building ----------------------------------------------------------------------------------


def test_same_seed_same_arrays_other_seed_other_arrays(hopper_dataset, minari_store):
    again = build_dataset("Hopper-v5", "random", TINY_SIZE, TINY_SEED, "o2o-test-determinism")
    assert_same_episodes(again, hopper_dataset)
    other = build_dataset("Hopper-v5", "random", TINY_SIZE, TINY_SEED + 1, "o2o-test-determinism-seed1")
    with pytest.raises(AssertionError):
        assert_same_episodes(other, hopper_dataset)
    assert not list(minari_store.glob(".staging-*")), "staging directories must be cleaned up"


def test_refuses_to_overwrite_unless_asked(run_script, minari_store):
    namespace = "o2o-test-overwrite"
    dataset_id = build_dataset("Hopper-v5", "random", 300, 0, namespace)
    with pytest.raises(UserError, match="already exists"):
        build_dataset("Hopper-v5", "random", 300, 1, namespace)
    result = run_script(SCRIPT, "--env", "Hopper-v5", "--quick", "--namespace", namespace)
    assert_user_error(result, dataset_id, "--overwrite")
    before = load_episodes(dataset_id)[0].observations
    assert build_dataset("Hopper-v5", "random", 300, 1, namespace, overwrite=True) == dataset_id
    assert minari.load_dataset(dataset_id).id == dataset_id
    assert not np.array_equal(load_episodes(dataset_id)[0].observations, before)
    assert not list(minari_store.glob(".staging-*"))


def test_a_failed_write_leaves_nothing_under_the_final_id(monkeypatch, minari_store):
    real_create = minari.create_dataset_from_buffers

    def create_then_crash(*args, **kwargs):
        real_create(*args, **kwargs)
        raise RuntimeError("simulated crash after writing")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", create_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_dataset("Hopper-v5", "random", 100, 0, "o2o-test-crash")
    assert not (minari_store / "o2o-test-crash/hopper/random-v0").exists()
    assert not list(minari_store.glob(".staging-*"))


def test_other_envs_need_reference_scores():
    with pytest.raises(UserError, match="--ref-min-score"):
        build_dataset("Swimmer-v5", "random", 100, 0, "o2o-test")
    with pytest.raises(UserError, match="both"):
        build_dataset("Swimmer-v5", "random", 100, 0, "o2o-test", ref_min=0.0)
    dataset_id = build_dataset("Swimmer-v5", "random", 100, 0, "o2o-test", ref_min=0.0, ref_max=360.0)
    dataset = minari.load_dataset(dataset_id)
    assert dataset_id == "o2o-test/swimmer/random-v0"
    assert minari.get_normalized_score(dataset, np.array([180.0])) == pytest.approx(0.5)
    (episode,) = load_episodes(dataset_id)  # one episode, cut at 100 steps
    assert len(episode) == 100 and episode.truncations[-1] and not episode.terminations.any()


def test_unwritable_store_is_a_user_error(monkeypatch, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(not_a_directory / "store"))
    with pytest.raises(UserError, match="MINARI_DATASETS_PATH"):
        build_dataset("Hopper-v5", "random", 100, 0, "o2o-test")


# --- command line ------------------------------------------------------------------------------


def test_cli_unknown_env_is_a_clean_error(run_script):
    assert_user_error(run_script(SCRIPT, "--env", "Foo-v5", "--quick"), "Foo-v5")


def test_cli_builds_and_prints_a_summary(run_script):
    result = run_script(SCRIPT, "--env", "Walker2d-v5", "--quick", "--namespace", "o2o-test-cli")
    assert result.returncode == 0, result.stderr
    assert "o2o-test-cli/walker2d/random-v0" in result.stdout and "normalized" in result.stdout
    assert minari.load_dataset("o2o-test-cli/walker2d/random-v0").total_steps == TINY_SIZE


# --- the harness's broken datasets are broken in the advertised way -----------------------------


def test_nan_dataset_has_one_nan(nan_dataset):
    observations = np.concatenate([episode.observations for episode in load_episodes(nan_dataset)])
    assert np.isnan(observations).sum() == 1


def test_mismatched_dataset_loads_but_disagrees_with_its_env(mismatched_dataset):
    dataset = minari.load_dataset(mismatched_dataset)
    env = dataset.recover_environment()
    assert env.spec.id == "Walker2d-v5"
    assert dataset[0].observations.shape[1] == dataset.observation_space.shape[0] == 11
    assert env.observation_space.shape == (17,)
    assert dataset[0].actions.shape[1] == 3 and env.action_space.shape == (6,)


def test_empty_dataset_loads_with_no_episodes(empty_dataset):
    dataset = minari.load_dataset(empty_dataset)
    assert dataset.total_episodes == 0 and dataset.total_steps == 0
    assert load_episodes(empty_dataset) == []
