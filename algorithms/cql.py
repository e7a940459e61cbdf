"""CQL: Conservative Q-Learning (CQL(H) on SAC), offline pre-training then online fine-tuning.

SAC with twin critics and an automatic entropy temperature, plus a conservative penalty that pushes
Q down on actions the policy might pick (a log-sum-exp over uniform, current-policy and
next-policy actions, importance-sampled) and up on dataset actions. Online, environment
transitions join the offline data in one buffer; the penalty weight can change at the switch.

Paper: Kumar, Zhou, Tucker, Levine, "Conservative Q-Learning for Offline Reinforcement Learning",
NeurIPS 2020, arXiv 2006.04779. Reference code: github.com/young-geng/JaxCQL and CORL
`algorithms/finetune/cql.py` (the semantics followed here).

Run:
    python algorithms/cql.py --env o2o/hopper/random-v0
    python algorithms/cql.py --config_path configs/cql/hopper_famo2o_protocol.yaml

Network and loss defaults are the official CQL+FamO2O locomotion settings (shared/specs/FAMO2O.md
section 3: Q with LayerNorm, 2x256 networks, CQL weight 1.0, learning rates 3e-4, no state or
reward normalisation), so that `cql.py` and `cql_famo2o.py` differ by FamO2O alone; the official
step counts and evaluation schedule (2M offline updates, 5 episodes every 5k) are in
configs/cql/*_famo2o_protocol.yaml. CORL's AntMaze and Adroit settings are flags (`--q_n_hidden 5
--cql_lagrange true --reward_scale 10 --reward_bias -5 ...`).

Deviations from CORL's finetune/cql.py, each with its reason:
1. Data comes from Minari and environments from gymnasium (`-v5`); only `terminations` mask the
   bootstrap.
2. Speed without changing the math: the policy runs once on [s; s'] and every sample (the actor's,
   the N current- and next-policy actions of the penalty, the TD target's) is drawn from those two
   distributions; each critic evaluates the data, uniform, current and next actions in one call;
   all losses are summed into one backward pass, with the critics' parameters detached where
   the actor reads Q, so each loss still reaches only its own module (CORL steps the modules one
   after the other, but from losses computed with the same pre-step parameters, which is the same).
3. Checkpoints keep the temperatures as tensors held by their optimizers and restore them in place
   (CORL replaces the log-alpha modules on load and the temperatures stop learning); learning rates
   are floats; no `bc_steps` phase.
4. Evaluation runs in a separate environment, episodes seeded `eval_seed + i`; metrics are logged
   every `log_every` updates.
5. Actions are handled in [-1, 1] (dataset actions divided by the action bound and clipped to
   +-(1 - 1e-5)); the online buffer keeps all offline data and replaces online data first-in first-out
   (CORL's and the official FIFO overwrite offline data once full).
6. The critic loss is the sum of the two critics' MSEs plus their penalties, as CORL.
7. Initialisation: orthogonal (gain sqrt 2) hidden layers and a last layer with gain 1e-2, for
   actor and critics alike (official FamO2O: flax's lecun-normal hidden layers and a 1e-2 variance-
   scaling last layer; CORL: PyTorch defaults and xavier(1e-2) last layers).
8. Online, one environment step then one update (UTD 1), as CORL; the official FamO2O code
   collects 1000 steps and then takes 1000 updates, the same ratio in chunks (FAMO2O.md 3.4).
9. `--normalize_reward` on AntMaze is r - 1 before `reward_scale` and `reward_bias` apply, so
   CORL's AntMaze rewards (r * 10 - 5) are `--normalize_reward false --reward_scale 10
   --reward_bias -5`.
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
    group: str = "cql"
    # Run name (also the run directory); empty = <algorithm>-<env>-s<seed>-<time>
    name: str = ""
    # wandb mode: offline (no account or network needed), online or disabled
    wandb_mode: str = "offline"


ALGORITHM = "cql"


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


class ConservativeQLearning:
    def __init__(self, config: TrainConfig, obs_dim: int, act_dim: int, device: torch.device):
        self.config, self.device, self.act_dim = config, device, act_dim
        self.discount, self.tau = config.discount, config.tau
        self.qf = CriticPair(obs_dim, act_dim, config.hidden_dim, config.q_n_hidden, config.q_layer_norm).to(device)
        self.q_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.actor = TanhGaussianPolicy(obs_dim, act_dim, config.hidden_dim, config.actor_n_hidden).to(device)
        self.qf_optimizer = torch.optim.Adam(self.qf.parameters(), lr=config.qf_lr, fused=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=True)
        self.target_entropy = -float(act_dim)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), device=device, requires_grad=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=config.alpha_lr, fused=True)
        self.log_alpha_prime = torch.tensor(1.0, device=device, requires_grad=True)
        self.alpha_prime_optimizer = torch.optim.Adam([self.log_alpha_prime], lr=config.qf_lr, fused=True)
        self.cql_alpha = config.cql_alpha
        self.online = False
        self.total_updates = 0

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {"qf_optimizer": self.qf_optimizer, "actor_optimizer": self.actor_optimizer,
                "alpha_optimizer": self.alpha_optimizer, "alpha_prime_optimizer": self.alpha_prime_optimizer}

    def learning_rates(self) -> List[Tuple[torch.optim.Optimizer, float]]:
        return [(self.qf_optimizer, self.config.qf_lr), (self.actor_optimizer, self.config.actor_lr),
                (self.alpha_optimizer, self.config.alpha_lr), (self.alpha_prime_optimizer, self.config.qf_lr)]

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
        dist_s, dist_next = split_distribution(self.actor(torch.cat([batch.states, batch.next_states])), size)
        alpha = self.log_alpha.exp().detach() if self.config.auto_alpha else torch.tensor(self.config.init_alpha)

        # Actor: SAC loss against the current critics, read with detached weights.
        new_actions, log_pi = tanh_sample(dist_s)
        q_new = self.qf(batch.states, new_actions, detached=True).min(0).values
        actor_loss = (alpha * log_pi - q_new).mean()
        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean()

        targets = self.td_targets(batch, dist_next, alpha)
        q_loss, lagrange_loss, metrics = self.critic_loss(batch, targets, self.sample_penalty_actions(dist_s, dist_next))

        # Every loss reaches only its own module, so one backward pass serves them all.
        total = actor_loss + q_loss + (alpha_loss if self.config.auto_alpha else 0.0) + lagrange_loss
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
            **metrics,
        }

    @torch.no_grad()
    def act(self, state: np.ndarray, deterministic: bool) -> np.ndarray:
        dist = self.actor(torch.as_tensor(state, device=self.device).unsqueeze(0))
        action = torch.tanh(dist.loc) if deterministic else torch.tanh(dist.sample())
        return action[0].cpu().numpy()

    def state_dict(self) -> Dict[str, Any]:
        return {
            "qf": self.qf.state_dict(),
            "q_target": self.q_target.state_dict(),
            "actor": self.actor.state_dict(),
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
        for key in ("qf", "q_target", "actor", *self.optimizers()):
            getattr(self, key).load_state_dict(state[key])
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

    agent = ConservativeQLearning(config, obs_dim, act_dim, device)
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

    progress = tqdm(total=total, initial=start, desc="offline" if start < config.offline_iterations else "online",
                    unit="it", dynamic_ncols=True)
    last_log_time, last_log_iteration = time.time(), start
    for t in range(start, total):
        if t == config.offline_iterations and not agent.online:
            # ---- offline-to-online switch: every phase change happens here ----
            # Online transitions join the offline data in one buffer; the penalty weight changes.
            agent.cql_alpha = config.cql_alpha_online
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
