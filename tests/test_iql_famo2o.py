"""FamO2O-on-IQL invariants: FAMO2O.md section 7, items 1-8 (9-13 are in test_iql_core.py),
and the reduction to iql.py in `fixed` mode."""
import copy
import math

import pytest
import torch

OBS_DIM, ACT_DIM, BATCH = 11, 3, 64


@pytest.fixture
def famo2o(load_algorithm):
    return load_algorithm("iql_famo2o")


def make_agent(module, **overrides):
    torch.manual_seed(0)
    config = module.TrainConfig(hidden_dim=32, **overrides)
    return module.FamO2OImplicitQLearning(config, OBS_DIM, ACT_DIM, torch.device("cpu"))


def random_batch(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    return module.Batch(torch.randn(BATCH, OBS_DIM, generator=g), torch.rand(BATCH, ACT_DIM, generator=g) * 2 - 1,
                        torch.randn(BATCH, generator=g), torch.randn(BATCH, OBS_DIM, generator=g),
                        (torch.rand(BATCH, generator=g) < 0.3).float())


def parameters_of(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def test_beta_embedding_matches_the_official_formula(famo2o):
    betas = torch.tensor([1.0, 3.0, 8.0, 14.0])
    embedding = famo2o.beta_embedding(betas)
    assert embedding.shape == (4, 6)
    assert embedding.abs().max() <= 1.0
    for k, denominator in enumerate([1.0, 21.544347, 464.15888]):  # 10000^(0), 10000^(1/3), 10000^(2/3)
        torch.testing.assert_close(embedding[:, 2 * k], torch.sin(betas / denominator))
        torch.testing.assert_close(embedding[:, 2 * k + 1], torch.cos(betas / denominator))
    # The AntMaze example of the spec: the third pair is almost constant over [8, 14].
    assert 0.017 == pytest.approx(embedding[2, 4].item(), abs=1e-3)
    assert 0.030 == pytest.approx(embedding[3, 4].item(), abs=1e-3)


def test_balance_mapping_is_monotonic_inside_the_range(famo2o):
    agent = make_agent(famo2o, famo2o_beta_min=1.0, famo2o_beta_max=5.0)
    betas = agent.to_beta(torch.tanh(torch.linspace(-15, 15, 1001, dtype=torch.float64)))
    assert (betas.diff() > 0).all()
    assert betas.min() > 1.0 and betas.max() < 5.0
    saturated = agent.to_beta(torch.tanh(torch.tensor([-1e4, 1e4])))  # float32 tanh saturates to +-1
    assert saturated.tolist() == [1.0, 5.0]


def test_awr_weights_per_sample_vs_official_broadcast(famo2o):
    advantages = torch.tensor([0.5, -1.0, 2.0, 0.1])
    same = torch.full((4,), 2.0)
    torch.testing.assert_close(famo2o.family_awr_weights(advantages, same), famo2o.family_awr_weights(advantages, same, True))
    betas = torch.tensor([1.0, 2.0, 3.0, 4.0])
    per_sample = famo2o.family_awr_weights(advantages, betas)
    broadcast = famo2o.family_awr_weights(advantages, betas, official_broadcast=True)
    assert per_sample.shape == broadcast.shape == (4,)
    torch.testing.assert_close(per_sample, torch.exp(betas * advantages).clamp(max=100))
    expected_broadcast = torch.stack([torch.exp(betas * a).clamp(max=100).mean() for a in advantages])
    torch.testing.assert_close(broadcast, expected_broadcast)
    assert not torch.allclose(per_sample, broadcast)
    assert ((per_sample > 0) & (per_sample <= 100)).all()


def test_gradients_reach_only_the_module_each_loss_trains(famo2o):
    """Each network's parameters receive exactly one gradient per update, from its own loss."""
    agent = make_agent(famo2o)
    calls = {}
    for name, net in [("qf", agent.qf), ("vf", agent.vf), ("actor", agent.actor), ("balance", agent.balance_model)]:
        calls[name] = 0
        for p in net.parameters():
            p.register_hook(lambda grad, name=name: calls.__setitem__(name, calls[name] + 1))
    agent.update(random_batch(famo2o))
    sizes = {name: len(list(net.parameters())) for name, net in
             [("qf", agent.qf), ("vf", agent.vf), ("actor", agent.actor), ("balance", agent.balance_model)]}
    assert calls == sizes


def test_balance_step_changes_only_the_balance_model(famo2o):
    agent = make_agent(famo2o)
    with torch.no_grad():  # make the target critics differ from the online ones
        for p in agent.qf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    states = random_batch(famo2o).states
    others = parameters_of(agent.actor, agent.qf, agent.q_target, agent.vf)
    balance_before = parameters_of(agent.balance_model)

    # The loss is alpha * log pi_b(u|s) - min target-Q(s, a ~ pi_u(s, beta(u))), same noise.
    torch.manual_seed(5)
    u, log_probs, _ = agent.balance_model.rsample(states)
    actions = agent.actor(states, agent.to_beta(u)).rsample()
    expected = (agent.log_alpha.exp() * log_probs - agent.q_target(states, actions).min(0).values).mean()
    torch.manual_seed(5)
    metrics = agent.update_balance(states)
    assert metrics["famo2o/balance_loss"].item() == pytest.approx(expected.item(), rel=1e-5)

    for before, after in zip(others, parameters_of(agent.actor, agent.qf, agent.q_target, agent.vf)):
        assert torch.equal(before, after)
    changed = [not torch.equal(b, a) for b, a in zip(balance_before, parameters_of(agent.balance_model))]
    assert all(changed)


@pytest.mark.parametrize("target_entropy, direction", [(10.0, 1), (-10.0, -1)])
def test_balance_temperature_moves_toward_the_target_entropy(famo2o, target_entropy, direction):
    agent = make_agent(famo2o, famo2o_target_entropy=target_entropy)
    before = agent.log_alpha.item()
    agent.update_balance(random_batch(famo2o).states)
    assert math.copysign(1, agent.log_alpha.item() - before) == direction


def test_offline_betas_are_uniform_and_never_query_the_balance_model(famo2o, monkeypatch):
    agent = make_agent(famo2o, famo2o_beta_min=1.0, famo2o_beta_max=5.0)
    monkeypatch.setattr(agent.balance_model, "forward", lambda *a: pytest.fail("balance model queried offline"))
    betas = agent.update_betas(torch.zeros(100000, OBS_DIM))
    assert betas.min() >= 1.0 and betas.max() <= 5.0
    assert betas.mean().item() == pytest.approx(3.0, abs=0.02)
    assert betas.std().item() == pytest.approx(4 / math.sqrt(12), abs=0.02)


def test_online_betas_come_from_the_pre_step_balance_model(famo2o):
    agent = make_agent(famo2o)
    with torch.no_grad():  # pi_b = tanh(N(atanh(0.5), tiny)): beta ~= map(0.5) = 4
        last = agent.balance_model.net[-1]
        last.weight.zero_()
        last.bias.fill_(math.atanh(0.5))
        agent.balance_model.log_std.fill_(-10.0)
    agent.online = True
    betas = agent.update_betas(torch.randn(BATCH, OBS_DIM))
    torch.testing.assert_close(betas, torch.full((BATCH,), 4.0), atol=1e-3, rtol=0)

    order = []
    update_betas, update_balance = agent.update_betas, agent.update_balance
    agent.update_betas = lambda *a: order.append("betas") or update_betas(*a)
    agent.update_balance = lambda *a: order.append("balance") or update_balance(*a)
    agent.update(random_batch(famo2o))
    assert order == ["betas", "balance"]


def test_uniform_online_update_betas_keep_acting_and_training_the_balance_model(famo2o, monkeypatch):
    """--famo2o_online_update_betas uniform: online update betas as offline, acting and the balance
    step unchanged."""
    agent = make_agent(famo2o, famo2o_online_update_betas="uniform")
    with torch.no_grad():  # pi_b's mode maps to beta = 4 everywhere
        last = agent.balance_model.net[-1]
        last.weight.zero_()
        last.bias.fill_(math.atanh(0.5))
    agent.online = True
    states = torch.zeros(100000, OBS_DIM)
    torch.testing.assert_close(agent.acting_betas(states[:5]), torch.full((5,), 4.0), atol=1e-4, rtol=0)
    forward = agent.balance_model.forward
    monkeypatch.setattr(agent.balance_model, "forward", lambda *a: pytest.fail("balance model queried"))
    betas = agent.update_betas(states)
    assert betas.mean().item() == pytest.approx(3.0, abs=0.02)
    assert betas.std().item() == pytest.approx(4 / math.sqrt(12), abs=0.02)
    monkeypatch.setattr(agent.balance_model, "forward", forward)
    before = parameters_of(agent.balance_model)
    metrics = agent.update(random_batch(famo2o))
    assert any(not torch.equal(b, a) for b, a in zip(before, parameters_of(agent.balance_model)))
    assert "famo2o/balance_loss" in metrics


@pytest.mark.parametrize("overrides", [{"famo2o_online_update_betas": "model"},
                                       {"famo2o_online_update_betas": "uniform", "famo2o_balance": "fixed"}])
def test_bad_online_update_betas_are_refused(famo2o, overrides):
    with pytest.raises(famo2o.UserError, match="famo2o_online_update_betas"):
        make_agent(famo2o, **overrides)


def test_acting_is_deterministic_in_beta(famo2o):
    agent = make_agent(famo2o)
    state = torch.randn(OBS_DIM).numpy()
    actions = [agent.act(state, deterministic=True) for _ in range(3)]
    assert all((a == actions[0]).all() for a in actions)
    assert (abs(actions[0]) <= 1).all()
    states = torch.randn(5, OBS_DIM)
    torch.testing.assert_close(agent.acting_betas(states), agent.acting_betas(states), rtol=0, atol=0)


def test_shapes_and_range_ends(famo2o):
    agent = make_agent(famo2o)
    assert agent.actor.net[0].in_features == OBS_DIM + 6
    assert agent.balance_model.net[-1].out_features == 1
    states = torch.randn(BATCH, OBS_DIM)
    for beta in (agent.beta_min, agent.beta_max):
        dist = agent.actor(states, torch.full((BATCH,), beta))
        assert torch.isfinite(dist.log_prob(dist.sample())).all()
    metrics = agent.update(random_batch(famo2o))
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert metrics["famo2o/beta_hist"].shape == (10,)
    assert metrics["famo2o/beta_hist"].sum().item() == pytest.approx(1.0)


def test_fixed_mode_reduces_to_iql(load_algorithm, famo2o):
    """With beta = c everywhere, IQL+FamO2O's update equals iql.py's with iql_beta = c, given the same
    weights (the universal policy's beta-embedding inputs zeroed)."""
    iql = load_algorithm("iql")
    torch.manual_seed(0)
    base = iql.ImplicitQLearning(iql.TrainConfig(hidden_dim=32, iql_beta=2.5), OBS_DIM, ACT_DIM, torch.device("cpu"))
    family = make_agent(famo2o, famo2o_balance="fixed", iql_beta=2.5)
    for name in ("qf", "q_target", "vf"):
        getattr(family, name).load_state_dict(getattr(base, name).state_dict())
    with torch.no_grad():
        family.actor.log_std.copy_(base.actor.log_std)
        for i, (b_layer, f_layer) in enumerate(zip(base.actor.net, family.actor.net)):
            if isinstance(b_layer, torch.nn.Linear):
                f_layer.bias.copy_(b_layer.bias)
                if i == 0:
                    f_layer.weight.zero_()
                    f_layer.weight[:, :OBS_DIM] = b_layer.weight
                else:
                    f_layer.weight.copy_(b_layer.weight)
    batch = random_batch(famo2o)
    base_metrics, family_metrics = base.update(batch), family.update(batch)
    for key in ("train/actor_loss", "train/value_loss", "train/q_loss", "train/weight_mean"):
        assert family_metrics[key].item() == pytest.approx(base_metrics[key].item(), rel=1e-6), key
    # And the official-broadcast variant agrees with per-sample weights when every beta is equal.
    family_broadcast = copy.deepcopy(family)
    family_broadcast.config = famo2o.TrainConfig(**{**family.config.__dict__, "famo2o_official_broadcast": True})
    assert family_broadcast.update(batch)["train/actor_loss"].item() == pytest.approx(
        copy.deepcopy(family).update(batch)["train/actor_loss"].item(), rel=1e-6)


def test_online_betas_are_stochastic_samples(famo2o):
    agent = make_agent(famo2o)
    agent.online = True
    state = torch.randn(1, OBS_DIM).expand(256, -1)
    first, second = agent.update_betas(state), agent.update_betas(state)
    assert first.std() > 0.1 and not torch.equal(first, second)


def test_balance_temperature_uses_the_pre_step_entropy(famo2o):
    agent = make_agent(famo2o)
    states = random_batch(famo2o).states
    torch.manual_seed(11)
    _, log_probs, _ = agent.balance_model.rsample(states)
    entropy = -log_probs.mean().item()
    before = agent.log_alpha.item()
    torch.manual_seed(11)
    metrics = agent.update_balance(states)
    assert metrics["famo2o/balance_entropy"].item() == pytest.approx(entropy, rel=1e-6)
    # Adam's first step moves by lr * sign(gradient); the gradient is alpha * (H - H_target).
    step = -3e-4 * math.copysign(1, entropy - agent.config.famo2o_target_entropy)
    assert agent.log_alpha.item() - before == pytest.approx(step, rel=1e-3)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden:UserWarning")
def test_balance_step_precedes_the_actor_step(famo2o):
    agent = make_agent(famo2o)
    order = []
    for name in ("balance_optimizer", "actor_optimizer", "vf_optimizer", "qf_optimizer"):
        optimizer = getattr(agent, name)
        step = optimizer.step
        optimizer.step = lambda *a, name=name, step=step, **k: order.append(name) or step(*a, **k)
    agent.update(random_batch(famo2o))
    assert order == ["vf_optimizer", "balance_optimizer", "actor_optimizer", "qf_optimizer"]


def test_embedding_frequencies_live_on_the_policy(famo2o):
    """No per-call host-to-device copy: the frequencies are a (non-checkpointed) buffer of pi_u."""
    agent = make_agent(famo2o)
    assert torch.equal(agent.actor.frequencies, torch.tensor(famo2o.BETA_FREQUENCIES))
    assert "frequencies" not in agent.actor.state_dict()
