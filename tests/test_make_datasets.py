"""Tests of scripts/make_datasets.py and of the tiny datasets the harness builds with it."""

from __future__ import annotations

import copy
import hashlib
import json
import types

import gymnasium as gym
import minari
import numpy as np
import pytest
import sac
import torch
from make_datasets import D4RL_REF_SCORES, BuildOptions, UserError, build_dataset, dataset_id_for, reference_source

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


def test_reference_sources():
    assert reference_source("Hopper-v5", BuildOptions()) == "d4rl"
    assert reference_source("Hopper-v5", BuildOptions(measure_references=True)) == "measured"
    assert reference_source("Swimmer-v5", BuildOptions()) == "measured"  # no published scale: measured by default
    assert reference_source("Swimmer-v5", BuildOptions(ref_min=0.0, ref_max=360.0)) == "given"
    with pytest.raises(UserError, match="both"):
        reference_source("Swimmer-v5", BuildOptions(ref_min=0.0))
    with pytest.raises(UserError, match="do not also give"):
        reference_source("Swimmer-v5", BuildOptions(ref_min=0.0, ref_max=1.0, measure_references=True))


def test_other_envs_with_given_reference_scores():
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


def test_cli_builds_and_prints_a_summary(run_script, minari_store):
    """--quick on a D4RL environment: medium is the first evaluation (after the SAC warm-up)."""
    result = run_script(SCRIPT, "--env", "Walker2d-v5", "--quick", "--levels", "random", "medium",
                        "--namespace", "o2o-test-cli")
    assert result.returncode == 0, result.stderr
    for level in ("random", "medium"):
        assert f"o2o-test-cli/walker2d/{level}-v0" in result.stdout
        assert minari.load_dataset(f"o2o-test-cli/walker2d/{level}-v0").total_steps == TINY_SIZE
    assert "normalized" in result.stdout and "Manifest:" in result.stdout
    medium = read_manifest(minari_store, "o2o-test-cli")["o2o-test-cli/walker2d/medium-v0"]
    assert medium["reference_source"] == "d4rl" and medium["ref_max_score"] == D4RL_REF_SCORES["walker2d"][1]
    assert medium["behaviour_policy"]["medium"]["sac_step"] == 1000  # warm-up 500, evaluations every 500
    assert medium["behaviour_policy"]["medium"]["medium_threshold"] is None  # -inf under --quick


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


# --- SAC levels: medium, medium-replay, expert, medium-expert -----------------------------------
# One quick build on InvertedPendulum-v5 (4-dim observations, actions in [-3, 3], terminates when
# the pole falls), whose reference scores are measured (the default outside the D4RL four). Medium
# is the evaluation that ends the first two evaluations in a row reaching the return 20 (a lowered
# threshold; --quick trains 3000 steps, and the expert is trained first to measure the references).

QUICK_SAC_ARGS = ("--env", "InvertedPendulum-v5", "--quick", "--medium-return", "20", "--medium-consecutive", "2",
                  "--size", "1000")
SAC_LEVELS = ("medium", "medium-replay", "expert", "medium-expert")


def builder_dir(store, namespace: str):
    return store / namespace / "_builder"


def read_manifest(store, namespace: str) -> dict:
    return json.loads((builder_dir(store, namespace) / "manifest.json").read_text())["datasets"]


def sac_checkpoint(store, namespace: str) -> dict:
    (path,) = builder_dir(store, namespace).glob("invertedpendulum/sac-seed0-*/checkpoint.pt")
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def sac_build(run_script, minari_store):
    """The five InvertedPendulum levels in namespace o2o-test-sac; returns the manifest's datasets."""
    result = run_script(SCRIPT, *QUICK_SAC_ARGS, "--namespace", "o2o-test-sac")
    assert result.returncode == 0, result.stderr[-3000:]
    for level in ("random", *SAC_LEVELS):
        assert f"o2o-test-sac/invertedpendulum/{level}-v0" in result.stdout  # the summary table
    return read_manifest(minari_store, "o2o-test-sac")


def assert_replays(dataset_id: str) -> None:
    """Reset with each episode's stored seed and step its actions: every observation (the next
    observation of step t is observation t+1), reward and termination is reproduced."""
    dataset = minari.load_dataset(dataset_id)
    seeds = [meta["seed"] for meta in dataset.storage.get_episode_metadata(dataset.episode_indices)]
    env = dataset.recover_environment()
    for seed, episode in zip(seeds, dataset.iterate_episodes()):
        obs, _ = env.reset(seed=int(seed))
        np.testing.assert_array_equal(obs, episode.observations[0])
        for t, action in enumerate(episode.actions):
            obs, reward, terminated, truncated, _ = env.step(action)
            np.testing.assert_array_equal(obs, episode.observations[t + 1])
            assert reward == episode.rewards[t] and terminated == episode.terminations[t]


def test_sac_levels_load_back_with_their_manifest(sac_build, minari_store):
    references_path = builder_dir(minari_store, "o2o-test-sac") / "invertedpendulum/references.json"
    references = json.loads(references_path.read_text())
    assert references["episodes"] == 5 and references["ref_max_score"] > references["ref_min_score"]
    for level in ("random", *SAC_LEVELS):
        dataset_id = f"o2o-test-sac/invertedpendulum/{level}-v0"
        entry, dataset = sac_build[dataset_id], minari.load_dataset(dataset_id)
        episodes = list(dataset.iterate_episodes())
        # one normalization scale for every level, the measured one
        assert entry["reference_source"] == "measured"
        assert dataset.storage.metadata["ref_min_score"] == references["ref_min_score"] == entry["ref_min_score"]
        assert dataset.storage.metadata["ref_max_score"] == references["ref_max_score"] == entry["ref_max_score"]
        # the manifest describes the stored data
        returns = np.array([episode.rewards.sum() for episode in episodes])
        assert entry["transitions"] == dataset.total_steps == sum(len(episode) for episode in episodes)
        assert entry["episodes"] == len(episodes)
        assert entry["normalized_score"] == pytest.approx(100 * minari.get_normalized_score(dataset, returns).mean())
        assert entry["return_mean"] == pytest.approx(returns.mean())
        data_dir = minari_store / dataset_id / "data"
        assert entry["sha256"] == hashlib.sha256((data_dir / "main_data.hdf5").read_bytes()).hexdigest()
        assert entry["size_bytes"] == sum(path.stat().st_size for path in data_dir.iterdir())
        assert entry["seed"] == 0 and "--quick" in entry["command"]
        assert {"gymnasium", "mujoco", "minari"} <= set(entry["versions"])
        # episode boundaries: terminated or truncated at the last step only, never both
        for episode in episodes:
            assert episode.observations.shape == (len(episode) + 1, 4) and episode.observations.dtype == np.float64
            assert episode.terminations[-1] != episode.truncations[-1]
            assert not episode.terminations[:-1].any() and not episode.truncations[:-1].any()
            assert np.all(np.abs(episode.actions) <= 3.0)
        assert any(episode.terminations[-1] for episode in episodes)  # the pole falls: real terminations
    for level in ("random", "medium", "medium-replay", "expert"):  # medium-expert holds the same episodes
        assert_replays(f"o2o-test-sac/invertedpendulum/{level}-v0")


def test_first_eval_reaching_counts_evaluations_in_a_row():
    returns = [5.0, 25.0, 10.0, 22.0, 30.0, 19.0, 40.0]
    run = types.SimpleNamespace(evals=[{"step": 1000 * (i + 1), "return_mean": r} for i, r in enumerate(returns)])
    steps = [sac.SACRun.first_eval_reaching(run, 20.0, k) for k in (1, 2, 3)]
    assert [s and s["step"] for s in steps] == [2000, 5000, None]
    assert sac.SACRun.first_eval_reaching(run, 20.0)["step"] == 2000  # one evaluation by default


def test_sac_training_stops_at_the_second_evaluation_in_a_row(tmp_path):
    from make_datasets import QUICK_SAC

    run = sac.SACRun("InvertedPendulum-v5", 0, QUICK_SAC, tmp_path / "run", checkpoint_every=1000, progress=False)
    try:
        run.train(3000, stop_return=20.0, stop_consecutive=2)
        point = run.first_eval_reaching(20.0, 2)
        assert point is not None and point is run.evals[-1]  # no evaluation after the stopping one
        assert run.first_eval_reaching(20.0, 1)["step"] < point["step"]
        assert 0 <= run.step - point["step"] <= 1000  # only the episode in progress was finished
        assert run.has_snapshot(point["step"]) and not run.has_snapshot(point["step"] + 1)
        steps = run.step
        run.train(3000, stop_return=20.0, stop_consecutive=2)  # already reached: nothing more to train
        assert run.step == steps
    finally:
        run.close()


def test_a_medium_point_without_its_snapshot_is_a_clear_error(run_script, minari_store):
    namespace = "o2o-test-nosnapshot"
    args = (*QUICK_SAC_ARGS, "--levels", "medium", "--namespace", namespace)
    assert run_script(SCRIPT, *args).returncode == 0
    medium = read_manifest(minari_store, namespace)[f"{namespace}/invertedpendulum/medium-v0"]["behaviour_policy"]
    (run_dir,) = builder_dir(minari_store, namespace).glob("invertedpendulum/sac-seed0-*")
    (run_dir / "snapshots" / f"step-{medium['medium']['sac_step']:09d}.pt").unlink()
    (run_dir / "policies" / "medium.pt").unlink()
    result = run_script(SCRIPT, *args, "--overwrite")
    assert_user_error(result, f"no actor snapshot at step {medium['medium']['sac_step']}", "delete that run directory")


def test_medium_ends_the_first_evaluations_in_a_row_reaching_the_threshold(sac_build, minari_store):
    checkpoint = sac_checkpoint(minari_store, "o2o-test-sac")
    evals = checkpoint["evals"]
    first = next(i for i in range(1, len(evals)) if min(evals[i - 1]["return_mean"], evals[i]["return_mean"]) >= 20)
    first = evals[first]
    first_reaching = next(e for e in evals if e["return_mean"] >= 20)
    medium = sac_build["o2o-test-sac/invertedpendulum/medium-v0"]["behaviour_policy"]["medium"]
    assert medium["sac_step"] == first["step"] > first_reaching["step"]
    assert medium["medium_threshold"] == 20 and medium["medium_consecutive"] == 2
    assert medium["eval_return_mean"] == first["return_mean"]
    # its actor is the snapshot of that evaluation (every evaluation keeps one)
    (run_dir,) = builder_dir(minari_store, "o2o-test-sac").glob("invertedpendulum/sac-seed0-*")
    policy = torch.load(run_dir / "policies" / "medium.pt", weights_only=False)
    snapshot = torch.load(run_dir / "snapshots" / f"step-{first['step']:09d}.pt", weights_only=True)
    assert all(torch.equal(policy["actor"][k], snapshot["actor"][k]) for k in snapshot["actor"])
    assert sorted(int(p.stem.split("-")[1]) for p in (run_dir / "snapshots").glob("step-*.pt")) == \
        [e["step"] for e in evals]
    # medium-replay: every transition of the run before that evaluation, warm-up included
    replay = load_episodes("o2o-test-sac/invertedpendulum/medium-replay-v0")
    assert sum(len(episode) for episode in replay) == first["step"]
    assert replay[-1].truncations[-1] or replay[-1].terminations[-1]
    # expert: the policy after the whole budget, which the run finished
    expert = sac_build["o2o-test-sac/invertedpendulum/expert-v0"]["behaviour_policy"]["expert"]
    assert expert["sac_step"] == 3000 and checkpoint["step"] >= 3000
    # medium-expert: the medium episodes, then the expert episodes
    combined = load_episodes("o2o-test-sac/invertedpendulum/medium-expert-v0")
    parts = [episode for level in ("medium", "expert")
             for episode in load_episodes(f"o2o-test-sac/invertedpendulum/{level}-v0")]
    assert len(combined) == len(parts)
    for a, b in zip(combined, parts):
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_policy_checkpoint_reproduces_the_expert_actions(sac_build, minari_store):
    entry = sac_build["o2o-test-sac/invertedpendulum/expert-v0"]["behaviour_policy"]["expert"]
    actor, scaler = sac.load_policy(builder_dir(minari_store, "o2o-test-sac") / entry["path"])
    generator = torch.Generator().manual_seed(sac.derived_seed(0, "rollout/expert"))
    episode = load_episodes("o2o-test-sac/invertedpendulum/expert-v0")[0]
    for obs, action in zip(episode.observations, episode.actions):
        np.testing.assert_array_equal(sac.to_env_action(actor.act(obs, False, generator), scaler), action)


def test_an_interrupted_build_resumes_to_the_same_datasets(sac_build, run_script, minari_store):
    namespace = "o2o-test-sac-resume"
    first = run_script(SCRIPT, *QUICK_SAC_ARGS, "--namespace", namespace, "--stop-after-checkpoints", "1")
    assert first.returncode == 3, first.stderr[-3000:]
    assert "run the same command again to resume" in first.stderr and "Traceback" not in first.stderr
    assert 1000 <= sac_checkpoint(minari_store, namespace)["step"] < 3000  # killed mid-training
    assert not (minari_store / namespace / "invertedpendulum").exists()  # no dataset under a final id
    second = run_script(SCRIPT, *QUICK_SAC_ARGS, "--namespace", namespace)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = read_manifest(minari_store, namespace)
    for level in ("random", *SAC_LEVELS):
        a = sac_build[f"o2o-test-sac/invertedpendulum/{level}-v0"]
        b = resumed[f"{namespace}/invertedpendulum/{level}-v0"]
        assert a["sha256"] == b["sha256"], level  # the same bytes: HDF5 files hold no time stamps
        assert a["behaviour_policy"] == b["behaviour_policy"] or level == "random"
    assert_same_episodes("o2o-test-sac/invertedpendulum/medium-replay-v0",
                         f"{namespace}/invertedpendulum/medium-replay-v0")
    assert not list(minari_store.glob(".staging-*"))


def test_cli_unwritable_store_is_a_clean_error(run_script, monkeypatch, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(not_a_directory / "store"))
    assert_user_error(run_script(SCRIPT, "--env", "Hopper-v5", "--quick", "--levels", "medium"), "MINARI_DATASETS_PATH")


def test_cli_unreachable_medium_is_a_clean_error(run_script):
    result = run_script(SCRIPT, "--env", "InvertedPendulum-v5", "--quick", "--levels", "medium", "--medium-return",
                        "5000", "--expert-steps", "1000", "--ref-min-score", "0", "--ref-max-score", "1000",
                        "--namespace", "o2o-test-unreachable")
    assert_user_error(result, "did not reach the medium return 5000.0", "--expert-steps")


# --- the SAC agent -------------------------------------------------------------------------------


def test_twin_critics_are_two_independent_mlps():
    torch.manual_seed(0)
    critic = sac.TwinQ(obs_dim=5, act_dim=2, hidden_dim=16)
    obs, action = torch.randn(7, 5), torch.randn(7, 2)
    q = critic(obs, action)
    assert q.shape == (2, 7)
    for i in range(2):  # each critic is relu(relu(x W1 + b1) W2 + b2) W3 + b3 with its own weights
        x = torch.cat([obs, action], dim=1)
        for layer, (weight, bias) in enumerate(zip(critic.weights, critic.biases)):
            x = x @ weight[i] + bias[i]
            x = torch.relu(x) if layer < 2 else x
        torch.testing.assert_close(q[i], x.squeeze(1))
    q[0].sum().backward()
    assert all(weight.grad[1].abs().sum() == 0 and weight.grad[0].abs().sum() > 0 for weight in critic.weights)
    critic.zero_grad()
    action.requires_grad_(True)  # the actor loss: gradients reach the action, not the critics
    critic(obs, action, detach_params=True).sum().backward()
    assert all(weight.grad is None or weight.grad.abs().sum() == 0 for weight in critic.weights)
    assert action.grad.abs().sum() > 0


def test_tanh_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    actor = sac.Actor(obs_dim=5, act_dim=3, hidden_dim=16)
    obs = torch.randn(64, 5)
    generator = torch.Generator().manual_seed(1)
    action, log_prob = actor.sample(obs, generator)
    mean, log_std = actor(obs)
    reference = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform(cache_size=1)])
    clipped = action.clamp(-1 + 1e-6, 1 - 1e-6)
    torch.testing.assert_close(log_prob, reference.log_prob(clipped).sum(-1), rtol=1e-3, atol=1e-3)
    assert action.abs().max() <= 1 and sac.LOG_STD_MIN <= log_std.min() and log_std.max() <= sac.LOG_STD_MAX


def test_sac_update_moves_every_network_and_restores_exactly():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    agent = sac.SAC(obs_dim=5, act_dim=2, config=sac.SACConfig(hidden_dim=16), generator=generator)
    batch = (torch.randn(32, 5), torch.rand(32, 2) * 2 - 1, torch.randn(32), torch.randn(32, 5),
             (torch.rand(32) < 0.1).float())
    before = copy.deepcopy(agent.state_dict())
    info = agent.update(*batch)
    assert all(isinstance(value, torch.Tensor) and value.dim() == 0 for value in info.values())
    after = agent.state_dict()
    for name in ("actor", "critic", "critic_target"):
        assert all(not torch.equal(before[name][key], after[name][key]) for key in after[name]), name
    assert not torch.equal(before["log_alpha"], after["log_alpha"])
    # a copy restored from the state dict and the generator state makes the same next update
    state, generator_state = copy.deepcopy(agent.state_dict()), generator.get_state()
    clone_generator = torch.Generator().manual_seed(123)
    clone = sac.SAC(obs_dim=5, act_dim=2, config=sac.SACConfig(hidden_dim=16), generator=clone_generator)
    clone.load_state_dict(state)
    clone_generator.set_state(generator_state)
    agent.update(*batch)
    clone.update(*batch)
    for name in ("actor", "critic", "critic_target"):
        for key, value in agent.state_dict()[name].items():
            assert torch.equal(value, clone.state_dict()[name][key])
