"""AWAC: Advantage-Weighted Actor-Critic, offline pre-training then online fine-tuning (one file).

Twin critics learn Q^pi with a SARSA-style target r + gamma * min Q'(s', a' ~ pi(s')); the actor is
weighted maximum likelihood of buffer actions with weights exp(A / lambda) clipped at 100, where
A = min Q(s, a) - min Q(s, a~pi(s)). The same update runs offline and online; online, environment
transitions join the offline data in one buffer.

Paper: Nair, Gupta, Dalal, Levine, "AWAC: Accelerating Online Reinforcement Learning with Offline
Datasets", arXiv 2006.09359. Reference code: CORL `algorithms/finetune/awac.py` (the semantics
followed here).

Run:
    python algorithms/awac.py --env o2o/hopper/random-v0

Deviations from CORL's finetune/awac.py, each with its reason:
1. One config vocabulary with the other files: `awac_lambda`, `discount`, `eval_freq`,
   `eval_episodes`, `env` (CORL's AWAC uses `gamma`, `eval_frequency`, `n_test_episodes`,
   `env_name`); defaults for locomotion (lambda 1/3, CORL's hopper-medium-replay config).
2. The policy's samples are clipped to [-1, 1] where they are used (V(s) and the TD target's next
   action); no log-probability is computed for a clipped sample (CORL scores the log-probability of
   the clamped sample, a quantity that has no density meaning at the bounds and is unused anyway).
3. Data comes from Minari and environments from gymnasium (`-v5`); only `terminations` mask the
   bootstrap; rewards are rescaled by max_episode_steps / (return range) (AntMaze: r - 1) with the
   same constants offline and online; states are standardised with the dataset's statistics.
4. Both critics are evaluated in one batched call (weights stacked); critics and actor use
   orthogonal initialisation (CORL: PyTorch's default);
   checkpoints hold optimizers and counters (CORL's AWAC saves networks only), resume and
   `--load_model` work as in every file here.
5. Evaluation runs in a separate environment, episodes seeded `eval_seed + i`; metrics are logged
   every `log_every` updates; the online buffer keeps all offline data (FIFO for online data).
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
    # Rescale rewards by max_episode_steps / (max return - min return) of the dataset (AntMaze: r - 1)
    normalize_reward: bool = True
    # Actor (policy) learning rate
    actor_lr: float = 3e-4
    # Critic (Q) learning rate
    qf_lr: float = 3e-4
    # Width of every hidden layer
    hidden_dim: int = 256
    # Hidden layers per network
    n_hidden: int = 3
    # Temperature lambda of the advantage weights exp(A / lambda) (CORL AntMaze/Adroit: 0.1)
    awac_lambda: float = 0.3333
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
    group: str = "awac"
    # Run name (also the run directory); empty = <algorithm>-<env>-s<seed>-<time>
    name: str = ""
    # wandb mode: offline (no account or network needed), online or disabled
    wandb_mode: str = "offline"


ALGORITHM = "awac"


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


class GaussianPolicy(nn.Module):
    """Normal(mean(s), exp(log_std)) with a state-independent log-std in [-20, 2] (CORL's AWAC actor);
    samples are clipped to [-1, 1] where they become actions."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden_dim, n_hidden)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, states: torch.Tensor) -> torch.distributions.Normal:
        # validate_args=False: argument checks would sync with the device on every update.
        return torch.distributions.Normal(self.net(states), self.log_std.clamp(-20.0, 2.0).exp(), validate_args=False)


def awac_weights(advantages: torch.Tensor, awac_lambda: float) -> torch.Tensor:
    return torch.exp(advantages / awac_lambda).clamp(max=100.0)


def make_adam(module: nn.Module, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(module.parameters(), lr=lr, fused=True)


class AdvantageWeightedActorCritic:
    def __init__(self, config: TrainConfig, obs_dim: int, act_dim: int, device: torch.device):
        self.config, self.device = config, device
        self.discount, self.tau = config.discount, config.tau
        self.qf = TwinQ(obs_dim, act_dim, config.hidden_dim, config.n_hidden).to(device)
        self.q_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.actor = GaussianPolicy(obs_dim, act_dim, config.hidden_dim, config.n_hidden).to(device)
        self.qf_optimizer = make_adam(self.qf, config.qf_lr)
        self.actor_optimizer = make_adam(self.actor, config.actor_lr)
        self.online = False
        self.total_updates = 0

    def learning_rates(self) -> List[Tuple[torch.optim.Optimizer, float]]:
        return [(self.qf_optimizer, self.config.qf_lr), (self.actor_optimizer, self.config.actor_lr)]

    def policy_actions(self, states: torch.Tensor) -> torch.Tensor:
        """a ~ pi(s), clipped to the action bounds (no gradient)."""
        with torch.no_grad():
            return self.actor(states).sample().clamp(-1.0, 1.0)

    def td_targets(self, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """r + gamma * (1 - terminated) * min target-Q(s', a'), a' ~ pi(s')."""
        with torch.no_grad():
            next_q = self.q_target(batch.next_states, self.policy_actions(batch.next_states)).min(0).values
            return batch.rewards + self.discount * (1.0 - batch.dones) * next_q, {}

    def update(self, batch: Batch) -> Dict[str, torch.Tensor]:
        states, actions = batch.states, batch.actions
        targets, target_metrics = self.td_targets(batch)
        q_values = self.qf(states, actions)
        q_loss = (q_values - targets).pow(2).mean(1).sum()
        self.qf_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        self.qf_optimizer.step()

        # Actor: advantage-weighted regression with the just-updated critics (CORL's order).
        with torch.no_grad():
            both = self.qf(torch.cat([states, states]), torch.cat([actions, self.policy_actions(states)]))
            q_data, values = both.min(0).values.chunk(2)
            advantages = q_data - values
            weights = awac_weights(advantages, self.config.awac_lambda)
        log_probs = self.actor(states).log_prob(actions).sum(-1)
        actor_loss = -(weights * log_probs).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        soft_update(self.q_target, self.qf, self.tau)

        self.total_updates += 1
        return {
            "train/q_loss": q_loss.detach(),
            "train/actor_loss": actor_loss.detach(),
            "train/q_mean": q_values.detach().mean(),
            "train/advantage_mean": advantages.mean(),
            "train/weight_mean": weights.mean(),
            **target_metrics,
        }

    @torch.no_grad()
    def act(self, state: np.ndarray, deterministic: bool) -> np.ndarray:
        dist = self.actor(torch.as_tensor(state, device=self.device).unsqueeze(0))
        action = dist.mean if deterministic else dist.sample()
        return action.clamp(-1.0, 1.0)[0].cpu().numpy()

    def state_dict(self) -> Dict[str, Any]:
        return {
            "qf": self.qf.state_dict(),
            "q_target": self.q_target.state_dict(),
            "actor": self.actor.state_dict(),
            "qf_optimizer": self.qf_optimizer.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "online": self.online,
            "total_updates": self.total_updates,
        }

    def load_state_dict(self, state: Dict[str, Any], fresh_schedule: bool = False) -> None:
        """fresh_schedule: fine-tuning a loaded model, so this run's learning rates apply."""
        for key in ("qf", "q_target", "actor", "qf_optimizer", "actor_optimizer"):
            getattr(self, key).load_state_dict(state[key])
        self.online, self.total_updates = state["online"], state["total_updates"]
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

    agent = AdvantageWeightedActorCritic(config, obs_dim, act_dim, device)
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
            # AWAC changes nothing but the data: online transitions join the offline data in one buffer.
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
