"""Gradient-update throughput of the algorithm files, with a matmul peak for scale.

Run (from the repository root):

    python scripts/throughput.py                          # CPU, 1 and 2 threads -> results/throughput.{csv,md}
    python scripts/throughput.py --threads 1,2,4 --repeats 5
    python scripts/throughput.py --device cuda            # GPU (the thread count still applies to the host)
    python scripts/throughput.py --quick --out-dir /tmp/tp   # smoke mode: a few updates, one pass, 1 thread
    python scripts/throughput.py --quick --files iql.py --out-dir /tmp/tp   # one file (a few seconds)
    python scripts/throughput.py --compile --threads 1 --files iql.py,cql.py --out-dir results/compile

What is measured, per entry of ENTRIES (file, phase) and per thread count:

- One training-loop step's learning work, `agent.update(buffer.sample(batch_size))`, on Hopper-like
  dimensions (obs 11, act 3) with the file's `TrainConfig` defaults (the paper hyperparameters:
  batch 256, 256x256 networks), from the file's own `ReplayBuffer` holding random transitions
  (`BUFFER_ROWS` of them). Online, each step also adds one transition, as the collector does (the
  environment step itself is not timed), to the buffer the file's switch block trains on: the
  offline rows plus online ones, or SAMG's online-only buffer with its per-row cache of p.
  Offline, the SAMG files' step also trains the C-VAE (one `update_vae` on offline pairs), as their
  training loop does: the offline rows of those files are the whole step's cost.
  `--warmup` untimed updates, then one timed run of N updates (N is sized from the warm-up so that
  the run lasts about `--seconds`). The whole set of measurements is repeated `--repeats` times, in
  passes over all entries, so that a burst of load from other processes hits all entries alike; the
  median over the passes gives ms/update and updates/s.
- FLOPs of one update, forward and backward matmuls, counted by `torch.utils.flop_counter`
  (element-wise ops and optimizer steps are not counted), and the achieved GFLOP/s.
- A float32 matmul peak at the same thread count: (256x256)@(256x256), the shape of the hidden
  layers at batch 256, and (1024x1024)@(1024x1024).

With `--compile`, every entry is also measured with the agent's networks compiled in place
(`nn.Module.compile()`, default inductor backend; compilation untimed), as a row "<file> (torch.compile)"
whose "vs base" is its time over the same file's eager time in the same run.

Every measurement (entry, phase, threads, pass) runs in its own subprocess (`--worker JOB`), so
thread settings and allocator state do not leak between entries. Entries whose file does not exist
yet are skipped. To measure a new algorithm file, add a row to ENTRIES.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import importlib.util
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from machine import cpu_model  # scripts/machine.py (this script's directory is on sys.path)

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = REPO / "algorithms"


# Hopper-like dimensions for the measurement; buffer memory is also reported for the larger tasks.
OBS_DIM, ACT_DIM = 11, 3


# Offline-to-online switches: what each file's "offline-to-online switch" block does to the agent,
# besides `agent.online = True` (always set after it). Signature (module, agent, config, device).
# A switch may return the buffer the online phase trains on (None: the offline buffer, kept).
def cql_switch(module: Any, agent: Any, config: Any, device: torch.device) -> None:
    agent.cql_alpha = config.cql_alpha_online


def samg_switch(module: Any, agent: Any, config: Any, device: torch.device) -> Any:
    """Freeze Q_off, score held-out offline pairs (random ones here) as the percentile reference, and
    train on an online-only buffer whose p the guide caches by row (as in the file's train())."""
    n = 10 * config.samg_reference_size  # the held-out split is at most 10% of the pairs
    states = torch.randn(n, OBS_DIM, device=device)
    actions = torch.rand(n, ACT_DIM, device=device) * 2.0 - 1.0
    agent.samg.start_online(agent.qf, module.OfflinePairs(states, actions, config.samg_reference_size))
    online_buffer = module.ReplayBuffer(OBS_DIM, ACT_DIM, BUFFER_CAPACITY, device, online_only=True)
    agent.samg.track(online_buffer)
    return online_buffer


def cql_samg_switch(module: Any, agent: Any, config: Any, device: torch.device) -> Any:
    cql_switch(module, agent, config, device)
    return samg_switch(module, agent, config, device)


Switch = Callable[[Any, Any, Any, torch.device], Any]


def samg_offline_extra(module: Any, agent: Any, config: Any, device: torch.device) -> Callable[[], Any]:
    """The C-VAE step that the SAMG files' offline training loop runs after each update."""
    pairs = module.OfflinePairs(torch.randn(BUFFER_ROWS, OBS_DIM, device=device),
                                torch.rand(BUFFER_ROWS, ACT_DIM, device=device) * 2.0 - 1.0,
                                config.samg_reference_size)
    return lambda: agent.samg.update_vae(*pairs.sample(config.batch_size))


@dataclass(frozen=True)
class Entry:
    file: str  # under algorithms/, or a label when `source` is given
    agent: Optional[str] = None  # agent class; None = the one class of the file with `update` and `act` methods
    base: Optional[str] = None  # file whose update time this one is compared with ("vs base")
    switch: Optional[Switch] = None  # agent-side offline-to-online switch, besides agent.online = True
    phases: Tuple[str, ...] = ("offline", "online")
    source: Optional[str] = None  # the algorithm file to load when `file` is a label
    make: Optional[Callable[[Any, Any, torch.device], Any]] = None  # builds the agent instead of its class
    offline_extra: Optional[Callable[..., Callable[[], Any]]] = None  # more offline work per loop step

    @property
    def path(self) -> Path:
        return ALGORITHMS / (self.source or self.file)


def make_cql_reference(module: Any, config: Any, device: torch.device) -> Any:
    """The straightforward formulation of cql.py's update (scripts/cql_reference.py), same math."""
    sys.path.insert(0, str(REPO / "scripts"))
    from cql_reference import StraightforwardCQL

    return StraightforwardCQL(module, config, OBS_DIM, ACT_DIM, device)


# The measured algorithm files. IQL's update ignores the phase; it is measured in both phases so that
# every "vs base" ratio compares the same phase (and the two IQL rows show the run-to-run noise).
# Files that do not exist are skipped; an agent class left as None is found by its methods.
ENTRIES: List[Entry] = [
    Entry("iql.py", "ImplicitQLearning"),
    Entry("iql_famo2o.py", "FamO2OImplicitQLearning", base="iql.py"),
    Entry("cql.py", switch=cql_switch),
    Entry("cql_famo2o.py", base="cql.py", switch=cql_switch),
    Entry("awac.py"),
    Entry("awac_samg.py", base="awac.py", switch=samg_switch, offline_extra=samg_offline_extra),
    Entry("cql_samg.py", base="cql.py", switch=cql_samg_switch, offline_extra=samg_offline_extra),
    # The reference point of cql.py's speed: "vs base" is the reference's time over cql.py's.
    Entry("cql.py (straightforward)", base="cql.py", source="cql.py", make=make_cql_reference, phases=("offline",)),
]
ENTRY_BY_FILE = {entry.file: entry for entry in ENTRIES}

BUFFER_DIMS = {"Hopper": (11, 3), "HalfCheetah / Walker2d": (17, 6)}
BUFFER_ROWS = 10_000  # random transitions in the buffer before timing (also in SAMG's online-only buffer)
BUFFER_CAPACITY = 100_000  # the gather's cost does not depend on it
TRANSITION_POOL = 1024  # pre-generated online transitions, cycled through
MATMUL_SIZES = (256, 1024)
MIN_CALLS = 5  # timed calls per run, at least
FULL_DEFAULTS = {"threads": "1,2", "warmup": 50, "seconds": 3.0, "repeats": 3}
QUICK_DEFAULTS = {"threads": "1", "warmup": 3, "seconds": 0.0, "repeats": 1}  # --quick: MIN_CALLS timed updates
COMPILE_CALLS = 3  # untimed steps before the warm-up of a compiled entry
COMPILED_SUFFIX = " (torch.compile)"  # rows of --compile; their "vs base" is over the same file in eager mode
FAMO2O_BUDGET = 1.5  # project requirement: a FamO2O-style update costs at most this many base updates


# ---------------------------------------------------------------- measurement (runs in the workers)
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Wall-clock seconds of `calls` calls of fn, device work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def benchmark(fn: Callable[[], Any], device: torch.device, warmup: int, seconds: float) -> Dict[str, Any]:
    """Warm up, size the timed run from the warm-up speed to last about `seconds`, time it."""
    warm = elapsed(fn, max(warmup, 1), device)
    calls = max(MIN_CALLS, math.ceil(seconds * max(warmup, 1) / max(warm, 1e-9)))
    return {"calls": calls, "seconds_per_call": elapsed(fn, calls, device) / calls}


def load_module(path: Path) -> Any:
    """Import a single-file script by path (algorithms/ is not a package)."""
    name = f"throughput_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def agent_class(module: Any, name: Optional[str]) -> type:
    if name is not None:
        if not hasattr(module, name):
            raise SystemExit(f"{module.__file__} has no class {name}; fix its row in ENTRIES.")
        return getattr(module, name)
    candidates = [obj for obj in vars(module).values() if isinstance(obj, type) and obj.__module__ == module.__name__
                  and callable(getattr(obj, "update", None)) and callable(getattr(obj, "act", None))]
    if len(candidates) != 1:
        raise SystemExit(f"Cannot tell the agent class of {module.__file__} (candidates: "
                         f"{[c.__name__ for c in candidates]}); name it in its row of ENTRIES.")
    return candidates[0]


def random_transitions(count: int, seed: int) -> Dict[str, Any]:
    """Random transitions as numpy arrays (actions in [-1, 1], about 1 in 10 terminal)."""
    rng = np.random.default_rng(seed)
    return {"states": rng.standard_normal((count, OBS_DIM), dtype=np.float32),
            "actions": rng.uniform(-1.0, 1.0, (count, ACT_DIM)).astype(np.float32),
            "rewards": rng.standard_normal(count, dtype=np.float32),
            "next_states": rng.standard_normal((count, OBS_DIM), dtype=np.float32),
            "dones": (rng.random(count) < 0.1).astype(np.float32)}


def add_transitions(buffer: Any, data: Dict[str, Any]) -> None:
    for row in zip(data["states"], data["actions"], data["rewards"], data["next_states"], data["dones"]):
        buffer.add(*row)


def compile_networks(agent: Any) -> None:
    """torch.compile every network the agent (and its SAMG guide) holds, in place (nn.Module.compile)."""
    for owner in (agent, getattr(agent, "samg", None)):
        for value in (vars(owner).values() if owner is not None else ()):
            if isinstance(value, torch.nn.Module):
                value.compile()


def training_step(entry: Entry, phase: str, device: torch.device, compiled: bool = False
                  ) -> Tuple[Callable[[], Any], Any, Any]:
    """(step, agent, config): one training-loop step's learning work for the entry in the phase;
    `compiled`: with the agent's networks compiled (after the switch, which copies networks)."""
    module = load_module(entry.path)
    config = module.TrainConfig()
    agent = entry.make(module, config, device) if entry.make else agent_class(module, entry.agent)(
        config, OBS_DIM, ACT_DIM, device)
    buffer = module.ReplayBuffer(OBS_DIM, ACT_DIM, BUFFER_CAPACITY, device)
    buffer.add_offline(random_transitions(BUFFER_ROWS, seed=1))
    if phase == "offline":
        if compiled:
            compile_networks(agent)
        extra = entry.offline_extra(module, agent, config, device) if entry.offline_extra else (lambda: None)

        def offline_step() -> Any:  # one update (and the SAMG files' C-VAE step)
            extra()
            return agent.update(buffer.sample(config.batch_size))

        return offline_step, agent, config

    online_buffer = entry.switch(module, agent, config, device) if entry.switch is not None else None
    agent.online = True
    if compiled:
        compile_networks(agent)
    if online_buffer is not None:
        buffer = online_buffer
        add_transitions(buffer, random_transitions(BUFFER_ROWS, seed=2))
    pool = random_transitions(TRANSITION_POOL, seed=3)
    transitions = itertools.cycle(list(zip(*(pool[k] for k in ("states", "actions", "rewards", "next_states", "dones")))))

    def online_step() -> Any:  # the collector adds one transition, then one update
        buffer.add(*next(transitions))
        return agent.update(buffer.sample(config.batch_size))

    return online_step, agent, config


def measure_update(job: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    step, agent, config = training_step(ENTRY_BY_FILE[job["file"]], job["phase"], device, job.get("compiled", False))
    if job.get("compiled", False):
        for _ in range(COMPILE_CALLS):  # compilation (and recompilation for new shapes) is not timed
            step()
    result = benchmark(step, device, job["warmup"], job["seconds"])
    with FlopCounterMode(display=False) as counter:
        step()
    network = ", ".join(f"{k} {v}" for k, v in vars(config).items() if "hidden" in k)
    return {**result, "agent": type(agent).__name__, "flops_per_call": counter.get_total_flops(),
            "config": f"batch_size {config.batch_size}, {network}"}


def measure_matmul(job: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    gflops = {}
    for n in MATMUL_SIZES:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        out = torch.empty(n, n, device=device)
        result = benchmark(lambda: torch.mm(a, b, out=out), device, job["warmup"], job["seconds"] / 2)
        gflops[n] = 2 * n**3 / result["seconds_per_call"] / 1e9
    return {"matmul_gflops": gflops}


def worker(job: Dict[str, Any]) -> None:
    """Run one job in this (fresh) process and print its result as one JSON line."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    device = torch.device(job["device"])
    measure = measure_matmul if job["kind"] == "matmul" else measure_update
    result = measure(job, device)
    result["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(json.dumps({**job, **result}))


# ---------------------------------------------------------------- orchestration (the parent process)
def run_worker(job: Dict[str, Any]) -> Dict[str, Any]:
    """The worker's JSON result, or {"error": last line of its stderr} when it fails."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    process = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        print(f"worker failed (exit {process.returncode}): {json.dumps(job)}\n{process.stderr[-3000:]}",
              file=sys.stderr)
        return {"error": (process.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit_label() -> str:
    """Short commit, plus "+dirty" and the changed files when algorithms/ differs from it."""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changes = git("status", "--porcelain", "--", "algorithms").splitlines()
    return commit + (f"+dirty ({'; '.join(c.strip() for c in changes)})" if changes else "")


def algorithms_digest() -> str:
    """Hash of the algorithm files' contents, to notice edits made while a run is measuring them."""
    digest = hashlib.sha1()
    for path in sorted(ALGORITHMS.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def mib_per_million_transitions(obs_dim: int, act_dim: int) -> float:
    """One replay row: state, action, reward, next state, done, all float32."""
    return 4 * (2 * obs_dim + act_dim + 2) * 1e6 / 2**20


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def summarize(runs: List[Dict[str, Any]], peaks: Dict[int, float]) -> Dict[str, Any]:
    """One table row from the passes' results of one (file, phase, threads) job."""
    update = runs[0]
    seconds = statistics.median(r["seconds_per_call"] for r in runs)
    achieved = update["flops_per_call"] / seconds / 1e9
    compiled = update.get("compiled", False)
    return {
        "file": update["file"] + (COMPILED_SUFFIX if compiled else ""),
        "agent": update["agent"],
        "phase": update["phase"],
        "threads": update["threads"],
        "device": update["device"],
        "ms_per_update": 1e3 * seconds,
        "ms_runs": [1e3 * r["seconds_per_call"] for r in runs],
        "updates_per_second": 1.0 / seconds,
        "updates_per_run": statistics.median(r["calls"] for r in runs),
        "config": update["config"],
        "gflop_per_update": update["flops_per_call"] / 1e9,
        "achieved_gflops": achieved,
        **{f"matmul{n}_gflops": peaks[n] for n in MATMUL_SIZES},
        **{f"pct_of_matmul{n}": 100.0 * achieved / peaks[n] for n in MATMUL_SIZES},
        "base": update["file"] if compiled else ENTRY_BY_FILE[update["file"]].base or "",
        "vs_base": None,
        "mib_per_million_transitions": mib_per_million_transitions(OBS_DIM, ACT_DIM),
    }


def add_base_ratios(rows: List[Dict[str, Any]]) -> None:
    by_key = {(r["file"], r["phase"], r["threads"]): r for r in rows}
    for row in rows:
        base = by_key.get((row["base"], row["phase"], row["threads"]))
        if base is not None:
            row["vs_base"] = row["ms_per_update"] / base["ms_per_update"]


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (" ".join(f"{x:.4f}" for x in v) if isinstance(v, list) else
                                 f"{v:.6g}" if isinstance(v, float) else "" if v is None else v)
                             for k, v in row.items()})


def markdown(rows: List[Dict[str, Any]], peaks: Dict[int, Dict[int, float]], header: Dict[str, str],
             skipped: Sequence[str], failures: Sequence[str]) -> str:
    lines = ["# Gradient-update throughput", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [f"- Replay memory per million buffered transitions (float32 rows of 2*obs + act + 2): "
              + ", ".join(f"{name} (obs {o}, act {a}) {mib_per_million_transitions(o, a):.1f} MiB"
                          for name, (o, a) in BUFFER_DIMS.items())]
    if skipped:
        lines.append(f"- Skipped (file not in algorithms/ yet): {', '.join(skipped)}")
    lines += [f"- FAILED (left out of the table): {failure}" for failure in failures]
    lines += ["", "## Matmul peak (float32, median over passes)", "", "| threads | 256² GFLOP/s | 1024² GFLOP/s |",
              "|---:|---:|---:|"]
    lines += [f"| {k} | {p[256]:.1f} | {p[1024]:.1f} |" for k, p in sorted(peaks.items())]
    lines += ["", "## Updates", "",
              f"ms/update is the median over the passes (range = fastest and slowest pass). GFLOP/update counts "
              f"forward and backward matmuls only; % of peak = achieved GFLOP/s over the matmul GFLOP/s at the same "
              f"thread count. vs base = ms/update over the base file's at the same phase and "
              f"thread count (project budget for FamO2O-style variants: at most {FAMO2O_BUDGET}x).", "",
              "| file | phase | threads | ms/update | range (ms) | updates/s | GFLOP/update | achieved GFLOP/s "
              "| % of 256² peak | % of 1024² peak | vs base |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs_base = f"{r['vs_base']:.2f}x ({r['base']})" if r["vs_base"] is not None else ""
        lines.append(
            f"| {r['file']} | {r['phase']} | {r['threads']} | {r['ms_per_update']:.2f} | "
            f"{min(r['ms_runs']):.2f}–{max(r['ms_runs']):.2f} | {r['updates_per_second']:.0f} | "
            f"{r['gflop_per_update']:.3f} | {r['achieved_gflops']:.1f} | {r['pct_of_matmul256']:.0f}% | "
            f"{r['pct_of_matmul1024']:.0f}% | {vs_base} |")
    return "\n".join(lines) + "\n"


def measure_all(args: argparse.Namespace, entries: Sequence[Entry], threads: Sequence[int]
                ) -> Tuple[List[Dict[str, Any]], Dict[int, Dict[int, float]], List[str], str, float]:
    """Run every job once per pass, each in a fresh worker. A job that fails is reported, not run again
    and left out of the rows. Returns rows, matmul peaks, failures, device name, highest 1-min load."""
    common = {"device": args.device, "warmup": args.warmup, "seconds": args.seconds}
    jobs = []
    for k in threads:
        jobs.append({**common, "kind": "matmul", "threads": k})
        jobs += [{**common, "kind": "update", "threads": k, "file": e.file, "phase": phase, "compiled": compiled}
                 for e in entries for phase in e.phases for compiled in ((False, True) if args.compile else (False,))]
    results: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    errors: Dict[int, str] = {}
    max_load = os.getloadavg()[0]
    for repeat in range(args.repeats):
        for i, job in enumerate(jobs):
            if i in errors:
                continue
            result = run_worker(job)
            max_load = max(max_load, os.getloadavg()[0])
            name = "matmul" if job["kind"] == "matmul" else \
                f"{job['file']}{COMPILED_SUFFIX if job['compiled'] else ''} {job['phase']}"
            if "error" in result:
                if job["kind"] == "matmul":
                    raise SystemExit(f"The matmul measurement failed: {result['error']}")
                errors[i] = result["error"]
                done = f"FAILED ({result['error']})"
            elif job["kind"] == "matmul":
                results[i].append(result)
                done = ", ".join(f"{n}²: {g:.1f} GFLOP/s" for n, g in result["matmul_gflops"].items())
            else:
                results[i].append(result)
                done = f"{1e3 * result['seconds_per_call']:.2f} ms/update"
            print(f"pass {repeat + 1}/{args.repeats}, {job['threads']} thread(s), {name}: {done}", flush=True)

    peaks = {job["threads"]: {int(n): statistics.median(r["matmul_gflops"][str(n)] for r in results[i])
                              for n in MATMUL_SIZES}
             for i, job in enumerate(jobs) if job["kind"] == "matmul"}
    rows = [summarize(results[i], peaks[job["threads"]])
            for i, job in enumerate(jobs) if job["kind"] == "update" and i not in errors]
    add_base_ratios(rows)
    failures = [f"{jobs[i]['file']} {jobs[i]['phase']}, {jobs[i]['threads']} thread(s): {error}"
                for i, error in errors.items()]
    device_name = results[0][0]["device_name"] if args.device != "cpu" else ""
    return rows, peaks, failures, device_name, max_load


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", help="comma-separated torch.set_num_threads values (default 1,2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--files", default="", help="comma-separated subset of ENTRIES files (default: all)")
    parser.add_argument("--warmup", type=int, help="untimed updates before the timed run (default 50)")
    parser.add_argument("--seconds", type=float, help="target duration of one timed run (default 3)")
    parser.add_argument("--repeats", type=int,
                        help="passes over all measurements, one timed run each; the median is reported (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: defaults become 3 warm-up updates, 5 timed updates, 1 pass, 1 thread")
    parser.add_argument("--compile", action="store_true",
                        help="also measure each entry with its networks torch.compile'd (vs base: over eager)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "results")
    parser.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here.")
    threads = [int(k) for k in args.threads.split(",")]
    wanted = set(filter(None, args.files.split(",")))
    if wanted - {e.file for e in ENTRIES}:
        raise SystemExit(f"--files: {sorted(wanted - {e.file for e in ENTRIES})} not in ENTRIES "
                         f"({', '.join(e.file for e in ENTRIES)}).")
    entries = [e for e in ENTRIES if not wanted or e.file in wanted]
    skipped = [e.file for e in entries if not e.path.is_file()]
    entries = [e for e in entries if e.file not in skipped]
    if not entries:
        raise SystemExit("No algorithm file to measure.")

    command = shlex.join(["python", "scripts/throughput.py", *(sys.argv[1:] if argv is None else argv)])
    load_before, commit, digest = load_average(), commit_label(), algorithms_digest()
    rows, peaks, failures, device_name, max_load = measure_all(args, entries, threads)
    if algorithms_digest() != digest:
        commit += " at the start; WARNING: algorithms/ changed during the run, passes may have measured different code"
    if not rows:
        raise SystemExit("Every update measurement failed:\n" + "\n".join(failures))
    first = rows[0]
    header = {
        "Command": f"`{command}`",
        "Commit": commit,
        "Date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "Machine": f"{cpu_model()}, {os.cpu_count()} cores" + (f"; GPU {device_name}" if device_name else ""),
        "Software": f"torch {torch.__version__}, Python {platform.python_version()}",
        "Load average (1/5/15 min) before / after": f"{load_before} / {load_average()} (highest 1-min load "
                                                    f"seen between workers: {max_load:.2f}, of which the "
                                                    f"measurement itself is up to {max(threads)})",
        "Setup": f"obs_dim {OBS_DIM}, act_dim {ACT_DIM}, each file's TrainConfig defaults ("
                 + "; ".join(sorted({f"{r['file']}: {r['config']}" for r in rows})) + "); "
                 f"batches sampled from the file's ReplayBuffer of {BUFFER_ROWS} random transitions, online "
                 f"one transition added per update; {args.warmup} warm-up updates, then one timed "
                 f"run of ~{args.seconds:g} s and at least {MIN_CALLS} updates (e.g. {first['updates_per_run']:.0f} "
                 f"updates for {first['file']} {first['phase']} at {first['threads']} thread(s)), in each of "
                 f"{args.repeats} pass(es) over all entries; device {args.device}",
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.out_dir / "throughput.csv", rows)
    (args.out_dir / "throughput.md").write_text(markdown(rows, peaks, header, skipped, failures))
    print(f"wrote {args.out_dir / 'throughput.csv'} and {args.out_dir / 'throughput.md'}")
    if failures:
        print("failed measurements:\n" + "\n".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
