"""Build Minari datasets from gymnasium MuJoCo environments.

Usage:

    python scripts/make_datasets.py                                  # random level, Hopper/Walker2d/HalfCheetah
    python scripts/make_datasets.py --env Hopper-v5 --levels random --size 1000000 --seed 0
    python scripts/make_datasets.py --env Swimmer-v5 --ref-min-score 0 --ref-max-score 360
    python scripts/make_datasets.py --quick --namespace scratch       # 2000 transitions, for a quick look

Each (environment, level) pair becomes the dataset `<namespace>/<env>/<level>-v0`, e.g.
`o2o/hopper/random-v0` or `o2o/halfcheetah/random-v0`, in the local Minari store
(`$MINARI_DATASETS_PATH`, else `~/.minari/datasets`). Load it with `minari.load_dataset(id)`.

What a dataset holds:

- Episodes exactly as gymnasium returns them: `observations` (T+1 rows, first and last included, in
  the dtype the observation space declares), `actions`, `rewards`, `terminations`, `truncations`.
  Episode `i` starts from `env.reset(seed=seed + i)` (the seed is stored per episode); the last
  episode is cut when the transition budget runs out and then ends with `truncations[-1] = True`.
- `ref_min_score` / `ref_max_score`, shared by every level of one environment, so that
  `minari.get_normalized_score(dataset, returns)` works. D4RL's published random/expert returns are
  the defaults for hopper, halfcheetah, walker2d and ant; other environments need
  `--ref-min-score` and `--ref-max-score`.
- `env` and `eval_env` specs (`dataset.recover_environment()` rebuilds the environment) and the
  gymnasium/mujoco versions it was recorded with (Minari warns on load when they differ).

Levels: `random` (uniform random actions from a seeded numpy Generator). New levels are new entries
in `LEVELS`: a collector `collect(env, size, seed) -> list[EpisodeBuffer]` plus its metadata.

A dataset is built in a hidden staging store inside the Minari store and renamed into place once
complete, so a crash never leaves a half-written dataset under the final id. Existing datasets are
kept unless `--overwrite` is given. The same seed always gives the same arrays.

Importable core (used by the tests): `build_dataset(env_id, level, size, seed, namespace, ...)`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import gymnasium as gym
import minari
import numpy as np
from gymnasium.envs.registration import EnvSpec, parse_env_id
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.namespace import create_namespace, list_local_namespaces
from minari.storage import get_dataset_path
from tqdm import tqdm

DEFAULT_ENVS = ["Hopper-v5", "Walker2d-v5", "HalfCheetah-v5"]
DEFAULT_SIZE = 1_000_000
QUICK_SIZE = 2_000
AUTHOR = "o2o project"
# D4RL's published (random, expert) returns: one normalization scale per environment, every level.
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}

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


def rollout(env: gym.Env, policy: Policy, size: int, seed: int) -> list[EpisodeBuffer]:
    """Episodes seeded `seed + i` until exactly `size` transitions, with a progress bar."""
    episodes: list[EpisodeBuffer] = []
    steps, return_sum = 0, 0.0
    with tqdm(total=size, unit="step", desc=env.spec.id, dynamic_ncols=True) as bar:
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


@dataclass(frozen=True)
class Level:
    """How one dataset level is collected and described."""

    collect: Callable[[gym.Env, int, int], list[EpisodeBuffer]]
    algorithm_name: str
    description: str


LEVELS = {
    "random": Level(collect_random, "uniform random policy", "Actions drawn uniformly from the action space."),
}


# ---------------------------------------------------------------------------------------------
# Checking a request
# ---------------------------------------------------------------------------------------------


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


def reference_scores(env_id: str, ref_min: Optional[float], ref_max: Optional[float]) -> tuple[float, float]:
    """The (min, max) normalization scores: given ones, else D4RL's for the four D4RL envs."""
    if (ref_min is None) != (ref_max is None):
        raise UserError("Give both --ref-min-score and --ref-max-score, or neither.")
    if ref_min is None:
        name = env_name(env_id)
        if name not in D4RL_REF_SCORES:
            raise UserError(
                f"No default reference scores for {env_id} (defaults exist for "
                f"{', '.join(sorted(D4RL_REF_SCORES))}). Pass --ref-min-score (random-policy return) "
                "and --ref-max-score (expert return); every level of one environment must use the same pair."
            )
        ref_min, ref_max = D4RL_REF_SCORES[name]
    if not ref_max > ref_min:
        raise UserError(f"--ref-max-score ({ref_max}) must be larger than --ref-min-score ({ref_min}).")
    return float(ref_min), float(ref_max)


def store_error(err: OSError) -> UserError:
    return UserError(f"Cannot write to the Minari store: {err}. Set MINARI_DATASETS_PATH to a writable directory.")


def store_root() -> Path:
    """The local Minari store (created if missing), or a UserError when it cannot be created."""
    try:
        return get_dataset_path()
    except OSError as err:
        raise store_error(err) from None


def check_request(env_id: str, level: str, namespace: str, overwrite: bool,
                  ref_min: Optional[float], ref_max: Optional[float]) -> tuple[str, EnvSpec, float, float]:
    """Validate one build request before any work; return (dataset_id, env spec, ref_min, ref_max)."""
    spec = env_spec_for(env_id)
    if level not in LEVELS:
        raise UserError(f"Unknown level {level!r}; available levels: {', '.join(LEVELS)}.")
    dataset_id = dataset_id_for(namespace, spec.id, level)
    ref_min, ref_max = reference_scores(spec.id, ref_min, ref_max)
    path = store_root() / dataset_id
    if path.exists() and not overwrite:
        raise UserError(f"Dataset {dataset_id} already exists at {path}. Pass --overwrite to replace it.")
    return dataset_id, spec, ref_min, ref_max


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


def build_dataset(env_id: str, level: str, size: int, seed: int, namespace: str, overwrite: bool = False,
                  ref_min: Optional[float] = None, ref_max: Optional[float] = None) -> str:
    """Collect `size` transitions of `level` on `env_id`, store them, and return the dataset id."""
    dataset_id, spec, ref_min, ref_max = check_request(env_id, level, namespace, overwrite, ref_min, ref_max)
    if size < 1:
        raise UserError(f"--size must be positive, got {size}.")
    root = store_root()
    with staging_dir(root) as staging:  # made first: an unwritable store fails before the collection
        env = gym.make(spec)
        try:
            episodes = LEVELS[level].collect(env, size, seed)
        finally:
            env.close()
        description = (
            f"{LEVELS[level].description} {size} transitions from {spec.id}; episode i starts from "
            f"env.reset(seed={seed} + i). Built by scripts/make_datasets.py."
        )
        print(f"Writing {len(episodes)} episodes to {dataset_id} ...", file=sys.stderr)  # ~1 ms per episode
        with minari_store_at(staging):
            write_dataset(dataset_id, episodes, spec.id, ref_min, ref_max, LEVELS[level].algorithm_name, description)
        move_into_store(staging, root, dataset_id)
    dataset = minari.load_dataset(dataset_id)
    if dataset.id != dataset_id or dataset.total_steps != size:
        raise RuntimeError(f"{dataset_id} reloads as {dataset.id} with {dataset.total_steps} steps, expected {size}.")
    return dataset_id


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def summarize(dataset_id: str, seconds: float) -> dict:
    """One summary-table row, read back from the stored dataset."""
    dataset = minari.load_dataset(dataset_id)
    returns = np.array([episode.rewards.sum() for episode in dataset.iterate_episodes()])
    return {
        "dataset": dataset_id,
        "transitions": dataset.total_steps,
        "episodes": dataset.total_episodes,
        "return mean": f"{returns.mean():.1f}",
        "return min": f"{returns.min():.1f}",
        "return max": f"{returns.max():.1f}",
        "normalized": f"{100 * minari.get_normalized_score(dataset, returns).mean():.1f}",
        "seconds": f"{seconds:.1f}",
    }


def print_table(rows: list[dict]) -> None:
    widths = {key: max(len(key), *(len(str(row[key])) for row in rows)) for key in rows[0]}
    print("  ".join(key.rjust(width) for key, width in widths.items()))
    for row in rows:
        print("  ".join(str(row[key]).rjust(width) for key, width in widths.items()))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build Minari datasets <namespace>/<env>/<level>-v0 from gymnasium environments."
    )
    parser.add_argument("--env", action="append", metavar="ENV_ID",
                        help=f"gymnasium environment id, repeatable (default: {' '.join(DEFAULT_ENVS)})")
    parser.add_argument("--levels", nargs="+", choices=list(LEVELS), default=list(LEVELS),
                        help="levels to build (default: all)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="transitions per dataset (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the policy; episode i resets with seed + i (default: %(default)s)")
    parser.add_argument("--namespace", default="o2o", help="Minari namespace of the dataset ids (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace datasets that already exist")
    parser.add_argument("--quick", action="store_true", help=f"tiny datasets ({QUICK_SIZE} transitions), for tests")
    parser.add_argument("--ref-min-score", type=float,
                        help="normalization minimum (a random policy's return); required, with --ref-max-score and "
                        f"a single --env, for environments other than {', '.join(sorted(D4RL_REF_SCORES))}")
    parser.add_argument("--ref-max-score", type=float, help="normalization maximum (an expert's return)")
    args = parser.parse_args(argv)
    args.env = args.env or DEFAULT_ENVS
    if args.quick:
        args.size = QUICK_SIZE
    if (args.ref_min_score is not None or args.ref_max_score is not None) and len(args.env) > 1:
        parser.error("--ref-min-score/--ref-max-score set one environment's scale: give a single --env with them")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    jobs = [(env_id, level) for env_id in args.env for level in args.levels]
    build_args = dict(namespace=args.namespace, overwrite=args.overwrite,
                      ref_min=args.ref_min_score, ref_max=args.ref_max_score)
    rows = []
    try:
        for env_id, level in jobs:  # fail before spending minutes on the first dataset
            check_request(env_id, level, **build_args)
        for env_id, level in jobs:
            start = time.perf_counter()
            dataset_id = build_dataset(env_id, level, args.size, args.seed, **build_args)
            rows.append(summarize(dataset_id, time.perf_counter() - start))
    except UserError as err:
        print(f"make_datasets.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    print_table(rows)


if __name__ == "__main__":
    main()
