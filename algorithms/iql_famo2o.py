"""IQL + FamO2O: a family of IQL policies in one network, and a balance model that picks per state.

FamO2O trains one *universal* policy pi_u(a | s, beta) for every balance coefficient beta in
[beta_min, beta_max] (beta is the inverse temperature of IQL's advantage weights exp(beta * A)):
offline with beta uniform per sample ("train once, get a family"), online with beta drawn from a
*balance model* pi_b(beta | s), itself trained SAC-style to maximise Q(s, pi_u(s, beta)).

Paper: Wang et al., "Train Once, Get a Family: State-Adaptive Balances for Offline-to-Online
Reinforcement Learning", NeurIPS 2023, arXiv 2310.17966. Reference code: github.com/LeapLabTHU/FamO2O
(`jax_iql/`, commit ea9cb01). Specification followed: shared/specs/FAMO2O.md, section 2.
`diff algorithms/iql.py algorithms/iql_famo2o.py` shows FamO2O and nothing else.

Run:
    python algorithms/iql_famo2o.py --env o2o/hopper/random-v0
    python algorithms/iql_famo2o.py --env o2o/hopper/random-v0 --famo2o_balance fixed   # = IQL

Balance modes (`--famo2o_balance`, the paper's ablations): `adaptive` (FamO2O), `fixed` (beta =
iql_beta everywhere, which is IQL with a beta-conditioned actor), `random` (beta ~ U[beta_min,
beta_max] when acting and in online updates; no balance model). One more of ours, not the paper's:
`--famo2o_online_update_betas uniform` keeps the adaptive balance model for acting but updates the
universal policy online at uniform betas, as offline: it separates acting at the model's betas from
updating at them.

Deviations from the official code, each with its reason:
1. The advantage weight is per sample, min(exp(beta_j * A_j), 100). The official code broadcasts a
   (B,) advantage against a (B, 1) beta into a (B, B) weight matrix, so a sample's weight ignores its
   own beta; `--famo2o_official_broadcast true` reproduces that (FAMO2O.md section 5, item 1).
2. Independent noise for the beta sample and the action sample (the official code reuses one key).
3. No LR schedule by default (the official FamilyLearner default, cosine over the online steps,
   reaches LR 0 before fine-tuning starts: FAMO2O.md section 5, item 4).
4. Evaluation uses a separate environment instance (the official IQL code reuses the training one).
5. Choices the spec leaves open [OURS]: states are standardised by default like CORL's IQL (the
   official code does not; `--normalize false` for fidelity); locomotion defaults iql_tau 0.7 and
   beta range [1, 5]; the balance model is updated every step (`--famo2o_balance_update_every 5`
   reproduces third-party ports); the family evaluation (score vs beta at
   `famo2o_family_eval_points` betas) runs at the end of each phase.
6. Everything IQL-specific follows algorithms/iql.py and its own list of deviations from CORL:
   Minari data, terminations-only masks, V after its update in the same step, summed critic
   losses, orthogonal init, log-std in [-5, 2], [-1, 1] actions, FIFO online window.
"""
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import gymnasium as gym
import minari
import numpy as np
import pyrallis
import torch
import torch.nn as nn
import torch.nn.functional as F
import wandb
from tqdm import tqdm


@dataclass
class TrainConfig:
    # Minari dataset id; the environment is recovered from it (e.g. mujoco/hopper/medium-v0)
    env: str = "o2o/hopper/random-v0"
    # Download the dataset from the Minari hub when it is missing from the local store
    download: bool = False
    # Seed for network initialisation, batch sampling and online episodes
    seed: int = 0
    # Evaluation episode i is reset with seed eval_seed + i
    eval_seed: int = 1000000
    # auto (CUDA when available), cpu, cuda or cuda:N
    device: str = "auto"
    # CPU threads for PyTorch (0 keeps PyTorch's default)
    cpu_threads: int = 0
    # Gradient updates on the offline dataset
    offline_iterations: int = 1000000
    # Online environment steps, one gradient update after each
    online_iterations: int = 1000000
    # Evaluate (and checkpoint) every eval_freq iterations
    eval_freq: int = 10000
    # Episodes per evaluation
    eval_episodes: int = 10
    # Transitions per gradient update
    batch_size: int = 256
    # Replay capacity: all offline data plus a first-in first-out window of online data
    buffer_size: int = 2000000
    # Discount factor gamma
    discount: float = 0.99
    # Polyak rate of the target critics
    tau: float = 0.005
    # Standardise states with the dataset's mean and std (also online)
    normalize: bool = True
    # Rescale rewards by max_episode_steps / (max return - min return) of the dataset
    normalize_reward: bool = True
    # Actor (policy) learning rate
    actor_lr: float = 3e-4
    # Critic (Q) learning rate
    qf_lr: float = 3e-4
    # Value function learning rate
    vf_lr: float = 3e-4
    # Actor LR schedule: constant, or cosine decay over offline + online iterations
    actor_lr_schedule: str = "constant"
    # Width of every hidden layer
    hidden_dim: int = 256
    # Hidden layers per network
    n_hidden: int = 2
    # Expectile of the value loss
    iql_tau: float = 0.7
    # Inverse temperature beta of the advantage weights exp(beta * A) (the constant beta of famo2o_balance=fixed)
    iql_beta: float = 3.0
    # Balance mode: adaptive (FamO2O), fixed (beta = iql_beta: IQL), random (beta ~ U[min, max] when
    # acting and in online updates)
    famo2o_balance: str = "adaptive"
    # Betas of the online policy updates in adaptive mode: balance (sampled from pi_b: FamO2O) or
    # uniform (U[min, max] as offline while still acting with pi_b: an ablation of ours)
    famo2o_online_update_betas: str = "balance"
    # Lower end of the balance coefficient range (locomotion 1, AntMaze 8)
    famo2o_beta_min: float = 1.0
    # Upper end of the balance coefficient range (locomotion 5, AntMaze 14)
    famo2o_beta_max: float = 5.0
    # Balance model learning rate
    famo2o_balance_lr: float = 3e-4
    # Balance temperature learning rate
    famo2o_alpha_lr: float = 3e-4
    # Initial balance temperature alpha_b
    famo2o_init_alpha: float = 1.0
    # Target entropy of the 1-D balance distribution
    famo2o_target_entropy: float = -0.5
    # Update the balance model and its temperature every this many updates
    famo2o_balance_update_every: int = 1
    # Reproduce the official (B, B) advantage-weight broadcast instead of per-sample weights
    famo2o_official_broadcast: bool = False
    # Betas scored by the family evaluation at the end of each phase (0 = off)
    famo2o_family_eval_points: int = 5
    # Root directory of run directories (config, metrics, checkpoints)
    checkpoints_path: str = "runs"
    # Offline checkpoint to start from (with --offline_iterations 0 to fine-tune it)
    load_model: str = ""
    # Continue <checkpoints_path>/<name> from its last checkpoint (needs --name)
    resume: bool = False
    # Log averaged training metrics every log_every updates
    log_every: int = 1000
    # wandb project
    project: str = "o2o"
    # wandb group
    group: str = "iql_famo2o"
    # Run name (also the run directory); empty = <algorithm>-<env>-s<seed>-<time>
    name: str = ""
    # wandb mode: offline (no account or network needed), online or disabled
    wandb_mode: str = "offline"


ALGORITHM = "iql_famo2o"


# === shared: utilities ===
class UserError(Exception):
    """A problem with the user's input: reported as one paragraph and exit code 2, no traceback."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was requested but CUDA is not available here; use --device cpu.")
    return torch.device(device)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        target_params = list(target.parameters())
        torch._foreach_lerp_(target_params, list(source.parameters()), tau)


def atomic_torch_save(payload: Dict[str, Any], path: Path) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# === end shared ===


# === shared: data ===
ACTION_CLIP = 1.0 - 1e-5


def load_minari_dataset(dataset_id: str, download: bool) -> minari.MinariDataset:
    store = os.environ.get("MINARI_DATASETS_PATH", str(Path("~/.minari/datasets").expanduser()))
    try:
        return minari.load_dataset(dataset_id, download=download)
    except FileNotFoundError:
        raise UserError(
            f"Dataset '{dataset_id}' is not in the local Minari store ({store})"
            + (" and could not be downloaded." if download else " and --download is off.")
            + " Either download it from the Minari hub (--download true, or `minari download "
            f"{dataset_id}`), or build one locally with `python scripts/make_datasets.py` and pass its "
            "id (e.g. o2o/hopper/random-v0). Set MINARI_DATASETS_PATH to use another store."
        ) from None
    except Exception as error:  # network errors, unknown remote ids, incompatible versions
        raise UserError(
            f"Could not load dataset '{dataset_id}' (local store {store}, download={download}): "
            f"{type(error).__name__}: {error}. Check the id with `minari list local` / `minari list remote`, "
            "or build a dataset with `python scripts/make_datasets.py`."
        ) from None


def flatten_episodes(dataset: minari.MinariDataset) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Transitions per episode: obs[:-1] -> obs[1:]; only terminations mask the bootstrap."""
    name = dataset.spec.dataset_id
    if not isinstance(dataset.observation_space, gym.spaces.Box) or not isinstance(
        dataset.action_space, gym.spaces.Box
    ):
        raise UserError(
            f"Dataset '{name}' has observation space {dataset.observation_space} and action space "
            f"{dataset.action_space}; these scripts support flat Box spaces only."
        )
    columns: Dict[str, List[np.ndarray]] = {k: [] for k in ("states", "actions", "rewards", "next_states", "dones")}
    returns = []
    for episode in dataset.iterate_episodes():
        observations = np.asarray(episode.observations, dtype=np.float32)
        steps = len(episode.actions)
        if observations.ndim != 2 or observations.shape[0] != steps + 1:
            raise UserError(
                f"Dataset '{name}', episode {episode.id}: {observations.shape[0]} observations for {steps} "
                "actions (expected one more observation than actions). The dataset is malformed; rebuild it."
            )
        columns["states"].append(observations[:-1])
        columns["next_states"].append(observations[1:])
        columns["actions"].append(np.asarray(episode.actions, dtype=np.float32).reshape(steps, -1))
        columns["rewards"].append(np.asarray(episode.rewards, dtype=np.float32).reshape(steps))
        columns["dones"].append(np.asarray(episode.terminations, dtype=np.float32).reshape(steps))
        returns.append(float(np.sum(episode.rewards)))
    if not returns or sum(len(r) for r in columns["rewards"]) == 0:
        raise UserError(f"Dataset '{name}' contains no transitions. Rebuild it or choose another dataset.")
    data = {key: np.concatenate(parts) for key, parts in columns.items()}
    for key, array in data.items():
        bad = ~np.isfinite(array)
        if bad.any():
            raise UserError(
                f"Dataset '{name}' has {int(bad.sum())} NaN/inf values in '{key}' (first at transition "
                f"{int(np.argwhere(bad)[0][0])}). Training on it would silently produce NaN networks; "
                "rebuild or clean the dataset."
            )
    return data, np.asarray(returns, dtype=np.float64)


def make_environments(dataset: minari.MinariDataset, data: Dict[str, np.ndarray]) -> Tuple[gym.Env, gym.Env]:
    """Training and evaluation environments recovered from the dataset, checked against its data."""
    name = dataset.spec.dataset_id
    try:
        env = dataset.recover_environment()
        eval_env = dataset.recover_environment(eval_env=True)
    except Exception as error:
        raise UserError(
            f"Could not create the environment of dataset '{name}': {type(error).__name__}: {error}. "
            "Install the packages the dataset needs (e.g. gymnasium[mujoco] with the pinned mujoco)."
        ) from None
    for label, space, width in (
        ("observation", env.observation_space, data["states"].shape[1]),
        ("action", env.action_space, data["actions"].shape[1]),
    ):
        if not isinstance(space, gym.spaces.Box) or space.shape != (width,):
            raise UserError(
                f"Dataset '{name}' stores {width}-dimensional {label}s but its environment "
                f"'{env.spec.id if env.spec else env}' has {label} space {space}. The dataset does not "
                "belong to this environment; rebuild it or fix its env_spec."
            )
    high = env.action_space.high
    if not np.allclose(env.action_space.low, -high) or not np.all(np.isfinite(high)):
        raise UserError(f"Environment of '{name}' has an asymmetric or unbounded action space {env.action_space}.")
    return env, eval_env


@dataclass
class Transform:
    """One state/action/reward transform, applied to offline data and to every online transition."""

    state_mean: np.ndarray
    state_std: np.ndarray
    action_scale: np.ndarray
    reward_scale: float
    reward_bias: float

    def states(self, states: np.ndarray) -> np.ndarray:
        return ((states - self.state_mean) / self.state_std).astype(np.float32)

    def actions(self, env_actions: np.ndarray) -> np.ndarray:
        return np.clip(env_actions / self.action_scale, -ACTION_CLIP, ACTION_CLIP).astype(np.float32)

    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        return np.clip(actions, -1.0, 1.0) * self.action_scale

    def rewards(self, rewards: np.ndarray) -> np.ndarray:
        return (np.asarray(rewards, dtype=np.float32) * self.reward_scale + self.reward_bias).astype(np.float32)

    def dataset(self, data: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return {
            "states": self.states(data["states"]),
            "actions": self.actions(data["actions"]),
            "rewards": self.rewards(data["rewards"]),
            "next_states": self.states(data["next_states"]),
            "dones": data["dones"].astype(np.float32),
        }


def fit_transform(
    data: Dict[str, np.ndarray], episode_returns: np.ndarray, env: gym.Env, config: Any
) -> Transform:
    """Constants come from the offline data only and are reused unchanged online. Reward: the
    normalisation of `normalize_reward` (locomotion: max_episode_steps / return range; AntMaze:
    r - 1), then `reward_scale` and `reward_bias` where the config has them (CQL)."""
    obs_dim = data["states"].shape[1]
    mean, std = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)
    if config.normalize:
        mean = data["states"].mean(0).astype(np.float32)
        std = (data["states"].std(0) + 1e-3).astype(np.float32)
    scale, bias = 1.0, 0.0
    if config.normalize_reward and "antmaze" in config.env:
        bias = -1.0
    elif config.normalize_reward:
        spread = float(episode_returns.max() - episode_returns.min())
        if spread <= 0:
            raise UserError(
                f"Dataset '{config.env}': every episode has the same return, so rewards cannot be normalised "
                "by the return range; pass --normalize_reward false."
            )
        scale = (env.spec.max_episode_steps or 1000) / spread
    extra_scale, extra_bias = getattr(config, "reward_scale", 1.0), getattr(config, "reward_bias", 0.0)
    return Transform(
        state_mean=mean,
        state_std=std,
        action_scale=np.asarray(env.action_space.high, np.float32),
        reward_scale=scale * extra_scale,
        reward_bias=bias * extra_scale + extra_bias,
    )


def reference_scores(dataset: minari.MinariDataset) -> Optional[Tuple[float, float]]:
    metadata = dataset.storage.metadata
    if metadata.get("ref_min_score") is None or metadata.get("ref_max_score") is None:
        return None
    return float(metadata["ref_min_score"]), float(metadata["ref_max_score"])


def normalized_score(returns: np.ndarray, references: Optional[Tuple[float, float]]) -> Optional[float]:
    """100 * (return - random) / (expert - random), as minari.get_normalized_score; None without references."""
    if references is None:
        return None
    low, high = references
    return float(100.0 * (np.mean(returns) - low) / (high - low))


# === end shared ===


# === shared: replay buffer ===
class Batch(NamedTuple):
    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_states: torch.Tensor
    dones: torch.Tensor
    index: Optional[torch.Tensor] = None  # the sampled rows, for per-row side data (SAMG caches p by row)


class ReplayBuffer:
    """Transitions in one device tensor: offline rows first (kept), then a FIFO window of online rows.

    One row is [state, action, reward, next_state, done]; a batch is one gather on the device.
    """

    def __init__(self, obs_dim: int, act_dim: int, capacity: int, device: torch.device, online_only: bool = False):
        self.obs_dim, self.act_dim, self.capacity, self.device = obs_dim, act_dim, capacity, device
        self.online_only = online_only  # a buffer for 100% online data refuses offline data
        self.split = [obs_dim, act_dim, 1, obs_dim, 1]
        self.rows = torch.zeros((capacity, sum(self.split)), dtype=torch.float32, device=device)
        self.n_offline = 0
        self.n_online = 0  # online rows currently stored
        self.online_added = 0  # online transitions ever added

    @property
    def size(self) -> int:
        return self.n_offline + self.n_online

    def add_offline(self, data: Dict[str, np.ndarray]) -> None:
        if self.online_only:
            raise RuntimeError("This buffer holds online transitions only; offline data may not enter it.")
        if self.size > 0:
            raise RuntimeError("Offline data must be loaded into an empty buffer.")
        n = len(data["rewards"])
        if n >= self.capacity:
            raise UserError(f"The dataset has {n} transitions but --buffer_size is {self.capacity}; raise it.")
        block = np.concatenate(
            [data["states"], data["actions"], data["rewards"][:, None], data["next_states"], data["dones"][:, None]],
            axis=1,
        )
        self.rows[:n] = torch.as_tensor(block, device=self.device)
        self.n_offline = n

    def add(self, state: np.ndarray, action: np.ndarray, reward: float, next_state: np.ndarray, done: float) -> None:
        row = np.concatenate([state, action, [reward], next_state, [done]]).astype(np.float32)
        slot = self.n_offline + self.online_added % (self.capacity - self.n_offline)
        self.rows[slot] = torch.as_tensor(row, device=self.device)
        self.online_added += 1
        self.n_online = min(self.n_online + 1, self.capacity - self.n_offline)

    def sample(self, batch_size: int) -> Batch:
        index = torch.randint(0, self.size, (batch_size,), device=self.device)
        states, actions, rewards, next_states, dones = torch.split(self.rows[index], self.split, dim=1)
        return Batch(states, actions, rewards.squeeze(1), next_states, dones.squeeze(1), index)

    def online_state_dict(self) -> Dict[str, Any]:
        """Online rows only (the offline rows are rebuilt from the dataset)."""
        rows = self.rows[self.n_offline : self.n_offline + self.n_online].cpu()
        return {"rows": rows, "online_added": self.online_added, "n_offline": self.n_offline}

    def load_online_state_dict(self, state: Dict[str, Any]) -> None:
        if state["n_offline"] != self.n_offline:
            raise UserError(
                f"The checkpoint's buffer was built on {state['n_offline']} offline transitions, this run has "
                f"{self.n_offline}: it was made with another dataset or buffer setting."
            )
        n = state["rows"].shape[0]
        self.rows[self.n_offline : self.n_offline + n] = state["rows"].to(self.device)
        self.n_online, self.online_added = n, state["online_added"]


# === end shared ===


# === shared: evaluation and online interaction ===
def evaluate(
    env: gym.Env, policy: Callable[[np.ndarray], np.ndarray], transform: Transform, episodes: int, seed: int
) -> np.ndarray:
    """Returns of `episodes` episodes; episode i is reset with seed + i. `policy` maps states to [-1, 1]."""
    returns = np.zeros(episodes)
    for i in range(episodes):
        observation, _ = env.reset(seed=seed + i)
        done = False
        while not done:
            action = policy(transform.states(observation))
            observation, reward, terminated, truncated, _ = env.step(transform.env_actions(action))
            returns[i] += reward
            done = terminated or truncated
    return returns


class OnlineCollector:
    """Steps the training environment and writes transformed transitions into the buffer."""

    def __init__(self, env: gym.Env, transform: Transform, buffer: ReplayBuffer, seed: int):
        self.env, self.transform, self.buffer, self.seed = env, transform, buffer, seed
        self.episodes = 0
        self.observation: Optional[np.ndarray] = None
        self.episode_return, self.episode_length = 0.0, 0

    def step(self, policy: Callable[[np.ndarray], np.ndarray]) -> Optional[Dict[str, float]]:
        """One environment step; returns the finished episode's statistics, else None."""
        if self.observation is None:
            episode_seed = int(np.random.SeedSequence([self.seed, self.episodes]).generate_state(1)[0])
            self.observation, _ = self.env.reset(seed=episode_seed)
            self.episode_return, self.episode_length = 0.0, 0
        state = self.transform.states(self.observation)
        action = np.clip(policy(state), -1.0, 1.0)
        observation, reward, terminated, truncated, _ = self.env.step(self.transform.env_actions(action))
        self.buffer.add(
            state,
            self.transform.actions(self.transform.env_actions(action)),
            float(self.transform.rewards(reward)),
            self.transform.states(observation),
            float(terminated),
        )
        self.observation = observation
        self.episode_return += float(reward)
        self.episode_length += 1
        if not (terminated or truncated):
            return None
        self.observation = None
        self.episodes += 1
        return {"train/episode_return": self.episode_return, "train/episode_length": self.episode_length}

    def state_dict(self) -> Dict[str, int]:
        # An episode in progress at checkpoint time is not resumed: a resumed run starts a new one.
        return {"episodes": self.episodes + (self.observation is not None)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.episodes = state["episodes"]


# === end shared ===


# === shared: logging ===
class MetricWindow:
    """Sums update metrics on the device; one host sync per log event, none per update."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}  # per key: some metrics are not produced on every update

    def add(self, metrics: Dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            if key in self.sums:
                self.sums[key].add_(value.detach())
            else:
                self.sums[key] = value.detach().clone()
            self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self) -> Dict[str, Any]:
        means = {key: (value / self.counts[key]).cpu() for key, value in self.sums.items()}
        self.sums, self.counts = {}, {}
        return {key: value.item() if value.numel() == 1 else value.tolist() for key, value in means.items()}


class RunLogger:
    """metrics.jsonl (always) and wandb (per wandb_mode); vectors are logged as histograms."""

    def __init__(self, run_dir: Path, run_name: str, config: Any, start_iteration: int):
        self.path = run_dir / "metrics.jsonl"
        for path in run_dir.glob("*.jsonl"):  # a resumed run drops what was logged after its checkpoint
            records = [json.loads(line) for line in path.read_text().splitlines()]
            path.write_text("".join(json.dumps(r) + "\n" for r in records if r["iteration"] <= start_iteration))
        self.file = open(self.path, "a")
        self.wandb = None
        if config.wandb_mode != "disabled":
            self.wandb = wandb.init(
                project=config.project,
                group=config.group,
                name=run_name,
                id=run_name.replace("/", "-"),
                dir=str(run_dir),
                mode=config.wandb_mode,
                config=asdict(config),
                resume="allow",
            )

    def log(self, metrics: Dict[str, Any], iteration: int) -> None:
        record = {"iteration": iteration, "time": time.time(), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            # Vectors are histograms over their metric's range, drawn on [0, 1] bins.
            values = {k: (wandb.Histogram(np_histogram=(v, np.linspace(0, 1, len(v) + 1))) if isinstance(v, list) else v)
                      for k, v in metrics.items()}
            self.wandb.log(values, step=iteration)

    def scores(self) -> Tuple[Optional[float], Optional[float]]:
        """(last evaluation of the offline phase, last evaluation) among the records logged so far."""
        offline, last = None, None
        for record in (json.loads(line) for line in self.path.read_text().splitlines()):
            score = record.get("eval/normalized_score", record.get("eval/return_mean"))
            if score is not None:
                last = score
                offline = score if record.get("phase") == 0 else offline
        return offline, last

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def make_run_dir(config: Any) -> Tuple[Path, str]:
    """The run name is derived once, here; the config itself is never mutated."""
    if config.resume and not config.name:
        raise UserError("--resume true needs --name: the run directory to continue is <checkpoints_path>/<name>.")
    name = config.name or f"{ALGORITHM}-{config.env.replace('/', '-')}-s{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.checkpoints_path) / name
    if run_dir.exists() and (run_dir / "metrics.jsonl").exists() and not config.resume:
        raise UserError(
            f"Run directory {run_dir} already holds a run. Pass --resume true to continue it, or another --name."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.yaml").exists():  # a resumed run keeps the config it started with
        with open(run_dir / "config.yaml", "w") as f:
            pyrallis.dump(config, f)
    return run_dir, name


# === end shared ===


# === shared: checkpoints ===
def save_checkpoint(path: Path, agent: Any, buffer: ReplayBuffer, collector: OnlineCollector,
                    transform: Transform, iteration: int, config: Any) -> None:
    atomic_torch_save(
        {
            "algorithm": ALGORITHM,
            "env": config.env,
            "iteration": iteration,
            "agent": agent.state_dict(),
            "buffer": buffer.online_state_dict(),
            "collector": collector.state_dict(),
            "transform": asdict(transform),
            "rng": rng_state(),
        },
        path,
    )


def load_checkpoint(path: str, config: Any, transform: Transform) -> Dict[str, Any]:
    """Tensors stay on the CPU: RNG states must, and load_state_dict moves the rest (on CUDA, Adam
    step counters loaded onto the GPU would cost host syncs in every update)."""
    if not Path(path).is_file():
        raise UserError(f"Checkpoint '{path}' does not exist.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("algorithm") != ALGORITHM or checkpoint.get("env") != config.env:
        raise UserError(
            f"Checkpoint '{path}' was written by {checkpoint.get('algorithm')} on '{checkpoint.get('env')}', "
            f"but this run is {ALGORITHM} on '{config.env}'."
        )
    stored = checkpoint["transform"]
    if any(not np.allclose(stored[key], value) for key, value in asdict(transform).items()):
        raise UserError(
            f"Checkpoint '{path}' was trained with other state/reward normalisation constants than this run "
            "computes (--normalize / --normalize_reward differ?); its networks would see differently scaled data."
        )
    return checkpoint


def load_agent_state(agent: Any, state: Dict[str, Any], path: str, fresh_schedule: bool) -> None:
    try:
        agent.load_state_dict(state, fresh_schedule)
    except (RuntimeError, KeyError, ValueError) as error:
        raise UserError(
            f"Checkpoint '{path}' does not fit this run's networks (different --hidden_dim or --n_hidden?): "
            f"{str(error).splitlines()[0]}"
        ) from None


def run_main(train_fn: Callable[[Any], Any], config_class: type) -> None:
    config = pyrallis.parse(config_class=config_class)
    try:
        train_fn(config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# === end shared ===


def orthogonal_linear(in_dim: int, out_dim: int, gain: float = math.sqrt(2)) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(in_dim: int, out_dim: int, hidden_dim: int, n_hidden: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(n_hidden):
        layers += [orthogonal_linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.ReLU()]
    layers.append(orthogonal_linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """n independent linear layers evaluated in one batched matmul: x (n, B, in) -> (n, B, out)."""

    def __init__(self, in_dim: int, out_dim: int, n: int, gain: float = math.sqrt(2)):
        super().__init__()
        weight = torch.empty(n, out_dim, in_dim)
        for member in weight:
            nn.init.orthogonal_(member, gain)
        self.weight = nn.Parameter(weight.transpose(1, 2).contiguous())
        self.bias = nn.Parameter(torch.zeros(n, 1, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TwinQ(nn.Module):
    """Two Q networks on concat(s, a), evaluated together; forward returns (2, B)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_hidden: int, n_critics: int = 2):
        super().__init__()
        dims = [obs_dim + act_dim] + [hidden_dim] * n_hidden
        self.hidden = nn.ModuleList(EnsembleLinear(i, o, n_critics) for i, o in zip(dims[:-1], dims[1:]))
        self.out = EnsembleLinear(hidden_dim, 1, n_critics)
        self.n_critics = n_critics

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([states, actions], dim=-1).expand(self.n_critics, -1, -1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x).squeeze(-1)


class ValueFunction(nn.Module):
    def __init__(self, obs_dim: int, hidden_dim: int, n_hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden_dim, n_hidden)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.net(states).squeeze(-1)


BETA_EMBEDDING_DIM = 6


BETA_FREQUENCIES = [10000.0 ** (-2 * k / BETA_EMBEDDING_DIM) for k in range(BETA_EMBEDDING_DIM // 2)]


def beta_embedding(betas: torch.Tensor, frequencies: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sinusoidal embedding of beta (official family_utils.py): for k = 0, 1, 2,
    [sin(beta / n^(2k/d)), cos(beta / n^(2k/d))] with n = 10000, d = 6. Shape (B,) -> (B, 6).
    frequencies: BETA_FREQUENCIES already on the device (a list copied per call would sync on CUDA)."""
    frequencies = betas.new_tensor(BETA_FREQUENCIES) if frequencies is None else frequencies
    angles = betas.unsqueeze(-1) * frequencies
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class UniversalPolicy(nn.Module):
    """pi_u(a | s, beta): Normal(tanh(mean(s, e(beta))), exp(log_std)), state-independent log-std,
    samples not squashed. Only the policy sees beta; the critics, V and the balance model see s."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_hidden: int):
        super().__init__()
        self.net = mlp(obs_dim + BETA_EMBEDDING_DIM, act_dim, hidden_dim, n_hidden)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.register_buffer("frequencies", torch.tensor(BETA_FREQUENCIES), persistent=False)

    def forward(self, states: torch.Tensor, betas: torch.Tensor, detached: bool = False) -> torch.distributions.Normal:
        """detached: read the weights without letting gradients reach them (the balance model's loss
        differentiates through pi_u's input only)."""
        x = torch.cat([states, beta_embedding(betas, self.frequencies)], dim=-1)
        for layer in self.net:
            if isinstance(layer, nn.Linear) and detached:
                x = F.linear(x, layer.weight.detach(), layer.bias.detach())
            else:
                x = layer(x)
        log_std = self.log_std.detach() if detached else self.log_std
        # validate_args=False: argument checks would sync with the device on every update.
        return torch.distributions.Normal(torch.tanh(x), log_std.clamp(-5.0, 2.0).exp(), validate_args=False)


class BalanceModel(nn.Module):
    """pi_b(u | s): a 1-D tanh-squashed Gaussian, state-independent log-std in [-10, 2]; u in (-1, 1)."""

    def __init__(self, obs_dim: int, hidden_dim: int, n_hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden_dim, n_hidden)
        self.log_std = nn.Parameter(torch.zeros(1))

    def forward(self, states: torch.Tensor) -> torch.distributions.Normal:
        """Distribution of the pre-tanh variable."""
        std = self.log_std.clamp(-10.0, 2.0).exp()
        return torch.distributions.Normal(self.net(states).squeeze(-1), std, validate_args=False)

    @staticmethod
    def squashed_rsample(dist: torch.distributions.Normal) -> Tuple[torch.Tensor, torch.Tensor]:
        """(u = tanh(x), x ~ dist reparameterised, and log pi_b(u | s) in tanh space)."""
        pre_tanh = dist.rsample()
        log_prob = dist.log_prob(pre_tanh) - 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
        return torch.tanh(pre_tanh), log_prob

    def rsample(self, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, log pi_b(u | s) in tanh space, deterministic u = tanh(mean))."""
        dist = self(states)
        return (*self.squashed_rsample(dist), torch.tanh(dist.loc))

    def mode(self, states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(states).squeeze(-1))


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """mean(|expectile - 1[diff < 0]| * diff^2), diff = target - prediction."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


def family_awr_weights(advantages: torch.Tensor, betas: torch.Tensor, official_broadcast: bool = False) -> torch.Tensor:
    """Per-sample min(exp(beta_j * A_j), 100), shape (B,). The official code's (B, B) broadcast gives
    sample j the weight mean_i min(exp(beta_i * A_j), 100), which ignores its own beta_j."""
    if official_broadcast:
        return torch.exp(betas[:, None] * advantages[None, :]).clamp(max=100.0).mean(0)
    return torch.exp(betas * advantages).clamp(max=100.0)


def make_adam(module: nn.Module, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(module.parameters(), lr=lr, fused=True)


class FamO2OImplicitQLearning:
    def __init__(self, config: TrainConfig, obs_dim: int, act_dim: int, device: torch.device):
        self.config, self.device = config, device
        self.discount, self.tau = config.discount, config.tau
        self.qf = TwinQ(obs_dim, act_dim, config.hidden_dim, config.n_hidden).to(device)
        self.q_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.vf = ValueFunction(obs_dim, config.hidden_dim, config.n_hidden).to(device)
        self.actor = UniversalPolicy(obs_dim, act_dim, config.hidden_dim, config.n_hidden).to(device)
        self.qf_optimizer = make_adam(self.qf, config.qf_lr)
        self.vf_optimizer = make_adam(self.vf, config.vf_lr)
        self.actor_optimizer = make_adam(self.actor, config.actor_lr)
        if config.actor_lr_schedule not in ("constant", "cosine"):
            raise UserError(f"--actor_lr_schedule must be constant or cosine, not '{config.actor_lr_schedule}'.")
        self.actor_scheduler = self.make_actor_scheduler()
        if config.famo2o_balance not in ("adaptive", "fixed", "random"):
            raise UserError(f"--famo2o_balance must be adaptive, fixed or random, not '{config.famo2o_balance}'.")
        if config.famo2o_online_update_betas not in ("balance", "uniform"):
            raise UserError("--famo2o_online_update_betas must be balance or uniform, "
                            f"not '{config.famo2o_online_update_betas}'.")
        if config.famo2o_online_update_betas == "uniform" and config.famo2o_balance != "adaptive":
            raise UserError("--famo2o_online_update_betas uniform needs --famo2o_balance adaptive "
                            "(fixed and random choose the update betas themselves).")
        if not config.famo2o_beta_min < config.famo2o_beta_max:
            raise UserError("--famo2o_beta_min must be smaller than --famo2o_beta_max.")
        self.balance_mode = config.famo2o_balance
        self.online_betas_from_balance = (config.famo2o_balance == "adaptive"
                                          and config.famo2o_online_update_betas == "balance")
        self.beta_min, self.beta_max = config.famo2o_beta_min, config.famo2o_beta_max
        self.balance_model = BalanceModel(obs_dim, config.hidden_dim, config.n_hidden).to(device)
        self.balance_optimizer = make_adam(self.balance_model, config.famo2o_balance_lr)
        self.log_alpha = torch.tensor(math.log(config.famo2o_init_alpha), device=device, requires_grad=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=config.famo2o_alpha_lr, fused=True)
        # Random-mode acting draws from its own generator: evaluation must not move the training RNG.
        self.acting_generator = torch.Generator(device=device).manual_seed(config.seed)
        self.online = False
        self.total_updates = 0

    def make_actor_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        """constant, or cosine decay to 0 over this run's offline + online iterations (never climbs back)."""
        total = max(1, self.config.offline_iterations + self.config.online_iterations)
        cosine = self.config.actor_lr_schedule == "cosine"
        return torch.optim.lr_scheduler.LambdaLR(
            self.actor_optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0))) if cosine else 1.0
        )

    def learning_rates(self) -> List[Tuple[torch.optim.Optimizer, float]]:
        return [(self.qf_optimizer, self.config.qf_lr), (self.vf_optimizer, self.config.vf_lr),
                (self.actor_optimizer, self.config.actor_lr), (self.balance_optimizer, self.config.famo2o_balance_lr),
                (self.alpha_optimizer, self.config.famo2o_alpha_lr)]

    def to_beta(self, u: torch.Tensor) -> torch.Tensor:
        """Balance mapping: u in (-1, 1) -> beta in (beta_min, beta_max)."""
        return self.beta_min + (u + 1.0) / 2.0 * (self.beta_max - self.beta_min)

    def uniform_betas(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * torch.rand(n, device=self.device, generator=generator)

    def update_betas(self, states: torch.Tensor, balance_dist: Optional[torch.distributions.Normal] = None
                     ) -> torch.Tensor:
        """beta of each sample in the universal policy's update: uniform offline, from the pre-step
        balance model (stochastic, no gradient) online, unless famo2o_online_update_betas = uniform.
        balance_dist: pi_b(s), if already computed."""
        if self.balance_mode == "fixed":
            return torch.full((states.shape[0],), self.config.iql_beta, device=self.device)
        if self.online_betas_from_balance and self.online:
            with torch.no_grad():
                dist = self.balance_model(states) if balance_dist is None else balance_dist
                return self.to_beta(torch.tanh(dist.sample()))
        return self.uniform_betas(states.shape[0])

    def acting_betas(self, states: torch.Tensor) -> torch.Tensor:
        """beta when acting: the balance model's deterministic choice (adaptive)."""
        if self.balance_mode == "fixed":
            return torch.full((states.shape[0],), self.config.iql_beta, device=self.device)
        if self.balance_mode == "random":
            return self.uniform_betas(states.shape[0], self.acting_generator)
        return self.to_beta(self.balance_model.mode(states))

    def update_balance(self, states: torch.Tensor, balance_dist: Optional[torch.distributions.Normal] = None
                       ) -> Dict[str, torch.Tensor]:
        """SAC-style step of pi_b and its temperature: maximise min target-Q(s, a~pi_u(s, beta)) +
        alpha_b * entropy. pi_u is read with its pre-step weights, detached, so the gradient reaches
        pi_b only; the temperature loss uses the entropy measured before the step."""
        dist = self.balance_model(states) if balance_dist is None else balance_dist
        u, log_probs = self.balance_model.squashed_rsample(dist)
        sampled_actions = self.actor(states, self.to_beta(u), detached=True).rsample()
        q_values = self.q_target(states, sampled_actions).min(0).values
        alpha = self.log_alpha.exp()
        balance_loss = (alpha.detach() * log_probs - q_values).mean()
        entropy = -log_probs.detach().mean()
        alpha_loss = alpha * (entropy - self.config.famo2o_target_entropy)
        self.balance_optimizer.zero_grad(set_to_none=True)
        self.alpha_optimizer.zero_grad(set_to_none=True)
        (balance_loss + alpha_loss).backward()  # disjoint graphs: each reaches its own parameters
        self.balance_optimizer.step()
        self.alpha_optimizer.step()
        acting_betas = self.to_beta(torch.tanh(dist.loc.detach()))
        return {
            "famo2o/balance_loss": balance_loss.detach(),
            "famo2o/balance_alpha": alpha.detach(),
            "famo2o/balance_entropy": entropy,
            "famo2o/beta_mean": acting_betas.mean(),
            "famo2o/beta_std": acting_betas.std(),
            "famo2o/beta_hist": torch.histc(acting_betas, bins=10, min=self.beta_min, max=self.beta_max)
            / states.shape[0],
        }

    def update(self, batch: Batch) -> Dict[str, torch.Tensor]:
        states, actions, rewards, next_states, dones = batch[:5]
        train_balance = (self.balance_mode == "adaptive"
                         and self.total_updates % self.config.famo2o_balance_update_every == 0)
        # pi_b(s) with its pre-step weights serves both the online betas and the balance step.
        balance_dist = self.balance_model(states) if train_balance or (
            self.online_betas_from_balance and self.online) else None
        betas = self.update_betas(states, balance_dist)  # drawn before the balance step: functional order
        with torch.no_grad():
            target_q = self.q_target(states, actions).min(0).values

        # V: expectile regression onto the target critics at dataset actions.
        value_loss = expectile_loss(target_q - self.vf(states), self.config.iql_tau)
        self.vf_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        self.vf_optimizer.step()

        balance_metrics = self.update_balance(states, balance_dist) if train_balance else {}

        with torch.no_grad():
            values, next_values = self.vf(torch.cat([states, next_states])).chunk(2)
            advantages = target_q - values
            weights = family_awr_weights(advantages, betas, self.config.famo2o_official_broadcast)
            targets = rewards + self.discount * (1.0 - dones) * next_values

        # Actor: advantage-weighted regression onto buffer actions.
        log_probs = self.actor(states, betas).log_prob(actions).sum(-1)
        actor_loss = -(weights * log_probs).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        self.actor_scheduler.step()

        # Q: regression onto r + gamma * (1 - terminated) * V(s'); the two MSEs are summed.
        q_values = self.qf(states, actions)
        q_loss = (q_values - targets).pow(2).mean(1).sum()
        self.qf_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        self.qf_optimizer.step()
        soft_update(self.q_target, self.qf, self.tau)

        self.total_updates += 1
        return {
            "train/value_loss": value_loss.detach(),
            "train/actor_loss": actor_loss.detach(),
            "train/q_loss": q_loss.detach(),
            "train/q_mean": q_values.detach().mean(),
            "train/advantage_mean": advantages.mean(),
            "train/weight_mean": weights.mean(),
            "famo2o/update_beta_mean": betas.mean(),
            **balance_metrics,
        }

    @torch.no_grad()
    def act(self, state: np.ndarray, deterministic: bool, beta: Optional[float] = None) -> np.ndarray:
        """Action for one state; beta from the balance mode unless given (family evaluation)."""
        states = torch.as_tensor(state, device=self.device).unsqueeze(0)
        betas = self.acting_betas(states) if beta is None else torch.full((1,), beta, device=self.device)
        dist = self.actor(states, betas)
        action = dist.mean if deterministic else dist.sample()
        return action.clamp(-1.0, 1.0)[0].cpu().numpy()

    def state_dict(self) -> Dict[str, Any]:
        return {
            "qf": self.qf.state_dict(),
            "q_target": self.q_target.state_dict(),
            "vf": self.vf.state_dict(),
            "actor": self.actor.state_dict(),
            "qf_optimizer": self.qf_optimizer.state_dict(),
            "vf_optimizer": self.vf_optimizer.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "actor_scheduler": self.actor_scheduler.state_dict(),
            "balance_model": self.balance_model.state_dict(),
            "balance_optimizer": self.balance_optimizer.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "acting_generator": self.acting_generator.get_state(),
            "online": self.online,
            "total_updates": self.total_updates,
        }

    def load_state_dict(self, state: Dict[str, Any], fresh_schedule: bool = False) -> None:
        """fresh_schedule: fine-tuning a loaded model, so this run's learning rates and LR schedule
        apply; otherwise (resuming) the checkpoint's."""
        for key in ("qf", "q_target", "vf", "actor", "qf_optimizer", "vf_optimizer", "actor_optimizer",
                    "balance_model", "balance_optimizer", "alpha_optimizer"):
            getattr(self, key).load_state_dict(state[key])
        with torch.no_grad():  # in place: the temperature optimizer keeps holding this very tensor
            self.log_alpha.copy_(state["log_alpha"])
        self.acting_generator.set_state(state["acting_generator"])
        self.online, self.total_updates = state["online"], state["total_updates"]
        if not fresh_schedule:
            self.actor_scheduler.load_state_dict(state["actor_scheduler"])
            return
        for optimizer, lr in self.learning_rates():
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] = lr
        self.actor_scheduler = self.make_actor_scheduler()


def train(config: TrainConfig) -> Path:
    device = resolve_device(config.device)
    if config.cpu_threads > 0:
        torch.set_num_threads(config.cpu_threads)
    dataset = load_minari_dataset(config.env, config.download)
    data, episode_returns = flatten_episodes(dataset)
    env, eval_env = make_environments(dataset, data)
    references = reference_scores(dataset)
    transform = fit_transform(data, episode_returns, env, config)
    obs_dim, act_dim = data["states"].shape[1], data["actions"].shape[1]
    run_dir, run_name = make_run_dir(config)
    set_seed(config.seed)

    agent = FamO2OImplicitQLearning(config, obs_dim, act_dim, device)
    buffer = ReplayBuffer(obs_dim, act_dim, config.buffer_size, device)
    buffer.add_offline(transform.dataset(data))
    collector = OnlineCollector(env, transform, buffer, config.seed)
    start = 0
    checkpoint_path = run_dir / "checkpoint.pt"
    if config.resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(str(checkpoint_path), config, transform)
        load_agent_state(agent, checkpoint["agent"], str(checkpoint_path), fresh_schedule=False)
        buffer.load_online_state_dict(checkpoint["buffer"])
        collector.load_state_dict(checkpoint["collector"])
        set_rng_state(checkpoint["rng"])
        start = checkpoint["iteration"]
        print(f"Resuming {run_dir} at iteration {start} with {buffer.n_online} online transitions.")
    elif config.load_model:
        checkpoint = load_checkpoint(config.load_model, config, transform)
        load_agent_state(agent, checkpoint["agent"], config.load_model, fresh_schedule=True)
        agent.online = False  # the switch block below runs for every fine-tuning run
        print(f"Loaded {config.load_model}.")

    logger = RunLogger(run_dir, run_name, config, start)
    total = config.offline_iterations + config.online_iterations
    window = MetricWindow()
    scores: Dict[str, Optional[float]] = dict(zip(("offline", "last"), logger.scores()))  # resumed runs

    def evaluate_and_log(iteration: int) -> float:
        returns = evaluate(eval_env, lambda s: agent.act(s, deterministic=True), transform,
                           config.eval_episodes, config.eval_seed)
        score = normalized_score(returns, references)
        metrics = {"eval/return_mean": float(returns.mean()), "eval/return_std": float(returns.std()),
                   "phase": int(agent.online)}
        if score is not None:
            metrics["eval/normalized_score"] = score
        logger.log(metrics, iteration)
        scores["last"] = score if score is not None else float(returns.mean())
        return scores["last"]

    def family_evaluation(iteration: int) -> None:
        """Train once, get a family: score the universal policy at fixed betas across the range."""
        if config.famo2o_family_eval_points <= 0:
            return
        metrics: Dict[str, Any] = {}
        with open(run_dir / "family_scores.jsonl", "a") as f:
            for beta in np.linspace(agent.beta_min, agent.beta_max, config.famo2o_family_eval_points):
                returns = evaluate(eval_env, lambda s: agent.act(s, deterministic=True, beta=float(beta)),
                                   transform, config.eval_episodes, config.eval_seed)
                score = normalized_score(returns, references)
                row = {"iteration": iteration, "phase": int(agent.online), "beta": float(beta),
                       "return_mean": float(returns.mean()), "return_std": float(returns.std()),
                       "normalized_score": score}
                f.write(json.dumps(row) + "\n")
                metrics[f"famo2o/family_score/beta_{beta:.2f}"] = score if score is not None else row["return_mean"]
                print(f"  family evaluation at iteration {iteration}: beta {beta:.2f} -> "
                      f"{metrics[f'famo2o/family_score/beta_{beta:.2f}']:.2f}")
        logger.log(metrics, iteration)

    progress = tqdm(total=total, initial=start, desc="offline" if start < config.offline_iterations else "online",
                    unit="it", dynamic_ncols=True)
    last_log_time, last_log_iteration = time.time(), start
    for t in range(start, total):
        if t == config.offline_iterations and not agent.online:
            # ---- offline-to-online switch: every phase change happens here ----
            # IQL changes nothing but the data: online transitions join the offline data in one buffer.
            scores["offline"] = scores["last"] if scores["last"] is not None else evaluate_and_log(t)
            # FamO2O: the universal policy's beta now comes from the balance model (adaptive mode).
            agent.online = True
            progress.set_description("online")
        if agent.online:
            episode = collector.step(lambda s: agent.act(s, deterministic=False))
            if episode is not None:
                score = normalized_score(np.array([episode["train/episode_return"]]), references)
                if score is not None:
                    episode["train/normalized_return"] = score
                logger.log(episode, t)
        window.add(agent.update(buffer.sample(config.batch_size)))

        done = t + 1
        if done % config.log_every == 0 or done == total:
            now = time.time()
            metrics = window.flush()
            metrics["time/updates_per_second"] = (done - last_log_iteration) / max(now - last_log_time, 1e-9)
            metrics["phase"] = int(agent.online)
            logger.log(metrics, done)
            progress.update(done - last_log_iteration)
            progress.set_postfix(ups=f"{metrics['time/updates_per_second']:.0f}", score=scores["last"])
            last_log_time, last_log_iteration = now, done
        if done % config.eval_freq == 0 or done == total or done == config.offline_iterations:
            eval_start = time.time()
            evaluate_and_log(done)
            if done in (config.offline_iterations, total):  # FamO2O: the family at the end of each phase
                family_evaluation(done)
            progress.set_postfix(score=scores["last"])
            save_checkpoint(checkpoint_path, agent, buffer, collector, transform, done, config)
            if done == config.offline_iterations:  # the pretrained model, to fine-tune many times
                save_checkpoint(run_dir / "offline.pt", agent, buffer, collector, transform, done, config)
            last_log_time += time.time() - eval_start  # updates per second excludes evaluation time
    progress.close()
    logger.close()
    unit = "normalized score" if references is not None else "return"
    before, after = ("n/a" if scores[k] is None else f"{scores[k]:.2f}" for k in ("offline", "last"))
    print(f"{ALGORITHM} on {config.env}: {unit} after the offline phase {before}, after fine-tuning {after}. "
          f"Run directory: {run_dir}")
    return run_dir


if __name__ == "__main__":
    run_main(train, TrainConfig)
