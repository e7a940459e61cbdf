"""Soft Actor-Critic on the CPU: the behaviour-policy trainer of `scripts/make_datasets.py`.

Standard SAC (Haarnoja et al., "Soft Actor-Critic Algorithms and Applications", arXiv 1812.05905),
the algorithm D4RL trained its MuJoCo behaviour policies with, with the usual hyperparameters (as in
CleanRL's `sac_continuous_action.py`): twin Q networks 256x256 with target copies (Polyak tau 0.005),
a tanh-squashed Gaussian actor 256x256 (log-std squashed into [-5, 2]), automatic entropy tuning
towards -|A|, Adam lr 3e-4 for all three, batch 256, gamma 0.99, one update per environment step
after `warmup_steps` uniform-random steps. Actor, critic and temperature are updated every step.

Made for CPU speed (the update is the cost):
- the two critics are one module whose weights carry a leading dimension of 2, (2, in, out), and
  are evaluated together with one `torch.baddbmm` per layer;
- the replay buffer is the run's transition log itself (numpy arrays seen as torch tensors without
  copies): a batch is `torch.randint` + indexing, cast to float32, and nothing is copied per step;
- `SAC.update` returns its diagnostics as tensors and nothing in it synchronizes with the host
  (no `.item()`, no numpy): the caller converts them only when it logs;
- fused Adam (one kernel per optimizer) and `torch._foreach_lerp_` for the target networks.

`SACRun` is one seeded training run with checkpoints: `run.train(until_step, stop_return, ...)` trains
(resuming from `<run_dir>/checkpoint.pt` if there is one) and keeps everything the dataset builder
needs: every environment transition in exact float64 (`run.transitions.slice(0, end)`, the
medium-replay data), the evaluation history, and actor snapshots at every evaluation and at
requested steps (`run.snapshot(step)`, the medium and expert policies). Run directory layout:

    run.json                          env, seed, hyperparameters (the run's identity), versions
    checkpoint.pt                     networks, optimizers, temperature, RNG, counters, evaluations
    transitions/<from>-<to>.npz       the environment transitions of steps [from, to)
    snapshots/step-<step>.pt          actor weights at every evaluation (about 0.3 MB each), or on request
    metrics.jsonl                     one JSON line per evaluation and per logged update window

Checkpoints are written only between episodes (each episode starts from `env.reset(seed=...)`, so
the environment needs no saved state) and atomically (temporary name, then rename); the transition
files they list are written before them. A killed run resumes from its last checkpoint and, on the
same machine with the same thread count, recomputes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
CHECKPOINT_FORMAT = 1


def derived_seed(seed: int, stream: str) -> int:
    """A 32-bit seed for the named random stream of a run, independent of the other streams."""
    return int(np.random.SeedSequence([seed, zlib.crc32(stream.encode())]).generate_state(1)[0])


def atomic_write(path: Path, write) -> None:
    """`write(temporary_path)`, then rename onto `path`: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(temporary)
    os.replace(temporary, path)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as file:  # a file object: np.savez would append ".npz" to a temporary name
        np.savez(file, **arrays)


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


# ---------------------------------------------------------------------------------------------
# Networks and the agent
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SACConfig:
    """Everything besides env and seed that decides a run's trajectory (the run directory's name hashes it)."""

    hidden_dim: int = 256
    batch_size: int = 256
    lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    # uniform-random actions and no updates for the first warmup_steps environment steps
    warmup_steps: int = 5000
    # evaluate (deterministic actions) every eval_every environment steps once the warm-up is over,
    # over eval_episodes episodes
    eval_every: int = 5000
    eval_episodes: int = 10


class TwinQ(nn.Module):
    """Two Q networks on concat(obs, action) in one: weights (2, in, out), one baddbmm per layer."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        dims = [obs_dim + act_dim, hidden_dim, hidden_dim, 1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialization, per critic
            self.weights.append(nn.Parameter(torch.empty(2, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(2, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, obs: torch.Tensor, action: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Q values of both critics, shape (2, B). `detach_params`: no gradient into the critics."""
        x = torch.cat([obs, action], dim=-1).expand(2, -1, -1)
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if detach_params:
                weight, bias = weight.detach(), bias.detach()
            x = torch.baddbmm(bias, x, weight)
            if i < last:
                x = F.relu(x)
        return x.squeeze(-1)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy; actions in [-1, 1] (the run maps them onto the action box)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, 2 * act_dim),
        )

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1.0)
        return mean, log_std

    def sample(self, obs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterized action and its log-probability (tanh change of variables included)."""
        mean, log_std = self(obs)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        pre_tanh = mean + log_std.exp() * noise
        log_prob = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # log(1 - tanh(u)^2) = 2 * (log 2 - u - softplus(-2u)), stable for large |u|
        log_prob = log_prob - (2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(-1)
        return torch.tanh(pre_tanh), log_prob

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool, generator: Optional[torch.Generator] = None) -> np.ndarray:
        """One action in [-1, 1] for one observation (float32 numpy)."""
        mean, log_std = self(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))
        if not deterministic:  # what `sample` computes (same noise draw), without the log-probability
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            mean = mean + log_std.exp() * noise
        return torch.tanh(mean)[0].numpy()


def make_adam(params, lr: float) -> torch.optim.Adam:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # a torch without fused Adam on this device
        return torch.optim.Adam(params, lr=lr, foreach=True)


class SAC:
    """Actor, twin critic with target, temperature; `update` is one gradient step of all of them."""

    def __init__(self, obs_dim: int, act_dim: int, config: SACConfig, generator: torch.Generator):
        self.config, self.generator = config, generator
        self.actor = Actor(obs_dim, act_dim, config.hidden_dim)
        self.critic = TwinQ(obs_dim, act_dim, config.hidden_dim)
        self.critic_target = TwinQ(obs_dim, act_dim, config.hidden_dim)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = torch.zeros((), requires_grad=True)
        self.target_entropy = -float(act_dim)
        self.actor_optimizer = make_adam(self.actor.parameters(), config.lr)
        self.critic_optimizer = make_adam(self.critic.parameters(), config.lr)
        self.alpha_optimizer = make_adam([self.log_alpha], config.lr)
        self._critic_params = list(self.critic.parameters())
        self._target_params = list(self.critic_target.parameters())

    def update(self, obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, next_obs: torch.Tensor,
               terminated: torch.Tensor) -> dict[str, torch.Tensor]:
        """One SAC step on a float32 batch; returns detached scalar tensors (no host sync here)."""
        gamma, tau = self.config.gamma, self.config.tau
        alpha = self.log_alpha.detach().exp()

        with torch.no_grad():
            next_action, next_log_prob = self.actor.sample(next_obs, self.generator)
            next_q = self.critic_target(next_obs, next_action).min(dim=0).values - alpha * next_log_prob
            target_q = reward + gamma * (1.0 - terminated) * next_q
        q = self.critic(obs, action)
        critic_loss = (q - target_q).pow(2).mean(dim=1).sum()  # sum of the two critics' MSEs
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        new_action, log_prob = self.actor.sample(obs, self.generator)
        new_q = self.critic(obs, new_action, detach_params=True).min(dim=0).values
        actor_loss = (alpha * log_prob - new_q).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_optimizer.step()

        with torch.no_grad():
            torch._foreach_lerp_(self._target_params, self._critic_params, tau)
        return {
            "critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "alpha": alpha,
            "entropy": -log_prob.detach().mean(), "q": q.detach().mean(),
        }

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])


# ---------------------------------------------------------------------------------------------
# The transition log, which is also the replay buffer
# ---------------------------------------------------------------------------------------------

TRANSITION_FIELDS = ("observations", "next_observations", "actions", "rewards", "terminations", "truncations")


class Transitions:
    """Every environment transition of a run in order, growable; rows [0, size) are filled.

    Observations and rewards keep the environment's dtypes (float64 for MuJoCo), so the medium-replay
    dataset holds exactly what the environment returned. `actions` are the policy's actions in
    [-1, 1] (float32). The torch views share memory with the numpy arrays; `sample` draws a batch
    with `torch.randint` and indexing and casts it to float32.
    """

    def __init__(self, obs_space: gym.spaces.Box, act_dim: int, capacity: int):
        self.dtypes = {
            "observations": obs_space.dtype, "next_observations": obs_space.dtype, "actions": np.float32,
            "rewards": np.float64, "terminations": np.bool_, "truncations": np.bool_,
        }
        self.shapes = {"observations": obs_space.shape, "next_observations": obs_space.shape, "actions": (act_dim,)}
        self.size = 0
        self.arrays: dict[str, np.ndarray] = {}
        self._allocate(max(capacity, 1))

    def _allocate(self, capacity: int) -> None:
        new = {k: np.zeros((capacity, *self.shapes.get(k, ())), dtype=d) for k, d in self.dtypes.items()}
        for key, array in self.arrays.items():
            new[key][: self.size] = array[: self.size]
        self.arrays = new
        self.tensors = {key: torch.from_numpy(array) for key, array in new.items()}

    def add(self, obs, action, reward, next_obs, terminated, truncated) -> None:
        if self.size == len(self.arrays["rewards"]):
            self._allocate(2 * self.size)
        i, a = self.size, self.arrays
        a["observations"][i], a["next_observations"][i], a["actions"][i] = obs, next_obs, action
        a["rewards"][i], a["terminations"][i], a["truncations"][i] = reward, terminated, truncated
        self.size += 1

    def extend(self, block: dict[str, np.ndarray]) -> None:
        n = len(block["rewards"])
        capacity = len(self.arrays["rewards"])
        if self.size + n > capacity:
            self._allocate(max(2 * capacity, self.size + n))
        for key in TRANSITION_FIELDS:
            self.arrays[key][self.size: self.size + n] = block[key]
        self.size += n

    def slice(self, start: int, end: int) -> dict[str, np.ndarray]:
        return {key: self.arrays[key][start:end].copy() for key in TRANSITION_FIELDS}

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        index = torch.randint(0, self.size, (batch_size,), generator=generator)
        t = self.tensors
        return (
            t["observations"][index].float(), t["actions"][index], t["rewards"][index].float(),
            t["next_observations"][index].float(), t["terminations"][index].float(),
        )


# ---------------------------------------------------------------------------------------------
# A training run with checkpoints
# ---------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Raised after `stop_after_checkpoints` checkpoints (to test resuming)."""


def action_scaler(space: gym.spaces.Box) -> tuple[np.ndarray, np.ndarray]:
    """(center, half range): env action = center + half * a for a in [-1, 1] (exact for [-1, 1] boxes)."""
    if not isinstance(space, gym.spaces.Box) or not space.is_bounded():
        raise ValueError(f"SAC needs a bounded Box action space, got {space}.")
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    return ((high + low) / 2).astype(space.dtype), ((high - low) / 2).astype(space.dtype)


def to_env_action(action: np.ndarray, scaler: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    center, half = scaler
    return (center + half * action).astype(center.dtype)


def load_policy(path: Path) -> tuple[Actor, tuple[np.ndarray, np.ndarray]]:
    """A behaviour policy file written by make_datasets.py (`policies/medium.pt`, `policies/expert.pt`).

    Returns (actor, scaler); the environment action for `obs` is
    `to_env_action(actor.act(obs, deterministic, generator), scaler)`.
    """
    policy = torch.load(path, map_location="cpu", weights_only=False)
    actor = Actor(policy["obs_dim"], policy["act_dim"], policy["hidden_dim"])
    actor.load_state_dict(policy["actor"])
    return actor, (policy["action_center"], policy["action_half_range"])


def evaluate(env: gym.Env, actor: Actor, scaler, episodes: int, seed: int) -> np.ndarray:
    """Returns of `episodes` deterministic-policy episodes, episode j reset with `seed + j`."""
    returns = []
    for j in range(episodes):
        obs, _ = env.reset(seed=seed + j)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(to_env_action(actor.act(obs, True), scaler))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return np.asarray(returns)


class SACRun:
    """One seeded SAC run on one environment, stored in `run_dir` and resumed from it."""

    def __init__(self, env_id: str, seed: int, config: SACConfig, run_dir: Path, checkpoint_every: int = 50000,
                 stop_after_checkpoints: Optional[int] = None, progress: bool = True):
        self.env_id, self.seed, self.config, self.run_dir = env_id, seed, config, Path(run_dir)
        self.checkpoint_every, self.progress = checkpoint_every, progress
        self.stop_after_checkpoints = stop_after_checkpoints
        self.env, self.eval_env = gym.make(env_id), gym.make(env_id)
        self.obs_space, self.act_space = self.env.observation_space, self.env.action_space
        self.scaler = action_scaler(self.act_space)
        obs_dim, act_dim = int(np.prod(self.obs_space.shape)), int(np.prod(self.act_space.shape))
        self.train_seed = derived_seed(seed, "sac/train-episodes")  # training episode k: reset(seed=train_seed + k)
        self.eval_seed = derived_seed(seed, "sac/eval-episodes")  # evaluation episode j: reset(seed=eval_seed + j)
        torch.manual_seed(derived_seed(seed, "sac/init"))
        self.generator = torch.Generator().manual_seed(derived_seed(seed, "sac/sampling"))
        self.agent = SAC(obs_dim, act_dim, config, self.generator)
        self.transitions = Transitions(self.obs_space, act_dim, capacity=100_000)
        self.step = 0  # environment steps done
        self.episode = 0  # episodes started before the current one (the next reset uses train_seed + episode)
        self.evals: list[dict] = []  # {"step", "return_mean", "return_std"}
        self.snapshots: list[int] = []  # steps with a stored actor snapshot
        self.chunks: list[str] = []  # transition files, in order
        self.checkpoint_step = 0
        self.checkpoints_written = 0
        self.seconds = 0.0  # training wall-clock time, summed over resumes
        self._load()

    # -- persistence ------------------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"env_id": self.env_id, "seed": self.seed, "config": asdict(self.config)}

    def _load(self) -> None:
        identity_path = self.run_dir / "run.json"
        if identity_path.exists():
            stored = json.loads(identity_path.read_text())
            if {k: stored.get(k) for k in ("env_id", "seed", "config")} != self._identity():
                raise ValueError(f"{self.run_dir} holds another run: {stored} (expected {self._identity()}).")
        else:
            info = {**self._identity(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "numpy": np.__version__}
            atomic_write(identity_path, lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))
        path = self.run_dir / "checkpoint.pt"
        if not path.exists():
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} has checkpoint format {state['format']}, expected {CHECKPOINT_FORMAT}.")
        self.agent.load_state_dict(state["agent"])
        self.generator.set_state(state["generator"])
        for key in ("step", "episode", "evals", "snapshots", "chunks", "seconds"):
            setattr(self, key, state[key])
        self.checkpoint_step = self.step
        for name in self.chunks:
            with np.load(self.run_dir / "transitions" / name) as block:
                self.transitions.extend({key: block[key] for key in TRANSITION_FIELDS})
        if self.transitions.size != self.step:
            raise ValueError(f"{path}: {self.transitions.size} stored transitions for {self.step} steps.")

    def _save(self) -> None:
        if self.step > self.checkpoint_step:  # first the new transitions, then the checkpoint that lists them
            name = f"{self.checkpoint_step:09d}-{self.step:09d}.npz"
            block = self.transitions.slice(self.checkpoint_step, self.step)
            atomic_write(self.run_dir / "transitions" / name, lambda path: save_npz(path, block))
            self.chunks = self.chunks + [name]
        state = {
            "format": CHECKPOINT_FORMAT, **self._identity(), "agent": self.agent.state_dict(),
            "generator": self.generator.get_state(), "step": self.step, "episode": self.episode,
            "evals": self.evals, "snapshots": self.snapshots, "chunks": self.chunks, "seconds": self.seconds,
        }
        atomic_torch_save(state, self.run_dir / "checkpoint.pt")
        self.checkpoint_step = self.step
        self.checkpoints_written += 1
        if self.stop_after_checkpoints is not None and self.checkpoints_written >= self.stop_after_checkpoints:
            raise Interrupted(f"stopped after {self.checkpoints_written} checkpoint(s) at step {self.step}")

    def _save_snapshot(self, step: int, eval_return: Optional[float]) -> None:
        state = {"actor": self.agent.actor.state_dict(), "step": step, "eval_return_mean": eval_return}
        atomic_torch_save(state, self.run_dir / "snapshots" / f"step-{step:09d}.pt")
        if step not in self.snapshots:
            self.snapshots = sorted(self.snapshots + [step])

    def _log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")

    # -- what the dataset builder reads -----------------------------------------------------------

    def new_actor(self) -> Actor:
        return Actor(self.agent.actor.net[0].in_features, self.agent.actor.net[-1].out_features // 2,
                     self.config.hidden_dim)

    def has_snapshot(self, step: int) -> bool:
        return (self.run_dir / "snapshots" / f"step-{step:09d}.pt").is_file()

    def snapshot(self, step: int) -> dict:
        """The stored snapshot at `step`: {"actor": state_dict, "step", "eval_return_mean"}."""
        return torch.load(self.run_dir / "snapshots" / f"step-{step:09d}.pt", map_location="cpu", weights_only=True)

    def first_eval_reaching(self, threshold: float, consecutive: int = 1) -> Optional[dict]:
        """The first evaluation that ends `consecutive` evaluations in a row whose mean return is >=
        threshold."""
        streak = 0
        for record in self.evals:
            streak = streak + 1 if record["return_mean"] >= threshold else 0
            if streak >= consecutive:
                return record
        return None

    def best_eval(self) -> Optional[dict]:
        return max(self.evals, key=lambda e: e["return_mean"], default=None)

    # -- training ---------------------------------------------------------------------------------

    def train(self, until_step: int, stop_return: Optional[float] = None, snapshot_at: tuple[int, ...] = (),
              stop_consecutive: int = 1) -> None:
        """Train until `until_step` environment steps, or until `stop_consecutive` evaluations in a row
        reach `stop_return`.

        Already done work is not repeated. The current episode is always finished (and trained on)
        before the checkpoint that ends the call, so the run can be continued later exactly. Actor
        snapshots are stored at every evaluation and at `snapshot_at`.
        """
        def reached() -> bool:
            return stop_return is not None and self.first_eval_reaching(stop_return, stop_consecutive) is not None

        if self.step >= until_step or reached():
            return
        config, agent, env = self.config, self.agent, self.env
        if self.step > 0 and self.progress:
            print(f"SAC {self.env_id} seed {self.seed}: continuing from the checkpoint at step {self.step} in "
                  f"{self.run_dir}", file=sys.stderr)
        start_time, start_step = time.perf_counter(), self.step
        best = self.best_eval()
        best_return = -math.inf if best is None else best["return_mean"]
        last_eval = self.evals[-1]["return_mean"] if self.evals else float("nan")
        sums: dict[str, torch.Tensor] = {}
        n_sums = 0
        log_every = max(1, config.eval_every)
        stop = False
        obs, episode_return = None, 0.0
        bar = tqdm(total=until_step, initial=self.step, unit="step", dynamic_ncols=True, disable=not self.progress,
                   desc=f"SAC {self.env_id} seed {self.seed}", mininterval=2.0)
        try:
            while True:
                if obs is None:  # between episodes: the only place to stop or checkpoint
                    if stop or self.step >= until_step:
                        break
                    if self.step - self.checkpoint_step >= self.checkpoint_every:
                        self._save_with_time(start_time, start_step)
                        start_time, start_step = time.perf_counter(), self.step
                    obs, _ = env.reset(seed=self.train_seed + self.episode)
                    episode_return = 0.0
                if self.step < config.warmup_steps:
                    action = (torch.rand(self.scaler[0].shape, generator=self.generator) * 2 - 1).numpy()
                else:
                    action = agent.actor.act(obs, deterministic=False, generator=self.generator)
                next_obs, reward, terminated, truncated, _ = env.step(to_env_action(action, self.scaler))
                self.transitions.add(obs, action, reward, next_obs, terminated, truncated)
                self.step += 1
                episode_return += float(reward)
                if self.step > config.warmup_steps:
                    info = agent.update(*self.transitions.sample(config.batch_size, self.generator))
                    for key, value in info.items():
                        sums[key] = sums[key] + value if key in sums else value
                    n_sums += 1
                if n_sums and self.step % log_every == 0:  # the only host syncs of the loop
                    self._log({"step": self.step, **{f"train/{k}": float(v) / n_sums for k, v in sums.items()}})
                    sums, n_sums = {}, 0
                evaluated = self.step % config.eval_every == 0 and self.step > config.warmup_steps
                if evaluated:
                    returns = evaluate(self.eval_env, agent.actor, self.scaler, config.eval_episodes, self.eval_seed)
                    record = {"step": self.step, "return_mean": float(returns.mean()),
                              "return_std": float(returns.std())}
                    self.evals = self.evals + [record]
                    self._log({"step": self.step, "eval/return_mean": record["return_mean"],
                               "eval/return_std": record["return_std"]})
                    last_eval = record["return_mean"]
                    best_return = max(best_return, last_eval)
                    self._save_snapshot(self.step, last_eval)
                    stop = stop or reached()
                if self.step in snapshot_at:
                    self._save_snapshot(self.step, last_eval if evaluated else None)
                if self.step >= until_step:
                    stop = True
                if terminated or truncated:
                    obs = None
                    self.episode += 1
                    bar.set_postfix(eval_return=f"{last_eval:.1f}", best=f"{best_return:.1f}",
                                    episode_return=f"{episode_return:.1f}", refresh=False)
                else:
                    obs = next_obs
                if self.step % 1000 == 0:
                    bar.update(self.step - bar.n)
            bar.update(self.step - bar.n)
            self._save_with_time(start_time, start_step)
        finally:
            bar.close()

    def _save_with_time(self, start_time: float, start_step: int) -> None:
        self.seconds += time.perf_counter() - start_time
        self._save()

    def close(self) -> None:
        self.env.close()
        self.eval_env.close()
