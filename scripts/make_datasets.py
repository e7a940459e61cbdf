"""Build D4RL-recipe Minari datasets from gymnasium MuJoCo environments, with no network.

Usage:

    python scripts/make_datasets.py                                  # all levels, Hopper/Walker2d/HalfCheetah
    python scripts/make_datasets.py --env Hopper-v5 --levels medium medium-replay --threads 1
    python scripts/make_datasets.py --env Hopper-v5 --levels random --size 1000000 --seed 0
    python scripts/make_datasets.py --env Swimmer-v5 --levels random medium   # references are measured
    python scripts/make_datasets.py --quick --namespace scratch       # tiny datasets and SAC budgets, for tests

Each (environment, level) pair becomes the dataset `<namespace>/<env>/<level>-v0`, e.g.
`o2o/hopper/medium-replay-v0`, in the local Minari store (`$MINARI_DATASETS_PATH`, else
`~/.minari/datasets`). Load it with `minari.load_dataset(id)`. `docs/datasets.md` is the user guide.

Levels (D4RL's recipe, Fu et al. 2020, arXiv 2004.07219):

- `random`: uniform random actions from a seeded numpy Generator.
- `medium`: `--size` transitions of a SAC policy (stochastic actions, as D4RL) taken at the first
  evaluation (deterministic actions, `eval_episodes` episodes) that ends `--medium-consecutive` (2)
  evaluations in a row whose mean return reaches `--medium-fraction` (1/3) of the reference expert
  return (one lucky evaluation of a policy still learning does not make it the medium policy).
- `medium-replay`: every transition that SAC run collected up to that evaluation, warm-up included.
- `expert`: `--size` transitions of the same SAC run's policy after `--expert-steps` (1M) steps.
- `medium-expert`: the medium episodes followed by the expert episodes (2 x `--size`, as D4RL).

All SAC levels of one (environment, seed) come from one SAC run (`scripts/sac.py`), so medium and
medium-replay need no expert training, and a later expert build continues the same run.

What a dataset holds: episodes exactly as gymnasium returns them (`observations` T+1 rows in the
observation space's dtype, `actions`, `rewards`, `terminations`, `truncations`), each with the seed
of its `env.reset(seed=...)`; an episode cut by a transition budget ends with `truncations[-1] = True`.
`ref_min_score` / `ref_max_score` are shared by every level of one environment, so
`minari.get_normalized_score` works on one scale: D4RL's published random/expert returns for hopper,
halfcheetah, walker2d and ant; for other environments they are measured (`--measure-references`: a
uniform random policy and the trained expert, `--reference-episodes` (100) episodes each, stored
once per environment) unless `--ref-min-score` / `--ref-max-score` are given.

Builder state lives in `--work-dir` (default `<store>/<namespace>/_builder/`): `manifest.json` (per
dataset: transitions, episodes, returns, normalized score, size, sha256, seed, command, versions,
behaviour policy), `<env>/references.json` when measured, and `<env>/sac-seed<S>-<hash>/` (the SAC
run: checkpoint, transitions, evaluations, `policies/medium.pt` and `policies/expert.pt`).

Guarantees: the same seed (and `--threads`) gives the same arrays on one machine; a killed build
resumes from its last SAC checkpoint when rerun; a dataset is written in a hidden staging store and
renamed into place once complete, so a crash never leaves a half-written dataset under a final id;
existing datasets are kept unless `--overwrite`. User errors (unknown env id, unwritable store,
existing dataset, ...) print one paragraph to stderr and exit with status 2.

Importable core (used by the tests): `build_dataset(env_id, level, size, seed, namespace, ...)`,
`collect_random(env, size, seed)`, `write_dataset(...)`, `LEVELS`, `D4RL_REF_SCORES`, `UserError`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import gymnasium as gym
import minari
import numpy as np
import torch
from gymnasium.envs.registration import EnvSpec, parse_env_id
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.namespace import create_namespace, list_local_namespaces
from minari.storage import get_dataset_path
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sac import (  # noqa: E402  (scripts/ is a folder of scripts, not a package)
    Actor, Interrupted, SACConfig, SACRun, action_scaler, atomic_torch_save, atomic_write, derived_seed, evaluate,
    to_env_action,
)
from machine import sha256_of  # noqa: E402

DEFAULT_ENVS = ["Hopper-v5", "Walker2d-v5", "HalfCheetah-v5"]
DEFAULT_SIZE = 1_000_000
DEFAULT_EXPERT_STEPS = 1_000_000
QUICK_SIZE = 2_000
AUTHOR = "o2o project"
# D4RL's published (random, expert) returns: one normalization scale per environment, every level.
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
# --quick: tiny SAC (seconds on a CPU); "medium" is then the first evaluation unless --medium-return (and
# --medium-consecutive) are given
QUICK_SAC = SACConfig(hidden_dim=64, batch_size=64, warmup_steps=500, eval_every=500, eval_episodes=2)
QUICK_EXPERT_STEPS = 3_000
QUICK_CHECKPOINT_EVERY = 1_000
QUICK_REFERENCE_EPISODES = 5

Policy = Callable[[np.ndarray], np.ndarray]


class UserError(Exception):
    """A problem with the request (bad id, existing dataset, ...): reported without a traceback."""


# ---------------------------------------------------------------------------------------------
# Collecting episodes
# ---------------------------------------------------------------------------------------------


def run_episode(env: gym.Env, policy: Policy, seed: int, max_steps: int) -> EpisodeBuffer:
    """One episode from `env.reset(seed=seed)`, cut (and marked truncated) after `max_steps`."""
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
    terminated = truncated = False
    while not (terminated or truncated) and len(actions) < max_steps:
        action = policy(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward)
        terminations.append(terminated)
        truncations.append(truncated)
    if not (terminated or truncated):  # the transition budget ran out mid-episode
        truncations[-1] = True
    return EpisodeBuffer(
        seed=seed,
        observations=np.asarray(observations, dtype=env.observation_space.dtype),
        actions=np.asarray(actions, dtype=env.action_space.dtype),
        rewards=np.asarray(rewards, dtype=np.float64),
        terminations=np.asarray(terminations, dtype=bool),
        truncations=np.asarray(truncations, dtype=bool),
    )


def rollout(env: gym.Env, policy: Policy, size: int, seed: int, desc: Optional[str] = None) -> list[EpisodeBuffer]:
    """Episodes seeded `seed + i` until exactly `size` transitions, with a progress bar."""
    episodes: list[EpisodeBuffer] = []
    steps, return_sum = 0, 0.0
    with tqdm(total=size, unit="step", desc=desc or env.spec.id, dynamic_ncols=True, mininterval=1.0) as bar:
        while steps < size:
            episode = run_episode(env, policy, seed + len(episodes), max_steps=size - steps)
            episodes.append(episode)
            steps += len(episode)
            return_sum += float(episode.rewards.sum())
            bar.set_postfix(episodes=len(episodes), mean_return=f"{return_sum / len(episodes):.1f}", refresh=False)
            bar.update(len(episode))
    return episodes


def uniform_policy(action_space: gym.spaces.Space, rng: np.random.Generator) -> Policy:
    """Actions drawn uniformly from a bounded Box, from `rng` (not the space's unseeded sampler)."""
    if not isinstance(action_space, gym.spaces.Box) or not action_space.is_bounded():
        raise UserError(f"The random level needs a bounded Box action space, got {action_space}.")
    low, high, dtype = action_space.low, action_space.high, action_space.dtype
    return lambda obs: rng.uniform(low, high).astype(dtype)


def collect_random(env: gym.Env, size: int, seed: int) -> list[EpisodeBuffer]:
    """Uniform random policy; actions come from `np.random.default_rng(seed)`."""
    return rollout(env, uniform_policy(env.action_space, np.random.default_rng(seed)), size, seed)


def sac_policy(actor: Actor, scaler, generator: Optional[torch.Generator]) -> Policy:
    """The SAC actor as an environment policy: sampled actions, or the mean action when `generator` is None."""
    return lambda obs: to_env_action(actor.act(obs, deterministic=generator is None, generator=generator), scaler)


def split_episodes(block: dict[str, np.ndarray], scaler, first_seed: int, act_dtype) -> list[EpisodeBuffer]:
    """A SAC run's transitions (consecutive steps) as episodes; episode k was reset with `first_seed + k`.

    Episodes end where `terminations | truncations`; a last episode cut by the end of `block` is
    marked truncated. Actions are mapped from the policy's [-1, 1] to the environment's box.
    """
    ends = np.flatnonzero(block["terminations"] | block["truncations"]) + 1
    if len(ends) == 0 or ends[-1] != len(block["rewards"]):
        ends = np.append(ends, len(block["rewards"]))
    episodes, start = [], 0
    for k, end in enumerate(ends):
        truncations = block["truncations"][start:end].copy()
        truncations[-1] = truncations[-1] or not block["terminations"][end - 1]
        episodes.append(EpisodeBuffer(
            seed=first_seed + k,
            observations=np.concatenate([block["observations"][start:end], block["next_observations"][end - 1:end]]),
            actions=to_env_action(block["actions"][start:end], scaler).astype(act_dtype),
            rewards=block["rewards"][start:end].copy(),
            terminations=block["terminations"][start:end].copy(),
            truncations=truncations,
        ))
        start = end
    return episodes


@dataclass(frozen=True)
class Level:
    """How one dataset level is collected (from the EnvBuild of its environment) and described."""

    collect: Callable[["EnvBuild"], list[EpisodeBuffer]]
    algorithm_name: str
    description: str
    uses_sac: bool = True


LEVELS = {
    "random": Level(lambda build: collect_random(build.env, build.size, build.seed), "uniform random policy",
                    "Actions drawn uniformly from the action space.", uses_sac=False),
    "medium": Level(lambda build: build.policy_rollouts("medium"), "SAC (medium: early-stopped)",
                    "Stochastic actions of a SAC policy stopped at the first evaluation whose return reached the "
                    "medium threshold."),
    "medium-replay": Level(lambda build: build.replay_episodes(), "SAC replay buffer (up to medium)",
                           "Every transition of the SAC run (uniform warm-up included) up to the evaluation at which "
                           "its policy reached the medium threshold."),
    "expert": Level(lambda build: build.policy_rollouts("expert"), "SAC (expert: fully trained)",
                    "Stochastic actions of the fully trained SAC policy."),
    "medium-expert": Level(lambda build: build.policy_rollouts("medium") + build.policy_rollouts("expert"),
                           "SAC (medium episodes, then expert episodes)",
                           "The episodes of the medium dataset followed by those of the expert dataset."),
}


# ---------------------------------------------------------------------------------------------
# Options and checking a request
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    """Everything besides (env, level, size, seed, namespace) that a build takes; CLI flags in brackets."""

    overwrite: bool = False  # [--overwrite]
    ref_min: Optional[float] = None  # [--ref-min-score]
    ref_max: Optional[float] = None  # [--ref-max-score]
    measure_references: bool = False  # [--measure-references] (the default outside D4RL_REF_SCORES)
    reference_episodes: int = 100  # [--reference-episodes]
    medium_fraction: float = 1 / 3  # [--medium-fraction] of the reference expert return
    medium_return: Optional[float] = None  # [--medium-return] absolute threshold, overrides the fraction
    medium_consecutive: int = 2  # [--medium-consecutive] evaluations in a row at or above the threshold
    expert_steps: int = DEFAULT_EXPERT_STEPS  # [--expert-steps] SAC budget (also the most medium may take)
    sac: SACConfig = field(default_factory=SACConfig)
    checkpoint_every: int = 50_000  # [--checkpoint-every] environment steps between SAC checkpoints
    work_dir: Optional[Path] = None  # [--work-dir] default <store>/<namespace>/_builder
    stop_after_checkpoints: Optional[int] = None  # [--stop-after-checkpoints] (tests of resuming)
    command: Optional[str] = None  # recorded in the manifest
    progress: bool = True


def env_spec_for(env_id: str) -> EnvSpec:
    """The registered gymnasium spec of `env_id`, or a UserError that says what is wrong."""
    try:
        return gym.spec(env_id)
    except gym.error.Error as err:
        raise UserError(
            f"Unknown environment id {env_id!r}: {err} Use a registered gymnasium id with its "
            f"version, e.g. {', '.join(DEFAULT_ENVS)}."
        ) from None


def env_name(env_id: str) -> str:
    """`HalfCheetah-v5` -> `halfcheetah`: the environment part of a dataset id."""
    return parse_env_id(env_id)[1].lower()


def dataset_id_for(namespace: str, env_id: str, level: str) -> str:
    """`<namespace>/<env name lowercased>/<level>-v0`, e.g. `o2o/hopper/random-v0`."""
    dataset_id = f"{namespace}/{env_name(env_id)}/{level}-v0"
    try:
        parse_dataset_id(dataset_id)
    except ValueError:
        raise UserError(f"{dataset_id!r} is not a valid Minari dataset id; check --namespace {namespace!r}.") from None
    return dataset_id


def reference_source(env_id: str, options: BuildOptions) -> str:
    """Where the normalization scores come from: `given`, `d4rl` or `measured`."""
    if (options.ref_min is None) != (options.ref_max is None):
        raise UserError("Give both --ref-min-score and --ref-max-score, or neither.")
    if options.ref_min is not None:
        if options.measure_references:
            raise UserError("--measure-references measures the reference scores: do not also give them.")
        if not options.ref_max > options.ref_min:
            raise UserError(f"--ref-max-score ({options.ref_max}) must be larger than --ref-min-score "
                            f"({options.ref_min}).")
        return "given"
    if env_name(env_id) in D4RL_REF_SCORES and not options.measure_references:
        return "d4rl"
    return "measured"


def store_error(err: OSError) -> UserError:
    return UserError(f"Cannot write to the Minari store: {err}. Set MINARI_DATASETS_PATH to a writable directory.")


def store_root() -> Path:
    """The local Minari store (created if missing), or a UserError when it cannot be created."""
    try:
        return get_dataset_path()
    except OSError as err:
        raise store_error(err) from None


def work_dir_for(namespace: str, options: BuildOptions) -> Path:
    """The builder's directory (manifest, SAC runs, references), created if missing."""
    path = Path(options.work_dir) if options.work_dir is not None else store_root() / namespace / "_builder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"Cannot write to the builder's work directory {path}: {err}. Choose another with "
                        "--work-dir, or set MINARI_DATASETS_PATH to a writable directory.") from None
    return path


def check_request(env_id: str, level: str, namespace: str, options: BuildOptions) -> tuple[str, EnvSpec]:
    """Validate one build request before any work; return (dataset_id, env spec)."""
    spec = env_spec_for(env_id)
    if level not in LEVELS:
        raise UserError(f"Unknown level {level!r}; available levels: {', '.join(LEVELS)}.")
    dataset_id = dataset_id_for(namespace, spec.id, level)
    source = reference_source(spec.id, options)
    if LEVELS[level].uses_sac or source == "measured":
        env = gym.make(spec)
        try:
            action_scaler(env.action_space)
        except ValueError as err:
            raise UserError(f"{spec.id}: level {level!r} needs SAC, which needs a bounded Box action space "
                            f"({err}).") from None
        finally:
            env.close()
    path = store_root() / dataset_id
    if path.exists() and not options.overwrite:
        raise UserError(f"Dataset {dataset_id} already exists at {path}. Pass --overwrite to replace it.")
    work_dir_for(namespace, options)
    return dataset_id, spec


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def requirements(spec: EnvSpec) -> list[str]:
    """Pinned packages the recording depends on; `recover_environment()` warns when they differ."""
    packages = ["gymnasium"] + (["mujoco"] if "mujoco" in str(spec.entry_point) else [])
    return [f"{name}=={importlib.metadata.version(name)}" for name in packages]


def write_dataset(dataset_id: str, episodes: list[EpisodeBuffer], env_id: str, ref_min: float, ref_max: float,
                  algorithm_name: str, description: str, **minari_kwargs) -> minari.MinariDataset:
    """`minari.create_dataset_from_buffers` with the project's metadata (HDF5, env = eval env)."""
    spec = gym.spec(env_id)
    with warnings.catch_warnings():  # we have no permalink or e-mail to give; Minari warns about both
        warnings.filterwarnings("ignore", message="`(code_permalink|author_email)` is set to None")
        return minari.create_dataset_from_buffers(
            dataset_id,
            buffer=episodes,
            env=env_id,
            eval_env=env_id,
            algorithm_name=algorithm_name,
            author=AUTHOR,
            description=description,
            ref_min_score=ref_min,
            ref_max_score=ref_max,
            requirements=requirements(spec),
            **minari_kwargs,
        )


@contextlib.contextmanager
def staging_dir(root: Path) -> Iterator[Path]:
    """A hidden scratch directory inside the store `root`, removed afterwards.

    Inside `root`, so the final move is a same-filesystem rename; its name starts with a dot, so
    Minari's listings skip it if a crash leaves it behind.
    """
    try:
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    except OSError as err:
        raise store_error(err) from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def minari_store_at(path: Path) -> Iterator[None]:
    """Point Minari (`MINARI_DATASETS_PATH`) at `path` while the block runs."""
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


def move_into_store(staging: Path, root: Path, dataset_id: str) -> None:
    """Rename the staged dataset directory to its final place (replacing an existing one)."""
    namespace = parse_dataset_id(dataset_id)[0]
    if namespace not in list_local_namespaces():
        create_namespace(namespace)  # what Minari does when it writes into a new namespace
    final = root / dataset_id
    if final.exists():  # only with --overwrite: move the old one aside (it is deleted with `staging`)
        final.rename(staging / ".replaced")
    (staging / dataset_id).rename(final)


def dataset_stats(dataset_id: str) -> dict:
    """Numbers of a stored dataset, read back from the store (the summary row and the manifest)."""
    dataset = minari.load_dataset(dataset_id)
    returns = np.array([episode.rewards.sum() for episode in dataset.iterate_episodes()])
    data_dir = store_root() / dataset_id / "data"
    return {
        "transitions": int(dataset.total_steps),
        "episodes": int(dataset.total_episodes),
        "return_mean": float(returns.mean()),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "normalized_score": float(100 * minari.get_normalized_score(dataset, returns).mean()),
        "ref_min_score": float(dataset.storage.metadata["ref_min_score"]),
        "ref_max_score": float(dataset.storage.metadata["ref_max_score"]),
        "size_bytes": sum(path.stat().st_size for path in data_dir.iterdir()),
        "sha256": sha256_of(data_dir / "main_data.hdf5"),
    }


def versions() -> dict:
    packages = ("gymnasium", "mujoco", "minari", "torch", "numpy", "h5py")
    return {"python": platform.python_version(), **{name: importlib.metadata.version(name) for name in packages}}


def finite_or_none(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_manifest(work_dir: Path, dataset_id: str, entry: dict) -> Path:
    """Add or replace one dataset's entry of `<work_dir>/manifest.json` (atomic, locked)."""
    path = work_dir / "manifest.json"
    with locked(work_dir / ".manifest.lock"):
        manifest = json.loads(path.read_text()) if path.exists() else {"datasets": {}}
        manifest["datasets"][dataset_id] = entry
        manifest["datasets"] = dict(sorted(manifest["datasets"].items()))
        atomic_write(path, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    return path


# ---------------------------------------------------------------------------------------------
# One environment: references, the SAC run, policies and rollouts, shared between its levels
# ---------------------------------------------------------------------------------------------


class EnvBuild:
    """The datasets of one environment and seed built by one invocation.

    The SAC run, the policies and the rollouts are made on first use and shared between levels
    (medium-expert reuses the medium and expert episodes collected in the same invocation).
    """

    def __init__(self, env_id: str, size: int, seed: int, namespace: str, options: BuildOptions):
        self.spec = env_spec_for(env_id)
        self.size, self.seed, self.namespace, self.options = size, seed, namespace, options
        self.work_dir = work_dir_for(namespace, options)
        self.env_dir = self.work_dir / env_name(self.spec.id)
        self.env = gym.make(self.spec)
        self._run: Optional[SACRun] = None
        self._references: Optional[dict] = None
        self._policies: dict[str, tuple[Actor, dict]] = {}
        self._rollouts: dict[str, list[EpisodeBuffer]] = {}

    def close(self) -> None:
        self.env.close()
        if self._run is not None:
            self._run.close()

    # -- the SAC run ------------------------------------------------------------------------------

    @property
    def run(self) -> SACRun:
        if self._run is None:
            config = self.options.sac
            fingerprint = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()
            run_dir = self.env_dir / f"sac-seed{self.seed}-{fingerprint[:8]}"
            try:
                self._run = SACRun(self.spec.id, self.seed, config, run_dir, self.options.checkpoint_every,
                                   self.options.stop_after_checkpoints, self.options.progress)
            except ValueError as err:
                raise UserError(f"Cannot use the SAC run in {run_dir}: {err}") from None
        return self._run

    def train(self, stop_return: Optional[float] = None) -> None:
        budget = self.options.expert_steps
        self.run.train(budget, stop_return=stop_return, snapshot_at=(budget,),
                       stop_consecutive=self.options.medium_consecutive)

    # -- reference scores -------------------------------------------------------------------------

    def references(self) -> dict:
        """{"ref_min_score", "ref_max_score", "source", ...}; measured ones are stored per environment."""
        if self._references is None:
            source = reference_source(self.spec.id, self.options)
            if source == "given":
                self._references = {"ref_min_score": self.options.ref_min, "ref_max_score": self.options.ref_max}
            elif source == "d4rl":
                ref_min, ref_max = D4RL_REF_SCORES[env_name(self.spec.id)]
                self._references = {"ref_min_score": ref_min, "ref_max_score": ref_max}
            else:
                self._references = self.measured_references()
            self._references["source"] = source
        return self._references

    def measured_references(self) -> dict:
        """Random-policy and expert mean returns, `reference_episodes` episodes each (stored once)."""
        path = self.env_dir / "references.json"
        if path.exists():
            return json.loads(path.read_text())
        episodes = self.options.reference_episodes
        why = "--measure-references" if self.options.measure_references else "it has no published ones"
        print(f"Reference scores of {self.spec.id} are measured ({why}): this trains the SAC expert "
              f"(--expert-steps {self.options.expert_steps}) first. --ref-min-score and --ref-max-score skip that.",
              file=sys.stderr)
        actor, info = self.policy("expert")
        seed = derived_seed(self.seed, "references/episodes")
        print(f"Measuring reference scores of {self.spec.id}: random policy and expert, {episodes} episodes each ...",
              file=sys.stderr)
        rng = np.random.default_rng(derived_seed(self.seed, "references/random-actions"))
        random_returns = np.array([run_episode(self.env, uniform_policy(self.env.action_space, rng), seed + j, 10**9)
                                   .rewards.sum() for j in range(episodes)])
        expert_returns = evaluate(self.env, actor, self.run.scaler, episodes, seed)
        references = {
            "ref_min_score": float(random_returns.mean()), "ref_max_score": float(expert_returns.mean()),
            "random_return_std": float(random_returns.std()), "expert_return_std": float(expert_returns.std()),
            "episodes": episodes, "episode_seeds": f"{seed} + j", "expert_actions": "deterministic (tanh of the mean)",
            "expert_policy": str(info["path"].relative_to(self.work_dir)), "seed": self.seed,
        }
        if not references["ref_max_score"] > references["ref_min_score"]:
            raise UserError(f"The measured expert return ({references['ref_max_score']:.1f}) of {self.spec.id} is not "
                            f"above the random return ({references['ref_min_score']:.1f}): train longer "
                            "(--expert-steps) or give --ref-min-score / --ref-max-score.")
        atomic_write(path, lambda p: p.write_text(json.dumps(references, indent=2) + "\n"))
        return references

    def medium_threshold(self) -> float:
        if self.options.medium_return is not None:
            return self.options.medium_return
        return self.options.medium_fraction * self.references()["ref_max_score"]

    # -- policies ---------------------------------------------------------------------------------

    def policy(self, which: str) -> tuple[Actor, dict]:
        """The `medium` or `expert` actor (training the run as far as needed) and its description."""
        if which not in self._policies:
            run, budget = self.run, self.options.expert_steps
            if which == "medium":
                threshold = self.medium_threshold()
                self.train(stop_return=threshold)
                consecutive = self.options.medium_consecutive
                point = run.first_eval_reaching(threshold, consecutive)
                if point is None:
                    best = run.best_eval()
                    raise UserError(
                        f"SAC on {self.spec.id} did not reach the medium return {threshold:.1f} in {consecutive} "
                        f"evaluation(s) in a row within {run.step} steps (best evaluation {best['return_mean']:.1f} "
                        f"at step {best['step']}). Raise --expert-steps, lower the threshold with --medium-fraction / "
                        "--medium-return, or ask for fewer evaluations in a row with --medium-consecutive."
                    )
                step, info = point["step"], {"medium_threshold": finite_or_none(threshold),
                                             "medium_consecutive": consecutive,
                                             "eval_return_mean": point["return_mean"],
                                             "eval_return_std": point["return_std"]}
            else:
                self.train()
                if budget not in run.snapshots:
                    raise UserError(f"The SAC run in {run.run_dir} is at step {run.step} and has no snapshot at "
                                    f"--expert-steps {budget}; use the --expert-steps it was trained with or "
                                    "another --work-dir.")
                step, info = budget, {"eval_return_mean": run.snapshot(budget)["eval_return_mean"]}
            if not run.has_snapshot(step):
                raise UserError(f"The SAC run in {run.run_dir} has no actor snapshot at step {step}, its {which} "
                                "point (it was trained by a builder that kept snapshots only at new best "
                                "evaluations): delete that run directory to train it again.")
            actor = run.new_actor()
            actor.load_state_dict(run.snapshot(step)["actor"])
            path = run.run_dir / "policies" / f"{which}.pt"
            center, half = run.scaler
            atomic_torch_save({
                "actor": actor.state_dict(), "env_id": self.spec.id, "level": which, "sac_step": step,
                "hidden_dim": run.config.hidden_dim, "obs_dim": actor.net[0].in_features,
                "act_dim": actor.net[-1].out_features // 2, "action_center": center, "action_half_range": half, **info,
            }, path)
            self._policies[which] = (actor, {"path": path, "sac_step": step, **info})
        return self._policies[which]

    def policy_rollouts(self, which: str) -> list[EpisodeBuffer]:
        """`size` transitions of the policy's sampled actions; episode i reset with `seed + i`."""
        if which not in self._rollouts:
            actor, _ = self.policy(which)
            generator = torch.Generator().manual_seed(derived_seed(self.seed, f"rollout/{which}"))
            policy = sac_policy(actor, self.run.scaler, generator)
            self._rollouts[which] = rollout(self.env, policy, self.size, self.seed, desc=f"{self.spec.id} {which}")
        return self._rollouts[which]

    def replay_episodes(self) -> list[EpisodeBuffer]:
        """The SAC run's transitions up to the evaluation that reached the medium threshold."""
        _, info = self.policy("medium")
        block = self.run.transitions.slice(0, info["sac_step"])
        return split_episodes(block, self.run.scaler, self.run.train_seed, self.env.action_space.dtype)

    # -- building one dataset ---------------------------------------------------------------------

    def build(self, level: str) -> tuple[str, dict]:
        """Collect, write and register one level; return (dataset id, manifest entry)."""
        start = time.perf_counter()
        dataset_id, spec = check_request(self.spec.id, level, self.namespace, self.options)
        root = store_root()
        with staging_dir(root) as staging:  # made first: an unwritable store fails before the collection
            references = self.references()
            episodes = LEVELS[level].collect(self)
            policy = self.policy_entry(level)
            description = (
                f"{LEVELS[level].description} {sum(len(e) for e in episodes)} transitions from {spec.id} "
                f"(seed {self.seed}). Reference scores: {references['source']}. Built by scripts/make_datasets.py; "
                "see its manifest.json for the behaviour policy."
            )
            print(f"Writing {len(episodes)} episodes to {dataset_id} ...", file=sys.stderr)  # ~1 ms per episode
            with minari_store_at(staging):
                write_dataset(dataset_id, episodes, spec.id, references["ref_min_score"], references["ref_max_score"],
                              LEVELS[level].algorithm_name, description)
            move_into_store(staging, root, dataset_id)
        dataset = minari.load_dataset(dataset_id)
        expected = sum(len(episode) for episode in episodes)
        if dataset.id != dataset_id or dataset.total_steps != expected:
            raise RuntimeError(f"{dataset_id} reloads as {dataset.id} with {dataset.total_steps} steps, "
                               f"expected {expected}.")
        entry = {
            "dataset_id": dataset_id, "env_id": spec.id, "level": level, **dataset_stats(dataset_id),
            "reference_source": references["source"], "seed": self.seed, "size_option": self.size,
            "command": self.options.command, "versions": versions(), "torch_threads": torch.get_num_threads(),
            "behaviour_policy": policy, "build_seconds": round(time.perf_counter() - start, 1),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if LEVELS[level].uses_sac or references["source"] == "measured":
            run = self.run
            entry["sac_run"] = {
                "dir": str(run.run_dir.relative_to(self.work_dir)), "config": dataclasses.asdict(run.config),
                "expert_steps": self.options.expert_steps, "steps_trained": run.step,
                "train_seconds": round(run.seconds, 1),
            }
        update_manifest(self.work_dir, dataset_id, entry)
        return dataset_id, entry

    def policy_entry(self, level: str) -> Optional[dict]:
        """The behaviour policies of a level, as the manifest records them (paths relative to it)."""
        names = {"medium": ["medium"], "expert": ["expert"], "medium-expert": ["medium", "expert"],
                 "medium-replay": ["medium"]}.get(level, [])
        entry = {}
        for name in names:
            _, info = self.policy(name)
            entry[name] = {**info, "path": str(info["path"].relative_to(self.work_dir))}
        if level == "medium-replay":
            entry["medium"]["note"] = "the data is the SAC run's transitions up to this policy's sac_step"
        return entry or None


def build_dataset(env_id: str, level: str, size: int, seed: int, namespace: str, overwrite: bool = False,
                  ref_min: Optional[float] = None, ref_max: Optional[float] = None, **options) -> str:
    """Build one dataset `<namespace>/<env>/<level>-v0` and return its id.

    `options` are `BuildOptions` fields (e.g. `expert_steps=3000, sac=QUICK_SAC, medium_return=50`).
    """
    options = BuildOptions(overwrite=overwrite, ref_min=ref_min, ref_max=ref_max, **options)
    if options.command is None:
        options = dataclasses.replace(options, command=f"build_dataset({env_id!r}, {level!r}, {size}, {seed}, "
                                                            f"{namespace!r}, ...)")
    check_request(env_id, level, namespace, options)
    if size < 1:
        raise UserError(f"--size must be positive, got {size}.")
    build = EnvBuild(env_id, size, seed, namespace, options)
    try:
        return build.build(level)[0]
    finally:
        build.close()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def summary_row(entry: dict) -> dict:
    return {
        "dataset": entry["dataset_id"],
        "transitions": entry["transitions"],
        "episodes": entry["episodes"],
        "return mean": f"{entry['return_mean']:.1f}",
        "return min": f"{entry['return_min']:.1f}",
        "return max": f"{entry['return_max']:.1f}",
        "normalized": f"{entry['normalized_score']:.1f}",
        "seconds": f"{entry['build_seconds']:.1f}",
    }


def print_table(rows: list[dict]) -> None:
    widths = {key: max(len(key), *(len(str(row[key])) for row in rows)) for key in rows[0]}
    print("  ".join(key.rjust(width) for key, width in widths.items()))
    for row in rows:
        print("  ".join(str(row[key]).rjust(width) for key, width in widths.items()))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build D4RL-recipe Minari datasets <namespace>/<env>/<level>-v0 from gymnasium MuJoCo "
                    "environments (see docs/datasets.md)."
    )
    parser.add_argument("--env", action="append", metavar="ENV_ID",
                        help=f"gymnasium environment id, repeatable (default: {' '.join(DEFAULT_ENVS)})")
    parser.add_argument("--levels", nargs="+", choices=list(LEVELS), default=list(LEVELS),
                        help="levels to build (default: all)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help="transitions of random, medium and expert (medium-expert has twice as many; "
                        "medium-replay has what SAC collected) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the SAC run and the policies; episode i of a rollout resets with seed + i "
                        "(default: %(default)s)")
    parser.add_argument("--namespace", default="o2o", help="Minari namespace of the dataset ids (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace datasets that already exist")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny datasets ({QUICK_SIZE} transitions) and a tiny SAC ({QUICK_EXPERT_STEPS} steps, "
                        f"64x64 networks, checkpoints every {QUICK_CHECKPOINT_EVERY} steps), for tests; medium is "
                        "the first evaluation unless --medium-return is given")
    refs = parser.add_argument_group("reference scores (one normalization scale for every level of an environment)")
    refs.add_argument("--ref-min-score", type=float, help="normalization minimum (a random policy's return)")
    refs.add_argument("--ref-max-score", type=float, help="normalization maximum (an expert's return)")
    refs.add_argument("--measure-references", action="store_true",
                      help="measure them (random policy, trained SAC expert) even where D4RL's exist; the default for "
                      f"environments other than {', '.join(sorted(D4RL_REF_SCORES))}")
    refs.add_argument("--reference-episodes", type=int, default=100,
                      help="episodes per measured reference return (default: %(default)s)")
    sac = parser.add_argument_group("SAC behaviour policies")
    sac.add_argument("--medium-fraction", type=float, default=1 / 3,
                     help="medium threshold as a fraction of the reference expert return (default: 1/3)")
    sac.add_argument("--medium-return", type=float, help="an absolute medium threshold instead of the fraction")
    sac.add_argument("--medium-consecutive", type=int,
                     help="medium = the evaluation that ends this many evaluations in a row at or above the "
                     "threshold (default: 2; 1 with --quick)")
    sac.add_argument("--expert-steps", type=int, default=DEFAULT_EXPERT_STEPS,
                     help="SAC training budget in environment steps: the expert policy is the one at this step, and "
                     "medium must be reached before it (default: %(default)s)")
    sac.add_argument("--warmup-steps", type=int, help=f"uniform-random steps before updates (default: "
                     f"{SACConfig.warmup_steps})")
    sac.add_argument("--eval-every", type=int,
                     help=f"environment steps between evaluations (default: {SACConfig.eval_every})")
    sac.add_argument("--eval-episodes", type=int, help=f"episodes per evaluation (default: {SACConfig.eval_episodes})")
    sac.add_argument("--checkpoint-every", type=int, default=50_000,
                     help="environment steps between SAC checkpoints, taken at the next episode end "
                     "(default: %(default)s)")
    sac.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s; results are "
                     "reproducible for a fixed thread count)")
    sac.add_argument("--work-dir", type=Path,
                     help="manifest, SAC runs and references (default: <Minari store>/<namespace>/_builder)")
    sac.add_argument("--stop-after-checkpoints", type=int, metavar="N",
                     help="stop (exit status 3) after writing N SAC checkpoints, as if killed; rerun to resume")
    args = parser.parse_args(argv)
    args.env = args.env or DEFAULT_ENVS
    if (args.ref_min_score is not None or args.ref_max_score is not None) and len(args.env) > 1:
        parser.error("--ref-min-score/--ref-max-score set one environment's scale: give a single --env with them")
    return args


def options_from_args(args: argparse.Namespace, argv: Optional[list[str]]) -> tuple[int, BuildOptions]:
    """(size, BuildOptions) from the parsed command line."""
    sac = QUICK_SAC if args.quick else SACConfig()
    overrides = {"warmup_steps": args.warmup_steps, "eval_every": args.eval_every, "eval_episodes": args.eval_episodes}
    sac = dataclasses.replace(sac, **{key: value for key, value in overrides.items() if value is not None})
    default = lambda value, normal, quick: quick if args.quick and value == normal else value  # noqa: E731
    arguments = sys.argv[1:] if argv is None else argv
    command = shlex.join([Path(sys.executable).name, "scripts/make_datasets.py", *arguments])
    options = BuildOptions(
        overwrite=args.overwrite, ref_min=args.ref_min_score, ref_max=args.ref_max_score,
        measure_references=args.measure_references,
        reference_episodes=default(args.reference_episodes, 100, QUICK_REFERENCE_EPISODES),
        medium_fraction=args.medium_fraction,
        medium_return=-math.inf if args.quick and args.medium_return is None else args.medium_return,
        medium_consecutive=(1 if args.quick else 2) if args.medium_consecutive is None else args.medium_consecutive,
        expert_steps=default(args.expert_steps, DEFAULT_EXPERT_STEPS, QUICK_EXPERT_STEPS),
        sac=sac, checkpoint_every=default(args.checkpoint_every, 50_000, QUICK_CHECKPOINT_EVERY),
        work_dir=args.work_dir, stop_after_checkpoints=args.stop_after_checkpoints, command=command,
    )
    size = default(args.size, DEFAULT_SIZE, QUICK_SIZE)
    for name, value in (("--size", size), ("--expert-steps", options.expert_steps),
                        ("--reference-episodes", options.reference_episodes), ("--threads", args.threads),
                        ("--checkpoint-every", options.checkpoint_every), ("--eval-every", sac.eval_every),
                        ("--eval-episodes", sac.eval_episodes), ("--medium-consecutive", options.medium_consecutive)):
        if value < 1:
            raise UserError(f"{name} must be positive, got {value}.")
    return size, options


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    rows, runs = [], {}
    try:
        size, options = options_from_args(args, argv)
        torch.set_num_threads(args.threads)
        levels = [level for level in LEVELS if level in args.levels]  # medium before medium-expert: rollouts are reused
        for env_id in args.env:  # fail before spending minutes on the first dataset
            for level in levels:
                check_request(env_id, level, args.namespace, options)
        for env_id in args.env:
            build = EnvBuild(env_id, size, args.seed, args.namespace, options)
            try:
                for level in levels:
                    _, entry = build.build(level)
                    rows.append(summary_row(entry))
                if build._run is not None:
                    runs[env_id] = build._run
            finally:
                build.close()
    except UserError as err:
        print(f"make_datasets.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as err:
        print(f"make_datasets.py: {err} (--stop-after-checkpoints); run the same command again to resume.",
              file=sys.stderr)
        sys.exit(3)
    print_table(rows)
    for env_id, run in runs.items():
        best = run.best_eval()
        print(f"SAC {env_id} seed {run.seed}: {run.step} steps trained in {run.seconds / 60:.1f} min in total; "
              f"best evaluation {best['return_mean']:.1f} at step {best['step']}; run directory {run.run_dir}")
    if rows:
        print(f"Manifest: {work_dir_for(args.namespace, options) / 'manifest.json'}")


if __name__ == "__main__":
    main()
