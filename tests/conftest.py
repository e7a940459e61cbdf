"""Shared test harness: a temporary Minari store with tiny datasets, wandb off.

For the whole session `MINARI_DATASETS_PATH` points at a temporary store and `WANDB_MODE` is
`disabled` (subprocesses inherit both). Fixtures (all session-scoped, each returns a dataset id in
that store):

- `hopper_dataset`: `o2o-test/hopper/random-v0`, 2000 random-policy transitions on Hopper-v5
  (seed 0), built by `scripts/make_datasets.py`, with D4RL reference scores.
- `nan_dataset`: the same episodes with one NaN in one observation.
- `mismatched_dataset`: Hopper-v5 episodes (11-dim observations, 3-dim actions) whose environment
  is Walker2d-v5 (17 / 6). The stored spaces describe the Hopper data, so the dataset is consistent
  with itself and loads; only a comparison with `dataset.recover_environment()` catches it.
- `empty_dataset`: a Hopper-v5 dataset with zero episodes (Minari 0.5.4 creates and loads it).

`minari_store` returns the store's path; `run_script(path, *args)` runs a repository script in a
subprocess (same interpreter, inherited environment, scratch working directory);
`train_script(name, run_dir_root, *args)` runs `algorithms/<name>.py` on the tiny Hopper dataset with
tiny budgets (`TINY_TRAIN_ARGS`, later arguments win); `load_algorithm(name)` imports
`algorithms/<name>.py` as a module for unit tests.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import make_datasets  # noqa: E402  (found through the sys.path entry above)

TEST_NAMESPACE = "o2o-test"
TINY_SIZE = 2000
TINY_SEED = 0
ALGORITHMS = ["iql", "iql_famo2o", "cql", "cql_famo2o", "awac", "awac_samg", "cql_samg"]
# Budgets that exercise every phase in seconds: offline, switch, online, evaluation, checkpoints.
TINY_TRAIN_ARGS = [
    "--offline_iterations", "60", "--online_iterations", "60", "--eval_freq", "40", "--eval_episodes", "1",
    "--log_every", "20", "--batch_size", "32", "--hidden_dim", "32", "--buffer_size", "5000",
    "--wandb_mode", "disabled", "--cpu_threads", "1",
]
# SAMG files start online updates after samg_learning_starts transitions; a small C-VAE keeps them fast.
SAMG_LEARNING_STARTS = 16
TINY_SAMG_ARGS = ["--samg_learning_starts", str(SAMG_LEARNING_STARTS), "--samg_vae_hidden", "32",
                  "--samg_reference_size", "100"]


def tiny_args(name: str) -> list:
    return TINY_TRAIN_ARGS + (TINY_SAMG_ARGS if name.endswith("samg") else [])


@pytest.fixture(scope="session", autouse=True)
def minari_store(tmp_path_factory) -> Path:
    """A temporary Minari store and `WANDB_MODE=disabled` for the whole session."""
    store = tmp_path_factory.mktemp("minari_datasets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(store))
        patch.setenv("WANDB_MODE", "disabled")
        yield store


@pytest.fixture(scope="session", autouse=True)
def hopper_dataset(minari_store) -> str:
    """`o2o-test/hopper/random-v0`: 2000 random transitions on Hopper-v5, built by the builder."""
    return make_datasets.build_dataset("Hopper-v5", "random", TINY_SIZE, TINY_SEED, TEST_NAMESPACE)


def tiny_hopper_episodes() -> list:
    """Fresh copies of the tiny Hopper episodes (same seed, so the same data as `hopper_dataset`)."""
    env = gym.make("Hopper-v5")
    try:
        return make_datasets.collect_random(env, TINY_SIZE, TINY_SEED)
    finally:
        env.close()


def write_bad_dataset(name: str, episodes: list, env_id: str = "Hopper-v5", **minari_kwargs) -> str:
    """Write `episodes` as `o2o-test/<name>-v0` with Hopper's reference scores; return the id."""
    dataset_id = f"{TEST_NAMESPACE}/{name}-v0"
    ref_min, ref_max = make_datasets.D4RL_REF_SCORES["hopper"]
    make_datasets.write_dataset(
        dataset_id, episodes, env_id, ref_min, ref_max,
        algorithm_name="test fixture", description=f"Deliberately broken test dataset: {name}.", **minari_kwargs,
    )
    return dataset_id


@pytest.fixture(scope="session")
def nan_dataset(minari_store) -> str:
    """Tiny Hopper data with observation [1, 0] of the middle episode set to NaN (Minari accepts it)."""
    episodes = tiny_hopper_episodes()
    episodes[len(episodes) // 2].observations[1, 0] = np.nan
    return write_bad_dataset("hopper/nan", episodes)


@pytest.fixture(scope="session")
def mismatched_dataset(minari_store) -> str:
    """Hopper-v5 data (obs 11, act 3) recorded under Walker2d-v5 (obs 17, act 6); loads fine."""
    hopper = gym.make("Hopper-v5")
    spaces = dict(observation_space=hopper.observation_space, action_space=hopper.action_space)
    hopper.close()
    return write_bad_dataset("walker2d/mismatched", tiny_hopper_episodes(), env_id="Walker2d-v5", **spaces)


@pytest.fixture(scope="session")
def empty_dataset(minari_store) -> str:
    """A Hopper-v5 dataset with no episodes at all."""
    return write_bad_dataset("hopper/empty", [])


@pytest.fixture(scope="session")
def run_script(minari_store, tmp_path_factory):
    """Run `python <repo>/<script> *args` in a scratch directory; return the CompletedProcess.

    The scratch working directory keeps MuJoCo's and wandb's log files out of the repository.
    """
    workdir = tmp_path_factory.mktemp("run_script")

    def run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / script), *map(str, args)]
        return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def train_script(run_script, hopper_dataset):
    """Run algorithms/<name>.py on the tiny Hopper dataset with tiny budgets into `runs_root`."""

    def train(name: str, runs_root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return run_script(f"algorithms/{name}.py", "--env", hopper_dataset, *tiny_args(name),
                          "--checkpoints_path", runs_root, *args, timeout=timeout)

    return train


_modules: dict = {}


@pytest.fixture(scope="session")
def load_algorithm():
    """Import algorithms/<name>.py as a module (algorithms/ is a folder of scripts, not a package)."""

    def load(name: str):
        if name not in _modules:
            spec = importlib.util.spec_from_file_location(f"algorithm_{name}", REPO / "algorithms" / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _modules[name] = module
        return _modules[name]

    return load
