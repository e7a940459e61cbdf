"""CQL invariants on cql.py and cql_famo2o.py (whose CQL core must not drift): the penalty against
hand-computed values, the batched critic evaluation, gradient isolation of the single backward
pass, TD target, max-backup, Lagrange multiplier, Polyak update and the checkpoint round trip."""
import copy
import math

import pytest
import torch

OBS_DIM, ACT_DIM, BATCH = 11, 3, 16


@pytest.fixture(params=["cql", "cql_famo2o"])
def module(request, load_algorithm):
    return load_algorithm(request.param)


def make_agent(module, **overrides):
    torch.manual_seed(0)
    if hasattr(module, "beta_embedding"):
        overrides.setdefault("famo2o_balance", "fixed")
    overrides.setdefault("cql_n_actions", 4)
    config = module.TrainConfig(hidden_dim=32, **overrides)
    agent_class = getattr(module, "ConservativeQLearning", None) or module.FamO2OConservativeQLearning
    return agent_class(config, OBS_DIM, ACT_DIM, torch.device("cpu"))


def random_batch(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    return module.Batch(torch.randn(BATCH, OBS_DIM, generator=g), torch.rand(BATCH, ACT_DIM, generator=g) * 2 - 1,
                        torch.randn(BATCH, generator=g), torch.randn(BATCH, OBS_DIM, generator=g),
                        (torch.rand(BATCH, generator=g) < 0.3).float())


def policy_distributions(agent, batch):
    if hasattr(agent, "balance_model"):
        betas = torch.full((2 * BATCH,), agent.config.famo2o_fixed_beta)
        dist = agent.actor(torch.cat([batch.states, batch.next_states]), betas)
    else:
        dist = agent.actor(torch.cat([batch.states, batch.next_states]))
    return agent_module_split(dist)


def agent_module_split(dist):
    loc, scale = dist.loc.chunk(2), dist.scale.chunk(2)
    return [torch.distributions.Normal(l, s) for l, s in zip(loc, scale)]


def test_cql_penalty_matches_a_hand_computed_case(module):
    q_data = torch.tensor([[1.0]])
    q_random, q_current, q_next = torch.tensor([[[2.0]]]), torch.tensor([[[3.0]]]), torch.tensor([[[0.5]]])
    log_pi_current, log_pi_next = torch.tensor([[-1.0]]), torch.tensor([[0.2]])
    # Importance sampling: uniform actions corrected by log(0.5^A) (A = 2), policy actions by log pi.
    penalty = module.cql_penalty(q_data, q_random, q_current, log_pi_current, q_next, log_pi_next,
                                 act_dim=2, temperature=1.0, importance_sample=True)
    expected = math.log(math.exp(2.0 - 2 * math.log(0.5)) + math.exp(0.5 - 0.2) + math.exp(3.0 + 1.0)) - 1.0
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    # Without it: logsumexp over the raw values, the data action included; temperature 2 scales.
    penalty = module.cql_penalty(q_data, q_random, q_current, log_pi_current, q_next, log_pi_next,
                                 act_dim=2, temperature=2.0, importance_sample=False)
    expected = 2.0 * math.log(sum(math.exp(q / 2.0) for q in (2.0, 1.0, 0.5, 3.0))) - 1.0
    assert penalty.item() == pytest.approx(expected, rel=1e-6)


def test_batched_critic_evaluation_equals_one_call_per_action_group(module):
    agent = make_agent(module)
    states = torch.randn(BATCH, OBS_DIM)
    groups = torch.rand(5, BATCH, ACT_DIM) * 2 - 1
    together = agent.qf(states, groups)
    assert together.shape == (2, 5, BATCH)
    for k in range(5):
        torch.testing.assert_close(together[:, k], agent.qf(states, groups[k]))
    assert agent.qf.critics[0].hidden[0].in_features == OBS_DIM + ACT_DIM  # no beta input


def test_critic_loss_is_td_error_plus_weighted_penalty(module):
    agent = make_agent(module, cql_alpha=2.5)
    batch = random_batch(module)
    targets = torch.randn(BATCH)
    n = agent.config.cql_n_actions
    actions = {"random": torch.rand(n, BATCH, ACT_DIM) * 2 - 1, "current": torch.rand(n, BATCH, ACT_DIM) * 2 - 1,
               "next": torch.rand(n, BATCH, ACT_DIM) * 2 - 1, "log_pi_current": torch.randn(n, BATCH),
               "log_pi_next": torch.randn(n, BATCH)}
    loss, lagrange_loss, _ = agent.critic_loss(batch, targets, actions)
    with torch.no_grad():
        expected = 0.0
        for i, critic in enumerate(agent.qf.critics):
            def q(acts):
                return critic(torch.cat([batch.states, acts], dim=-1))
            q_data = q(batch.actions)
            ood = torch.stack(
                [q(actions["random"][k]) - ACT_DIM * math.log(0.5) for k in range(n)]
                + [q(actions["next"][k]) - actions["log_pi_next"][k] for k in range(n)]
                + [q(actions["current"][k]) - actions["log_pi_current"][k] for k in range(n)])
            expected += ((q_data - targets) ** 2).mean() + 2.5 * (torch.logsumexp(ood, 0) - q_data).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert lagrange_loss.item() == 0.0


def test_detached_reads_give_no_gradient_to_the_weights_read(module):
    agent = make_agent(module)
    states = torch.randn(BATCH, OBS_DIM)
    actions = (torch.rand(BATCH, ACT_DIM) * 2 - 1).requires_grad_(True)
    agent.qf(states, actions, detached=True).sum().backward()
    assert all(p.grad is None for p in agent.qf.parameters())
    assert actions.grad is not None and actions.grad.abs().sum() > 0


def test_update_reads_the_critics_with_weights_only_in_the_critic_loss(module, monkeypatch):
    """The actor (and FamO2O's balance model) read Q with detached weights, so the single backward
    pass gives the critics the gradient of their own loss only."""
    agent = make_agent(module, famo2o_balance="adaptive") if hasattr(module, "beta_embedding") else make_agent(module)
    calls = []
    forward = agent.qf.forward
    monkeypatch.setattr(agent.qf, "forward", lambda s, a, detached=False: calls.append(detached) or forward(s, a, detached))
    agent.update(random_batch(module))
    assert calls.count(False) == 1  # the batched critic-loss evaluation
    assert calls.count(True) == (2 if hasattr(module, "beta_embedding") else 1)


def test_td_target_terminals_and_max_backup_with_one_action(module):
    batch = random_batch(module)
    plain, maxed = make_agent(module, cql_n_actions=1), make_agent(module, cql_n_actions=1, cql_max_target_backup=True)
    _, dist_next = policy_distributions(plain, batch)
    alpha = torch.tensor(1.0)
    torch.manual_seed(3)
    y_plain = plain.td_targets(batch, dist_next, alpha)
    torch.manual_seed(3)
    y_max = maxed.td_targets(batch, dist_next, alpha)
    torch.testing.assert_close(y_plain, y_max, rtol=0, atol=0)
    terminal = batch.dones == 1
    assert terminal.any() and torch.equal(y_plain[terminal], batch.rewards[terminal])
    torch.manual_seed(3)
    actions, _ = module.tanh_sample(dist_next, (1,))
    expected = batch.rewards + 0.99 * (1 - batch.dones) * plain.q_target(batch.next_states, actions[0]).min(0).values
    torch.testing.assert_close(y_plain, expected)


@pytest.mark.parametrize("gap_target, direction", [(-100.0, 1), (100.0, -1)])
def test_lagrange_multiplier_moves_toward_the_target_gap(module, gap_target, direction):
    agent = make_agent(module, cql_lagrange=True, cql_target_action_gap=gap_target)
    before = agent.log_alpha_prime.item()
    agent.update(random_batch(module))
    assert math.copysign(1, agent.log_alpha_prime.item() - before) == direction


def test_polyak_update(module):
    agent = make_agent(module)
    old = [p.clone() for p in agent.q_target.parameters()]
    agent.update(random_batch(module))
    for target, source, before in zip(agent.q_target.parameters(), agent.qf.parameters(), old):
        torch.testing.assert_close(target, 0.995 * before + 0.005 * source, rtol=0, atol=1e-7)


def test_checkpoint_round_trip_keeps_temperatures_and_critics_learning(module):
    original = make_agent(module, cql_lagrange=True)
    for seed in range(2):
        original.update(random_batch(module, seed))
    restored = make_agent(module, cql_lagrange=True)
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    assert restored.alpha_optimizer.param_groups[0]["params"][0] is restored.log_alpha
    assert restored.alpha_prime_optimizer.param_groups[0]["params"][0] is restored.log_alpha_prime
    before = (restored.log_alpha.item(), restored.log_alpha_prime.item(), [p.clone() for p in restored.qf.parameters()])
    for agent in (original, restored):
        torch.manual_seed(9)
        agent.update(random_batch(module, 5))
    assert restored.log_alpha.item() != before[0] and restored.log_alpha_prime.item() != before[1]
    assert all(not torch.equal(a, b) for a, b in zip(before[2], restored.qf.parameters()))
    for a, b in zip(original.state_dict()["qf"].values(), restored.state_dict()["qf"].values()):
        assert torch.equal(a, b)
    assert original.log_alpha.item() == restored.log_alpha.item()


def test_fine_tuning_applies_this_runs_learning_rates(module):
    pretrained = make_agent(module)
    finetune = make_agent(module, qf_lr=1e-4, actor_lr=5e-5)
    finetune.load_state_dict(copy.deepcopy(pretrained.state_dict()), fresh_schedule=True)
    assert finetune.qf_optimizer.param_groups[0]["lr"] == 1e-4
    assert finetune.actor_optimizer.param_groups[0]["lr"] == 5e-5


@pytest.mark.parametrize("lagrange", [False, True])
@pytest.mark.parametrize("name", ["cql", "cql_famo2o", "cql_samg"])
def test_alpha_prime_is_logged_only_when_it_weighs_the_penalty(load_algorithm, name, lagrange):
    module = load_algorithm(name)
    overrides = {"hidden_dim": 32, "cql_n_actions": 4, "cql_lagrange": lagrange}
    if hasattr(module, "beta_embedding"):
        overrides["famo2o_balance"] = "fixed"
    if hasattr(module, "SAMGGuide"):
        overrides["samg_vae_hidden"] = 32
    agent_class = next(getattr(module, cls) for cls in ("ConservativeQLearning", "FamO2OConservativeQLearning",
                                                         "SAMGConservativeQLearning") if hasattr(module, cls))
    torch.manual_seed(0)
    agent = agent_class(module.TrainConfig(**overrides), OBS_DIM, ACT_DIM, torch.device("cpu"))
    metrics = agent.update(random_batch(module))
    assert ("train/alpha_prime" in metrics) == lagrange
    if lagrange:  # the weight this update used: exp(log alpha' = 1), before alpha' takes its first step
        assert float(metrics["train/alpha_prime"]) == pytest.approx(math.e, rel=1e-6)
