"""SAMG invariants (SAMG.md section 6, items 1-13 and 15) on awac_samg.py and cql_samg.py, the
C-VAE sanity check, and AWAC's advantage weights."""
import copy
import math

import numpy as np
import pytest
import torch

OBS_DIM, ACT_DIM, BATCH = 11, 3, 32
BASE = {"awac_samg": "awac", "cql_samg": "cql"}


@pytest.fixture(params=["awac_samg", "cql_samg"])
def samg(request, load_algorithm):
    return load_algorithm(request.param)


def agent_class(module):
    return next(getattr(module, name) for name in ("SAMGAdvantageWeightedActorCritic", "SAMGConservativeQLearning",
                                                   "AdvantageWeightedActorCritic", "ConservativeQLearning")
                if hasattr(module, name))


def make_agent(module, **overrides):
    torch.manual_seed(0)
    defaults = {"hidden_dim": 32}
    if hasattr(module, "SAMGGuide"):
        defaults.update(samg_vae_hidden=32)
    if "cql" in module.__name__:
        defaults.update(cql_n_actions=4)
    return agent_class(module)(module.TrainConfig(**{**defaults, **overrides}), OBS_DIM, ACT_DIM, torch.device("cpu"))


def random_batch(module, seed=1, dones=None):
    g = torch.Generator().manual_seed(seed)
    batch = module.Batch(torch.randn(BATCH, OBS_DIM, generator=g), torch.rand(BATCH, ACT_DIM, generator=g) * 2 - 1,
                         torch.randn(BATCH, generator=g), torch.randn(BATCH, OBS_DIM, generator=g),
                         (torch.rand(BATCH, generator=g) < 0.3).float())
    return batch if dones is None else batch._replace(dones=dones)


def go_online(agent, module, offline_q_shift=0.0):
    """The switch, with a reference set of random pairs; optionally make Q_off differ from Qt."""
    pairs = module.OfflinePairs(torch.randn(2000, OBS_DIM), torch.rand(2000, ACT_DIM) * 2 - 1, 200)
    agent.samg.start_online(agent.qf, pairs)
    agent.online = True
    if offline_q_shift:
        with torch.no_grad():
            for p in agent.samg.q_offline.parameters():
                p.add_(offline_q_shift * torch.randn_like(p))
    return agent


def targets_of(agent, batch, seed=5):
    """(targets, p) of one online batch, with a fixed seed for a'."""
    torch.manual_seed(seed)
    if hasattr(agent, "sample_penalty_actions"):  # CQL
        dist_next = agent.actor(batch.next_states)
        targets, p, _ = agent.td_targets(batch, dist_next, torch.tensor(1.0))
        return targets, p
    targets, metrics = agent.td_targets(batch)
    return targets, metrics.get("samg/p_mean")


def bootstrap_values(agent, batch, seed=5):
    """Qt(s', a') and Qo(s', a') at the a' that targets_of(seed) draws."""
    torch.manual_seed(seed)
    with torch.no_grad():
        if hasattr(agent, "sample_penalty_actions"):
            tanh_sample = type(agent).td_targets.__globals__["tanh_sample"]
            next_actions = tanh_sample(agent.actor(batch.next_states), (1,))[0][0]
        else:
            next_actions = agent.policy_actions(batch.next_states)
        return (agent.q_target(batch.next_states, next_actions).min(0).values,
                agent.samg.q_offline(batch.next_states, next_actions).min(0).values)


def test_coefficient_threshold_range_and_monotonicity(samg):
    agent = go_online(make_agent(samg), samg)
    states, actions = torch.randn(500, OBS_DIM), torch.rand(500, ACT_DIM) * 2 - 1
    previous = None
    for p_m in (0.0, 0.2, 0.5, 0.9):
        agent.samg.config = agent.samg.coefficient.config = samg.TrainConfig(samg_vae_hidden=32, samg_p_m=p_m)
        p, p_raw = agent.samg.coefficient(states, actions)
        assert p.shape == p_raw.shape == (500,)
        assert ((0 <= p_raw) & (p_raw <= 1)).all() and ((0 <= p) & (p <= 1)).all()
        assert torch.equal(p == 0, (p_raw < p_m) | (p_raw == 0))
        assert torch.equal(p[p_raw >= p_m], p_raw[p_raw >= p_m])
        if previous is not None:
            assert (p <= previous).all()
        previous = p
    # Two calls give the same p (eval mode, encoder mean, no sampling).
    torch.testing.assert_close(agent.samg.coefficient(states, actions)[0], agent.samg.coefficient(states, actions)[0],
                               rtol=0, atol=0)


def test_percentile_against_the_reference(samg):
    reference = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # A pair scoring 2.5 is more likely than the two pairs scoring 3 and 4: p_raw = 2/4.
    got = samg.SAMGCoefficient.percentile(torch.tensor([0.5, 2.5, 4.0, 9.0]), reference)
    assert got.tolist() == [1.0, 0.5, 0.0, 0.0]


def test_zero_coefficient_reduces_to_the_base_target(samg, load_algorithm):
    base_module = load_algorithm(BASE[samg.__name__.removeprefix("algorithm_")])
    agent = go_online(make_agent(samg, samg_mode="zero"), samg, offline_q_shift=0.5)
    base = make_agent(base_module)
    for name in ("qf", "q_target", "actor"):
        getattr(base, name).load_state_dict(getattr(agent, name).state_dict())
    base.online = True
    batch = random_batch(samg)
    y_samg, _ = targets_of(agent, batch)
    torch.manual_seed(5)
    if hasattr(base, "sample_penalty_actions"):
        y_base = base.td_targets(batch, base.actor(batch.next_states), torch.tensor(1.0))
    else:
        y_base, _ = base.td_targets(batch)
    torch.testing.assert_close(y_samg, y_base, rtol=0, atol=1e-6)


def test_target_is_affine_in_p_and_terminals_back_up_the_reward(samg):
    batch = random_batch(samg)
    ys = {}
    for mode in ("zero", "even"):
        agent = go_online(make_agent(samg, samg_mode=mode), samg, offline_q_shift=0.5)
        ys[mode], _ = targets_of(agent, batch)
    q_online, q_offline = bootstrap_values(agent, batch)
    assert not torch.allclose(q_online, q_offline)
    gamma_mask = 0.99 * (1 - batch.dones)
    # y(p) = y(0) + p * gamma * (1 - d) * (Qo - Qt), here with p = 1/2 ...
    torch.testing.assert_close(ys["even"], ys["zero"] + 0.5 * gamma_mask * (q_offline - q_online), rtol=0, atol=1e-5)
    # ... and y(1) = r + gamma * (1 - d) * Qo, via the mixing function itself.
    torch.testing.assert_close(samg.mix_targets(q_online, q_offline, torch.ones(BATCH)), q_offline)
    terminal = batch.dones == 1
    assert terminal.any()
    for y in ys.values():
        assert y.shape == batch.rewards.shape == (BATCH,)  # no [B] x [B, 1] -> [B, B] broadcast
        assert torch.equal(y[terminal], batch.rewards[terminal])
        assert not y.requires_grad


def test_offline_critic_is_frozen(samg):
    agent = go_online(make_agent(samg), samg)
    q_offline = agent.samg.q_offline
    # At the first online step the online critic equals Q_off parameter-wise.
    for online, offline in zip(agent.qf.parameters(), q_offline.parameters()):
        assert torch.equal(online, offline)
    assert all(not p.requires_grad for p in q_offline.parameters())
    optimized = {id(p) for opt in [agent.qf_optimizer, agent.actor_optimizer, agent.samg.vae_optimizer,
                                   *getattr(agent, "optimizers", lambda: {})().values()]
                 for group in opt.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in q_offline.parameters()}
    before = [p.clone() for p in q_offline.parameters()]
    vae_before = [p.clone() for p in agent.samg.vae.parameters()]
    for seed in range(3):
        agent.update(random_batch(samg, seed))
    for b, p in zip(before, q_offline.parameters()):
        assert torch.equal(b, p) and p.grad is None
    # The C-VAE gets no gradient from the critic loss (p is computed without gradient).
    assert all(p.grad is None for p in agent.samg.vae.parameters())
    assert all(torch.equal(b, p) for b, p in zip(vae_before, agent.samg.vae.parameters()))
    assert not all(torch.equal(b, p) for b, p in zip(before, agent.qf.parameters()))


def test_state_dict_round_trip_keeps_the_offline_critic_and_reference(samg):
    agent = go_online(make_agent(samg), samg, offline_q_shift=0.5)
    agent.update(random_batch(samg))
    restored = make_agent(samg)
    restored.load_state_dict(copy.deepcopy(agent.state_dict()))
    for a, b in zip(agent.samg.q_offline.parameters(), restored.samg.q_offline.parameters()):
        assert torch.equal(a, b) and not b.requires_grad
    assert torch.equal(agent.samg.coefficient.reference, restored.samg.coefficient.reference)
    batch = random_batch(samg, 3)
    torch.testing.assert_close(targets_of(agent, batch)[0], targets_of(restored, batch)[0], rtol=0, atol=0)


def test_online_buffer_refuses_offline_data(samg):
    buffer = samg.ReplayBuffer(OBS_DIM, ACT_DIM, 100, torch.device("cpu"), online_only=True)
    data = {"states": np.zeros((5, OBS_DIM), np.float32), "actions": np.zeros((5, ACT_DIM), np.float32),
            "rewards": np.zeros(5, np.float32), "next_states": np.zeros((5, OBS_DIM), np.float32),
            "dones": np.zeros(5, np.float32)}
    with pytest.raises(RuntimeError, match="online transitions only"):
        buffer.add_offline(data)
    for i in range(7):
        buffer.add(np.zeros(OBS_DIM), np.zeros(ACT_DIM), float(i), np.zeros(OBS_DIM), 0.0)
    assert buffer.size == 7 and buffer.n_offline == 0
    assert set(buffer.sample(500).rewards.tolist()) == set(range(7))  # every index < number of steps


def fill(buffer, count, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        buffer.add(rng.standard_normal(OBS_DIM), rng.uniform(-1, 1, ACT_DIM), float(rng.standard_normal()),
                   rng.standard_normal(OBS_DIM), 0.0)


def test_p_cached_by_buffer_row_equals_p_at_the_sampled_pairs(samg):
    """Each online transition is scored once; the batch's p is read by row and equals the C-VAE's p
    at the batch's (s, a), also after the FIFO window wraps and after a checkpoint reload."""
    agent = go_online(make_agent(samg), samg)
    buffer = samg.ReplayBuffer(OBS_DIM, ACT_DIM, 50, torch.device("cpu"), online_only=True)
    agent.samg.track(buffer)
    scored = []
    original = agent.samg.coefficient.__class__.__call__

    def counting(self, states, actions):
        scored.append(states.shape[0])
        return original(self, states, actions)

    agent.samg.coefficient.__class__.__call__ = counting
    try:
        fill(buffer, 30)
        for count in (0, 1, 64):  # 30 rows, then one more, then a wrap-around of the 50-row window
            fill(buffer, count, seed=count + 1)
            batch = buffer.sample(BATCH)
            p, p_raw = agent.samg.coefficients(batch, None)
            scored_now = sum(scored)
            expected_p, expected_raw = original(agent.samg.coefficient, batch.states, batch.actions)
            # the same C-VAE on one row or on a batch may round differently: at most one reference rank
            tolerance = 1.0 / agent.samg.coefficient.reference.numel() + 1e-6
            assert (p_raw - expected_raw).abs().max() <= tolerance
            assert ((p - expected_p).abs() <= tolerance).all()
            scored.clear()
            agent.samg.coefficients(buffer.sample(BATCH), None)
            assert sum(scored) == 0  # no new rows: no C-VAE pass
            assert scored_now == {0: 30, 1: 1, 64: 50}[count]  # each new row once; overwritten rows skipped
            scored.clear()
    finally:
        agent.samg.coefficient.__class__.__call__ = original

    restored = make_agent(samg)
    restored.load_state_dict(copy.deepcopy(agent.state_dict()))
    restored.samg.track(buffer)
    restored.samg.coefficient.reference = restored.samg.coefficient.reference + 1.0  # a different C-VAE reference
    batch = buffer.sample(BATCH)
    assert not torch.equal(restored.samg.coefficients(batch, None)[1], agent.samg.coefficients(batch, None)[1])
    agent.samg.load_state_dict(restored.samg.state_dict(), agent.qf)  # a reload rescores every row
    torch.testing.assert_close(agent.samg.coefficients(batch, None), restored.samg.coefficients(batch, None),
                               rtol=0, atol=0)


def test_the_target_reads_p_from_the_row_cache(samg):
    """Both files' TD targets take p by buffer row for a batch of the tracked buffer: with the
    cached p set to 1 the bootstrap is Q_off's alone, and the C-VAE is not run."""
    agent = go_online(make_agent(samg), samg, offline_q_shift=0.5)
    buffer = samg.ReplayBuffer(OBS_DIM, ACT_DIM, 100, torch.device("cpu"), online_only=True)
    agent.samg.track(buffer)
    fill(buffer, 60)
    batch = buffer.sample(BATCH)
    agent.samg.score_new_rows()
    agent.samg.row_p.fill_(1.0)
    agent.samg.coefficient.vae = None  # any C-VAE pass would fail
    targets, _ = targets_of(agent, batch)
    _, q_offline = bootstrap_values(agent, batch)
    torch.testing.assert_close(targets, batch.rewards + 0.99 * (1 - batch.dones) * q_offline, rtol=0, atol=1e-5)


def test_adaptive_rounds_add_mastered_pairs_and_never_lower_p(samg):
    """SAMG.md 1.6 and 6.14: OOD pairs (p_raw < p_m) whose TD error is at most the quantile of the
    known pairs' join the mastered set; each round adds a frozen snapshot to p_raw's max, so p_raw
    never decreases, and the row cache equals the max over the offline and every snapshot percentile."""
    agent = go_online(make_agent(samg, samg_adapt_vae_iterations=20, samg_p_m=0.5), samg)
    buffer = samg.ReplayBuffer(OBS_DIM, ACT_DIM, 300, torch.device("cpu"), online_only=True)
    agent.samg.track(buffer)
    fill(buffer, 100)
    recent = buffer.sample(100)
    _, before = agent.samg.coefficients(recent, None)
    assert agent.samg.rows_scored == 100
    known = before >= 0.5
    assert known.any() and (~known).any()
    td_errors = torch.linspace(0.0, 1.0, 100)
    expected = ~known & (td_errors <= torch.quantile(td_errors[known], 0.25))
    info = agent.samg.adaptive_round(recent, td_errors, agent.qf)
    assert info["samg/mastered_pairs"] == int(expected.sum()) > 0
    assert torch.equal(agent.samg.mastered_states, recent.states[expected])
    coefficient = agent.samg.coefficient
    probe_states, probe_actions = torch.randn(400, OBS_DIM), torch.rand(400, ACT_DIM) * 2 - 1
    history = [coefficient.raw(probe_states, probe_actions)]
    for round_seed in (1, 2):  # more rounds on other recent transitions: the snapshots accumulate
        fill(buffer, 60, seed=10 + round_seed)
        agent.samg.adaptive_round(buffer.sample(100), torch.rand(100), agent.qf)
        history.append(coefficient.raw(probe_states, probe_actions))
    assert len(coefficient.mastered) == 3 and all(not any(p.requires_grad for p in vae.parameters())
                                                  for vae, _ in coefficient.mastered)
    for earlier, later in zip(history, history[1:]):
        assert (later >= earlier).all()
    batch = buffer.sample(BATCH)
    _, cached = agent.samg.coefficients(batch, None)
    percentiles = [coefficient.percentile(coefficient.scores(vae, batch.states, batch.actions), reference)
                   for vae, reference in [(coefficient.vae, coefficient.reference), *coefficient.mastered]]
    tolerance = 1.0 / min(reference.numel() for _, reference in coefficient.mastered) + 1e-6
    assert ((cached - torch.stack(percentiles).max(0).values).abs() <= tolerance).all()
    restored = make_agent(samg, samg_adapt_vae_iterations=20, samg_p_m=0.5)
    restored.load_state_dict(copy.deepcopy(agent.state_dict()))
    torch.testing.assert_close(restored.samg.coefficient.raw(probe_states, probe_actions), history[-1],
                               rtol=0, atol=0)


def test_adaptive_rounds_need_the_elbo_percentile(samg):
    with pytest.raises(samg.UserError, match="samg_coef elbo_percentile"):
        make_agent(samg, samg_adaptive=True, samg_coef="encoder_tail")


def test_reference_split_does_not_depend_on_the_run_seed(samg):
    states, actions = torch.randn(3000, OBS_DIM), torch.rand(3000, ACT_DIM) * 2 - 1
    torch.manual_seed(1)
    first = samg.OfflinePairs(states, actions, 200)
    torch.manual_seed(2)
    second = samg.OfflinePairs(states, actions, 100)
    assert first.held_out == 200 and second.held_out == 100
    assert torch.equal(first.reference_states[:100], second.reference_states)  # smaller: a subset
    training = {tuple(row.tolist()) for row in first.states}
    assert not any(tuple(row.tolist()) in training for row in second.reference_states)


def test_fine_tuning_refuses_unsuitable_checkpoints(samg):
    pairs = samg.OfflinePairs(torch.randn(3000, OBS_DIM), torch.rand(3000, ACT_DIM) * 2 - 1, 200)
    agent = make_agent(samg)
    agent.samg.vae_held_out = 100
    with pytest.raises(samg.UserError, match="after the offline-to-online switch"):
        agent.samg.check_pretrained(True, "x.pt", pairs)
    with pytest.raises(samg.UserError, match="never trained"):
        agent.samg.check_pretrained(False, "x.pt", pairs)
    agent.samg.update_vae(*pairs.sample(8))
    with pytest.raises(samg.UserError, match="--samg_reference_size 100 or less"):
        agent.samg.check_pretrained(False, "x.pt", pairs)
    agent.samg.vae_held_out = 200
    agent.samg.check_pretrained(False, "x.pt", pairs)
    make_agent(samg, samg_mode="zero").samg.check_pretrained(False, "x.pt", pairs)  # no C-VAE needed


def test_p_is_not_cached_for_noise_or_next_pairs(samg):
    for overrides in ({"samg_mode": "random"}, {"samg_coef_at": "next"}):
        agent = go_online(make_agent(samg, **overrides), samg)
        buffer = samg.ReplayBuffer(OBS_DIM, ACT_DIM, 50, torch.device("cpu"), online_only=True)
        agent.samg.track(buffer)
        fill(buffer, 20)
        batch = buffer.sample(BATCH)
        next_actions = torch.rand(BATCH, ACT_DIM) * 2 - 1
        if overrides.get("samg_mode") == "random":  # fresh noise per call
            assert not torch.equal(agent.samg.coefficients(batch, next_actions)[0],
                                   agent.samg.coefficients(batch, next_actions)[0])
        else:  # p at (s', a')
            torch.testing.assert_close(agent.samg.coefficients(batch, next_actions),
                                       agent.samg.coefficient(batch.next_states, next_actions), rtol=0, atol=0)
        assert agent.samg.scored_buffer is None


def test_max_backup_with_one_action_equals_the_plain_target(load_algorithm):
    module = load_algorithm("cql_samg")
    batch = random_batch(module)
    plain = go_online(make_agent(module, samg_mode="even", cql_n_actions=1), module, offline_q_shift=0.5)
    maxed = make_agent(module, samg_mode="even", cql_n_actions=1, cql_max_target_backup=True)
    maxed.load_state_dict(copy.deepcopy(plain.state_dict()))
    torch.testing.assert_close(targets_of(plain, batch)[0], targets_of(maxed, batch)[0], rtol=0, atol=0)


def test_cql_penalty_weighting_by_one_minus_p(load_algorithm):
    module = load_algorithm("cql_samg")
    agent = make_agent(module, samg_cql_penalty="one_minus_p")
    batch = random_batch(module)
    n = agent.config.cql_n_actions
    actions = {"random": torch.rand(n, BATCH, ACT_DIM) * 2 - 1, "current": torch.rand(n, BATCH, ACT_DIM) * 2 - 1,
               "next": torch.rand(n, BATCH, ACT_DIM) * 2 - 1, "log_pi_current": torch.randn(n, BATCH),
               "log_pi_next": torch.randn(n, BATCH)}
    targets = torch.randn(BATCH)
    _, _, unweighted = agent.critic_loss(batch, targets, actions, None)
    _, _, zero = agent.critic_loss(batch, targets, actions, torch.zeros(BATCH))
    _, _, full = agent.critic_loss(batch, targets, actions, torch.ones(BATCH))
    assert zero["train/cql_gap"].item() == pytest.approx(unweighted["train/cql_gap"].item())
    assert full["train/cql_gap"].item() == 0.0


def test_cvae_prefers_dataset_pairs_to_random_actions(load_algorithm):
    """SAMG.md 6.12: trained on actions that are a fixed function of the state plus small noise, the
    C-VAE gives dataset pairs a higher mean p_raw than pairs with uniform random actions."""
    module = load_algorithm("awac_samg")
    torch.manual_seed(0)
    config = module.TrainConfig(samg_vae_hidden=64, samg_vae_lr=3e-3)
    guide = module.SAMGGuide(config, 4, 2, torch.device("cpu"))
    weights = torch.randn(4, 2)

    def dataset(n):
        states = torch.randn(n, 4)
        return states, (torch.tanh(states @ weights) + 0.05 * torch.randn(n, 2)).clamp(-1, 1)

    for _ in range(600):
        guide.update_vae(*dataset(256))
    reference_states, reference_actions = dataset(1000)
    guide.coefficient.set_reference(reference_states, reference_actions)
    states, actions = dataset(2000)
    p_data = guide.coefficient.raw(states, actions).mean().item()
    p_random = guide.coefficient.raw(states, torch.rand(2000, 2) * 2 - 1).mean().item()
    assert p_data == pytest.approx(0.5, abs=0.08)  # calibrated: dataset pairs ~ U(0, 1)
    assert p_random < 0.25 and p_data > p_random + 0.25


def test_awac_weights_on_a_hand_computed_batch(load_algorithm):
    awac = load_algorithm("awac")
    advantages = torch.tensor([0.0, 0.3, -0.6, 5.0])
    weights = awac.awac_weights(advantages, awac_lambda=0.3)
    expected = [1.0, math.e, math.exp(-2.0), 100.0]  # exp(5 / 0.3) is clipped at 100
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)


def test_awac_actor_loss_uses_the_updated_critics(load_algorithm):
    awac = load_algorithm("awac")
    agent = make_agent(awac, awac_lambda=0.5)
    batch = random_batch(awac)
    before = copy.deepcopy(agent)
    torch.manual_seed(3)
    metrics = agent.update(batch)
    torch.manual_seed(3)
    before.td_targets(batch)  # consume a' the same way
    with torch.no_grad():
        q_data = agent.qf(batch.states, batch.actions).min(0).values
        values = agent.qf(batch.states, before.policy_actions(batch.states)).min(0).values
        weights = torch.exp((q_data - values) / 0.5).clamp(max=100)
        expected = -(weights * before.actor(batch.states).log_prob(batch.actions).sum(-1)).mean()
    assert metrics["train/actor_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_tabular_samg_operator():
    """SAMG.md 6.13: on a random MDP, the SAMG evaluation operator contracts with modulus <= gamma;
    with p = 0 it converges to Q^pi, and with Q_off = Q^pi it converges to Q^pi for any p."""
    g = torch.Generator().manual_seed(0)
    n_states, n_actions, gamma = 5, 3, 0.9
    transitions = torch.rand(n_states, n_actions, n_states, generator=g, dtype=torch.float64)
    transitions /= transitions.sum(-1, keepdim=True)
    rewards = torch.randn(n_states, n_actions, generator=g, dtype=torch.float64)
    policy = torch.rand(n_states, n_actions, generator=g, dtype=torch.float64)
    policy /= policy.sum(-1, keepdim=True)
    # Q^pi solves Q = r + gamma * P pi Q.
    flat = transitions.reshape(-1, n_states)
    operator = gamma * (flat.unsqueeze(-1) * policy.unsqueeze(0)).reshape(-1, n_states * n_actions)
    q_pi = torch.linalg.solve(torch.eye(n_states * n_actions, dtype=torch.float64) - operator,
                              rewards.reshape(-1)).reshape(n_states, n_actions)

    def samg_operator(q, q_offline, p):
        mixed = (1 - p)[:, :, None] * (policy * q).sum(-1)[None, None, :] \
            + p[:, :, None] * (policy * q_offline).sum(-1)[None, None, :]
        return rewards + gamma * (transitions * mixed).sum(-1)

    p = torch.rand(n_states, n_actions, generator=g, dtype=torch.float64)
    q_offline = torch.randn(n_states, n_actions, generator=g, dtype=torch.float64)
    for _ in range(20):
        q1, q2 = (torch.randn(n_states, n_actions, generator=g, dtype=torch.float64) for _ in range(2))
        gap = (samg_operator(q1, q_offline, p) - samg_operator(q2, q_offline, p)).abs().max()
        assert gap <= gamma * (q1 - q2).abs().max() + 1e-12

    def fixed_point(q_off, coefficient):
        q = torch.zeros(n_states, n_actions, dtype=torch.float64)
        for _ in range(500):
            q = samg_operator(q, q_off, coefficient)
        return q

    torch.testing.assert_close(fixed_point(q_offline, torch.zeros_like(p)), q_pi)
    torch.testing.assert_close(fixed_point(q_pi, p), q_pi)
    assert not torch.allclose(fixed_point(q_offline, p), q_pi, atol=1e-3)  # biased toward Q_off otherwise
