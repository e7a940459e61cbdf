"""Load a finished (or running) run of an algorithm script for analysis: its module, resolved config,
dataset, transform, environments and an agent with a checkpoint's weights. Used by the diagnostics in
scripts/ (eval_policy.py, famo2o_q_vs_beta.py); CPU only."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import yaml

from benchmark import dataset_sha256, recorded_dataset_sha256

REPO = Path(__file__).resolve().parents[1]

# The agent class of each algorithm file (constructed as Class(config, obs_dim, act_dim, device)).
AGENT_CLASSES = {
    "iql": "ImplicitQLearning",
    "iql_famo2o": "FamO2OImplicitQLearning",
    "cql": "ConservativeQLearning",
    "cql_famo2o": "FamO2OConservativeQLearning",
    "awac": "AdvantageWeightedActorCritic",
    "awac_samg": "SAMGAdvantageWeightedActorCritic",
    "cql_samg": "SAMGConservativeQLearning",
}


def load_algorithm(name: str) -> Any:
    """Import algorithms/<name>.py as a module (algorithms/ is a folder of scripts, not a package)."""
    module_name = f"loaded_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@dataclass
class LoadedRun:
    name: str  # algorithm file name, e.g. "iql_famo2o"
    module: Any
    config: Any  # the file's TrainConfig, from the run's config.yaml, on the CPU
    dataset: Any
    data: Dict[str, np.ndarray]
    transform: Any
    env: Any
    eval_env: Any
    references: Optional[tuple]
    agent: Any = None
    checkpoint: Optional[dict] = None

    def load_checkpoint(self, path: Path) -> dict:
        """Weights of `path` into the agent (built on first use); returns the checkpoint. The algorithm
        file's own loader checks the algorithm, the dataset id and the normalisation constants."""
        try:
            checkpoint = self.module.load_checkpoint(str(path), self.config, self.transform)
        except self.module.UserError as error:
            raise SystemExit(f"error: {error}") from None
        if self.agent is None:
            agent_class = getattr(self.module, AGENT_CLASSES[self.name])
            self.agent = agent_class(self.config, self.data["states"].shape[1], self.data["actions"].shape[1],
                                     torch.device("cpu"))
        self.agent.load_state_dict(checkpoint["agent"])
        self.checkpoint = checkpoint
        return checkpoint


def load_run(run_dir: Path, checkpoint_name: str) -> LoadedRun:
    """The run of `run_dir` (its config.yaml and the algorithm named in `checkpoint_name`), with that
    checkpoint loaded."""
    checkpoint_path = run_dir / checkpoint_name
    if not checkpoint_path.is_file():
        raise SystemExit(f"{checkpoint_path} does not exist (a run writes checkpoint.pt at every evaluation and "
                         "offline.pt at the switch).")
    name = torch.load(checkpoint_path, map_location="cpu", weights_only=False).get("algorithm")
    if name not in AGENT_CLASSES:
        raise SystemExit(f"{checkpoint_path} is not a checkpoint of an algorithms/*.py file (algorithm {name!r}).")
    module = load_algorithm(name)
    fields = yaml.safe_load((run_dir / "config.yaml").read_text())
    config = module.TrainConfig(**{k: v for k, v in fields.items() if k in module.TrainConfig.__dataclass_fields__})
    config.device = "cpu"
    trained_on, now = recorded_dataset_sha256(run_dir), dataset_sha256(config.env)
    if trained_on and now and trained_on != now:
        raise SystemExit(f"error: {run_dir} trained on {config.env} with sha256 {trained_on[:10]}, but the local store "
                         f"holds other data under that id (sha256 {now[:10]}): its states and scores would not mean "
                         "the same.")
    try:
        dataset = module.load_minari_dataset(config.env, False)
        data, episode_returns = module.flatten_episodes(dataset)
        env, eval_env = module.make_environments(dataset, data)
        transform = module.fit_transform(data, episode_returns, env, config)
    except module.UserError as error:
        raise SystemExit(f"error: {error}") from None
    run = LoadedRun(name, module, config, dataset, data, transform, env, eval_env, module.reference_scores(dataset))
    run.load_checkpoint(checkpoint_path)
    return run
