"""Evaluate a run's checkpoint again: with the deterministic action (what every algorithm file logs as
`eval/*`) and with actions sampled from the policy (what the online phase collects data with).

    python scripts/eval_policy.py runs/<run>                                # checkpoint.pt, both modes
    python scripts/eval_policy.py runs/<run> --checkpoint offline.pt --episodes 50 --json

Episode i of each mode is reset with `--seed` + i (default: the run's `eval_seed`, so the
deterministic mode of `checkpoint.pt` repeats the run's last logged evaluation when `--episodes`
equals its `eval_episodes`); sampled actions draw from torch's generator seeded with `--seed`. For
a FamO2O run, beta comes from the balance model as in the run's own evaluations. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from run_loading import load_run

MODES = ("deterministic", "stochastic")


def evaluate_modes(run_dir: Path, checkpoint: str, episodes: int, seed: Optional[int],
                   modes: List[str]) -> List[Dict[str, Any]]:
    torch.set_num_threads(1)
    run = load_run(run_dir, checkpoint)
    seed = run.config.eval_seed if seed is None else seed
    results = []
    for mode in modes:
        torch.manual_seed(seed)
        start = time.perf_counter()
        returns = run.module.evaluate(run.eval_env, lambda s: run.agent.act(s, deterministic=mode == "deterministic"),
                                      run.transform, episodes, seed)
        per_episode = [run.module.normalized_score(np.array([r]), run.references) for r in returns]
        results.append({
            "run": str(run_dir), "checkpoint": checkpoint, "iteration": run.checkpoint["iteration"], "mode": mode,
            "episodes": episodes, "seed": seed, "return_mean": float(returns.mean()),
            "return_std": float(returns.std()),
            "normalized_score": run.module.normalized_score(returns, run.references),
            "normalized_scores": per_episode if per_episode[0] is not None else None,
            "seconds": time.perf_counter() - start,
        })
    return results


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="checkpoint.pt", help="checkpoint file of the run directory")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per mode (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="first reset seed (default: the run's eval_seed)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", action="store_true", help="print one JSON object per mode")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error("--episodes must be at least 1")
    for result in evaluate_modes(args.run_dir, args.checkpoint, args.episodes, args.seed, args.modes):
        if args.json:
            print(json.dumps(result))
            continue
        score = result["normalized_score"]
        score_text = f"normalized score {score:6.1f}, " if score is not None else ""
        print(f"{result['checkpoint']} (iteration {result['iteration']}) {result['mode']:>13}: {score_text}"
              f"return {result['return_mean']:8.1f} +- {result['return_std']:6.1f} over {result['episodes']} "
              f"episodes from seed {result['seed']}")


if __name__ == "__main__":
    main()
