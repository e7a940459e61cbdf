"""CQL + SAMG: online fine-tuning on 100% online data, guided by a frozen offline critic.

SAMG keeps a frozen copy Q_off of the offline critics and mixes it into the online Bellman target
with a per-(s, a) coefficient p from a conditional VAE trained on the offline data:
y = r + gamma * (1 - d) * [(1 - p) * Qt(s', a') + p * Q_off(s', a')], one shared a' ~ pi(s')
(with the max-target backup, the mix is formed per sampled a' before the max). The conservative
penalty stays on online batches. The online buffer starts empty.

Paper: Zhang et al., "SAMG: Offline-to-Online Reinforcement Learning via State-Action-Conditional
Offline Model Guidance", arXiv 2410.18626. No official code exists: the specification followed is
shared/specs/SAMG.md (sections 1 and 2.2). `diff algorithms/cql.py algorithms/cql_samg.py` shows
SAMG and nothing else.

Run:
    python algorithms/cql_samg.py --env o2o/hopper/random-v0
    python algorithms/cql_samg.py --env o2o/hopper/random-v0 --samg_mode zero   # online-only CQL

Ablations from `--samg_mode`: vae (SAMG), zero (p = 0: CQL on 100% online data), even (p = 1/2),
random (p ~ U(0, 1) per sample).

Choices the paper leaves open (SAMG.md marks them [OURS] or TODO(pdf); each is a config field
with the spec's default, and each is a deviation risk):
1. p_raw is the ELBO percentile against held-out offline pairs (`samg_coef elbo_percentile`):
   encoder-only formulas, the literal reading of the reviews, collapse to p ~ 1 for every input with
   a standard C-VAE (SAMG.md 1.4); they remain as `encoder_tail`, `encoder_gauss`, `encoder_post`.
2. C-VAE: BCQ defaults (750x2, latent 2 * act_dim, KL weight 0.5, Adam 1e-3), one step per offline
   update for `samg_vae_iterations` steps on its own batches. Its loss sums the squared error over
   action dimensions and the KL over latent dimensions (SAMG.md's formula; BCQ averages each, which
   weighs the KL differently). The reference is a held-out split (`samg_reference_size`, at most 10%
   of the data, fixed by the dataset, not by --seed) scored at the switch and stored in checkpoints;
   a fine-tuning run refuses a checkpoint from after the switch, one whose C-VAE never trained, and
   a reference larger than the pretraining run's. p is scored once per stored online transition
   (it depends on nothing else) and read by buffer row in the updates. The offline (s, a) pairs stay
   in memory during the online phase (SAMG.md 1.2 discards the dataset; only the reference is used).
3. p is evaluated at the sample's (s, a) (`samg_coef_at sa`; `next` evaluates it at each (s', a'));
   p_m = 0.2; Q_off is the offline critic (not its target), aggregated by min over twins like Qt.
4. The penalty: `samg_cql_penalty base` keeps CQL's penalty unchanged (default); `one_minus_p`
   weighs each sample's penalty by 1 - p(s, a), the regulariser applied to (1 - p) Q + p Q_off.
   The paper's "offline version weighted by p" is not specified further (SAMG.md 2.2). With
   `samg_coef_at next` the weight is 1 - p(s', a') at the backed-up a'; with `cql_lagrange` the
   multiplier is tuned on the weighted gap, so it partly undoes the weighting.
5. Static coefficient by default; `samg_adaptive` enables the reconstruction of section 1.6 (see
   awac_samg.py's docstring: frozen snapshots of the mastered C-VAE join p_raw's max).
6. Updates start once the online buffer holds `samg_learning_starts` transitions; optimizer states
   and the temperatures carry over at the switch; reward and state constants stay the offline ones.
7. Defaults are cql.py's (the official CQL+FamO2O locomotion settings: Q and actor 2x256 with
   LayerNorm Q, learning rates 3e-4, CQL weight 1.0, no max-target backup), not SAMG.md section 3's
   CORL settings (actor 256x3, Q 256x3 without LayerNorm, policy lr 1e-4 when fine-tuning and 3e-5
   offline on locomotion, weight 10 offline on locomotion, max-target backup), so that the diff
   against cql.py shows SAMG only; those are `--actor_n_hidden 3 --q_n_hidden 3 --q_layer_norm
   false --actor_lr 1e-4 --cql_alpha 10 --cql_max_target_backup true` (the 3e-5 offline policy lr
   has no flag of its own: pretrain with `--actor_lr 3e-5`, fine-tune with `--actor_lr 1e-4`).
Everything else is algorithms/cql.py, with its own list of deviations from CORL.
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
    # Replay capacity: offline, all offline data; online (SAMG), a first-in first-out window of online data only
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
    # Coefficient mode: vae (SAMG), zero (p = 0), even (p = 1/2), random (p ~ U(0, 1) per sample)
    samg_mode: str = "vae"
    # p_raw from the C-VAE: elbo_percentile, or encoder_tail / encoder_gauss / encoder_post (ablations)
    samg_coef: str = "elbo_percentile"
    # Threshold p_m: p = 0 where p_raw < p_m (Eq. 5)
    samg_p_m: float = 0.2
    # Where p is evaluated: sa (the sample's (s, a)) or next ((s', a'))
    samg_coef_at: str = "sa"
    # Online transitions collected before online updates start (the buffer starts empty)
    samg_learning_starts: int = 256
    # C-VAE updates during the offline phase
    samg_vae_iterations: int = 1000000
    # C-VAE learning rate
    samg_vae_lr: float = 1e-3
    # C-VAE hidden width (two layers in the encoder and in the decoder)
    samg_vae_hidden: int = 750
    # Weight of the KL term in the C-VAE loss and in its ELBO
    samg_vae_kl_weight: float = 0.5
    # Held-out offline pairs whose ELBOs are the percentile reference (at most a tenth of the data)
    samg_reference_size: int = 10000
    # Adaptive coefficient rounds (SAMG.md 1.6); off = static SAMG
    samg_adaptive: bool = False
    # Online steps between adaptive rounds
    samg_adapt_every: int = 50000
    # TD-error quantile of in-distribution pairs under which OOD pairs count as mastered
    samg_adapt_quantile: float = 0.25
    # C-VAE updates on the mastered set per adaptive round
    samg_adapt_vae_iterations: int = 10000
    # Replace Q_off by a frozen copy of the current critic at each adaptive round
    samg_refresh_offline_critic: bool = False
    # CQL penalty online: base (unchanged) or one_minus_p (each sample's penalty times 1 - p)
    samg_cql_penalty: str = "base"
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
    group: str = "cql_samg"
    # Run name (also the run directory); empty = <algorithm>-<env>-s<seed>-<time>
    name: str = ""
    # wandb mode: offline (no account or network needed), online or disabled
    wandb_mode: str = "offline"


ALGORITHM = "cql_samg"


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


# === shared: samg ===
class ConditionalVAE(nn.Module):
    """BCQ-style conditional VAE of the offline (s, a) pairs: encoder (s, a) -> N(mu, sigma^2) over a
    latent of 2 * act_dim, decoder (s, z) -> a in [-1, 1]; two hidden layers each."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        latent = 2 * act_dim
        self.encoder = nn.Sequential(nn.Linear(obs_dim + act_dim, hidden_dim), nn.ReLU(),
                                     nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(obs_dim + latent, hidden_dim), nn.ReLU(),
                                     nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, act_dim))

    def encode(self, states: torch.Tensor, actions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.encoder(torch.cat([states, actions], dim=-1)).chunk(2, dim=-1)
        return mean, log_std.clamp(-4.0, 15.0).exp()

    def decode(self, states: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(torch.cat([states, latents], dim=-1)))

    def negative_elbo(self, states: torch.Tensor, actions: torch.Tensor, kl_weight: float,
                      sample: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair: ||Dec(s, z) - a||^2 + kl_weight * KL(N(mu, sigma^2) || N(0, I)), with z sampled
        (training) or z = mu (scoring, deterministic); also returns (mu, sigma)."""
        mean, std = self.encode(states, actions)
        latents = mean + std * torch.randn_like(std) if sample else mean
        reconstruction = (self.decode(states, latents) - actions).pow(2).sum(-1)
        kl = (0.5 * (mean.pow(2) + std.pow(2) - 1.0) - std.log()).sum(-1)
        return reconstruction + kl_weight * kl, mean, std


SAMG_MODES = ("vae", "zero", "even", "random")
SAMG_COEFFICIENTS = ("elbo_percentile", "encoder_tail", "encoder_gauss", "encoder_post")


class SAMGCoefficient:
    """p(s, a), the weight of the frozen offline critic in the online target (SAMG.md section 1.4).

    vae mode: p_raw from the C-VAE, by default the ELBO percentile against held-out offline pairs
    (1 - the fraction of those pairs the C-VAE finds at least as likely), then p = p_raw where
    p_raw >= p_m and 0 elsewhere (Eq. 5). Ablations: zero (p = 0), even (p = 1/2), random (p ~ U(0, 1)).
    Always computed without gradient; shapes (B,)."""

    def __init__(self, vae: ConditionalVAE, config: Any, device: torch.device):
        if config.samg_mode not in SAMG_MODES:
            raise UserError(f"--samg_mode must be one of {', '.join(SAMG_MODES)}, not '{config.samg_mode}'.")
        if config.samg_coef not in SAMG_COEFFICIENTS:
            raise UserError(f"--samg_coef must be one of {', '.join(SAMG_COEFFICIENTS)}, not '{config.samg_coef}'.")
        if config.samg_coef_at not in ("sa", "next"):
            raise UserError(f"--samg_coef_at must be sa or next, not '{config.samg_coef_at}'.")
        if config.samg_adaptive and config.samg_mode == "vae" and config.samg_coef != "elbo_percentile":
            raise UserError("--samg_adaptive takes the max of ELBO percentiles (SAMG.md section 1.6); "
                            f"it needs --samg_coef elbo_percentile, not '{config.samg_coef}'.")
        self.vae, self.config, self.device = vae, config, device
        self.reference: Optional[torch.Tensor] = None  # sorted negative ELBOs of held-out offline pairs
        # Adaptive rounds (section 1.6): one frozen (C-VAE, sorted negative ELBOs) snapshot of the
        # mastered set per round; p_raw is the max over the offline percentile and every snapshot's,
        # so it never decreases at a round (a single retrained C-VAE could lower it).
        self.mastered: List[Tuple[ConditionalVAE, torch.Tensor]] = []

    @torch.no_grad()
    def scores(self, vae: ConditionalVAE, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        chunks = [vae.negative_elbo(s, a, self.config.samg_vae_kl_weight, sample=False)[0]
                  for s, a in zip(states.split(65536), actions.split(65536))]
        return torch.cat(chunks)

    @torch.no_grad()
    def set_reference(self, states: torch.Tensor, actions: torch.Tensor) -> None:
        self.reference = self.scores(self.vae, states, actions).sort().values

    @staticmethod
    def percentile(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Fraction of reference pairs that are less likely (larger negative ELBO) than each score."""
        return 1.0 - torch.searchsorted(reference, scores.contiguous(), right=True).float() / reference.numel()

    @torch.no_grad()
    def raw(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if self.config.samg_coef == "elbo_percentile":
            p_raw = self.percentile(self.scores(self.vae, states, actions), self.reference)
            for vae, reference in self.mastered:  # union of supports: never forgets the offline data
                p_raw = torch.maximum(p_raw, self.percentile(self.scores(vae, states, actions), reference))
            return p_raw
        mean, std = self.vae.encode(states, actions)
        if self.config.samg_coef == "encoder_tail":  # mean_i 2 Phi(-|mu_i|)
            return torch.erfc(mean.abs() / math.sqrt(2.0)).mean(-1)
        if self.config.samg_coef == "encoder_gauss":  # mean_i exp(-mu_i^2 / 2)
            return torch.exp(-0.5 * mean.pow(2)).mean(-1)
        return torch.erfc(mean.abs() / torch.sqrt(1.0 + std.pow(2)) / math.sqrt(2.0)).mean(-1)  # encoder_post

    @torch.no_grad()
    def __call__(self, states: torch.Tensor, actions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(p, p_raw), each (B,)."""
        mode = self.config.samg_mode
        if mode == "vae":
            p_raw = self.raw(states, actions)
            return self.threshold(p_raw), p_raw
        size = states.shape[0]
        if mode == "zero":
            p = torch.zeros(size, device=self.device)
        elif mode == "even":
            p = torch.full((size,), 0.5, device=self.device)
        else:
            p = torch.rand(size, device=self.device)
        return p, p

    def threshold(self, p_raw: torch.Tensor) -> torch.Tensor:
        """Eq. 5: p = p_raw where p_raw >= p_m, else 0."""
        return torch.where(p_raw >= self.config.samg_p_m, p_raw, torch.zeros_like(p_raw))

    def state_dict(self) -> Dict[str, Any]:
        return {"reference": self.reference,
                "mastered": [(vae.state_dict(), reference) for vae, reference in self.mastered]}

    def load_state_dict(self, state: Dict[str, Any], obs_dim: int, act_dim: int) -> None:
        self.reference = None if state["reference"] is None else state["reference"].to(self.device)
        self.mastered = []
        for vae_state, reference in state["mastered"]:
            vae = ConditionalVAE(obs_dim, act_dim, self.config.samg_vae_hidden).to(self.device)
            vae.load_state_dict(vae_state)
            self.mastered.append((freeze(vae), reference.to(self.device)))


def freeze(module: nn.Module) -> nn.Module:
    """A frozen copy: no gradient, in no optimizer, never soft-updated."""
    return copy.deepcopy(module).requires_grad_(False).eval()


def mix_targets(online: torch.Tensor, offline: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(1 - p) * Qt(s', a') + p * Qo(s', a'): SAMG's bootstrap value, affine in p."""
    return (1.0 - p) * online + p * offline


class SAMGGuide:
    """Everything SAMG adds to a base agent: the C-VAE and its coefficient p, the frozen offline
    critic Q_off, and the adaptive rounds' mastered set."""

    def __init__(self, config: Any, obs_dim: int, act_dim: int, device: torch.device):
        self.config, self.obs_dim, self.act_dim, self.device = config, obs_dim, act_dim, device
        self.vae = ConditionalVAE(obs_dim, act_dim, config.samg_vae_hidden).to(device)
        self.vae_optimizer = torch.optim.Adam(self.vae.parameters(), lr=config.samg_vae_lr, fused=True)
        self.coefficient = SAMGCoefficient(self.vae, config, device)
        self.q_offline: Optional[nn.Module] = None  # frozen at the switch
        self.vae_updates = 0  # C-VAE steps on the offline pairs (0: it never learnt them)
        self.vae_held_out = 0  # held-out offline pairs of the run that trained the C-VAE
        self.mastered_states: Optional[torch.Tensor] = None
        self.mastered_actions: Optional[torch.Tensor] = None
        self.mastered_vae: Optional[ConditionalVAE] = None  # trained at each round, warm-started
        self.mastered_optimizer: Optional[torch.optim.Optimizer] = None
        # With samg_coef_at = sa, p at a stored (s, a) is fixed while the C-VAE, its reference and the
        # mastered snapshots are, so each online transition is scored once (when first needed) and
        # updates read p by buffer row: the same p without a C-VAE pass per update. Raised to the new
        # snapshot's percentile at each adaptive round; rescored after loading a checkpoint.
        self.scored_buffer: Optional[ReplayBuffer] = None
        self.row_p = self.row_p_raw = torch.zeros(0, device=device)
        self.rows_scored = 0  # online transitions ever added whose p is in row_p

    def update_vae(self, states: torch.Tensor, actions: torch.Tensor, mastered: bool = False) -> Dict[str, torch.Tensor]:
        """One C-VAE step on (s, a) pairs: mean over pairs of the sampled negative ELBO."""
        vae = self.mastered_vae if mastered else self.vae
        optimizer = self.mastered_optimizer if mastered else self.vae_optimizer
        loss = vae.negative_elbo(states, actions, self.config.samg_vae_kl_weight, sample=True)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.vae_updates += 0 if mastered else 1
        return {"samg/vae_loss": loss.detach()}

    def check_pretrained(self, online: bool, path: str, pairs: "OfflinePairs") -> None:
        """A model to fine-tune must come from before the switch, with a trained C-VAE in vae mode,
        and this run's reference pairs must be ones that C-VAE never trained on."""
        if online:
            raise UserError(f"{path} was saved after the offline-to-online switch, so its critic is no longer the "
                            "offline one SAMG freezes as Q_off; fine-tune from the offline phase's checkpoint "
                            "(offline.pt in the pretraining run's directory).")
        if self.config.samg_mode == "vae" and self.vae_updates == 0:
            raise UserError(f"The C-VAE in {path} was never trained (pretrained with --samg_mode other than vae or "
                            "--samg_vae_iterations 0), so --samg_mode vae has no coefficient to use; pretrain "
                            "with --samg_mode vae.")
        if self.config.samg_mode == "vae" and pairs.held_out > self.vae_held_out:
            raise UserError(f"--samg_reference_size gives {pairs.held_out} held-out reference pairs, but the C-VAE in "
                            f"{path} was trained with only {self.vae_held_out} held out: the others were its training "
                            f"data. Use --samg_reference_size {self.vae_held_out} or less.")

    def start_online(self, critic: nn.Module, pairs: "OfflinePairs") -> None:
        """The switch: freeze Q_off; score the held-out offline pairs as the percentile reference."""
        self.q_offline = freeze(critic)
        if self.config.samg_mode == "vae":
            self.vae.eval()
            self.coefficient.set_reference(pairs.reference_states, pairs.reference_actions)
            self.rows_scored = 0

    def track(self, buffer: ReplayBuffer) -> None:
        """Cache p by row for the online buffer's batches (vae mode with samg_coef_at = sa only:
        the ablations' p is a constant or fresh noise, and p at (s', a') depends on the policy)."""
        if self.config.samg_mode == "vae" and self.config.samg_coef_at == "sa":
            self.scored_buffer, self.rows_scored = buffer, 0
            self.row_p = torch.zeros(buffer.capacity, device=self.device)
            self.row_p_raw = torch.zeros(buffer.capacity, device=self.device)

    def stored_slots(self, first: int, end: int) -> torch.Tensor:
        """Buffer rows of the online transitions first..end-1 still stored (older ones were overwritten)."""
        buffer = self.scored_buffer
        window = buffer.capacity - buffer.n_offline
        first = max(first, buffer.online_added - window)
        return buffer.n_offline + torch.arange(first, max(first, end), device=self.device) % window

    def score_new_rows(self) -> None:
        buffer = self.scored_buffer
        slots = self.stored_slots(self.rows_scored, buffer.online_added)
        if slots.numel():
            states, actions, _, _, _ = torch.split(buffer.rows[slots], buffer.split, dim=1)
            self.row_p[slots], self.row_p_raw[slots] = self.coefficient(states, actions)
        self.rows_scored = buffer.online_added

    def raise_scored_rows(self, vae: ConditionalVAE, reference: torch.Tensor) -> None:
        """A new mastered snapshot: p_raw = max(p_raw, its percentile) on the rows already scored."""
        if self.scored_buffer is None:
            return
        slots = self.stored_slots(0, self.rows_scored)
        if slots.numel():
            states, actions, _, _, _ = torch.split(self.scored_buffer.rows[slots], self.scored_buffer.split, dim=1)
            coefficient = self.coefficient
            p_raw = torch.maximum(self.row_p_raw[slots],
                                  coefficient.percentile(coefficient.scores(vae, states, actions), reference))
            self.row_p[slots], self.row_p_raw[slots] = coefficient.threshold(p_raw), p_raw

    def coefficients(self, batch: Any, next_actions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(p, p_raw) at the sample's (s, a), or at (s', a') with samg_coef_at = next."""
        if self.config.samg_coef_at == "next":
            return self.coefficient(batch.next_states, next_actions)
        if self.scored_buffer is not None and batch.index is not None:  # a batch of the tracked buffer
            self.score_new_rows()
            return self.row_p[batch.index], self.row_p_raw[batch.index]
        return self.coefficient(batch.states, batch.actions)

    @staticmethod
    def metrics(p: torch.Tensor, p_raw: torch.Tensor, offline_q: torch.Tensor, online_q: torch.Tensor
                ) -> Dict[str, torch.Tensor]:
        return {"samg/p_mean": p.mean(), "samg/p_zero_fraction": (p == 0).float().mean(),
                "samg/p_raw_mean": p_raw.mean(), "samg/offline_minus_online": (offline_q - online_q).mean()}

    def adaptive_round(self, recent: Any, td_errors: torch.Tensor, critic: nn.Module) -> Dict[str, Any]:
        """SAMG.md 1.6: OOD pairs (p_raw < p_m) of the recent online transitions whose TD error is
        at most the `samg_adapt_quantile` of the in-distribution pairs' join the mastered set, which a
        second C-VAE learns (warm-started between rounds); a frozen snapshot of it and its reference
        (scored on mastered pairs it trained on: the set has no held-out split) join p_raw's max.
        Optionally Q_off <- frozen copy of the current critic."""
        config = self.config
        _, p_raw = self.coefficient(recent.states, recent.actions)
        known = p_raw >= config.samg_p_m
        if known.any() and (~known).any():
            mastered = ~known & (td_errors <= torch.quantile(td_errors[known], config.samg_adapt_quantile))
            states, actions = recent.states[mastered], recent.actions[mastered]
            if self.mastered_states is not None:
                states = torch.cat([self.mastered_states, states])
                actions = torch.cat([self.mastered_actions, actions])
            self.mastered_states, self.mastered_actions = states, actions
        size = 0 if self.mastered_states is None else self.mastered_states.shape[0]
        if size > 0:
            if self.mastered_vae is None:
                self.mastered_vae = ConditionalVAE(self.obs_dim, self.act_dim, config.samg_vae_hidden).to(self.device)
                self.mastered_optimizer = torch.optim.Adam(self.mastered_vae.parameters(), lr=config.samg_vae_lr)
            for _ in range(config.samg_adapt_vae_iterations):
                index = torch.randint(0, size, (config.batch_size,), device=self.device)
                self.update_vae(self.mastered_states[index], self.mastered_actions[index], mastered=True)
            sample = torch.randperm(size, device=self.device)[: config.samg_reference_size]
            snapshot = freeze(self.mastered_vae)
            reference = self.coefficient.scores(snapshot, self.mastered_states[sample],
                                                self.mastered_actions[sample]).sort().values
            self.coefficient.mastered.append((snapshot, reference))
            self.raise_scored_rows(snapshot, reference)
        if config.samg_refresh_offline_critic:
            self.q_offline = freeze(critic)
        return {"samg/mastered_pairs": size, "samg/known_fraction": known.float().mean().item()}

    def state_dict(self) -> Dict[str, Any]:
        return {
            "vae": self.vae.state_dict(),
            "vae_optimizer": self.vae_optimizer.state_dict(),
            "q_offline": None if self.q_offline is None else self.q_offline.state_dict(),
            "vae_updates": self.vae_updates,
            "vae_held_out": self.vae_held_out,
            "coefficient": self.coefficient.state_dict(),
            "mastered": (self.mastered_states, self.mastered_actions),
            "mastered_vae": None if self.mastered_vae is None else self.mastered_vae.state_dict(),
            "mastered_optimizer": None if self.mastered_optimizer is None else self.mastered_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any], critic: nn.Module) -> None:
        self.vae.load_state_dict(state["vae"])
        self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        if state["q_offline"] is not None:
            self.q_offline = freeze(critic)
            self.q_offline.load_state_dict(state["q_offline"])
        self.vae_updates, self.vae_held_out = state["vae_updates"], state["vae_held_out"]
        self.coefficient.load_state_dict(state["coefficient"], self.obs_dim, self.act_dim)
        self.rows_scored = 0
        self.mastered_states, self.mastered_actions = (None if t is None else t.to(self.device)
                                                       for t in state["mastered"])
        if state["mastered_vae"] is not None:
            self.mastered_vae = ConditionalVAE(self.obs_dim, self.act_dim, self.config.samg_vae_hidden).to(self.device)
            self.mastered_vae.load_state_dict(state["mastered_vae"])
            self.mastered_optimizer = torch.optim.Adam(self.mastered_vae.parameters(), lr=self.config.samg_vae_lr)
            self.mastered_optimizer.load_state_dict(state["mastered_optimizer"])


class OfflinePairs:
    """The offline (s, a) pairs for the C-VAE: a training split sampled on the device and a held-out
    split whose negative ELBOs are the percentile reference (computed at the switch).

    The split depends on the dataset only (a fixed permutation seed, not the run's --seed), so a run
    fine-tuning a pretrained model with another seed scores its reference on pairs that C-VAE never
    trained on; a smaller --samg_reference_size gives a subset of the same held-out pairs."""

    SPLIT_SEED = 0

    def __init__(self, states: torch.Tensor, actions: torch.Tensor, reference_size: int):
        order = torch.randperm(states.shape[0], generator=torch.Generator().manual_seed(self.SPLIT_SEED))
        order = order.to(states.device)
        self.held_out = held_out = min(reference_size, states.shape[0] // 10)
        self.reference_states, self.reference_actions = states[order[:held_out]], actions[order[:held_out]]
        self.states, self.actions = states[order[held_out:]], actions[order[held_out:]]

    def sample(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, self.states.shape[0], (batch_size,), device=self.states.device)
        return self.states[index], self.actions[index]


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


class SAMGConservativeQLearning:
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
        if config.samg_cql_penalty not in ("base", "one_minus_p"):
            raise UserError(f"--samg_cql_penalty must be base or one_minus_p, not '{config.samg_cql_penalty}'.")
        self.samg = SAMGGuide(config, obs_dim, act_dim, device)
        self.online = False
        self.total_updates = 0

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {"qf_optimizer": self.qf_optimizer, "actor_optimizer": self.actor_optimizer,
                "alpha_optimizer": self.alpha_optimizer, "alpha_prime_optimizer": self.alpha_prime_optimizer}

    def learning_rates(self) -> List[Tuple[torch.optim.Optimizer, float]]:
        return [(self.qf_optimizer, self.config.qf_lr), (self.actor_optimizer, self.config.actor_lr),
                (self.alpha_optimizer, self.config.alpha_lr), (self.alpha_prime_optimizer, self.config.qf_lr),
                (self.samg.vae_optimizer, self.config.samg_vae_lr)]

    def adaptive_round(self, recent: Batch) -> Dict[str, Any]:
        with torch.no_grad():
            dist_next = self.actor(recent.next_states)
            alpha = self.log_alpha.exp() if self.config.auto_alpha else torch.tensor(self.config.init_alpha)
            targets, _, _ = self.td_targets(recent, dist_next, alpha)
            td_errors = (self.qf(recent.states, recent.actions) - targets).abs().mean(0)
        return self.samg.adaptive_round(recent, td_errors, self.qf)

    def sample_penalty_actions(self, dist_s, dist_next) -> Dict[str, torch.Tensor]:
        """The penalty's N uniform, current-policy and next-policy actions and log-densities (no grad)."""
        n, batch = self.config.cql_n_actions, dist_s.loc.shape[0]
        with torch.no_grad():
            current, log_pi_current = tanh_sample(dist_s, (n,))
            following, log_pi_next = tanh_sample(dist_next, (n,))
        uniform = torch.rand(n, batch, self.act_dim, device=self.device) * 2 - 1
        return {"random": uniform, "current": current, "log_pi_current": log_pi_current,
                "next": following, "log_pi_next": log_pi_next}

    def td_targets(self, batch: Batch, dist_next: torch.distributions.Normal, alpha: torch.Tensor
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """(targets, p, metrics): r + gamma * (1 - terminated) * min target-Q(s', a'), a' ~ pi(s')
        (max over N with max-backup); online (SAMG) each sampled a' is backed up with
        (1 - p) * min target-Q(s', a') + p * min Q_off(s', a'), mixed before the max."""
        with torch.no_grad():
            samples = self.config.cql_n_actions if self.config.cql_max_target_backup else 1
            next_actions, next_log_pi = tanh_sample(dist_next, (samples,))
            next_q = self.q_target(batch.next_states, next_actions).min(0).values  # (samples, B)
            p, metrics = None, {}
            if self.online:
                offline_q = self.samg.q_offline(batch.next_states, next_actions).min(0).values
                if self.config.samg_coef_at == "next":  # one p per sampled (s', a')
                    states = batch.next_states.expand(samples, -1, -1).reshape(-1, batch.next_states.shape[-1])
                    p, p_raw = (c.view(samples, -1) for c in self.samg.coefficient(states, next_actions.flatten(0, 1)))
                else:
                    p, p_raw = self.samg.coefficients(batch, None)  # read by buffer row (p cached)
                metrics = self.samg.metrics(p, p_raw, offline_q, next_q)
                next_q = mix_targets(next_q, offline_q, p)
            next_q, best = next_q.max(0)
            if self.config.backup_entropy:
                next_q = next_q - alpha * next_log_pi.gather(0, best.unsqueeze(0)).squeeze(0)
            if p is not None and p.dim() == 2:
                p = p.gather(0, best.unsqueeze(0)).squeeze(0)
            return batch.rewards + self.discount * (1.0 - batch.dones) * next_q, p, metrics

    def critic_loss(self, batch: Batch, targets: torch.Tensor, penalty_actions: Dict[str, torch.Tensor],
                    p: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """(critic loss, Lagrange loss, metrics): TD MSE summed over the twins plus the CQL penalty
        (online with samg_cql_penalty one_minus_p: each sample's penalty times 1 - p(s, a))."""
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
        penalty = penalty.clamp(self.config.cql_clip_diff_min, self.config.cql_clip_diff_max)
        if p is not None and self.config.samg_cql_penalty == "one_minus_p":
            penalty = penalty * (1.0 - p)
        gap = penalty.mean(1)  # (2,)
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

        targets, p, samg_metrics = self.td_targets(batch, dist_next, alpha)
        q_loss, lagrange_loss, metrics = self.critic_loss(batch, targets, self.sample_penalty_actions(dist_s, dist_next), p)

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
            **samg_metrics,
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
            "samg": self.samg.state_dict(),
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
        self.samg.load_state_dict(state["samg"], self.qf)
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

    agent = SAMGConservativeQLearning(config, obs_dim, act_dim, device)
    buffer = ReplayBuffer(obs_dim, act_dim, config.buffer_size, device)
    offline = transform.dataset(data)
    buffer.add_offline(offline)
    # SAMG: the C-VAE's offline pairs, split into training pairs and the held-out reference.
    pairs = OfflinePairs(torch.as_tensor(offline["states"], device=device),
                         torch.as_tensor(offline["actions"], device=device), config.samg_reference_size)
    agent.samg.vae_held_out = pairs.held_out  # a checkpoint loaded below brings its own
    online_buffer = ReplayBuffer(obs_dim, act_dim, config.buffer_size, device, online_only=True)
    agent.samg.track(online_buffer)
    collector = OnlineCollector(env, transform, buffer, config.seed)
    start = 0
    checkpoint_path = run_dir / "checkpoint.pt"
    if config.resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(str(checkpoint_path), config, transform)
        load_agent_state(agent, checkpoint["agent"], str(checkpoint_path), fresh_schedule=False)
        if agent.online:  # SAMG: past the switch the buffer holds online data only
            buffer = collector.buffer = online_buffer
        buffer.load_online_state_dict(checkpoint["buffer"])
        collector.load_state_dict(checkpoint["collector"])
        set_rng_state(checkpoint["rng"])
        start = checkpoint["iteration"]
        print(f"Resuming {run_dir} at iteration {start} with {buffer.n_online} online transitions.")
    elif config.load_model:
        checkpoint = load_checkpoint(config.load_model, config, transform)
        load_agent_state(agent, checkpoint["agent"], config.load_model, fresh_schedule=True)
        agent.samg.check_pretrained(agent.online, config.load_model, pairs)
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
            # The penalty weight changes.
            agent.cql_alpha = config.cql_alpha_online
            scores["offline"] = scores["last"] if scores["last"] is not None else evaluate_and_log(t)
            # SAMG: Q_off = frozen copy of the offline critics; the online critics, target critics,
            # actor and temperatures continue from the offline ones; the C-VAE's reference ELBOs are
            # scored; the dataset is dropped: the online buffer starts empty (100% online data).
            agent.samg.start_online(agent.qf, pairs)
            buffer = collector.buffer = online_buffer
            agent.online = True
            progress.set_description("online")
        if agent.online:
            episode = collector.step(lambda s: agent.act(s, deterministic=False))
            if episode is not None:
                score = normalized_score(np.array([episode["train/episode_return"]]), references)
                if score is not None:
                    episode["train/normalized_return"] = score
                logger.log(episode, t)
        if agent.online and buffer.size < max(config.samg_learning_starts, 1):
            pass  # SAMG: no update until the online buffer holds samg_learning_starts transitions
        else:
            window.add(agent.update(buffer.sample(config.batch_size)))
        if not agent.online and t < config.samg_vae_iterations and config.samg_mode == "vae":
            window.add(agent.samg.update_vae(*pairs.sample(config.batch_size)))
        online_steps = buffer.online_added if agent.online else 0
        if config.samg_adaptive and agent.online and online_steps % config.samg_adapt_every == 0 and online_steps:
            recent = torch.arange(online_steps - config.samg_adapt_every, online_steps, device=device) % buffer.capacity
            states, actions, rewards, next_states, dones = torch.split(buffer.rows[recent], buffer.split, dim=1)
            logger.log(agent.adaptive_round(
                Batch(states, actions, rewards.squeeze(1), next_states, dones.squeeze(1))), t)

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
