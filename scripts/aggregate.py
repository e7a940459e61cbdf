"""Aggregate benchmark runs into tables and plots: scores, learning curves, FamO2O families, SAMG's p.

Run (from the repository root):

    python scripts/aggregate.py runs/benchmark/medium_replay_cpu --out results/benchmark
    python scripts/aggregate.py ROOT [ROOT ...] --out DIR [--last-n 3] [--include-unfinished]
    # keep the small files of every run (config, metrics, family scores, provenance) next to the
    # results, so that the tables and plots can be rebuilt from the repository alone
    python scripts/aggregate.py runs/benchmark/medium_replay_cpu --out results/benchmark \
        --export-runs results/benchmark/runs
    python scripts/aggregate.py results/benchmark/runs --out results/benchmark --readme README.md

A ROOT holds run directories (`<root>/<run>/metrics.jsonl`, `config.yaml`, and, when launched by
scripts/benchmark.py, `provenance.json`). Runs are grouped by (dataset, algorithm label); the label,
base and seed come from provenance.json, else from the run name `<label>__<dataset>__s<seed>` and
config.yaml. Only finished runs (an evaluation at offline + online iterations) count unless
`--include-unfinished`.

Per run: the *offline score* is its last evaluation of the offline phase (phase 0), the *final
score* the mean of its last N evaluations (`--last-n`, default 3), the *online average* the mean of
all its evaluations of the online phase (phase 1: an area-under-the-curve view of fine-tuning, less
sensitive than the final score to the noise of single evaluations), and *training episodes* the
mean score of the online episodes it collected in the stretch its last N evaluations span (actions
sampled from the policy: what exploration scored, next to the deterministic evaluations). Scores are
normalized scores
(`eval/normalized_score`) when the dataset has reference scores, else mean returns. Per (dataset,
algorithm): mean and sample standard deviation (ddof=1) over seeds; *delta vs base* = final mean
minus the base algorithm's final mean on the same dataset (BASES in scripts/benchmark.py, or the
matrix's `base`), marked when the two rows' budgets, data or seeds differ.

Writes into --out:
    summary.csv, summary.json   one row per (dataset, algorithm); summary.json also has every run
    table.md                    the markdown table (with notes and a provenance footnote per row)
    curves.csv, curves_<dataset>.png         eval score vs iteration, each method next to its base,
                                             mean +/- std over seeds, the offline/online switch marked
    family.csv, family_<dataset>.png         FamO2O: score vs beta at the end of each phase
    samg.csv, samg_<dataset>.png             SAMG: its samg/* scalars (p mean, fraction zeroed, ...)
`--readme FILE` replaces the text between `<!-- benchmark-table:begin -->` and
`<!-- benchmark-table:end -->` in FILE with table.md.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from benchmark import (BASES, REPO, UserError, evaluations, read_config, read_jsonl, score_of,  # noqa: E402
                       total_iterations)

# Row order of the tables: each base algorithm followed by its methods.
ORDER = ["iql", "iql_famo2o", "cql", "cql_famo2o", "cql_samg", "awac", "awac_samg"]
README_BEGIN, README_END = "<!-- benchmark-table:begin -->", "<!-- benchmark-table:end -->"
EXPORTED_FILES = ("config.yaml", "metrics.jsonl", "family_scores.jsonl", "provenance.json")


@dataclass
class RunResult:
    name: str
    path: Path
    label: str
    base: Optional[str]
    dataset: str
    seed: int
    config: dict
    finished: bool
    metric: str  # "normalized score" or "return"
    evals: List[Tuple[int, float, Optional[int]]]  # (iteration, score, phase)
    offline_score: Optional[float]
    final_score: Optional[float]
    online_average: Optional[float]
    training_episodes: Optional[float]
    family: List[dict] = field(default_factory=list)
    samg: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def budget(self) -> Tuple[Optional[int], Optional[int]]:
        return self.config.get("offline_iterations"), self.config.get("online_iterations")


def load_run(run_dir: Path, last_n: int) -> Optional[RunResult]:
    records = read_jsonl(run_dir / "metrics.jsonl")
    config = read_config(run_dir)
    provenance = {}
    if (run_dir / "provenance.json").is_file():
        try:
            provenance = json.loads((run_dir / "provenance.json").read_text())
        except json.JSONDecodeError:
            provenance = {}
    evals = evaluations(records)
    if not evals or not config:
        return None
    parts = run_dir.name.split("__")
    label = provenance.get("algorithm") or (parts[0] if len(parts) == 3 else str(config.get("group", run_dir.name)))
    scores = [score_of(r) for r in evals]
    offline = [s for r, s in zip(evals, scores) if r.get("phase") == 0]
    online = [s for r, s in zip(evals, scores) if r.get("phase") == 1]
    total = total_iterations(config)
    metric = "normalized score" if all("eval/normalized_score" in r for r in evals) else "return"
    # training episodes that ended in the stretch of training the final score's evaluations span; an
    # episode is logged at the index t of its last step, an evaluation after that step at t + 1
    window_start = evals[-last_n - 1]["iteration"] if len(evals) > last_n else -1
    train_key = "train/normalized_return" if metric == "normalized score" else "train/episode_return"
    training = [r[train_key] for r in records if train_key in r and r["iteration"] >= window_start]
    samg: Dict[str, Dict[int, float]] = defaultdict(dict)
    for record in records:
        for key, value in record.items():
            if key.startswith("samg/") and isinstance(value, (int, float)):
                samg[key][record["iteration"]] = float(value)
    family = {(row["iteration"], round(row["beta"], 6)): row for row in read_jsonl(run_dir / "family_scores.jsonl")}
    return RunResult(
        name=run_dir.name,
        path=run_dir,
        label=label,
        base=provenance.get("base") or BASES.get(Path(provenance.get("script", "")).stem or label),
        dataset=provenance.get("dataset") or str(config.get("env")),
        seed=int(provenance.get("seed", config.get("seed", 0))),
        config=config,
        finished=total is not None and any(r["iteration"] == total for r in evals),
        metric=metric,
        evals=[(r["iteration"], s, r.get("phase")) for r, s in zip(evals, scores)],
        offline_score=offline[-1] if offline else None,
        final_score=statistics.fmean(scores[-last_n:]),
        online_average=statistics.fmean(online) if online else None,
        training_episodes=statistics.fmean(training) if training else None,
        family=[family[k] for k in sorted(family)],
        samg={key: sorted(values.items()) for key, values in samg.items()},
        provenance=provenance,
    )


def find_runs(roots: Sequence[str], last_n: int) -> Tuple[List[RunResult], List[str]]:
    runs, skipped = [], []
    for root in roots:
        if not Path(root).is_dir():
            raise UserError(f"'{root}' is not a directory of runs.")
        for metrics in sorted(Path(root).glob("*/metrics.jsonl")):
            run = load_run(metrics.parent, last_n)
            if run is None:
                skipped.append(f"{metrics.parent} (no evaluation or no config.yaml yet)")
            else:
                runs.append(run)
    return runs, skipped


# ---------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def short_count(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % (size // 10) == 0:
            value = n / size
            return f"{value:g}{unit}"
    return str(n)


def budget_text(runs: Sequence[RunResult]) -> str:
    budgets = sorted({run.budget for run in runs}, key=str)
    return " / ".join(f"{short_count(off)} + {short_count(on)}" for off, on in budgets)


def family_key(label: str, bases: Dict[str, Optional[str]]) -> tuple:
    root = label
    for _ in range(10):
        if not bases.get(root):
            break
        root = bases[root]
    rank = lambda name: ORDER.index(name) if name in ORDER else len(ORDER)  # noqa: E731
    return rank(root), root, label != root, rank(label), label


def git_blob_sha256(commit: str, path: str) -> Optional[str]:
    try:
        blob = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return hashlib.sha256(blob.stdout).hexdigest() if blob.returncode == 0 else None


def script_commit_note(launch: Dict[str, Any], script: Optional[str]) -> str:
    """"" for a launch from a clean tree; else whether the launched script is the file at the commit.

    A launch from a tree with uncommitted changes ran the committed script when the script's
    recorded sha256 equals that of the file at the commit (other files, which the run's resolved
    config.yaml makes irrelevant to training, were changed); otherwise the commit that first holds a
    file with that sha256 is named (checked with git), or the script is marked as uncommitted."""
    if not launch.get("dirty"):
        return ""
    sha, commit = launch.get("script_sha256"), launch.get("commit")
    if script and sha and commit:
        if git_blob_sha256(commit, script) == sha:
            return " (script as committed, other files uncommitted)"
        try:
            later = subprocess.run(["git", "rev-list", "--reverse", f"{commit}..HEAD", "--", script], cwd=REPO,
                                   capture_output=True, text=True, timeout=30).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            later = []
        for candidate in later:
            if git_blob_sha256(candidate, script) == sha:
                return f" (script as committed in `{candidate[:10]}`)"
    return " (script with uncommitted changes)"


def provenance_text(runs: Sequence[RunResult]) -> str:
    launches = [(launch, run.provenance.get("script")) for run in runs for launch in run.provenance.get("launches", [])]
    if not launches:
        return "no provenance.json (not launched by scripts/benchmark.py); resolved configs in each run's config.yaml"
    notes: Dict[str, set] = {}
    for launch, script in launches:
        notes.setdefault((launch.get("commit") or "unknown")[:10], set()).add(script_commit_note(launch, script))
    # a commit launched once clean and once with other files uncommitted is named once, with its note
    commits = sorted(f"`{commit}`{note}" for commit, commit_notes in notes.items()
                     for note in (commit_notes - {""} or {""}))
    launches = [launch for launch, _ in launches]
    machines = sorted({f"{launch.get('gpu') or launch.get('cpu')} ({launch.get('cpu_count')} cores, device "
                       f"{launch.get('device')}, host {launch.get('host')})" for launch in launches})
    software = sorted({f"torch {launch.get('torch')}, mujoco {launch.get('mujoco')}, Python {launch.get('python')}"
                       for launch in launches})
    matrices = sorted({str(run.provenance.get("matrix")) for run in runs if run.provenance.get("matrix")})
    hashes = sorted({f"`{launch['dataset_sha256'][:10]}`" for launch in launches if launch.get("dataset_sha256")})
    unrecorded = any(not launch.get("dataset_sha256") for launch in launches)
    parts = [f"commit {', '.join(commits)}"]
    if not hashes:
        parts.append("dataset sha256 not recorded")
    else:
        parts.append(f"dataset sha256 {', '.join(hashes)}"
                     + (" (runs trained on different data)" if len(hashes) > 1 else "")
                     + (" (not recorded for some launches)" if unrecorded else ""))
    parts.append(f"matrix {', '.join(f'`{m}`' for m in matrices)}" if matrices else "matrix from command-line flags")
    parts.append("resolved config: each run's config.yaml")
    parts.append(f"machine {'; '.join(machines)}")
    parts.append("; ".join(software))
    if any(run.provenance.get("launches", [{}])[-1].get("resumed_at_iteration") for run in runs):
        parts.append("some runs were resumed from a checkpoint")
    return "; ".join(parts)


@dataclass
class Row:
    dataset: str
    algorithm: str
    base: Optional[str]
    metric: str
    seeds: List[int]
    offline_mean: Optional[float]
    offline_std: Optional[float]
    final_mean: Optional[float]
    final_std: Optional[float]
    online_average_mean: Optional[float]
    online_average_std: Optional[float]
    training_episodes_mean: Optional[float]
    training_episodes_std: Optional[float]
    delta_vs_base: Optional[float]
    budget: str
    offline_iterations: List[Optional[int]]
    online_iterations: List[Optional[int]]
    finished_runs: int
    provenance: str
    dataset_sha256: List[str] = field(default_factory=list)  # of every launch that recorded one
    footnote: int = 0


def summarise(runs: List[RunResult]) -> List[Row]:
    groups: Dict[Tuple[str, str], List[RunResult]] = defaultdict(list)
    for run in runs:
        groups[(run.dataset, run.label)].append(run)
    bases = {run.label: run.base for run in runs}
    rows: Dict[Tuple[str, str], Row] = {}
    for (dataset, label), group in sorted(groups.items(), key=lambda kv: (kv[0][0], family_key(kv[0][1], bases))):
        group.sort(key=lambda run: run.seed)
        offline_mean, offline_std = mean_std([run.offline_score for run in group])
        final_mean, final_std = mean_std([run.final_score for run in group])
        online_mean, online_std = mean_std([run.online_average for run in group])
        training_mean, training_std = mean_std([run.training_episodes for run in group])
        rows[(dataset, label)] = Row(
            dataset=dataset, algorithm=label, base=group[0].base,
            metric=" / ".join(sorted({run.metric for run in group})), seeds=[run.seed for run in group],
            offline_mean=offline_mean, offline_std=offline_std, final_mean=final_mean, final_std=final_std,
            online_average_mean=online_mean, online_average_std=online_std, training_episodes_mean=training_mean,
            training_episodes_std=training_std, delta_vs_base=None, budget=budget_text(group),
            offline_iterations=sorted({run.budget[0] for run in group}, key=str),
            online_iterations=sorted({run.budget[1] for run in group}, key=str),
            finished_runs=sum(run.finished for run in group), provenance=provenance_text(group),
            dataset_sha256=sorted({launch["dataset_sha256"] for run in group
                                   for launch in run.provenance.get("launches", []) if launch.get("dataset_sha256")}))
    for (dataset, _), row in rows.items():
        base = rows.get((dataset, row.base)) if row.base else None
        if base is not None and row.final_mean is not None and base.final_mean is not None:
            row.delta_vs_base = row.final_mean - base.final_mean
    footnotes: Dict[str, int] = {}
    for row in rows.values():
        row.footnote = footnotes.setdefault(row.provenance, len(footnotes) + 1)
    return list(rows.values())


# ---------------------------------------------------------------- outputs


def fmt(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def delta_text(row: Row, rows_by_key: Dict[Tuple[str, str], Row]) -> str:
    if row.delta_vs_base is None:
        return ""
    text = f"{round(row.delta_vs_base, 1) + 0.0:+.1f} vs {row.base}"  # + 0.0: no "-0.0"
    base = rows_by_key[(row.dataset, row.base)]
    if base.budget != row.budget:
        text += " (unequal budget)"
    if base.dataset_sha256 != row.dataset_sha256:  # same dataset id, other bytes (or a hash not recorded)
        text += " (other data)"
    if base.seeds != row.seeds:  # a matrix still running: means over different seeds
        text += f" (seeds {', '.join(map(str, row.seeds))} vs {', '.join(map(str, base.seeds))})"
    return text


def markdown_table(rows: List[Row], last_n: int) -> str:
    by_key = {(row.dataset, row.algorithm): row for row in rows}
    lines = ["| dataset | algorithm | offline score | final score | online average | training episodes | delta vs base "
             "| seeds | budget | provenance |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        unit = "" if row.metric == "normalized score" else " (return)"
        scores = [(row.offline_mean, row.offline_std), (row.final_mean, row.final_std),
                  (row.online_average_mean, row.online_average_std),
                  (row.training_episodes_mean, row.training_episodes_std)]
        cells = [fmt(mean, std) + (unit if mean is not None else "") for mean, std in scores]
        lines.append(f"| {row.dataset} | {row.algorithm} | {' | '.join(cells)} | {delta_text(row, by_key)} | "
                     f"{len(row.seeds)} | {row.budget} | [{row.footnote}] |")
    lines += [
        "",
        f"Scores: normalized score (100 x (return - random) / (expert - random), reference scores of the dataset), "
        f"or mean return where marked; mean ± sample std (ddof=1) over seeds. Offline score: each run's last "
        f"evaluation of the offline phase. Final score: the mean of each run's last {last_n} evaluations. "
        f"Online average: the mean of all of each run's evaluations during the online phase. Training episodes: "
        f"the mean score of the online episodes each run collected (actions sampled from its policy, not the "
        f"deterministic evaluation action) in the stretch of training its last {last_n} evaluations span. "
        f"Delta vs base: final score minus the base algorithm's final score on the same dataset (marked when the "
        f"budgets, data or seeds of the two differ). Budget: offline "
        f"gradient updates + online environment steps (one update each).",
        "",
    ]
    notes: Dict[int, str] = {row.footnote: row.provenance for row in rows}
    lines += [f"[{number}] {text}.  " for number, text in sorted(notes.items())]
    return "\n".join(lines).rstrip() + "\n"


def write_csv(path: Path, rows: List[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def slug(dataset: str) -> str:
    return dataset.replace("/", "-")


def curve(series: Sequence[Dict[int, float]]) -> Tuple[List[int], List[float], List[Optional[float]]]:
    """Mean and sample std over seeds at the iterations every seed has."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    means, stds = [], []
    for it in common:
        mean, std = mean_std([s[it] for s in series])
        means.append(mean)
        stds.append(std)
    return common, means, stds


def plot_band(ax, xs, means, stds, label, color, marker=None) -> None:
    ax.plot(xs, means, label=label, color=color, marker=marker)
    if any(s is not None for s in stds):
        lo = [m - (s or 0.0) for m, s in zip(means, stds)]
        hi = [m + (s or 0.0) for m, s in zip(means, stds)]
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2)


def grid(n_panels: int, width: float = 5.0, height: float = 3.6, sharey: bool = False):
    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharey=sharey)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def comparison_panels(labels: List[str], bases: Dict[str, Optional[str]]) -> List[List[str]]:
    """Each method next to its base; labels that are nobody's method and nobody's base alone."""
    present = set(labels)
    panels = [[bases[label], label] for label in labels if bases.get(label) in present]
    shown = {label for panel in panels for label in panel}
    panels += [[label] for label in labels if label not in shown]
    return panels


def plot_curves(dataset: str, runs: List[RunResult], colors: Dict[str, Any], out: Path) -> Tuple[Path, List[dict]]:
    by_label: Dict[str, List[RunResult]] = defaultdict(list)
    for run in runs:
        by_label[run.label].append(run)
    bases = {run.label: run.base for run in runs}
    labels = sorted(by_label, key=lambda label: family_key(label, bases))
    panels = comparison_panels(labels, bases)
    # one y-axis for every panel of a dataset, so that a method scoring far below the others shows as such
    fig, axes = grid(len(panels), sharey=True)
    rows = []
    for ax, panel in zip(axes, panels):
        switches = set()
        for label in panel:
            group = by_label[label]
            xs, means, stds = curve([{it: s for it, s, _ in run.evals} for run in group])
            plot_band(ax, xs, means, stds, f"{label} (n={len(group)})", colors[label])
            switches |= {run.budget[0] for run in group if run.budget[0]}
            rows += [{"dataset": dataset, "algorithm": label, "iteration": x, "mean": m, "std": s, "seeds": len(group)}
                     for x, m, s in zip(xs, means, stds)]
        for i, switch in enumerate(sorted(switches)):
            ax.axvline(switch, color="black", linestyle="--", linewidth=1,
                       label="offline → online" if i == 0 else None)
        ax.set_title(" vs ".join(reversed(panel)) if len(panel) > 1 else panel[0])
        ax.set_xlabel("iteration (offline updates, then online steps)")
        ax.set_ylabel(runs[0].metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{dataset}\nevaluation score, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    path = out / f"curves_{slug(dataset)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, rows


def family_stages(run: RunResult) -> Dict[str, Tuple[int, Dict[float, float]]]:
    """stage -> (iteration, beta -> score) for the end of the offline phase and the final evaluation."""
    stages = {}
    offline = [row for row in run.family if row.get("phase") == 0]
    picks = [("end of offline", offline), ("final", run.family)]
    for stage, rows in picks:
        if not rows:
            continue
        last = max(row["iteration"] for row in rows)
        if stage == "final" and "end of offline" in stages and stages["end of offline"][0] == last:
            continue
        scores = {round(row["beta"], 6): row["normalized_score"] if row.get("normalized_score") is not None
                  else row["return_mean"] for row in rows if row["iteration"] == last}
        stages[stage] = (last, scores)
    return stages


def plot_family(dataset: str, runs: List[RunResult], out: Path) -> Tuple[Optional[Path], List[dict]]:
    by_label: Dict[str, List[RunResult]] = defaultdict(list)
    for run in runs:
        if run.family:
            by_label[run.label].append(run)
    if not by_label:
        return None, []
    fig, axes = grid(len(by_label))
    rows = []
    for ax, (label, group) in zip(axes, sorted(by_label.items())):
        for stage, color in (("end of offline", "tab:blue"), ("final", "tab:orange")):
            per_run = [family_stages(run).get(stage) for run in group]
            per_run = [s for s in per_run if s is not None]
            if not per_run:
                continue
            betas, means, stds = curve([scores for _, scores in per_run])
            iterations = sorted({it for it, _ in per_run})
            it_text = "/".join(short_count(it) for it in iterations)
            ax.errorbar(betas, means, yerr=[s or 0.0 for s in stds], label=f"{stage} (it {it_text})",
                        color=color, marker="o", capsize=3)
            rows += [{"dataset": dataset, "algorithm": label, "stage": stage, "iteration": it_text, "beta": b,
                      "mean": m, "std": s, "seeds": len(per_run)} for b, m, s in zip(betas, means, stds)]
        ax.set_title(f"{label}: the family of policies")
        ax.set_xlabel("balance coefficient beta")
        ax.set_ylabel(group[0].metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{dataset}\nFamO2O: score vs beta, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    path = out / f"family_{slug(dataset)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, rows


def plot_samg(dataset: str, runs: List[RunResult], out: Path) -> Tuple[Optional[Path], List[dict]]:
    panels = sorted({(run.label, key) for run in runs for key in run.samg})
    if not panels:
        return None, []
    fig, axes = grid(len(panels))
    rows = []
    for ax, (label, key) in zip(axes, panels):
        group = [run for run in runs if run.label == label and key in run.samg]
        xs, means, stds = curve([dict(run.samg[key]) for run in group])
        plot_band(ax, xs, means, stds, f"{label} (n={len(group)})", "tab:green")
        rows += [{"dataset": dataset, "algorithm": label, "metric": key, "iteration": x, "mean": m, "std": s,
                  "seeds": len(group)} for x, m, s in zip(xs, means, stds)]
        ax.set_title(f"{label}: {key}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{dataset}\nSAMG diagnostics over training, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    path = out / f"samg_{slug(dataset)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, rows


def update_readme(path: Path, table: str) -> None:
    text = path.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise UserError(f"{path} has no '{README_BEGIN}' ... '{README_END}' markers to put the table between.")
    path.write_text(text[:begin + len(README_BEGIN)] + "\n" + table + text[end:])
    print(f"updated {path}")


def export_runs(runs: Iterable[RunResult], dest: Path) -> None:
    for run in runs:
        target = dest / run.name
        if target.resolve() == run.path.resolve():
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name in EXPORTED_FILES:
            if (run.path / name).is_file():
                shutil.copy2(run.path / name, target / name)


def aggregate(roots: Sequence[str], out: Path, last_n: int = 3, include_unfinished: bool = False) -> dict:
    runs, skipped = find_runs(roots, last_n)
    unfinished = [run for run in runs if not run.finished]
    if not include_unfinished:
        skipped += [f"{run.path} (unfinished: last evaluation at iteration {run.evals[-1][0]})" for run in unfinished]
        runs = [run for run in runs if run.finished]
    if not runs:
        raise UserError(f"No {'' if include_unfinished else 'finished '}runs with evaluations under "
                        f"{', '.join(roots)}." + (f" Skipped: {'; '.join(skipped)}" if skipped else ""))
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(runs)
    table = markdown_table(rows, last_n)
    (out / "table.md").write_text(table)
    lists = ("seeds", "offline_iterations", "online_iterations")
    write_csv(out / "summary.csv", [{**{k: v for k, v in row.__dict__.items() if k not in lists},
                                     "seeds": " ".join(map(str, row.seeds)), "n_seeds": len(row.seeds),
                                     "last_n": last_n} for row in rows])
    labels = sorted({run.label for run in runs}, key=lambda label: family_key(label, {r.label: r.base for r in runs}))
    palette = plt.get_cmap("tab10")
    colors = {label: palette(i % 10) for i, label in enumerate(labels)}
    plots, curve_rows, family_rows, samg_rows = [], [], [], []
    for dataset in sorted({run.dataset for run in runs}):
        subset = [run for run in runs if run.dataset == dataset]
        path, rows_ = plot_curves(dataset, subset, colors, out)
        plots.append(path)
        curve_rows += rows_
        for plotter, collected in ((plot_family, family_rows), (plot_samg, samg_rows)):
            path, rows_ = plotter(dataset, subset, out)
            if path is not None:
                plots.append(path)
                collected += rows_
    write_csv(out / "curves.csv", curve_rows)
    write_csv(out / "family.csv", family_rows)
    write_csv(out / "samg.csv", samg_rows)
    summary = {
        "last_n": last_n,
        "definitions": {
            "offline_score": "last evaluation of the offline phase (phase 0) of each run",
            "final_score": f"mean of the last {last_n} evaluations of each run",
            "online_average": "mean of all evaluations of the online phase (phase 1) of each run",
            "training_episodes": f"mean score of the training episodes of each run that ended after its evaluation "
                                 f"before the last {last_n} (sampled actions)",
            "mean_std": "mean and sample standard deviation (ddof=1) over seeds; std null for one seed",
            "delta_vs_base": "final_mean minus the base algorithm's final_mean on the same dataset",
            "budget": "offline gradient updates + online environment steps",
        },
        "rows": [row.__dict__ for row in rows],
        "runs": [{"name": run.name, "algorithm": run.label, "base": run.base, "dataset": run.dataset, "seed": run.seed,
                  "finished": run.finished, "metric": run.metric, "offline_iterations": run.budget[0],
                  "online_iterations": run.budget[1], "offline_score": run.offline_score,
                  "final_score": run.final_score, "online_average": run.online_average,
                  "training_episodes": run.training_episodes,
                  "last_evaluations": [s for _, s, _ in run.evals[-last_n:]],
                  "path": str(run.path), "provenance": run.provenance} for run in runs],
        "skipped": skipped,
        "files": sorted(str(p.name) for p in [*plots, out / "table.md", out / "summary.csv"]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {"runs": runs, "rows": rows, "table": table, "plots": plots, "skipped": skipped}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Aggregate benchmark runs into CSV/JSON/markdown and PNG plots.")
    parser.add_argument("roots", nargs="+", help="directories holding run directories")
    parser.add_argument("--out", required=True, help="output directory (e.g. results/benchmark)")
    parser.add_argument("--last-n", type=int, default=3, help="final score = mean of the last N evaluations (3)")
    parser.add_argument("--include-unfinished", action="store_true", help="also aggregate runs still in progress")
    parser.add_argument("--export-runs", metavar="DIR", help="copy each run's config, metrics, family scores and "
                                                             "provenance to DIR/<run> (small files, to commit)")
    parser.add_argument("--readme", metavar="FILE", help="put table.md between the benchmark-table markers of FILE")
    options = parser.parse_args(argv)
    if options.last_n < 1:
        parser.error("--last-n must be at least 1")
    result = aggregate(options.roots, Path(options.out), options.last_n, options.include_unfinished)
    if options.export_runs:
        export_runs(result["runs"], Path(options.export_runs))
        print(f"exported {len(result['runs'])} runs to {options.export_runs}")
    if options.readme:
        update_readme(Path(options.readme), result["table"])
    for line in result["skipped"]:
        print(f"skipped {line}")
    print(result["table"])
    print(f"{len(result['runs'])} runs -> {options.out}: table.md, summary.csv, summary.json, curves.csv, "
          f"{', '.join(p.name for p in result['plots'])}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
