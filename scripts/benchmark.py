"""Run a benchmark matrix (algorithm config x dataset x seed) of the algorithm scripts.

Run (from the repository root):

    # a matrix file (configs/benchmark/*.yaml), as parallel single-thread processes on this machine
    python scripts/benchmark.py --matrix configs/benchmark/medium_replay_cpu.yaml --workers 2
    # the same matrix on a GPU (several runs share it)
    python scripts/benchmark.py --matrix configs/benchmark/paper_gpu.yaml --device cuda --workers 4
    # a matrix from flags; flags after `--` go to every run and win over the matrix's
    python scripts/benchmark.py --algorithms iql iql_famo2o --datasets o2o/hopper/random-v0 --seeds 0 1 \
        --root runs/benchmark/try -- --offline_iterations 5000 --online_iterations 5000
    # a subset of a matrix file, or one cell (what each line of --commands and each sweep run does)
    python scripts/benchmark.py --matrix M --algorithm iql --dataset o2o/hopper/medium-replay-v0 --seed 0
    # look before running / hand the matrix to other machines (nothing is launched)
    python scripts/benchmark.py --matrix M --dry-run                 # state and command of every run
    python scripts/benchmark.py --matrix M --commands commands.txt   # one line per run (SLURM array, ...)
    python scripts/benchmark.py --matrix M --wandb-sweep sweep.yaml  # the same grid as a wandb sweep

Each run is `python algorithms/<script>.py --env <dataset> --seed <seed> --name <run name>
--checkpoints_path <root> --resume true --cpu_threads <n> --device <device> ...` in a process of its
own (OMP/MKL threads set to the same n), with its output in `<root>/<run name>/stdout.log`. Run names
are deterministic, `<algorithm>__<dataset id, '/' -> '-'>__s<seed>`, so running the same command
again skips the runs whose metrics show completion (an evaluation at offline + online iterations)
and resumes the others from their last checkpoint. A run whose `config.yaml` disagrees with the
flags planned for it (another budget, say) is reported as failed instead of being mixed in: use
another `--root`. Before each launch the runner appends the git commit (and whether the tree had
uncommitted changes), the script's sha256, the machine (host, CPU, GPU), Python and torch versions
and the command to `<root>/<run name>/provenance.json`; `scripts/aggregate.py` names them in its
tables. The runner prints one line per run whenever its state (pending, running, done, failed, busy)
or its latest evaluation score changes, and exits 1 if any run failed. It locks a run's directory
while the run lives (`<root>/<run name>/.runner.lock`), so several runners may share a root: a run
locked by another runner is left to it (busy).

Matrix file (YAML; see configs/benchmark/):

    root: runs/benchmark/medium_replay_cpu      # --checkpoints_path of every run (default runs/benchmark/<file stem>)
    project: o2o                                # wandb project of the sweep (optional)
    datasets: [o2o/hopper/medium-replay-v0]
    seeds: [0, 1, 2]
    args: {eval_freq: 5000, eval_episodes: 10}  # flags of every run
    algorithms:                                 # label -> settings; the label names the runs
      iql: {args: {offline_iterations: 50000, online_iterations: 50000}}
      iql_famo2o_fixed:
        script: iql_famo2o                      # algorithms/<script>.py (default: the label)
        base: iql                               # compared with in the tables and plots (default: BASES)
        config: configs/{script}/{dataset}.yaml # optional --config_path; {dataset}: hopper_medium_replay
        args: {famo2o_balance: fixed}

Flags on a run's command line, later ones winning: the algorithm's `config`, the matrix `args`, the
algorithm's `args`, the runner's (env, seed, name, ...), then everything after `--`.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, IO, List, Optional, Sequence, Tuple

from machine import cpu_model, sha256_of  # scripts/machine.py (this script's directory is on sys.path)

import yaml

REPO = Path(__file__).resolve().parents[1]

# method -> the base algorithm it is compared with at equal budget
BASES = {"iql_famo2o": "iql", "cql_famo2o": "cql", "awac_samg": "awac", "cql_samg": "cql"}
# flags the runner sets itself; a matrix may not set them
RUNNER_FLAGS = {"env", "seed", "name", "checkpoints_path", "resume", "cpu_threads", "device", "config_path"}
# config fields that may differ between launches of one run without changing its results
FREE_FIELDS = RUNNER_FLAGS | {"wandb_mode", "project", "group", "download", "log_every"}
MATRIX_KEYS = {"root", "project", "datasets", "seeds", "args", "algorithms"}
ALGORITHM_KEYS = {"script", "base", "config", "args"}


class UserError(Exception):
    """Bad input: reported as one paragraph and exit code 2, no traceback."""


# ---------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Cell:
    """One run of the matrix."""

    label: str  # algorithm config name: iql, iql_famo2o, iql_famo2o_fixed, ...
    script: str  # algorithms/<script>.py
    dataset: str  # Minari dataset id
    seed: int
    base: Optional[str]  # label of the base algorithm config, if it is in the matrix
    config: Optional[str]  # --config_path
    args: Tuple[str, ...]  # matrix and algorithm flags

    @property
    def name(self) -> str:
        return run_name(self.label, self.dataset, self.seed)


def run_name(label: str, dataset: str, seed: int) -> str:
    return f"{label}__{dataset.replace('/', '-')}__s{seed}"


def dataset_key(dataset: str) -> str:
    """`o2o/hopper/medium-replay-v0` -> `hopper_medium_replay` (the {dataset} of config templates)."""
    parts = dataset.split("/")
    parts = parts[1:] if len(parts) > 2 else parts
    name = "_".join(parts)
    stem, _, version = name.rpartition("-v")
    name = stem if stem and version.isdigit() else name
    return name.replace("-", "_")


def flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), separators=(",", ":"))
    return str(value)


def dict_flags(args: Dict[str, Any], where: str) -> List[str]:
    if not isinstance(args, dict):
        raise UserError(f"{where}: 'args' must be a mapping of flag names to values, got {args!r}.")
    flags = []
    for key, value in args.items():
        key = str(key).lstrip("-")
        if key in RUNNER_FLAGS:
            raise UserError(f"{where}: '{key}' is set by the runner for every run; remove it from 'args' "
                            "(use --root for checkpoints_path, --device, --cpu-threads, a matrix entry's 'config').")
        flags += [f"--{key}", flag_value(value)]
    return flags


@dataclass
class Matrix:
    algorithms: Dict[str, Dict[str, Any]]  # label -> {script, base, config, args}
    datasets: List[str]
    seeds: List[int]
    args: Dict[str, Any] = field(default_factory=dict)
    root: str = "runs/benchmark"
    project: str = "o2o"
    source: Optional[str] = None  # the matrix file, if any
    # every label the matrix file defines: a base stays the run's base when --algorithms leaves it out
    defined_labels: Optional[List[str]] = None

    def cells(self) -> List[Cell]:
        cells = []
        common = dict_flags(self.args, self.where)
        for label, spec in self.algorithms.items():
            script = spec.get("script") or label
            base = spec.get("base", BASES.get(script))
            base = base if base in (self.defined_labels or self.algorithms) and base != label else None
            own = dict_flags(spec.get("args") or {}, f"{self.where}, algorithm '{label}'")
            for dataset in self.datasets:
                config = spec.get("config")
                if config:
                    config = str(config).format(script=script, label=label, dataset=dataset_key(dataset))
                for seed in self.seeds:
                    cells.append(Cell(label, script, dataset, int(seed), base, config, tuple(common + own)))
        names = [cell.name for cell in cells]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UserError(f"{self.where}: run names repeat ({', '.join(duplicates[:3])}): each (algorithm, "
                            "dataset, seed) may appear once.")
        return cells

    @property
    def where(self) -> str:
        return f"matrix {self.source}" if self.source else "matrix"


def load_matrix(path: str) -> Matrix:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"Matrix file '{path}' does not exist (see configs/benchmark/ for examples).")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"Matrix file '{path}' is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"Matrix file '{path}' must be a mapping with keys {sorted(MATRIX_KEYS)}.")
    unknown = set(data) - MATRIX_KEYS
    if unknown:
        raise UserError(f"Matrix file '{path}' has unknown keys {sorted(unknown)}; known: {sorted(MATRIX_KEYS)}.")
    algorithms = data.get("algorithms") or {}
    if isinstance(algorithms, list):  # a plain list of scripts
        algorithms = {str(name): {} for name in algorithms}
    if not isinstance(algorithms, dict) or not algorithms:
        raise UserError(f"Matrix file '{path}' needs 'algorithms': a mapping of labels to settings, or a list.")
    for label, spec in list(algorithms.items()):
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - ALGORITHM_KEYS:
            raise UserError(f"Matrix file '{path}', algorithm '{label}': settings must be a mapping with keys "
                            f"among {sorted(ALGORITHM_KEYS)}, got {spec!r}.")
        algorithms[str(label)] = spec
    for key in ("datasets", "seeds"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise UserError(f"Matrix file '{path}' needs '{key}': a non-empty list.")
    return Matrix(
        algorithms=algorithms,
        datasets=[str(d) for d in data["datasets"]],
        seeds=[int(s) for s in data["seeds"]],
        args=data.get("args") or {},
        root=str(data.get("root") or f"runs/benchmark/{file.stem}"),
        project=str(data.get("project") or "o2o"),
        source=path,
    )


def build_matrix(options: argparse.Namespace) -> Matrix:
    """The matrix file (if any) with --algorithms/--datasets/--seeds/--root applied."""
    if options.matrix:
        matrix = load_matrix(options.matrix)
        if options.algorithms:
            missing = [a for a in options.algorithms if a not in matrix.algorithms]
            if missing:
                raise UserError(f"Algorithm(s) {missing} are not in {options.matrix}; it defines "
                                f"{list(matrix.algorithms)}.")
            matrix.defined_labels = list(matrix.algorithms)
            matrix.algorithms = {a: matrix.algorithms[a] for a in options.algorithms}
    else:
        if not (options.algorithms and options.datasets):
            raise UserError("Give a matrix: --matrix FILE, or --algorithms and --datasets (and --seeds, default 0).")
        matrix = Matrix(algorithms={a: {} for a in options.algorithms}, datasets=[], seeds=[0])
    if options.datasets:
        matrix.datasets = list(options.datasets)
    if options.seeds:
        matrix.seeds = list(options.seeds)
    if options.root:
        matrix.root = options.root
    return matrix


# ---------------------------------------------------------------- commands


def algorithm_command(cell: Cell, root: str, options: argparse.Namespace, extra: Sequence[str],
                      python: str = sys.executable) -> List[str]:
    command = [python, str(REPO / "algorithms" / f"{cell.script}.py")]
    if cell.config:
        command += ["--config_path", cell.config]
    command += [*cell.args, "--env", cell.dataset, "--seed", str(cell.seed), "--name", cell.name,
                "--checkpoints_path", root, "--resume", "true", "--cpu_threads", str(options.cpu_threads),
                "--device", options.device, *extra]
    return command


def runner_command(cell: Cell, options: argparse.Namespace, extra: Sequence[str]) -> List[str]:
    """This script restricted to one cell: skips it when done, resumes it, writes provenance and logs."""
    return ["python", "scripts/benchmark.py", *source_flags(options), "--workers", "1",
            "--algorithm", cell.label, "--dataset", cell.dataset, "--seed", str(cell.seed),
            *(["--", *extra] if extra else [])]


def source_flags(options: argparse.Namespace) -> List[str]:
    """The runner flags (other than the selection and --workers) that define what a run does."""
    flags = ["--matrix", options.matrix] if options.matrix else []
    if options.root:
        flags += ["--root", options.root]
    flags += ["--device", options.device, "--cpu-threads", str(options.cpu_threads)]
    return flags


def write_commands(path: str, cells: List[Cell], options: argparse.Namespace, extra: Sequence[str]) -> None:
    lines = [shlex.join(runner_command(cell, options, extra)) for cell in cells]
    write_text(path, "".join(line + "\n" for line in lines))


def sweep_config(matrix: Matrix, cells: List[Cell], options: argparse.Namespace, extra: Sequence[str]) -> dict:
    """A wandb grid sweep over the matrix; each sweep run is this script restricted to one cell."""
    extra = list(extra)
    if not any(token.split("=")[0] == "--wandb_mode" for token in extra):
        extra += ["--wandb_mode", "online"]  # a sweep's runs report to wandb, whatever the matrix says for local runs
    labels = list(dict.fromkeys(c.label for c in cells))
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    seeds = list(dict.fromkeys(c.seed for c in cells))
    name = Path(matrix.source).stem if matrix.source else "benchmark"
    return {
        "name": name,
        "project": matrix.project,
        "program": "scripts/benchmark.py",
        "method": "grid",
        "metric": {"name": "eval/normalized_score", "goal": "maximize"},
        "parameters": {
            "algorithm": {"values": labels},
            "dataset": {"values": datasets},
            "seed": {"values": seeds},
        },
        "command": ["${env}", "${interpreter}", "${program}", *source_flags(options), "--workers", "1",
                    "${args}", "--", *extra],
    }


def write_sweep(path: str, matrix: Matrix, cells: List[Cell], options: argparse.Namespace,
                extra: Sequence[str]) -> None:
    config = sweep_config(matrix, cells, options, extra)
    header = (f"# wandb sweep: the benchmark matrix ({len(cells)} runs) as a grid over algorithm, dataset and seed.\n"
              "# Each sweep run is scripts/benchmark.py restricted to one cell (skips it when done, resumes it).\n"
              f"#   wandb sweep --project {matrix.project} {path}\n"
              "#   wandb agent <entity>/<project>/<sweep id>     # on each machine, from the repository root\n")
    write_text(path, header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=1000))


def write_text(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}")


# ---------------------------------------------------------------- reading a run


def read_jsonl(path: Path) -> List[dict]:
    """Records of a JSON-lines file; a torn last line (a process killed mid-write) is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def score_of(record: dict) -> Optional[float]:
    """The normalized score of an evaluation record, else its mean return."""
    value = record.get("eval/normalized_score", record.get("eval/return_mean"))
    return None if value is None else float(value)


def evaluations(records: List[dict]) -> List[dict]:
    """Evaluation records by iteration; a repeated iteration (a resumed run) keeps its last record."""
    by_iteration = {r["iteration"]: r for r in records if "eval/return_mean" in r}
    return [by_iteration[i] for i in sorted(by_iteration)]


def read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}


def total_iterations(config: dict) -> Optional[int]:
    try:
        return int(config["offline_iterations"]) + int(config["online_iterations"])
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class Progress:
    iteration: int = 0  # last iteration logged
    total: Optional[int] = None  # offline + online iterations of the run's config
    score: Optional[float] = None  # latest evaluation
    offline_score: Optional[float] = None  # last evaluation of the offline phase
    finished: bool = False


def read_progress(run_dir: Path) -> Progress:
    records = read_jsonl(run_dir / "metrics.jsonl")
    total = total_iterations(read_config(run_dir))
    evals = evaluations(records)
    offline = [r for r in evals if r.get("phase") == 0]
    return Progress(
        iteration=max((r.get("iteration", 0) for r in records), default=0),
        total=total,
        score=score_of(evals[-1]) if evals else None,
        offline_score=score_of(offline[-1]) if offline else None,
        finished=total is not None and any(r["iteration"] == total for r in evals),
    )


def normalise(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def config_conflicts(run_dir: Path, command: Sequence[str]) -> List[str]:
    """Flags of the planned command that disagree with the config the run was started with."""
    config = read_config(run_dir)
    conflicts = []
    for i, token in enumerate(command[:-1]):
        key = token[2:] if token.startswith("--") else None
        if key is None or key in FREE_FIELDS or key not in config:
            continue
        if normalise(command[i + 1]) != normalise(config[key]):
            conflicts.append(f"{key} {config[key]} -> {command[i + 1]}")
    return conflicts


# ---------------------------------------------------------------- provenance


def git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def gpu_name() -> Optional[str]:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def repository_state() -> dict:
    """At each launch: the commit, and whether the tree had uncommitted changes."""
    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def machine_info(device: str) -> dict:
    """Once per runner invocation: what every launch records besides its own command and commit."""
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "gpu": gpu_name() if device.startswith("cuda") else None,
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "mujoco": package_version("mujoco"),
        "minari": package_version("minari"),
    }


def file_sha256(path: Path) -> Optional[str]:
    return sha256_of(path) if path.is_file() else None


def dataset_file(dataset: str) -> Path:
    """The data file of a dataset in the local Minari store (where the algorithm scripts read it)."""
    store = os.environ.get("MINARI_DATASETS_PATH") or str(Path("~/.minari/datasets").expanduser())
    return Path(store) / dataset / "data" / "main_data.hdf5"


_dataset_hashes: Dict[Tuple[str, int, int], Optional[str]] = {}


def dataset_sha256(dataset: str) -> Optional[str]:
    """sha256 of the dataset's data file (None if it is not in the store): a dataset id names data
    that another machine may build differently (docs/datasets.md), the hash names the bytes."""
    path = dataset_file(dataset)
    if not path.is_file():
        return None
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _dataset_hashes:
        _dataset_hashes[key] = file_sha256(path)
    return _dataset_hashes[key]


def recorded_dataset_sha256(run_dir: Path) -> Optional[str]:
    """The dataset hash of the run's last launch that recorded one."""
    try:
        launches = json.loads((run_dir / "provenance.json").read_text()).get("launches", [])
    except (OSError, json.JSONDecodeError):
        return None
    return next((launch["dataset_sha256"] for launch in reversed(launches) if launch.get("dataset_sha256")), None)


def dataset_change(run_dir: Path, dataset: str) -> Optional[str]:
    """Why the run may not continue on `dataset` as it is in the store now, if its data changed."""
    trained_on, now = recorded_dataset_sha256(run_dir), dataset_sha256(dataset)
    if trained_on and now and trained_on != now:
        return (f"{dataset} is not the data this run started on (sha256 {trained_on[:10]}, now {now[:10]}; rebuilt, "
                "or built on another machine?): delete the run directory to start it again on the new data, or "
                "restore the old dataset to resume")
    return None


def checkpoint_iteration(run_dir: Path) -> Optional[int]:
    """The iteration a run resumes from (0 without a checkpoint). Not its metrics' last iteration: a run
    killed between checkpoints has logged past its checkpoint, and drops those lines when it resumes."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return 0
    import torch  # only here: planning and progress need no torch; mmap reads the small pickle, not the tensors

    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["iteration"])
    except Exception:  # unreadable: the run itself reports it when it loads the checkpoint
        return None


def record_launch(run_dir: Path, cell: Cell, matrix: Matrix, machine: dict, command: List[str],
                  resumed_at: Optional[int]) -> None:
    path = run_dir / "provenance.json"
    try:
        provenance = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        provenance = {}
    provenance.update(run=cell.name, algorithm=cell.label, script=f"algorithms/{cell.script}.py",
                      dataset=cell.dataset, seed=cell.seed, base=cell.base, matrix=matrix.source)
    launch = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **repository_state(), **machine,
              "script_sha256": file_sha256(REPO / "algorithms" / f"{cell.script}.py"),
              "dataset_sha256": dataset_sha256(cell.dataset),
              "command": shlex.join(command), "cwd": os.getcwd(), "resumed_at_iteration": resumed_at}
    provenance["launches"] = [*provenance.get("launches", []), launch]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(provenance, indent=1) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- running


@dataclass
class Run:
    index: int
    cell: Cell
    run_dir: Path
    command: List[str]
    state: str = "pending"
    progress: Progress = field(default_factory=Progress)
    process: Optional[subprocess.Popen] = None
    log: Optional[IO] = None
    lock: Optional[IO] = None
    started: float = 0.0
    note: str = ""
    shown: Optional[tuple] = None


def fmt_score(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def show(run: Run, n_runs: int, width: int, force: bool = False) -> None:
    """Print the run's line if its state or latest score changed since it was last printed."""
    p = run.progress
    key = (run.state, p.score, run.note)
    if key == run.shown and not force:
        return
    run.shown = key
    total = "?" if p.total is None else p.total
    line = (f"[{run.index:>{len(str(n_runs))}}/{n_runs}] {run.state:<7} {run.cell.name:<{width}} "
            f"it {p.iteration:>7}/{total:<7} score {fmt_score(p.score):>7} (offline {fmt_score(p.offline_score)})")
    if run.state in ("done", "failed") and run.started:
        line += f" {time.time() - run.started:.0f}s"
    if run.note:
        line += f"  {run.note}"
    print(line, flush=True)


def last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").replace("\r", "\n").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


def child_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def lock_run(run_dir: Path) -> Optional[IO]:
    """An exclusive lock on the run directory, or None when another runner holds it. The launched run
    inherits the lock's file descriptor, so the lock lasts while either this runner or the run lives."""
    handle = open(run_dir / ".runner.lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def launch(run: Run, matrix: Matrix, machine: dict, env: Dict[str, str]) -> bool:
    """Start the run; False (and nothing started) when another runner is running it."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.lock = lock_run(run.run_dir)
    if run.lock is None:
        run.state, run.note = "busy", "another runner is running it: left to that runner"
        return False
    run.progress = read_progress(run.run_dir)  # the other runner may have finished it since we planned
    if run.progress.finished:
        run.state, run.note = "done", "finished by another runner"
        run.lock.close()
        return False
    record_launch(run.run_dir, run.cell, matrix, machine, run.command, checkpoint_iteration(run.run_dir))
    run.log = open(run.run_dir / "stdout.log", "a")
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    run.log.write(f"\n=== {stamp} benchmark.py launches: {shlex.join(run.command)}\n")
    run.log.flush()
    run.process = subprocess.Popen(run.command, stdout=run.log, stderr=subprocess.STDOUT, env=env,
                                   pass_fds=(run.lock.fileno(),))
    run.state, run.started, run.note = "running", time.time(), ""
    return True


def finish(run: Run, returncode: int) -> None:
    run.log.close()
    run.lock.close()
    run.progress = read_progress(run.run_dir)
    if returncode == 0 and run.progress.finished:
        run.state, run.note = "done", ""
    elif returncode == 0:
        run.state = "failed"
        run.note = (f"exited 0 but its metrics have no evaluation at iteration {run.progress.total} (metrics.jsonl "
                    "edited, or killed between its last evaluation and checkpoint?): delete the run directory to "
                    f"run it again; log: {run.run_dir / 'stdout.log'}")
    else:
        run.state = "failed"
        run.note = f"exit {returncode}: {last_line(run.run_dir / 'stdout.log')} (log: {run.run_dir / 'stdout.log'})"


def execute(runs: List[Run], matrix: Matrix, options: argparse.Namespace) -> int:
    n, width = len(runs), max(len(r.cell.name) for r in runs)
    for run in runs:
        show(run, n, width)
    queue = [r for r in runs if r.state == "pending"]
    if queue:
        missing = sorted({f"algorithms/{r.cell.script}.py" for r in queue
                          if not (REPO / "algorithms" / f"{r.cell.script}.py").is_file()})
        if missing:
            raise UserError(f"{', '.join(missing)} not found: these algorithms do not exist (yet); leave them out "
                            "with --algorithms.")
        machine, env = machine_info(options.device), child_env(options.cpu_threads)
    active: List[Run] = []

    def stop(signum, frame):  # SLURM and `kill` send SIGTERM: stop the children, keep what they wrote
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while queue or active:
            while queue and len(active) < options.workers:
                run = queue.pop(0)
                changed_data = dataset_change(run.run_dir, run.cell.dataset)  # again: planned maybe hours ago
                if changed_data:
                    run.state, run.note = "failed", changed_data
                    show(run, n, width)
                    continue
                if launch(run, matrix, machine, env):
                    active.append(run)
                show(run, n, width)
            time.sleep(options.poll)
            for run in list(active):
                returncode = run.process.poll()
                if returncode is None:
                    run.progress = read_progress(run.run_dir)
                else:
                    finish(run, returncode)
                    active.remove(run)
                show(run, n, width)
    except KeyboardInterrupt:
        for run in active:
            run.process.terminate()
        for run in active:
            try:
                run.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                run.process.kill()
                run.process.wait()
            run.log.close()
            run.lock.close()
        print(f"interrupted: stopped {len(active)} running run(s); run the same command again to resume "
              "them from their last checkpoints.", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    states = [r.state for r in runs]
    skipped = sum(1 for r in runs if r.note == "finished earlier")
    busy = f", {states.count('busy')} left to another runner" if "busy" in states else ""
    print(f"{n} runs: {states.count('done')} done ({skipped} finished earlier), {states.count('failed')} failed"
          f"{busy}. "
          f"Aggregate: python scripts/aggregate.py {matrix.root} --out results/<name>", flush=True)
    return 1 if "failed" in states else 0


def ordered_cells(matrix: Matrix, order: str) -> List[Cell]:
    """The matrix's cells, algorithm by algorithm (`algorithm`), or every seed-0 run first, then seed 1, ...
    (`seed`: a benchmark stopped early then holds one seed of every (algorithm, dataset) before a second one)."""
    cells = matrix.cells()
    if order == "seed":
        cells.sort(key=lambda cell: matrix.seeds.index(cell.seed))  # stable: the matrix's order within a seed
    return cells


def plan(matrix: Matrix, options: argparse.Namespace, extra: Sequence[str]) -> List[Run]:
    runs = []
    for index, cell in enumerate(ordered_cells(matrix, options.order), 1):
        run_dir = Path(matrix.root) / cell.name
        run = Run(index, cell, run_dir, algorithm_command(cell, matrix.root, options, extra))
        run.progress = read_progress(run_dir)
        conflicts = config_conflicts(run_dir, run.command)
        changed_data = None if run.progress.finished else dataset_change(run_dir, cell.dataset)
        if changed_data:
            run.state, run.note = "failed", changed_data
        elif conflicts:
            run.state = "failed"
            run.note = (f"{run_dir}/config.yaml disagrees with the planned flags ({'; '.join(conflicts)}): "
                        "use another --root, or delete the run directory to start it again")
        elif run.progress.finished:
            run.state, run.note = "done", "finished earlier"
        elif run.progress.iteration:
            resume_from = checkpoint_iteration(run_dir)
            logged = f"metrics up to iteration {run.progress.iteration}"
            run.note = (f"will start again: no checkpoint yet ({logged})" if resume_from == 0 else
                        f"will resume from its checkpoint at iteration {'?' if resume_from is None else resume_from} "
                        f"({logged})")
        runs.append(run)
    return runs


# ---------------------------------------------------------------- command line


def split_extra(argv: List[str]) -> Tuple[List[str], List[str]]:
    """Everything after the first `--` goes to every run."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parse_args(argv: List[str]) -> Tuple[argparse.Namespace, List[str]]:
    own, extra = split_extra(argv)
    reserved = sorted({token[2:].split("=")[0] for token in extra if token.startswith("--")} & RUNNER_FLAGS)
    if reserved:
        raise UserError(f"--{reserved[0]} after `--`: the runner sets {', '.join(sorted(RUNNER_FLAGS))} itself "
                        "(use --datasets, --seeds, --root, --device, --cpu-threads or a matrix entry's 'config').")
    parser = argparse.ArgumentParser(
        description="Run a benchmark matrix of the algorithm scripts (resumable; one line per run and change).",
        epilog="Flags after `--` are passed to every run (they win over the matrix). See docs/benchmark.md.",
        allow_abbrev=False)
    parser.add_argument("--matrix", help="matrix YAML file (configs/benchmark/*.yaml)")
    parser.add_argument("--algorithms", "--algorithm", nargs="+", metavar="NAME",
                        help="algorithm scripts (no --matrix), or a subset of the matrix's algorithm labels")
    parser.add_argument("--datasets", "--dataset", nargs="+", metavar="ID",
                        help="Minari dataset ids (replace the matrix's)")
    parser.add_argument("--seeds", "--seed", nargs="+", type=int, metavar="N", help="seeds (replace the matrix's)")
    parser.add_argument("--root", help="directory of the run directories (default: the matrix's root, "
                                       "runs/benchmark/<matrix file stem>, or runs/benchmark)")
    parser.add_argument("--order", choices=["algorithm", "seed"], default="algorithm",
                        help="launch order: algorithm by algorithm as the matrix lists them (default), or seed by "
                             "seed (every algorithm and dataset at seed 0 first)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="runs at a time (default: the number of CPU cores)")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch/OMP threads per run (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N; passed to every run")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between progress checks (default 5)")
    parser.add_argument("--dry-run", action="store_true", help="print each run's state and command; launch nothing")
    parser.add_argument("--commands", metavar="FILE", help="write one command line per run ('-': stdout)")
    parser.add_argument("--wandb-sweep", metavar="FILE", help="write the matrix as a wandb sweep YAML; launch nothing")
    options = parser.parse_args(own)
    if options.workers < 1 or options.cpu_threads < 1 or options.poll <= 0:
        parser.error("--workers and --cpu-threads must be at least 1, --poll positive")
    return options, extra


def check_device(device: str) -> None:
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise UserError(f"--device {device}: use cpu, cuda or cuda:N.")
    import torch  # only here: the CPU runner never pays for importing torch

    if not torch.cuda.is_available():
        raise UserError(f"--device {device} but torch sees no CUDA device (torch {torch.__version__}). "
                        "Run on a GPU machine (see docs/benchmark.md, Docker CUDA image) or use --device cpu.")


def main(argv: Optional[List[str]] = None) -> int:
    options, extra = parse_args(sys.argv[1:] if argv is None else argv)
    matrix = build_matrix(options)
    runs = plan(matrix, options, extra)
    if options.commands or options.wandb_sweep:
        cells = [run.cell for run in runs]
        if options.commands:
            write_commands(options.commands, cells, options, extra)
        if options.wandb_sweep:
            write_sweep(options.wandb_sweep, matrix, cells, options, extra)
        return 0
    if options.dry_run:
        width = max(len(r.cell.name) for r in runs)
        for run in runs:
            show(run, len(runs), width)
            print("    " + shlex.join(run.command))
        return 0
    check_device(options.device)
    return execute(runs, matrix, options)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
