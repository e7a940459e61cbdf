"""CQL + FamO2O: a family of CQL policies in one network, and a balance model that picks per state.

FamO2O trains one *universal* policy pi_u(a | s, beta) for every balance coefficient beta in
[beta_min, beta_max], where beta weighs Q in the SAC actor loss alpha * log pi - beta * min Q:
offline with beta uniform per sample ("train once, get a family"), online with beta drawn from a
*balance model* pi_b(beta | s) trained to maximise min Q(s, pi_u(s, beta)). The critics and the
CQL penalty are shared by the whole family and never see beta.

Paper: Wang et al., "Train Once, Get a Family: State-Adaptive Balances for Offline-to-Online
Reinforcement Learning", NeurIPS 2023, arXiv 2310.17966. Reference code: github.com/LeapLabTHU/FamO2O
(`jax_cql/`, commit ea9cb01). Specification followed: shared/specs/FAMO2O.md, section 3.
`diff algorithms/cql.py algorithms/cql_famo2o.py` shows FamO2O and nothing else.

Run:
    python algorithms/cql_famo2o.py --env o2o/hopper/random-v0
    python algorithms/cql_famo2o.py --config_path configs/cql_famo2o/hopper_famo2o_protocol.yaml

Balance modes (`--famo2o_balance`, the paper's ablations): `adaptive` (FamO2O), `fixed` (beta =
famo2o_fixed_beta everywhere; 1 gives CQL with a beta-conditioned actor), `random` (beta ~
U[beta_min, beta_max] when acting and in the updates; no balance model).

As coded officially (FAMO2O.md section 3.3): all losses come from one forward pass with the
pre-step parameters and each reaches only its own module; offline the actor's beta is uniform per
sample while the TD target and the penalty's next-state actions use the balance model's beta drawn
at s (not s'); the balance loss is -min Q of the current critics, with no entropy term.

Deviations from the official code, each with its reason:
1. The balance mapping is lo + (u + 1) / 2 * (hi - lo), inside (0.5, 1.5). The official
   u * (hi - lo) + lo reaches (-0.5, 1.5), outside the range the family was trained on, and a
   negative beta makes the actor minimise Q (FAMO2O.md section 5, item 2);
   `--famo2o_official_mapping true` reproduces it (the beta histogram then spans (-0.5, 1.5)).
2. `--famo2o_target_beta_at next` draws the target's beta at s' (the principled alternative to the
   official beta at s), as an ablation; it applies to `adaptive` mode (the other modes have no
   balance model: their target beta is the fixed or uniform one).
3. Offline 1M updates by default like cql.py, so the two files share their defaults; the official
   protocol (2M offline, CQL weight 1.0, LayerNorm critics) is in configs/*/*famo2o_protocol.yaml
   for both files (the official CQL baseline differed in three more ways: section 5, item 3).
4. Everything CQL-specific follows algorithms/cql.py and its own list of deviations (Minari data,
   terminations-only masks, one backward pass, offline data kept in the buffer, evaluation in a
   separate environment, initialisation, one update per environment step).
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
    normalize: bool = False
    # Rescale rewards by max_episode_steps / (max return - min return) of the dataset (AntMaze: r - 1)
    normalize_reward: bool = False
    # Multiply rewards by this after normalisation (CORL AntMaze: 10, with normalize_reward false)
    reward_scale: float = 1.0
    # Add this to rewards after scaling (CORL AntMaze: -5, with normalize_reward false)
    reward_bias: float = 0.0
    # Actor (policy) learning rate
    actor_lr: float = 3e-4
    # Critic (Q) learning rate, also of the Lagrange multiplier
    qf_lr: float = 3e-4
    # Entropy temperature learning rate
    alpha_lr: float = 3e-4
    # Width of every hidden layer
    hidden_dim: int = 256
    # Hidden layers of the actor
    actor_n_hidden: int = 2
    # Hidden layers of each critic (CORL AntMaze: 5)
    q_n_hidden: int = 2
    # LayerNorm after every hidden layer of the critics
    q_layer_norm: bool = True
    # Learn the entropy temperature toward entropy -action_dim
    auto_alpha: bool = True
    # Initial (or fixed, without auto_alpha) entropy temperature
    init_alpha: float = 1.0
    # Subtract alpha * log pi(a'|s') in the TD target
    backup_entropy: bool = False
    # Weight of the conservative penalty offline
    cql_alpha: float = 1.0
    # Weight of the conservative penalty online (set at the offline-to-online switch)
    cql_alpha_online: float = 1.0
    # Uniform, current-policy and next-policy actions per state in the penalty (each)
    cql_n_actions: int = 10
    # Importance-sample the penalty's log-sum-exp (subtract log densities)
    cql_importance_sample: bool = True
    # Tune the penalty weight with a Lagrange multiplier toward cql_target_action_gap
    cql_lagrange: bool = False
    # Target of (log-sum-exp Q - data Q) for the Lagrange variant
    cql_target_action_gap: float = -1.0
    # Temperature of the log-sum-exp
    cql_temp: float = 1.0
    # Back up the max over cql_n_actions next actions instead of one sample
    cql_max_target_backup: bool = False
    # Balance mode: adaptive (FamO2O), fixed (beta = famo2o_fixed_beta: CQL), random (beta ~ U[min, max])
    famo2o_balance: str = "adaptive"
    # Lower end of the balance coefficient range
    famo2o_beta_min: float = 0.5
    # Upper end of the balance coefficient range
    famo2o_beta_max: float = 1.5
    # The constant beta of famo2o_balance=fixed
    famo2o_fixed_beta: float = 1.0
    # Balance model learning rate
    famo2o_balance_lr: float = 3e-4
    # Reproduce the official balance mapping u * (max - min) + min, which reaches below famo2o_beta_min
    famo2o_official_mapping: bool = False
    # Where the TD target's beta is drawn: s (official) or next (s')
    famo2o_target_beta_at: str = "s"
    # Betas scored by the family evaluation at the end of each phase (0 = off)
    famo2o_family_eval_points: int = 5
    # Lower clip of the per-state penalty difference
    cql_clip_diff_min: float = -1e9
    # Upper clip of the per-state penalty difference
    cql_clip_diff_max: float = 1e9
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
    group: str = "cql_famo2o"
    # Run name (also the run directory); empty = <algorithm>-<env>-s<seed>-<time>
    name: str = ""
    # wandb mode: offline (no account or network needed), online or disabled
    wandb_mode: str = "offline"


ALGORITHM = "cql_famo2o"


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


def run_linear(layer: nn.Linear, x: torch.Tensor, detached: bool) -> torch.Tensor:
    if detached:
        return F.linear(x, layer.weight.detach(), layer.bias.detach())
    return layer(x)


class TanhGaussianPolicy(nn.Module):
    """tanh(Normal(mean(s), exp(m * raw_log_std(s) + o))), learnable scalars m = 1, o = -1 at init
    (JaxCQL / CORL); log-std clipped to [-20, 2]. Orthogonal init, last layer gain 1e-2."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_hidden: int):
        super().__init__()
        dims = [obs_dim] + [hidden_dim] * n_hidden
        self.hidden = nn.ModuleList(orthogonal_linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.out = orthogonal_linear(hidden_dim, 2 * act_dim, gain=1e-2)
        self.log_std_multiplier = nn.Parameter(torch.tensor(1.0))
        self.log_std_offset = nn.Parameter(torch.tensor(-1.0))

    def forward(self, states: torch.Tensor, detached: bool = False) -> torch.distributions.Normal:
        """The pre-tanh Gaussian. detached: read the weights without letting gradients reach them."""
        x = states
        for layer in self.hidden:
            x = F.relu(run_linear(layer, x, detached))
        mean, raw_log_std = run_linear(self.out, x, detached).chunk(2, dim=-1)
        multiplier, offset = self.log_std_multiplier, self.log_std_offset
        if detached:
            multiplier, offset = multiplier.detach(), offset.detach()
        log_std = (multiplier * raw_log_std + offset).clamp(-20.0, 2.0)
        # validate_args=False: argument checks would sync with the device on every update.
        return torch.distributions.Normal(mean, log_std.exp(), validate_args=False)


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
    """pi_u(a | s, beta): the tanh-Gaussian policy on concat(s, e(beta)). Only the policy sees beta."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_hidden: int):
        super().__init__()
        self.policy = TanhGaussianPolicy(obs_dim + BETA_EMBEDDING_DIM, act_dim, hidden_dim, n_hidden)
        self.register_buffer("frequencies", torch.tensor(BETA_FREQUENCIES), persistent=False)

    def forward(self, states: torch.Tensor, betas: torch.Tensor, detached: bool = False) -> torch.distributions.Normal:
        return self.policy(torch.cat([states, beta_embedding(betas, self.frequencies)], dim=-1), detached)


def tanh_sample(dist: torch.distributions.Normal, shape: Tuple[int, ...] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised tanh-squashed sample(s) and their log-density (sum over action dimensions)."""
    pre_tanh = dist.rsample(shape)
    log_prob = dist.log_prob(pre_tanh) - 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return torch.tanh(pre_tanh), log_prob.sum(-1)


def split_distribution(dist: torch.distributions.Normal, n: int) -> Tuple[torch.distributions.Normal, ...]:
    """The distributions of the first n rows and of the rest (one policy pass over [s; s'])."""
    return (torch.distributions.Normal(dist.loc[:n], dist.scale[:n], validate_args=False),
            torch.distributions.Normal(dist.loc[n:], dist.scale[n:], validate_args=False))


class QNetwork(nn.Module):
    """Q(s, a): Dense, optional LayerNorm, ReLU per hidden layer; orthogonal init, last gain 1e-2."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_hidden: int, layer_norm: bool):
        super().__init__()
        dims = [obs_dim + act_dim] + [hidden_dim] * n_hidden
        self.hidden = nn.ModuleList(orthogonal_linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(n_hidden if layer_norm else 0))
        self.out = orthogonal_linear(hidden_dim, 1, gain=1e-2)

    def forward(self, x: torch.Tensor, detached: bool = False) -> torch.Tensor:
        for i, layer in enumerate(self.hidden):
            x = run_linear(layer, x, detached)
            if self.norms:
                norm = self.norms[i]
                weight, bias = (norm.weight.detach(), norm.bias.detach()) if detached else (norm.weight, norm.bias)
                x = F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
            x = F.relu(x, inplace=True)  # safe: neither Linear nor LayerNorm backward needs its output
        return run_linear(self.out, x, detached).squeeze(-1)


class CriticPair(nn.Module):
    """Two Q networks, each evaluated once on every (s, a) row: states (R, S) and actions (..., R, A)
    -> (2, ..., R). Stacking the actions of one state in one call beats one call per action group."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_hidden: int, layer_norm: bool,
                 n_critics: int = 2):
        super().__init__()
        self.critics = nn.ModuleList(
            QNetwork(obs_dim, act_dim, hidden_dim, n_hidden, layer_norm) for _ in range(n_critics)
        )

    def forward(self, states: torch.Tensor, actions: torch.Tensor, detached: bool = False) -> torch.Tensor:
        leading = actions.shape[:-1]
        x = torch.cat([states.expand(*leading, -1), actions], dim=-1).reshape(-1, states.shape[-1] + actions.shape[-1])
        return torch.stack([critic(x, detached) for critic in self.critics]).reshape(-1, *leading)


def cql_penalty(q_data: torch.Tensor, q_random: torch.Tensor, q_current: torch.Tensor, log_pi_current: torch.Tensor,
                q_next: torch.Tensor, log_pi_next: torch.Tensor, act_dim: int, temperature: float,
                importance_sample: bool) -> torch.Tensor:
    """CQL(H) per critic and state: temperature * logsumexp(Q_ood / temperature) - Q(s, a_data).

    q_data (C, B); q_random, q_current, q_next (C, N, B): Q at s of N uniform, current-policy
    (a ~ pi(s)) and next-policy (a ~ pi(s')) actions; log_pi_* (N, B). With importance sampling the
    log-densities are subtracted: log(0.5^A) for the uniform actions, log pi for the others."""
    if importance_sample:
        random_density = act_dim * math.log(0.5)
        ood = torch.cat([q_random - random_density, q_next - log_pi_next, q_current - log_pi_current], dim=1)
    else:
        ood = torch.cat([q_random, q_data.unsqueeze(1), q_next, q_current], dim=1)
    return temperature * torch.logsumexp(ood / temperature, dim=1) - q_data


class FamO2OConservativeQLearning:
    def __init__(self, config: TrainConfig, obs_dim: int, act_dim: int, device: torch.device):
        self.config, self.device, self.act_dim = config, device, act_dim
        self.discount, self.tau = config.discount, config.tau
        self.qf = CriticPair(obs_dim, act_dim, config.hidden_dim, config.q_n_hidden, config.q_layer_norm).to(device)
        self.q_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.actor = UniversalPolicy(obs_dim, act_dim, config.hidden_dim, config.actor_n_hidden).to(device)
        self.qf_optimizer = torch.optim.Adam(self.qf.parameters(), lr=config.qf_lr, fused=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=True)
        self.target_entropy = -float(act_dim)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), device=device, requires_grad=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=config.alpha_lr, fused=True)
        self.log_alpha_prime = torch.tensor(1.0, device=device, requires_grad=True)
        self.alpha_prime_optimizer = torch.optim.Adam([self.log_alpha_prime], lr=config.qf_lr, fused=True)
        self.cql_alpha = config.cql_alpha
        if config.famo2o_balance not in ("adaptive", "fixed", "random"):
            raise UserError(f"--famo2o_balance must be adaptive, fixed or random, not '{config.famo2o_balance}'.")
        if config.famo2o_target_beta_at not in ("s", "next"):
            raise UserError(f"--famo2o_target_beta_at must be s or next, not '{config.famo2o_target_beta_at}'.")
        if not config.famo2o_beta_min < config.famo2o_beta_max:
            raise UserError("--famo2o_beta_min must be smaller than --famo2o_beta_max.")
        self.balance_mode = config.famo2o_balance
        self.beta_min, self.beta_max = config.famo2o_beta_min, config.famo2o_beta_max
        # Lowest beta the balance mapping reaches (the official mapping's goes below beta_min).
        self.beta_low = 2 * self.beta_min - self.beta_max if config.famo2o_official_mapping else self.beta_min
        if config.famo2o_balance == "fixed" and not self.beta_low <= config.famo2o_fixed_beta <= self.beta_max:
            raise UserError(f"--famo2o_fixed_beta {config.famo2o_fixed_beta} is outside the beta range "
                            f"[{self.beta_low}, {self.beta_max}].")
        # pi_b: the same tanh-Gaussian class on s, one output (official HierarchicalPolicy).
        self.balance_model = TanhGaussianPolicy(obs_dim, 1, config.hidden_dim, config.actor_n_hidden).to(device)
        self.balance_optimizer = torch.optim.Adam(
            self.balance_model.parameters(), lr=config.famo2o_balance_lr, fused=True
        )
        # Random-mode acting draws from its own generator: evaluation must not move the training RNG.
        self.acting_generator = torch.Generator(device=device).manual_seed(config.seed)
        self.online = False
        self.total_updates = 0

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {"qf_optimizer": self.qf_optimizer, "actor_optimizer": self.actor_optimizer,
                "alpha_optimizer": self.alpha_optimizer, "alpha_prime_optimizer": self.alpha_prime_optimizer,
                "balance_optimizer": self.balance_optimizer}

    def learning_rates(self) -> List[Tuple[torch.optim.Optimizer, float]]:
        return [(self.qf_optimizer, self.config.qf_lr), (self.actor_optimizer, self.config.actor_lr),
                (self.alpha_optimizer, self.config.alpha_lr), (self.alpha_prime_optimizer, self.config.qf_lr),
                (self.balance_optimizer, self.config.famo2o_balance_lr)]

    def to_beta(self, u: torch.Tensor) -> torch.Tensor:
        """Balance mapping: u in (-1, 1) -> beta in (beta_min, beta_max) (official: (2 min - max, max))."""
        if self.config.famo2o_official_mapping:
            return u * (self.beta_max - self.beta_min) + self.beta_min
        return self.beta_min + (u + 1.0) / 2.0 * (self.beta_max - self.beta_min)

    def uniform_betas(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * torch.rand(n, device=self.device, generator=generator)

    def balance_betas(self, states: torch.Tensor) -> Tuple[torch.Tensor, torch.distributions.Normal]:
        """beta_b = map(u), u ~ pi_b(s) reparameterised (stochastic), and pi_b's pre-tanh distribution."""
        dist = self.balance_model(states)
        u, _ = tanh_sample(dist)
        return self.to_beta(u.squeeze(-1)), dist

    def acting_betas(self, states: torch.Tensor) -> torch.Tensor:
        """beta when acting: the balance model's deterministic choice (adaptive)."""
        if self.balance_mode == "fixed":
            return torch.full((states.shape[0],), self.config.famo2o_fixed_beta, device=self.device)
        if self.balance_mode == "random":
            return self.uniform_betas(states.shape[0], self.acting_generator)
        return self.to_beta(torch.tanh(self.balance_model(states).loc.squeeze(-1)))

    def update_betas(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """The betas of one update: `policy` for the actor and the penalty's current actions (uniform
        offline, beta_b online), `target` for a' in the TD target and the penalty's next actions
        (beta_b at s, as coded officially, or at s'), and `balance` (beta_b with its gradient)."""
        size = batch.states.shape[0]
        if self.balance_mode == "fixed":
            fixed = torch.full((size,), self.config.famo2o_fixed_beta, device=self.device)
            return {"policy": fixed, "target": fixed}
        if self.balance_mode == "random":
            return {"policy": self.uniform_betas(size), "target": self.uniform_betas(size)}
        at_next = self.config.famo2o_target_beta_at == "next"
        betas, dist = self.balance_betas(torch.cat([batch.states, batch.next_states]) if at_next else batch.states)
        balance = betas[:size]
        target = betas[size:] if at_next else balance
        policy = balance.detach() if self.online else self.uniform_betas(size)
        return {"policy": policy, "target": target.detach(), "balance": balance,
                "acting": self.to_beta(torch.tanh(dist.loc[:size].squeeze(-1))).detach()}

    def balance_loss(self, states: torch.Tensor, betas: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """-mean min Q(s, a~pi_u(s, beta_b)) with the current critics; pi_u and Q are read with
        detached weights, so the gradient reaches pi_b only. No entropy term (official CQL code)."""
        if "balance" not in betas:
            return torch.zeros((), device=self.device), {}
        actions, _ = tanh_sample(self.actor(states, betas["balance"], detached=True))
        loss = -self.qf(states, actions, detached=True).min(0).values.mean()
        acting = betas["acting"]
        return loss, {
            "famo2o/balance_loss": loss.detach(),
            "famo2o/beta_mean": acting.mean(),
            "famo2o/beta_std": acting.std(),
            "famo2o/beta_hist": torch.histc(acting, bins=10, min=self.beta_low, max=self.beta_max) / acting.shape[0],
        }

    def sample_penalty_actions(self, dist_s, dist_next) -> Dict[str, torch.Tensor]:
        """The penalty's N uniform, current-policy and next-policy actions and log-densities (no grad)."""
        n, batch = self.config.cql_n_actions, dist_s.loc.shape[0]
        with torch.no_grad():
            current, log_pi_current = tanh_sample(dist_s, (n,))
            following, log_pi_next = tanh_sample(dist_next, (n,))
        uniform = torch.rand(n, batch, self.act_dim, device=self.device) * 2 - 1
        return {"random": uniform, "current": current, "log_pi_current": log_pi_current,
                "next": following, "log_pi_next": log_pi_next}

    def td_targets(self, batch: Batch, dist_next: torch.distributions.Normal, alpha: torch.Tensor) -> torch.Tensor:
        """r + gamma * (1 - terminated) * min target-Q(s', a'), a' ~ pi(s') (max over N with max-backup)."""
        with torch.no_grad():
            samples = self.config.cql_n_actions if self.config.cql_max_target_backup else 1
            next_actions, next_log_pi = tanh_sample(dist_next, (samples,))
            next_q = self.q_target(batch.next_states, next_actions).min(0).values  # (samples, B)
            next_q, best = next_q.max(0)
            if self.config.backup_entropy:
                next_q = next_q - alpha * next_log_pi.gather(0, best.unsqueeze(0)).squeeze(0)
            return batch.rewards + self.discount * (1.0 - batch.dones) * next_q

    def critic_loss(self, batch: Batch, targets: torch.Tensor, penalty_actions: Dict[str, torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """(critic loss, Lagrange loss, metrics): TD MSE summed over the twins plus the CQL penalty."""
        n = self.config.cql_n_actions
        actions = torch.cat([batch.actions.unsqueeze(0), penalty_actions["random"], penalty_actions["current"],
                             penalty_actions["next"]])
        q_all = self.qf(batch.states, actions)  # (2, 1 + 3N, B): one batched call for everything at s
        q_data = q_all[:, 0]
        q_random, q_current, q_next = q_all[:, 1:].split(n, dim=1)
        td_loss = (q_data - targets).pow(2).mean(1).sum()
        penalty = cql_penalty(q_data, q_random, q_current, penalty_actions["log_pi_current"], q_next,
                              penalty_actions["log_pi_next"], self.act_dim, self.config.cql_temp,
                              self.config.cql_importance_sample)
        gap = penalty.clamp(self.config.cql_clip_diff_min, self.config.cql_clip_diff_max).mean(1)  # (2,)
        lagrange_loss = torch.zeros((), device=self.device)
        if self.config.cql_lagrange:
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            conservative_loss = (alpha_prime.detach() * self.cql_alpha * (gap - self.config.cql_target_action_gap)).sum()
            lagrange_loss = -0.5 * (alpha_prime * self.cql_alpha * (gap.detach() - self.config.cql_target_action_gap)).sum()
        else:
            conservative_loss = self.cql_alpha * gap.sum()
        metrics = {"train/td_loss": td_loss.detach(), "train/cql_gap": gap.detach().mean(),
                   "train/q_data_mean": q_data.detach().mean(), "train/q_random_mean": q_random.detach().mean()}
        if self.config.cql_lagrange:  # without it alpha' is unused: its constant e would read as the weight
            metrics["train/alpha_prime"] = alpha_prime.detach()
        return td_loss + conservative_loss, lagrange_loss, metrics

    def update(self, batch: Batch) -> Dict[str, torch.Tensor]:
        size = batch.states.shape[0]
        betas = self.update_betas(batch)
        dist_s, dist_next = split_distribution(
            self.actor(torch.cat([batch.states, batch.next_states]), torch.cat([betas["policy"], betas["target"]])), size
        )
        alpha = self.log_alpha.exp().detach() if self.config.auto_alpha else torch.tensor(self.config.init_alpha)

        # Actor: SAC loss with beta weighing Q, against the current critics read with detached weights.
        new_actions, log_pi = tanh_sample(dist_s)
        q_new = self.qf(batch.states, new_actions, detached=True).min(0).values
        actor_loss = (alpha * log_pi - betas["policy"] * q_new).mean()
        balance_loss, balance_metrics = self.balance_loss(batch.states, betas)
        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean()

        targets = self.td_targets(batch, dist_next, alpha)
        q_loss, lagrange_loss, metrics = self.critic_loss(batch, targets, self.sample_penalty_actions(dist_s, dist_next))

        # Every loss reaches only its own module, so one backward pass serves them all.
        total = actor_loss + q_loss + (alpha_loss if self.config.auto_alpha else 0.0) + lagrange_loss + balance_loss
        for optimizer in self.optimizers().values():
            optimizer.zero_grad(set_to_none=True)
        total.backward()
        for optimizer in self.optimizers().values():
            optimizer.step()
        soft_update(self.q_target, self.qf, self.tau)

        self.total_updates += 1
        return {
            "train/actor_loss": actor_loss.detach(),
            "train/q_loss": q_loss.detach(),
            "train/alpha": alpha,
            "train/log_pi": log_pi.detach().mean(),
            "famo2o/update_beta_mean": betas["policy"].mean(),
            **metrics,
            **balance_metrics,
        }

    @torch.no_grad()
    def act(self, state: np.ndarray, deterministic: bool, beta: Optional[float] = None) -> np.ndarray:
        """Action for one state; beta from the balance mode unless given (family evaluation)."""
        states = torch.as_tensor(state, device=self.device).unsqueeze(0)
        betas = self.acting_betas(states) if beta is None else torch.full((1,), beta, device=self.device)
        dist = self.actor(states, betas)
        action = torch.tanh(dist.loc) if deterministic else torch.tanh(dist.sample())
        return action[0].cpu().numpy()

    def state_dict(self) -> Dict[str, Any]:
        return {
            "qf": self.qf.state_dict(),
            "q_target": self.q_target.state_dict(),
            "actor": self.actor.state_dict(),
            "balance_model": self.balance_model.state_dict(),
            "acting_generator": self.acting_generator.get_state(),
            **{name: optimizer.state_dict() for name, optimizer in self.optimizers().items()},
            "log_alpha": self.log_alpha.detach().clone(),
            "log_alpha_prime": self.log_alpha_prime.detach().clone(),
            "cql_alpha": self.cql_alpha,
            "online": self.online,
            "total_updates": self.total_updates,
        }

    def load_state_dict(self, state: Dict[str, Any], fresh_schedule: bool = False) -> None:
        """fresh_schedule: fine-tuning a loaded model, so this run's learning rates apply; otherwise
        (resuming) the checkpoint's. Temperatures are restored in place: their optimizers hold them."""
        for key in ("qf", "q_target", "actor", "balance_model", *self.optimizers()):
            getattr(self, key).load_state_dict(state[key])
        self.acting_generator.set_state(state["acting_generator"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
            self.log_alpha_prime.copy_(state["log_alpha_prime"])
        self.cql_alpha, self.online, self.total_updates = state["cql_alpha"], state["online"], state["total_updates"]
        if fresh_schedule:
            for optimizer, lr in self.learning_rates():
                for group in optimizer.param_groups:
                    group["lr"] = lr


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

    agent = FamO2OConservativeQLearning(config, obs_dim, act_dim, device)
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
            # Online transitions join the offline data in one buffer; the penalty weight changes.
            agent.cql_alpha = config.cql_alpha_online
            # FamO2O: the universal policy's beta now comes from the balance model (adaptive mode).
            scores["offline"] = scores["last"] if scores["last"] is not None else evaluate_and_log(t)
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
