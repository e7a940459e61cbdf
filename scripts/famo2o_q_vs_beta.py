"""How much the balance model of a FamO2O run can see: Q of the universal policy's action per beta.

    python scripts/famo2o_q_vs_beta.py runs/<run>                      # offline.pt and checkpoint.pt
    python scripts/famo2o_q_vs_beta.py runs/<run> --states 8192 --betas 1,2,3,4,5

The balance model picks beta(s) by maximising min Q(s, a ~ pi_u(s, beta)) (iql_famo2o.py: the
target critics; cql_famo2o.py: the current critics). For each checkpoint of the run this prints,
over dataset states, the mean of that Q at the universal policy's deterministic action for a grid
of betas, the spread of those means across the grid, and the mean beta the balance model picks;
next to the family evaluation (`family_scores.jsonl`: the return of each fixed beta) it tells
whether the balance model had a signal to follow. For scale it also prints the spread per state
(the balance model chooses per state), how far apart the actions of the lowest and highest beta are,
and the same critic's Q at the dataset's action and at a uniformly random action: a small spread
across betas next to a large dataset-vs-random gap means the family's actions are too close for
the critic to rank, not that the critic ignores actions. For an adaptive run it also prints how
widely the balance model's sampled betas (those of FamO2O's online updates) spread within a state,
next to the spread of its deterministic betas (those it acts with) across states. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from run_loading import load_run

FAMO2O_SCRIPTS = ("iql_famo2o", "cql_famo2o")


def deterministic_action(module: Any, agent: Any, states: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """pi_u(s, beta)'s deterministic action, as the file's balance model scores it."""
    dist = agent.actor(states, betas)
    if hasattr(module, "CriticPair"):  # cql_famo2o.py: tanh-Gaussian actor
        return torch.tanh(dist.loc)
    return dist.mean.clamp(-1.0, 1.0)  # iql_famo2o.py


def min_q(module: Any, agent: Any, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """min over the critic pair, with the critics the file's balance model maximises."""
    if hasattr(module, "CriticPair"):  # cql_famo2o.py: current critics
        return agent.qf(states, actions).min(0).values
    return agent.q_target(states, actions).min(0).values  # iql_famo2o.py: target critics


def sampled_beta_std_per_state(agent: Any, states: torch.Tensor, generator: torch.Generator,
                               n_samples: int = 256) -> Optional[float]:
    """Std of beta ~ pi_b(s) over samples of one state, averaged over states (None without a balance
    model): how far FamO2O's online update betas stray from the beta it acts with at that state."""
    if agent.balance_mode != "adaptive":
        return None
    dist = agent.balance_model(states)
    loc, scale = dist.loc.reshape(-1), dist.scale.reshape(-1)
    pre_tanh = loc + scale * torch.randn((n_samples, states.shape[0]), generator=generator)
    return agent.to_beta(torch.tanh(pre_tanh)).std(0).mean().item()


def analyse(run_dir: Path, checkpoints: List[str], n_states: int, betas: Optional[List[float]]) -> List[Dict[str, Any]]:
    torch.set_num_threads(1)
    run = load_run(run_dir, checkpoints[0])
    if run.name not in FAMO2O_SCRIPTS:
        raise SystemExit(f"{run_dir} is a {run.name} run; this diagnostic reads {' or '.join(FAMO2O_SCRIPTS)} runs.")
    dataset = run.transform.dataset(run.data)
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, dataset["states"].shape[0], (n_states,), generator=generator)
    states = torch.as_tensor(dataset["states"])[index]
    dataset_actions = torch.as_tensor(dataset["actions"])[index]
    random_actions = torch.rand(dataset_actions.shape, generator=generator) * 2.0 - 1.0
    results = []
    for checkpoint_name in checkpoints:
        checkpoint = run.load_checkpoint(run_dir / checkpoint_name)
        agent = run.agent
        grid = betas or torch.linspace(agent.beta_min, agent.beta_max, 5).tolist()
        with torch.no_grad():
            actions = [deterministic_action(run.module, agent, states, torch.full((n_states,), beta)) for beta in grid]
            q_per_state = torch.stack([min_q(run.module, agent, states, a) for a in actions])  # [betas, states]
            chosen = agent.acting_betas(states)
            q_dataset = min_q(run.module, agent, states, dataset_actions).mean().item()
            q_random = min_q(run.module, agent, states, random_actions).mean().item()
            sampled_std = sampled_beta_std_per_state(agent, states, torch.Generator().manual_seed(1))
        q = {beta: q_per_state[i].mean().item() for i, beta in enumerate(grid)}
        results.append({
            "checkpoint": checkpoint_name, "iteration": checkpoint["iteration"], "q_by_beta": q,
            "q_spread": max(q.values()) - min(q.values()),
            "q_spread_per_state": (q_per_state.max(0).values - q_per_state.min(0).values).mean().item(),
            "action_distance": (actions[-1] - actions[0]).norm(dim=-1).mean().item(),
            "q_dataset_action": q_dataset, "q_random_action": q_random,
            "balance_beta_mean": chosen.mean().item(), "balance_beta_std": chosen.std().item(),
            "balance_sampled_beta_std_per_state": sampled_std,
        })
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
              f"{result['q_spread']:.3f} (per state {result['q_spread_per_state']:.3f})")
        print(f"  |a(beta max) - a(beta min)| = {result['action_distance']:.3f}; min Q at the dataset action "
              f"{result['q_dataset_action']:.3f}, at a uniformly random action {result['q_random_action']:.3f}")
        if result["balance_sampled_beta_std_per_state"] is not None:
            print(f"  balance model's sampled beta: std {result['balance_sampled_beta_std_per_state']:.2f} within a state "
                  f"(its deterministic beta: std {result['balance_beta_std']:.2f} across states)")
        for beta, q in result["q_by_beta"].items():
            print(f"  beta {beta:g}: mean min Q(s, pi_u(s, beta)) = {q:.3f}")


if __name__ == "__main__":
    main()
