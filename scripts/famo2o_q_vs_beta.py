"""How much the balance model of a FamO2O run can see: Q of the universal policy's action per beta.

    python scripts/famo2o_q_vs_beta.py runs/<run>                      # offline.pt and checkpoint.pt
    python scripts/famo2o_q_vs_beta.py runs/<run> --states 8192 --betas 1,2,3,4,5

The balance model picks beta(s) by maximising min Q(s, a ~ pi_u(s, beta)) (iql_famo2o.py: the
target critics; cql_famo2o.py: the current critics). For each checkpoint of the run this prints,
over dataset states, the mean of that Q at the universal policy's deterministic action for a grid
of betas, the spread of those means across the grid, and the mean beta the balance model picks;
next to the family evaluation (`family_scores.jsonl`: the return of each fixed beta) it tells
whether the balance model had a signal to follow. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from run_loading import load_run

FAMO2O_SCRIPTS = ("iql_famo2o", "cql_famo2o")


def deterministic_q(module: Any, agent: Any, states: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """min Q(s, pi_u(s, beta)) with the critics the file's balance model maximises."""
    dist = agent.actor(states, betas)
    if hasattr(module, "CriticPair"):  # cql_famo2o.py: tanh-Gaussian actor, current critics
        return agent.qf(states, torch.tanh(dist.loc)).min(0).values
    return agent.q_target(states, dist.mean.clamp(-1.0, 1.0)).min(0).values  # iql_famo2o.py


def analyse(run_dir: Path, checkpoints: List[str], n_states: int, betas: Optional[List[float]]) -> List[Dict[str, Any]]:
    torch.set_num_threads(1)
    run = load_run(run_dir, checkpoints[0])
    if run.name not in FAMO2O_SCRIPTS:
        raise SystemExit(f"{run_dir} is a {run.name} run; this diagnostic reads {' or '.join(FAMO2O_SCRIPTS)} runs.")
    states_all = torch.as_tensor(run.transform.dataset(run.data)["states"])
    index = torch.randint(0, states_all.shape[0], (n_states,), generator=torch.Generator().manual_seed(0))
    states = states_all[index]
    results = []
    for checkpoint_name in checkpoints:
        checkpoint = run.load_checkpoint(run_dir / checkpoint_name)
        agent = run.agent
        grid = betas or torch.linspace(agent.beta_min, agent.beta_max, 5).tolist()
        with torch.no_grad():
            q = {beta: deterministic_q(run.module, agent, states, torch.full((n_states,), beta)).mean().item()
                 for beta in grid}
            chosen = agent.acting_betas(states)
        results.append({"checkpoint": checkpoint_name, "iteration": checkpoint["iteration"], "q_by_beta": q,
                        "q_spread": max(q.values()) - min(q.values()), "balance_beta_mean": chosen.mean().item(),
                        "balance_beta_std": chosen.std().item()})
    return results


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoints", default="offline.pt,checkpoint.pt",
                        help="checkpoint files of the run directory (those that exist are read)")
    parser.add_argument("--states", type=int, default=4096, help="dataset states averaged over")
    parser.add_argument("--betas", default="", help="comma-separated betas (default: 5 from beta_min to beta_max)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per checkpoint")
    args = parser.parse_args(argv)
    checkpoints = [c for c in args.checkpoints.split(",") if (args.run_dir / c).is_file()]
    if not checkpoints:
        raise SystemExit(f"None of {args.checkpoints} exists in {args.run_dir}.")
    betas = [float(b) for b in args.betas.split(",")] if args.betas else None
    for result in analyse(args.run_dir, checkpoints, args.states, betas):
        if args.json:
            print(json.dumps(result))
            continue
        print(f"{result['checkpoint']} (iteration {result['iteration']}): balance model's beta "
              f"{result['balance_beta_mean']:.2f} +- {result['balance_beta_std']:.2f}; Q spread across betas "
              f"{result['q_spread']:.3f}")
        for beta, q in result["q_by_beta"].items():
            print(f"  beta {beta:g}: mean min Q(s, pi_u(s, beta)) = {q:.3f}")


if __name__ == "__main__":
    main()
