"""The straightforward formulation of CQL's update, as a speed reference for algorithms/cql.py.

This is how CORL's finetune/cql.py computes one update: each critic is a plain nn.Sequential
(Linear, LayerNorm, ReLU modules), the policy runs on every state repeated cql_n_actions times (once
for current-policy actions, once for next-policy actions), each critic is evaluated separately on
each group of actions, and the entropy temperature, actor and critic losses are back-propagated one
after the other. The math is the one of `cql.ConservativeQLearning.update`
(same networks, same losses, same sampling distributions); only the arrangement of the computation
differs. scripts/throughput.py times both; tests/test_cql.py checks that they compute the same losses.

    module = load algorithms/cql.py
    reference = StraightforwardCQL(module, config, obs_dim, act_dim, device)
    reference.update(batch)
"""
import copy
import math
from typing import Any, Dict

import torch
import torch.nn.functional as F


class StraightforwardCQL:
    def __init__(self, module: Any, config: Any, obs_dim: int, act_dim: int, device: torch.device):
        self.m, self.config, self.act_dim = module, config, act_dim
        self.critics = [self.make_critic(obs_dim + act_dim, config).to(device) for _ in range(2)]
        self.targets = [copy.deepcopy(c).requires_grad_(False) for c in self.critics]
        self.actor = module.TanhGaussianPolicy(obs_dim, act_dim, config.hidden_dim, config.actor_n_hidden).to(device)
        self.critic_optimizers = [torch.optim.Adam(c.parameters(), lr=config.qf_lr) for c in self.critics]
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=config.alpha_lr)
        self.device = device

    @staticmethod
    def make_critic(in_dim: int, config: Any) -> torch.nn.Sequential:
        layers = []
        for i in range(config.q_n_hidden):
            layers.append(torch.nn.Linear(in_dim if i == 0 else config.hidden_dim, config.hidden_dim))
            if config.q_layer_norm:
                layers.append(torch.nn.LayerNorm(config.hidden_dim))
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(config.hidden_dim, 1))
        return torch.nn.Sequential(*layers)

    def policy(self, states: torch.Tensor, repeat: int = 1):
        if repeat > 1:
            states = states.unsqueeze(1).repeat(1, repeat, 1).reshape(-1, states.shape[-1])
        actions, log_pi = self.m.tanh_sample(self.actor(states))
        return actions, log_pi

    @staticmethod
    def q(critic, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return critic(torch.cat([states, actions], dim=-1)).squeeze(-1)

    def update(self, batch: Any) -> Dict[str, torch.Tensor]:
        config, n = self.config, self.config.cql_n_actions
        states, actions, rewards, next_states, dones = batch[:5]
        size = states.shape[0]
        new_actions, log_pi = self.policy(states)
        alpha_loss = -(self.log_alpha * (log_pi + -float(self.act_dim)).detach()).mean()
        alpha = self.log_alpha.exp()
        q_new = torch.min(self.q(self.critics[0], states, new_actions), self.q(self.critics[1], states, new_actions))
        actor_loss = (alpha.detach() * log_pi - q_new).mean()

        q_data = [self.q(c, states, actions) for c in self.critics]
        with torch.no_grad():
            next_actions, _ = self.policy(next_states)
            next_q = torch.min(self.q(self.targets[0], next_states, next_actions),
                               self.q(self.targets[1], next_states, next_actions))
            targets = rewards + config.discount * (1 - dones) * next_q
        repeated = states.unsqueeze(1).repeat(1, n, 1).reshape(-1, states.shape[-1])
        random_actions = torch.rand(size * n, self.act_dim, device=self.device) * 2 - 1
        current, log_pi_current = self.policy(states, n)
        following, log_pi_next = self.policy(next_states, n)
        current, log_pi_current = current.detach(), log_pi_current.detach()
        following, log_pi_next = following.detach(), log_pi_next.detach()
        q_loss = 0.0
        for critic, q_d in zip(self.critics, q_data):
            q_random = self.q(critic, repeated, random_actions).view(size, n)
            q_current = self.q(critic, repeated, current).view(size, n)
            q_next = self.q(critic, repeated, following).view(size, n)
            ood = torch.cat([q_random - self.act_dim * math.log(0.5), q_next - log_pi_next.view(size, n),
                             q_current - log_pi_current.view(size, n)], dim=1)
            penalty = config.cql_temp * torch.logsumexp(ood / config.cql_temp, dim=1) - q_d
            q_loss = q_loss + F.mse_loss(q_d, targets) + config.cql_alpha * penalty.mean()

        self.alpha_optimizer.zero_grad()
        alpha_loss.backward()
        self.alpha_optimizer.step()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()
        for optimizer in self.critic_optimizers:
            optimizer.zero_grad()
        q_loss.backward()
        for optimizer in self.critic_optimizers:
            optimizer.step()
        with torch.no_grad():
            for target, critic in zip(self.targets, self.critics):
                for t, c in zip(target.parameters(), critic.parameters()):
                    t.lerp_(c, config.tau)
        return {"train/actor_loss": actor_loss.detach(), "train/q_loss": q_loss.detach()}
