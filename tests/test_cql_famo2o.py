"""FamO2O-on-CQL invariants: FAMO2O.md section 7, items 2, 8, 10, 14, 15, 16 (13, Polyak, is in
test_cql.py), and the reduction to cql.py in `fixed` mode with beta = 1."""
import copy

import pytest
import torch

OBS_DIM, ACT_DIM, BATCH = 11, 3, 16


@pytest.fixture
def famo2o(load_algorithm):
    return load_algorithm("cql_famo2o")


def make_agent(module, **overrides):
    torch.manual_seed(0)
    config = module.TrainConfig(hidden_dim=32, cql_n_actions=4, **overrides)
    return module.FamO2OConservativeQLearning(config, OBS_DIM, ACT_DIM, torch.device("cpu"))


def random_batch(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    return module.Batch(torch.randn(BATCH, OBS_DIM, generator=g), torch.rand(BATCH, ACT_DIM, generator=g) * 2 - 1,
                        torch.randn(BATCH, generator=g), torch.randn(BATCH, OBS_DIM, generator=g),
                        (torch.rand(BATCH, generator=g) < 0.3).float())


def test_balance_mappings(famo2o):
    intended, official = make_agent(famo2o), make_agent(famo2o, famo2o_official_mapping=True)
    u = torch.tanh(torch.linspace(-15, 15, 1001, dtype=torch.float64))
    betas = intended.to_beta(u)
    assert (betas.diff() > 0).all() and betas.min() > 0.5 and betas.max() < 1.5
    ends = torch.tensor([-1.0, 1.0])
    assert intended.to_beta(ends).tolist() == [0.5, 1.5]
    assert official.to_beta(ends).tolist() == [-0.5, 1.5]  # spans (2 lo - hi, hi): FAMO2O.md 5.2


def test_fixed_beta_one_reduces_to_cql(load_algorithm, famo2o):
    """Item 14: with beta = 1 the actor loss (and everything else) equals cql.py's on the same batch,
    with the same weights (the universal policy's beta-embedding inputs zeroed) and the same noise."""
    cql = load_algorithm("cql")
    torch.manual_seed(0)
    base = cql.ConservativeQLearning(cql.TrainConfig(hidden_dim=32, cql_n_actions=4), OBS_DIM, ACT_DIM,
                                     torch.device("cpu"))
    family = make_agent(famo2o, famo2o_balance="fixed", famo2o_fixed_beta=1.0)
    family.qf.load_state_dict(base.qf.state_dict())
    family.q_target.load_state_dict(base.q_target.state_dict())
    state = {k: v.clone() for k, v in base.actor.state_dict().items()}
    weight = torch.zeros(32, OBS_DIM + 6)
    weight[:, :OBS_DIM] = state["hidden.0.weight"]
    state["hidden.0.weight"] = weight
    family.actor.policy.load_state_dict(state)
    batch = random_batch(famo2o)
    torch.manual_seed(4)
    base_metrics = base.update(batch)
    torch.manual_seed(4)
    family_metrics = family.update(batch)
    for key in ("train/actor_loss", "train/q_loss", "train/td_loss", "train/cql_gap", "train/log_pi"):
        assert family_metrics[key].item() == pytest.approx(base_metrics[key].item(), rel=1e-5), key


def test_beta_weighs_q_in_the_actor_loss_and_never_reaches_the_critics(famo2o):
    """Item 14: the penalty and the critic loss do not depend on the value of the beta multiplier
    (with the embedding zeroed beta cannot move the sampled actions either); the actor loss does."""
    agents = [make_agent(famo2o, famo2o_balance="fixed", famo2o_fixed_beta=b) for b in (1.0, 1.4)]
    for agent in agents:
        with torch.no_grad():
            agent.actor.policy.hidden[0].weight[:, OBS_DIM:] = 0
    batch = random_batch(famo2o)
    metrics = []
    for agent in agents:
        torch.manual_seed(4)
        metrics.append(agent.update(batch))
    assert metrics[0]["train/q_loss"].item() == pytest.approx(metrics[1]["train/q_loss"].item(), rel=1e-6)
    assert metrics[0]["train/cql_gap"].item() == pytest.approx(metrics[1]["train/cql_gap"].item(), rel=1e-6)
    assert metrics[0]["train/actor_loss"].item() != pytest.approx(metrics[1]["train/actor_loss"].item(), rel=1e-3)


def test_balance_loss_reaches_only_the_balance_model(famo2o):
    """Item 15: -min Q(s, a ~ pi_u(s, beta_b)) of the current critics moves pi_b only; the betas the
    other losses use carry no gradient into pi_b."""
    agent = make_agent(famo2o, famo2o_balance="adaptive")
    agent.online = True
    batch = random_batch(famo2o)
    betas = agent.update_betas(batch)
    assert not betas["policy"].requires_grad and not betas["target"].requires_grad
    loss, metrics = agent.balance_loss(batch.states, betas)
    loss.backward()
    assert all(p.grad is None for p in [*agent.actor.parameters(), *agent.qf.parameters()])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.balance_model.parameters()
               if p.requires_grad and p is not agent.balance_model.log_std_multiplier)
    # The loss is computed against the current critics, not the targets.
    torch.manual_seed(2)
    betas = agent.update_betas(batch)
    actions, _ = famo2o.tanh_sample(agent.actor(batch.states, betas["balance"]))
    expected = -agent.qf(batch.states, actions).min(0).values.mean()
    torch.manual_seed(2)
    betas = agent.update_betas(batch)
    loss, _ = agent.balance_loss(batch.states, betas)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["famo2o/beta_hist"].sum().item() == pytest.approx(1.0)


def test_policy_beta_is_uniform_offline_and_from_the_balance_model_online(famo2o):
    agent = make_agent(famo2o, famo2o_balance="adaptive")
    batch = random_batch(famo2o)
    offline = torch.cat([agent.update_betas(batch)["policy"] for _ in range(2000)])
    assert offline.min() >= 0.5 and offline.max() <= 1.5
    assert offline.mean().item() == pytest.approx(1.0, abs=0.01)
    agent.online = True
    torch.manual_seed(1)
    online = agent.update_betas(batch)
    torch.testing.assert_close(online["policy"], online["balance"].detach())
    # Item 10: the TD target's beta is the balance model's, drawn at s (official) ...
    torch.testing.assert_close(online["target"], online["balance"].detach())
    # ... or at s' with the ablation flag.
    at_next = make_agent(famo2o, famo2o_balance="adaptive", famo2o_target_beta_at="next")
    at_next.balance_model.load_state_dict(agent.balance_model.state_dict())
    with torch.no_grad():
        expected = at_next.to_beta(torch.tanh(at_next.balance_model(batch.next_states).loc.squeeze(-1)))
        at_next.balance_model.log_std_offset.fill_(-30.0)  # deterministic pi_b: beta = map(tanh(mean))
    torch.testing.assert_close(at_next.update_betas(batch)["target"], expected, atol=1e-5, rtol=0)


def test_acting_is_deterministic_in_beta(famo2o):
    """Item 8: beta = map(tanh(mean of pi_b(s))); evaluation actions repeat exactly, inside [-1, 1]."""
    agent = make_agent(famo2o, famo2o_balance="adaptive")
    state = torch.randn(OBS_DIM).numpy()
    actions = [agent.act(state, deterministic=True) for _ in range(3)]
    assert all((a == actions[0]).all() for a in actions) and (abs(actions[0]) <= 1).all()
    states = torch.randn(5, OBS_DIM)
    torch.testing.assert_close(agent.acting_betas(states), agent.acting_betas(states), rtol=0, atol=0)


def test_shapes_and_range_ends(famo2o):
    """Item 16: pi_u input obs_dim + 6, pi_b one output (mean and log-std of one dimension), no NaN
    at the ends of the range."""
    agent = make_agent(famo2o, famo2o_balance="adaptive")
    assert agent.actor.policy.hidden[0].in_features == OBS_DIM + 6
    assert agent.balance_model.out.out_features == 2 * 1
    states = torch.randn(BATCH, OBS_DIM)
    for beta in (0.5, 1.5):
        actions, log_pi = famo2o.tanh_sample(agent.actor(states, torch.full((BATCH,), beta)))
        assert torch.isfinite(actions).all() and torch.isfinite(log_pi).all()
    agent.online = True
    metrics = agent.update(random_batch(famo2o))
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_state_dict_round_trip(famo2o):
    agent = make_agent(famo2o, famo2o_balance="adaptive")
    agent.update(random_batch(famo2o))
    restored = make_agent(famo2o, famo2o_balance="adaptive")
    restored.load_state_dict(copy.deepcopy(agent.state_dict()))
    for a, b in zip(agent.balance_model.parameters(), restored.balance_model.parameters()):
        assert torch.equal(a, b)
    for model in (agent, restored):
        torch.manual_seed(3)
        model.update(random_batch(famo2o, 2))
    for a, b in zip(agent.balance_model.parameters(), restored.balance_model.parameters()):
        assert torch.equal(a, b)


def test_beta_histogram_covers_the_official_mapping(famo2o):
    """FAMO2O.md 5.2: with the official mapping betas below beta_min are what the histogram is for."""
    agent = make_agent(famo2o, famo2o_official_mapping=True)
    agent.online = True
    batch = random_batch(famo2o)
    betas = agent.update_betas(batch)
    betas["acting"] = torch.tensor([-0.4, -0.1, 0.2, 0.7, 1.2])
    _, metrics = agent.balance_loss(batch.states, betas)
    histogram = metrics["famo2o/beta_hist"]
    assert histogram.sum().item() == pytest.approx(1.0)
    assert histogram[:5].sum().item() == pytest.approx(0.6)  # bins of (-0.5, 0.5): -0.4, -0.1, 0.2


def test_fixed_beta_outside_the_range_is_refused(famo2o):
    with pytest.raises(famo2o.UserError, match="outside the beta range"):
        make_agent(famo2o, famo2o_balance="fixed", famo2o_fixed_beta=2.0)
    make_agent(famo2o, famo2o_balance="fixed", famo2o_fixed_beta=0.0, famo2o_official_mapping=True)


def test_embedding_frequencies_live_on_the_policy(famo2o):
    """No per-call host-to-device copy: the frequencies are a (non-checkpointed) buffer of pi_u."""
    agent = make_agent(famo2o)
    assert torch.equal(agent.actor.frequencies, torch.tensor(famo2o.BETA_FREQUENCIES))
    assert "frequencies" not in agent.actor.state_dict()
    betas = torch.linspace(0.5, 1.5, 7)
    torch.testing.assert_close(famo2o.beta_embedding(betas, agent.actor.frequencies), famo2o.beta_embedding(betas),
                               rtol=0, atol=0)
