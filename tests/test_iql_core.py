"""IQL invariants, checked on iql.py and on iql_famo2o.py (whose IQL core must not drift).

FAMO2O.md section 7 items 9-13 and the iql.py items of the foundation issue: expectile loss values,
TD target with terminations-only masks and the freshly updated V, advantage weights, Polyak
update, one transform for offline and online data, a buffer that keeps its offline rows.
"""
import copy

import numpy as np
import pytest
import torch

OBS_DIM, ACT_DIM, BATCH = 11, 3, 64


@pytest.fixture(params=["iql", "iql_famo2o"])
def module(request, load_algorithm):
    return load_algorithm(request.param)


def make_agent(module, **overrides):
    config = module.TrainConfig(hidden_dim=32, **overrides)
    torch.manual_seed(0)
    agent_class = module.ImplicitQLearning if hasattr(module, "ImplicitQLearning") else module.FamO2OImplicitQLearning
    return agent_class(config, OBS_DIM, ACT_DIM, torch.device("cpu"))


def random_batch(module, seed=1, batch=BATCH):
    g = torch.Generator().manual_seed(seed)
    return module.Batch(
        states=torch.randn(batch, OBS_DIM, generator=g),
        actions=torch.rand(batch, ACT_DIM, generator=g) * 2 - 1,
        rewards=torch.randn(batch, generator=g),
        next_states=torch.randn(batch, OBS_DIM, generator=g),
        dones=(torch.rand(batch, generator=g) < 0.3).float(),
    )


def policy_log_prob(agent, states, actions, betas=None):
    dist = agent.actor(states) if betas is None else agent.actor(states, betas)
    return dist.log_prob(actions).sum(-1)


def test_expectile_loss_values(module):
    diff = torch.tensor([1.0, -2.0])
    # 0.7 * 1^2 for the positive residual, 0.3 * 2^2 for the negative one, averaged.
    assert module.expectile_loss(diff, 0.7).item() == pytest.approx((0.7 * 1 + 0.3 * 4) / 2)
    residuals = torch.randn(1000)
    assert module.expectile_loss(residuals, 0.5).item() == pytest.approx(0.5 * residuals.pow(2).mean().item())
    # Above 0.5, an under-estimate (positive residual) costs more than an over-estimate.
    assert module.expectile_loss(torch.tensor([1.0]), 0.9) > module.expectile_loss(torch.tensor([-1.0]), 0.9)


def test_td_target_uses_updated_value_and_terminations(module):
    agent = make_agent(module, famo2o_balance="fixed") if hasattr(module, "beta_embedding") else make_agent(module)
    batch = random_batch(module)
    before = copy.deepcopy(agent)
    metrics = agent.update(batch)
    with torch.no_grad():
        next_values = agent.vf(batch.next_states)  # V after its step; V does not change after that
        targets = batch.rewards + 0.99 * (1 - batch.dones) * next_values
        expected = (before.qf(batch.states, batch.actions) - targets).pow(2).mean(1).sum()
        # Terminal transitions back up the reward only.
        terminal = batch.dones == 1
        assert terminal.any()
        assert torch.equal(targets[terminal], batch.rewards[terminal])
    assert metrics["train/q_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_actor_loss_is_clipped_advantage_weighted_regression(module):
    famo2o = hasattr(module, "beta_embedding")
    agent = make_agent(module, famo2o_balance="fixed", iql_beta=3.0) if famo2o else make_agent(module, iql_beta=3.0)
    batch = random_batch(module)
    before = copy.deepcopy(agent)
    metrics = agent.update(batch)
    with torch.no_grad():
        advantages = before.q_target(batch.states, batch.actions).min(0).values - agent.vf(batch.states)
        weights = torch.exp(3.0 * advantages).clamp(max=100.0)
        betas = torch.full((BATCH,), 3.0) if famo2o else None
        expected = -(weights * policy_log_prob(before, batch.states, batch.actions, betas)).mean()
    assert metrics["train/actor_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # The clip: a huge advantage gets weight exactly 100.
    if famo2o:
        weights = module.family_awr_weights(torch.tensor([100.0, 0.0]), torch.tensor([3.0, 3.0]))
    else:
        weights = module.awr_weights(torch.tensor([100.0, 0.0]), 3.0)
    assert weights.tolist() == [100.0, 1.0]


def test_polyak_update(module):
    agent = make_agent(module)
    old_target = [p.clone() for p in agent.q_target.parameters()]
    agent.update(random_batch(module))
    for target, source, old in zip(agent.q_target.parameters(), agent.qf.parameters(), old_target):
        torch.testing.assert_close(target, 0.995 * old + 0.005 * source, rtol=0, atol=1e-7)
        assert not torch.equal(target, old)


def test_masks_come_from_terminations_only(module, hopper_dataset):
    import minari

    dataset = minari.load_dataset(hopper_dataset)
    data, returns = module.flatten_episodes(dataset)
    terminations = np.concatenate([ep.terminations for ep in dataset.iterate_episodes()])
    truncations = np.concatenate([ep.truncations for ep in dataset.iterate_episodes()])
    assert truncations.any(), "the test dataset must contain a truncated episode"
    np.testing.assert_array_equal(data["dones"], terminations.astype(np.float32))
    assert (data["dones"][truncations] == 0).all()
    # Transitions never cross an episode boundary: next_state of step t is state of step t+1 within episodes.
    lengths = [len(ep.actions) for ep in dataset.iterate_episodes()]
    ends = np.cumsum(lengths)
    inner = np.setdiff1d(np.arange(len(data["dones"]) - 1), ends - 1)
    np.testing.assert_array_equal(data["next_states"][inner], data["states"][inner + 1])
    assert len(returns) == dataset.total_episodes


def test_reward_and_state_transform_identical_offline_and_online(module, hopper_dataset):
    import minari

    dataset = minari.load_dataset(hopper_dataset)
    data, returns = module.flatten_episodes(dataset)
    env, _ = module.make_environments(dataset, data)
    config = module.TrainConfig(env=hopper_dataset, normalize=True, normalize_reward=True)
    transform = module.fit_transform(data, returns, env, config)
    # The reward scale is 1000 / (return range) of the offline episodes.
    assert transform.reward_scale == pytest.approx(1000 / (returns.max() - returns.min()))
    offline = transform.dataset(data)
    np.testing.assert_allclose(offline["rewards"], data["rewards"] * transform.reward_scale, rtol=1e-6)

    buffer = module.ReplayBuffer(data["states"].shape[1], data["actions"].shape[1], 100, torch.device("cpu"))
    collector = module.OnlineCollector(env, transform, buffer, seed=3)
    action = np.array([0.3, -0.5, 0.9], dtype=np.float32)
    collector.step(lambda state: action)
    # Replay the same step by hand and push it through the offline path.
    replay_env, _ = module.make_environments(dataset, data)
    seed = int(np.random.SeedSequence([3, 0]).generate_state(1)[0])
    observation, _ = replay_env.reset(seed=seed)
    next_observation, reward, terminated, _, _ = replay_env.step(action)
    raw = {"states": observation[None], "actions": action[None], "rewards": np.array([reward]),
           "next_states": next_observation[None], "dones": np.array([float(terminated)])}
    expected = transform.dataset(raw)
    row = buffer.rows[0].numpy()
    np.testing.assert_allclose(row, np.concatenate([expected[k].reshape(-1) for k in
                                                    ("states", "actions", "rewards", "next_states", "dones")]),
                               rtol=1e-6)


def test_buffer_keeps_offline_rows_and_samples_the_union(module):
    buffer = module.ReplayBuffer(2, 1, capacity=10, device=torch.device("cpu"))
    offline = {"states": np.zeros((4, 2), np.float32), "actions": np.zeros((4, 1), np.float32),
               "rewards": np.arange(4, dtype=np.float32), "next_states": np.zeros((4, 2), np.float32),
               "dones": np.zeros(4, np.float32)}
    buffer.add_offline(offline)
    for i in range(15):  # more than the 6 online slots: FIFO within the online window only
        buffer.add(np.zeros(2), np.zeros(1), 100.0 + i, np.zeros(2), 0.0)
    rewards = buffer.rows[:, 3]
    assert rewards[:4].tolist() == [0, 1, 2, 3]
    assert sorted(rewards[4:].tolist()) == [109.0 + i for i in range(6)]
    assert buffer.size == 10 and buffer.online_added == 15
    torch.manual_seed(0)
    sampled = torch.cat([buffer.sample(256).rewards for _ in range(40)])
    counts = torch.stack([(sampled == r).sum() for r in rewards])
    assert counts.min() > 0.7 * counts.float().mean()  # every row, offline and online, is drawn


def networks(agent):
    nets = {"qf": agent.qf, "vf": agent.vf, "actor": agent.actor}
    if hasattr(agent, "balance_model"):
        nets["balance"] = agent.balance_model
    return nets


def test_each_loss_reaches_only_its_own_network(module):
    """Every network's parameters receive exactly one gradient per update, from its own loss."""
    agent = make_agent(module)
    calls = {}
    for name, net in networks(agent).items():
        calls[name] = 0
        for p in net.parameters():
            p.register_hook(lambda grad, name=name: calls.__setitem__(name, calls[name] + 1))
    agent.update(random_batch(module))
    assert calls == {name: len(list(net.parameters())) for name, net in networks(agent).items()}


def all_state(agent):
    tensors = [p.detach().clone() for net in networks(agent).values() for p in net.parameters()]
    tensors += [p.detach().clone() for p in agent.q_target.parameters()]
    if hasattr(agent, "log_alpha"):
        tensors.append(agent.log_alpha.detach().clone())
    return tensors


def test_state_dict_round_trip_continues_training_identically(module):
    """An agent restored from a state dict trains exactly like the original (optimizer moments,
    temperatures still held by their optimizers, counters): CORL's reload bug would break this."""
    original = make_agent(module)
    for seed in range(3):
        original.update(random_batch(module, seed))
    state = copy.deepcopy(original.state_dict())
    torch.manual_seed(123)
    restored = type(original)(original.config, OBS_DIM, ACT_DIM, torch.device("cpu"))
    restored.load_state_dict(state)
    if hasattr(restored, "log_alpha"):
        assert restored.alpha_optimizer.param_groups[0]["params"][0] is restored.log_alpha
    for agent in (original, restored):
        torch.manual_seed(7)
        for seed in range(3, 6):
            agent.update(random_batch(module, seed))
    for a, b in zip(all_state(original), all_state(restored)):
        assert torch.equal(a, b)
    assert restored.total_updates == original.total_updates == 6


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_fine_tuning_uses_this_runs_learning_rates_and_schedule(module):
    pretrained = make_agent(module, actor_lr_schedule="cosine", offline_iterations=100, online_iterations=0)
    for seed in range(100):
        pretrained.actor_scheduler.step()  # as after 100 offline updates: the cosine reached 0
    assert pretrained.actor_optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    finetune = make_agent(module, actor_lr_schedule="cosine", offline_iterations=0, online_iterations=100,
                          qf_lr=1e-4)
    finetune.load_state_dict(copy.deepcopy(pretrained.state_dict()), fresh_schedule=True)
    assert finetune.actor_optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)
    assert finetune.qf_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    finetune.update(random_batch(module))
    assert 0 < finetune.actor_optimizer.param_groups[0]["lr"] < 3e-4


def test_evaluation_seeds_and_normalized_score(module):
    class RecordingEnv:
        seeds = []

        def reset(self, seed):
            self.seeds.append(seed)
            return np.zeros(2), {}

        def step(self, action):
            return np.zeros(2), 1.5, True, False, {}

    transform = module.Transform(np.zeros(2, np.float32), np.ones(2, np.float32), np.ones(1, np.float32), 1.0, 0.0)
    returns = module.evaluate(RecordingEnv(), lambda s: np.zeros(1), transform, episodes=3, seed=7)
    assert RecordingEnv.seeds == [7, 8, 9] and returns.tolist() == [1.5, 1.5, 1.5]
    assert module.normalized_score(np.array([-10.0 + 0.5 * 110.0]), (-10.0, 100.0)) == pytest.approx(50.0)
    assert module.normalized_score(np.array([1.0]), None) is None


def test_metric_window_averages_each_key_over_its_own_count(module):
    window = module.MetricWindow()
    for step in range(4):
        metrics = {"every": torch.tensor(float(step))}
        if step % 2 == 0:
            metrics["sometimes"] = torch.tensor(10.0 + step)
            metrics["hist"] = torch.tensor([1.0, 0.0])
        window.add(metrics)
    assert window.flush() == {"every": 1.5, "sometimes": 11.0, "hist": [1.0, 0.0]}
    assert window.flush() == {}


def test_checkpoints_load_onto_the_cpu(module, tmp_path):
    agent = make_agent(module)
    agent.update(random_batch(module))
    buffer = module.ReplayBuffer(OBS_DIM, ACT_DIM, 10, torch.device("cpu"))
    transform = module.Transform(np.zeros(OBS_DIM, np.float32), np.ones(OBS_DIM, np.float32),
                                 np.ones(ACT_DIM, np.float32), 1.0, 0.0)
    collector = module.OnlineCollector(None, transform, buffer, seed=0)
    config = agent.config
    module.save_checkpoint(tmp_path / "c.pt", agent, buffer, collector, transform, 1, config)
    checkpoint = module.load_checkpoint(str(tmp_path / "c.pt"), config, transform)
    assert checkpoint["rng"]["torch"].is_cpu
    assert all(s["step"].is_cpu for s in checkpoint["agent"]["qf_optimizer"]["state"].values())
    other = module.Transform(np.ones(OBS_DIM, np.float32), np.ones(OBS_DIM, np.float32),
                             np.ones(ACT_DIM, np.float32), 1.0, 0.0)
    with pytest.raises(module.UserError, match="normalisation constants"):
        module.load_checkpoint(str(tmp_path / "c.pt"), config, other)


def test_collector_reports_finished_episodes_and_restarts(module, hopper_dataset):
    import minari

    dataset = minari.load_dataset(hopper_dataset)
    data, returns = module.flatten_episodes(dataset)
    env, _ = module.make_environments(dataset, data)
    config = module.TrainConfig(env=hopper_dataset)
    transform = module.fit_transform(data, returns, env, config)
    buffer = module.ReplayBuffer(data["states"].shape[1], data["actions"].shape[1], 5000, torch.device("cpu"))
    collector = module.OnlineCollector(env, transform, buffer, seed=0)
    finished, total_return = [], 0.0
    for _ in range(2000):  # Hopper falls within a few dozen steps under full-scale actions
        episode = collector.step(lambda state: np.ones(3, np.float32))
        if episode is not None:
            finished.append(episode)
        if len(finished) == 2:
            break
    assert len(finished) == 2 and collector.episodes == 2
    assert sum(e["train/episode_length"] for e in finished) == buffer.online_added
    assert buffer.rows[: buffer.n_online, -1].sum().item() == 2  # both ended by termination
