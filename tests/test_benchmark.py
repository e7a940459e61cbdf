"""The benchmark runner and the aggregation end to end on a tiny matrix (2 algorithms x the tiny
Hopper dataset x 2 seeds, 2 workers): runs, skip and resume, provenance, command list, wandb sweep,
then the numbers of the tables recomputed by hand from the metrics files, and the plots."""
import argparse
import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import ALGORITHMS, REPO, TINY_TRAIN_ARGS

import aggregate
import benchmark

LABELS = ["iql", "iql_famo2o"]
SEEDS = [0, 1]
TOTAL = 120  # offline 60 + online 60 in TINY_TRAIN_ARGS
# TINY_TRAIN_ARGS as a matrix's `args` (the runner sets --cpu_threads itself)
TINY = {key[2:]: value for key, value in zip(TINY_TRAIN_ARGS[::2], TINY_TRAIN_ARGS[1::2]) if key != "--cpu_threads"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_records(run_dir: Path) -> list:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/normalized_score" in r]


def dataset_sha256(dataset: str) -> str:
    """sha256 of the data file of a dataset in the test session's Minari store."""
    path = Path(os.environ["MINARI_DATASETS_PATH"]) / dataset / "data" / "main_data.hdf5"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git_head():
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def write_matrix(path: Path, dataset: str, root: Path, **overrides) -> Path:
    matrix = {"root": str(root), "datasets": [dataset], "seeds": SEEDS, "args": TINY,
              "algorithms": {label: {} for label in LABELS}, **overrides}
    path.write_text(yaml.safe_dump(matrix))
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory, run_script, hopper_dataset):
    """The tiny matrix, run once by the runner with 2 workers."""
    tmp = tmp_path_factory.mktemp("benchmark")
    root = tmp / "runs"
    matrix = write_matrix(tmp / "matrix.yaml", hopper_dataset, root)
    result = run_script("scripts/benchmark.py", "--matrix", matrix, "--workers", "2", "--poll", "0.2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = [benchmark.run_name(label, hopper_dataset, seed) for label in LABELS for seed in SEEDS]
    return {"tmp": tmp, "root": root, "matrix": matrix, "result": result, "names": names, "dataset": hopper_dataset}


def test_runner_runs_the_matrix_with_provenance_and_logs(bench):
    root, stdout = bench["root"], bench["result"].stdout
    assert bench["names"][0] == f"iql__{bench['dataset'].replace('/', '-')}__s0"
    assert sorted(p.name for p in root.iterdir()) == sorted(bench["names"])
    for name in bench["names"]:
        run_dir = root / name
        assert [r["iteration"] for r in eval_records(run_dir)] == [40, 60, 80, TOTAL]
        assert "normalized score after the offline phase" in (run_dir / "stdout.log").read_text()
        # one progress line per state change: pending, running, done
        lines = [line for line in stdout.splitlines() if f" {name} " in line]
        assert [line.split()[1] for line in lines][0] == "pending" and "done" in lines[-1].split()
        assert "running" in {line.split()[1] for line in lines}
        provenance = json.loads((run_dir / "provenance.json").read_text())
        label, _, seed = name.split("__")
        assert provenance["algorithm"] == label and provenance["seed"] == int(seed[1:])
        assert provenance["base"] == ("iql" if label == "iql_famo2o" else None)
        (launch,) = provenance["launches"]
        head = git_head()  # None outside a git checkout (e.g. a Docker image built without .git)
        assert (launch["commit"] is None) if head is None else re.fullmatch("[0-9a-f]{40}", launch["commit"])
        assert launch["cpu_count"] and launch["torch"] and launch["dirty"] in (True, False, None)
        assert launch["dataset_sha256"] == dataset_sha256(bench["dataset"])
        command = shlex.split(launch["command"])
        assert command[1].endswith(f"algorithms/{label}.py")
        assert command[command.index("--cpu_threads") + 1] == "1" and command[command.index("--resume") + 1] == "true"
        assert command[command.index("--name") + 1] == name
    assert "4 runs: 4 done (0 finished earlier), 0 failed." in stdout


def hand_summary(root: Path, names: list, last_n: int) -> dict:
    """(label) -> offline score, final score, online average and training episodes per seed,
    recomputed from metrics.jsonl."""
    scores = {}
    for name in names:
        evals = eval_records(root / name)
        offline = [r["eval/normalized_score"] for r in evals if r["phase"] == 0][-1]
        final = statistics.fmean(r["eval/normalized_score"] for r in evals[-last_n:])
        online = [r["eval/normalized_score"] for r in evals if r["phase"] == 1]
        assert len(online) >= 2
        window_start = evals[-last_n - 1]["iteration"]  # an episode logged there ended after that evaluation
        training = [r["train/normalized_return"] for r in read_jsonl(root / name / "metrics.jsonl")
                    if "train/normalized_return" in r and r["iteration"] >= window_start]
        assert len(training) >= 2
        scores.setdefault(name.split("__")[0], []).append(
            (offline, final, statistics.fmean(online), statistics.fmean(training)))
    return scores


def test_aggregation_tables_and_plots(bench, run_script, tmp_path):
    root, out = bench["root"], tmp_path / "results"
    result = run_script("scripts/aggregate.py", root, "--out", out, "--export-runs", out / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = hand_summary(root, bench["names"], last_n=3)
    final_mean = {label: statistics.fmean(v[1] for v in values) for label, values in scores.items()}

    with open(out / "summary.csv") as f:
        rows = {row["algorithm"]: row for row in csv.DictReader(f)}
    summary = json.loads((out / "summary.json").read_text())
    table = (out / "table.md").read_text()
    assert summary["last_n"] == 3 and "mean of each run's last 3 evaluations" in table
    for label in LABELS:
        offline, final, online, training = ([v[i] for v in scores[label]] for i in range(4))
        expected = {"offline_mean": statistics.fmean(offline), "offline_std": statistics.stdev(offline),
                    "final_mean": statistics.fmean(final), "final_std": statistics.stdev(final),
                    "online_average_mean": statistics.fmean(online), "online_average_std": statistics.stdev(online),
                    "training_episodes_mean": statistics.fmean(training),
                    "training_episodes_std": statistics.stdev(training)}
        row = rows[label]
        (json_row,) = [r for r in summary["rows"] if r["algorithm"] == label]
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12, abs=1e-12), (label, key)
            assert json_row[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (label, key)
        assert row["dataset"] == bench["dataset"] and row["seeds"] == "0 1" and row["budget"] == "60 + 60"
        cells = (f"| {bench['dataset']} | {label} | {expected['offline_mean']:.1f} ± {expected['offline_std']:.1f} | "
                 f"{expected['final_mean']:.1f} ± {expected['final_std']:.1f} | "
                 f"{expected['online_average_mean']:.1f} ± {expected['online_average_std']:.1f} | "
                 f"{expected['training_episodes_mean']:.1f} ± {expected['training_episodes_std']:.1f} |")
        assert cells in table, table
    delta = final_mean["iql_famo2o"] - final_mean["iql"]
    assert float(rows["iql_famo2o"]["delta_vs_base"]) == pytest.approx(delta, rel=1e-12, abs=1e-12)
    assert rows["iql"]["delta_vs_base"] == ""
    assert f"| {delta:+.1f} vs iql | 2 | 60 + 60 | [1] |" in table
    provenance = json.loads((root / bench["names"][0] / "provenance.json").read_text())
    launch = provenance["launches"][0]
    note = aggregate.script_commit_note(launch, provenance["script"])  # "" on a clean tree (CI); tested below
    assert f"[1] commit `{(launch['commit'] or 'unknown')[:10]}`{note}" in table
    assert f"dataset sha256 `{dataset_sha256(bench['dataset'])[:10]}`;" in table
    assert f"({os.cpu_count()} cores, device cpu, host " in table and "torch 2." in table

    # learning curves: mean over seeds at every evaluation iteration
    with open(out / "curves.csv") as f:
        curve = [r for r in csv.DictReader(f) if r["algorithm"] == "iql" and r["iteration"] == "80"]
    at_80 = [r["eval/normalized_score"] for name in bench["names"][:2] for r in eval_records(root / name)
             if r["iteration"] == 80]
    assert float(curve[0]["mean"]) == pytest.approx(statistics.fmean(at_80))
    # FamO2O family: score vs beta at the end of the offline phase, mean over seeds
    with open(out / "family.csv") as f:
        family = [r for r in csv.DictReader(f) if r["stage"] == "end of offline" and float(r["beta"]) == 1.0]
    rows_beta1 = [r["normalized_score"] for name in bench["names"][2:]
                  for r in read_jsonl(root / name / "family_scores.jsonl") if r["phase"] == 0 and r["beta"] == 1.0]
    assert len(rows_beta1) == 2 and float(family[0]["mean"]) == pytest.approx(statistics.fmean(rows_beta1))

    slug = bench["dataset"].replace("/", "-")
    for plot in (f"curves_{slug}.png", f"family_{slug}.png"):
        data = (out / plot).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, plot
    # the exported small files alone reproduce the same table
    assert sorted(p.name for p in (out / "runs" / bench["names"][2]).iterdir()) == sorted(aggregate.EXPORTED_FILES)
    again = tmp_path / "again"
    assert run_script("scripts/aggregate.py", out / "runs", "--out", again).returncode == 0
    assert (again / "table.md").read_text() == table


def test_rerun_skips_finished_runs_and_resumes_a_killed_one(bench, run_script, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(bench["root"], root)
    killed = root / bench["names"][1]
    original = eval_records(killed)
    # as if killed in the online phase after the checkpoint at the switch (60) and after the evaluation at
    # 80 but before that evaluation's checkpoint was written: metrics run ahead of the checkpoint
    records = read_jsonl(killed / "metrics.jsonl")
    (killed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["iteration"] <= 80))
    shutil.copy(killed / "offline.pt", killed / "checkpoint.pt")
    untouched = {name: (root / name / "metrics.jsonl").read_text() for name in bench["names"] if root / name != killed}

    result = run_script("scripts/benchmark.py", "--matrix", bench["matrix"], "--root", root, "--workers", "2",
                        "--poll", "0.2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 runs: 4 done (3 finished earlier), 0 failed." in result.stdout
    assert f"pending {killed.name}" in result.stdout
    assert "will resume from its checkpoint at iteration 60 (metrics up to iteration 80)" in result.stdout
    assert f"Resuming {killed} at iteration 60" in (killed / "stdout.log").read_text()
    resumed = eval_records(killed)
    assert [r["iteration"] for r in resumed] == [40, 60, 80, TOTAL]
    assert resumed[:2] == original[:2]  # records up to the checkpoint are kept as they were, later ones redone
    # resuming from the checkpoint reproduces the uninterrupted run
    assert [r["eval/normalized_score"] for r in resumed] == [r["eval/normalized_score"] for r in original]
    assert [launch["resumed_at_iteration"] for launch in
            json.loads((killed / "provenance.json").read_text())["launches"]] == [0, 60]
    for name, text in untouched.items():
        assert (root / name / "metrics.jsonl").read_text() == text
        assert len(json.loads((root / name / "provenance.json").read_text())["launches"]) == 1


def test_a_run_another_runner_holds_is_left_to_it(bench, run_script, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(bench["root"], root)
    held = root / bench["names"][1]
    for name in bench["names"][1:]:  # three unfinished runs, one of them held by "another runner"
        (root / name / "metrics.jsonl").write_text("")
        (root / name / "checkpoint.pt").unlink(missing_ok=True)
    with open(held / ".runner.lock", "a") as other_runner:
        benchmark.fcntl.flock(other_runner, benchmark.fcntl.LOCK_EX | benchmark.fcntl.LOCK_NB)
        result = run_script("scripts/benchmark.py", "--matrix", bench["matrix"], "--root", root, "--workers", "2",
                            "--poll", "0.2")
        assert (held / "metrics.jsonl").read_text() == ""  # not launched a second time
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 runs: 3 done (1 finished earlier), 0 failed, 1 left to another runner." in result.stdout
    assert re.search(rf"busy +{held.name} .*another runner is running it", result.stdout)
    for name in bench["names"][2:]:
        assert [r["iteration"] for r in eval_records(root / name)] == [40, 60, 80, TOTAL]
    for name in bench["names"][1:]:  # the runner let go of every lock it took
        with open(root / name / ".runner.lock", "a") as handle:
            benchmark.fcntl.flock(handle, benchmark.fcntl.LOCK_EX | benchmark.fcntl.LOCK_NB)


def test_the_lock_on_a_run_lives_as_long_as_the_run(tmp_path):
    lock = benchmark.lock_run(tmp_path)
    assert lock is not None and benchmark.lock_run(tmp_path) is None
    # the launched run inherits the lock: a runner killed with SIGKILL leaves its run still holding it
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], pass_fds=(lock.fileno(),))
    try:
        lock.close()
        assert benchmark.lock_run(tmp_path) is None
    finally:
        child.kill()
        child.wait()
    assert benchmark.lock_run(tmp_path) is not None


def test_a_run_is_not_resumed_on_other_data(bench, run_script, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(bench["root"], root)
    stopped, finished = root / bench["names"][1], root / bench["names"][2]
    records = read_jsonl(stopped / "metrics.jsonl")  # as if stopped at the switch
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["iteration"] <= 60))
    for run_dir in (stopped, finished):  # as if the dataset was rebuilt since they started
        provenance = json.loads((run_dir / "provenance.json").read_text())
        provenance["launches"][-1]["dataset_sha256"] = "0" * 64
        (run_dir / "provenance.json").write_text(json.dumps(provenance))
    result = run_script("scripts/benchmark.py", "--matrix", bench["matrix"], "--root", root, "--dry-run")
    assert result.returncode == 0, result.stderr
    now = dataset_sha256(bench["dataset"])[:10]
    assert f"failed  {stopped.name}" in result.stdout
    assert f"is not the data this run started on (sha256 0000000000, now {now}" in result.stdout
    assert f"done    {finished.name}" in result.stdout  # a finished run stays finished; the table names its data
    assert result.stdout.count("failed") == 1


def test_command_list_and_wandb_sweep_cover_the_matrix(bench, run_script, tmp_path):
    commands, sweep = tmp_path / "commands.txt", tmp_path / "sweep.yaml"
    result = run_script("scripts/benchmark.py", "--matrix", bench["matrix"], "--commands", commands,
                        "--wandb-sweep", sweep, "--", "--eval_episodes", "1")
    assert result.returncode == 0, result.stderr
    lines = commands.read_text().splitlines()
    assert len(lines) == len(LABELS) * len(SEEDS)
    cells = set()
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["python", "scripts/benchmark.py"] and argv[-3:] == ["--", "--eval_episodes", "1"]
        cells.add(tuple(argv[argv.index(flag) + 1] for flag in ("--algorithm", "--dataset", "--seed")))
    assert cells == {(label, bench["dataset"], str(seed)) for label in LABELS for seed in SEEDS}
    # one line, run as a SLURM array task would: the finished run is recognised and not launched again
    argv = shlex.split(lines[0])
    done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "1 runs: 1 done (1 finished earlier)" in done.stdout, done.stdout + done.stderr

    config = yaml.safe_load(sweep.read_text())
    assert config["method"] == "grid" and config["program"] == "scripts/benchmark.py"
    assert config["parameters"] == {"algorithm": {"values": LABELS}, "dataset": {"values": [bench["dataset"]]},
                                    "seed": {"values": SEEDS}}
    assert config["command"][:3] == ["${env}", "${interpreter}", "${program}"] and "${args}" in config["command"]
    # what `wandb agent` runs for one grid point (it passes parameters as --name=value)
    macros = {"${env}": [], "${interpreter}": [sys.executable], "${program}": [config["program"]],
              "${args}": ["--algorithm=iql_famo2o", f"--dataset={bench['dataset']}", "--seed=1"]}
    agent = [part for token in config["command"] for part in macros.get(token, [token])]
    assert agent[-4:] == ["--eval_episodes", "1", "--wandb_mode", "online"]
    done = subprocess.run(agent, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"done    {bench['names'][3]}" in done.stdout, done.stdout + done.stderr


def test_dry_run_reports_states_and_config_conflicts(bench, run_script):
    result = run_script("scripts/benchmark.py", "--matrix", bench["matrix"], "--dry-run", "--seeds", "0", "7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("finished earlier") == 2 and result.stdout.count("pending") == 2
    assert f"--name {benchmark.run_name('iql', bench['dataset'], 7)}" in result.stdout
    conflict = run_script("scripts/benchmark.py", "--matrix", bench["matrix"], "--dry-run", "--", "--eval_freq", "30")
    assert conflict.stdout.count("failed") == 4
    assert "disagrees with the planned flags (eval_freq 40 -> 30)" in conflict.stdout
    assert not list(bench["root"].glob("*__s7"))  # a dry run launches nothing


def test_seed_order_launches_every_algorithm_at_one_seed_before_the_next(bench, run_script):
    names = {}
    for order in ("algorithm", "seed"):
        result = run_script("scripts/benchmark.py", "--matrix", bench["matrix"], "--dry-run", "--order", order)
        names[order] = re.findall(r"^\[.*\] \w+ +(iql\S*__s\d) ", result.stdout, re.M)  # the state lines
    by_label = [benchmark.run_name(label, bench["dataset"], seed) for label in LABELS for seed in SEEDS]
    by_seed = [benchmark.run_name(label, bench["dataset"], seed) for seed in SEEDS for label in LABELS]
    assert by_label != by_seed
    assert names["algorithm"] == by_label and names["seed"] == by_seed


def test_a_failing_run_is_reported_with_its_error(run_script, tmp_path):
    matrix = write_matrix(tmp_path / "matrix.yaml", "o2o-test/nothing/here-v0", tmp_path / "runs", seeds=[0],
                          algorithms={"iql": {}})
    result = run_script("scripts/benchmark.py", "--matrix", matrix, "--poll", "0.2")
    assert result.returncode == 1
    assert "failed  iql__o2o-test-nothing-here-v0__s0" in result.stdout
    assert "exit 2: error: " in result.stdout and "is not in the local Minari store" in result.stdout
    assert "1 runs: 0 done (0 finished earlier), 1 failed." in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--algorithms", "iql"], "Give a matrix"),
    (["--algorithms", "iql", "--datasets", "d", "--", "--seed", "3"], "--seed after `--`"),
    (["--matrix", "nowhere.yaml"], "does not exist"),
    (["--matrix", "MATRIX", "--algorithm", "sac"], "are not in"),
    (["--matrix", "BAD", "--dry-run"], "unknown keys ['algorithm']"),
    (["--matrix", "RESERVED", "--dry-run"], "'seed' is set by the runner"),
])
def test_bad_input_gives_a_clear_message(args, message, run_script, tmp_path):
    (tmp_path / "bad.yaml").write_text("datasets: [d]\nseeds: [0]\nalgorithm: {iql: {}}\n")
    (tmp_path / "reserved.yaml").write_text("datasets: [d]\nseeds: [0]\nalgorithms: {iql: {args: {seed: 1}}}\n")
    write_matrix(tmp_path / "matrix.yaml", "d", tmp_path / "runs")
    files = {"BAD": tmp_path / "bad.yaml", "RESERVED": tmp_path / "reserved.yaml", "MATRIX": tmp_path / "matrix.yaml"}
    result = run_script("scripts/benchmark.py", *[files.get(a, a) for a in args])
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_committed_results_and_readme_table_come_from_the_committed_runs(tmp_path):
    """results/benchmark's table and summary, and the README's table, are what aggregate.py makes of
    results/benchmark/runs now: a run added without re-aggregating, or a table edited by hand, fails."""
    out = tmp_path / "results"
    assert aggregate.main([str(REPO / "results" / "benchmark" / "runs"), "--out", str(out)]) == 0
    committed = REPO / "results" / "benchmark"
    for name in ("table.md", "summary.csv"):
        assert (out / name).read_text() == (committed / name).read_text(), name
    readme = (REPO / "README.md").read_text()
    begin = readme.index(aggregate.README_BEGIN) + len(aggregate.README_BEGIN)
    assert readme[begin:readme.index(aggregate.README_END)] == "\n" + (out / "table.md").read_text()


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "benchmark").glob("*.yaml"))
                         + sorted((REPO / "configs" / "investigations").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_matrices_are_valid(path):
    matrix = benchmark.load_matrix(str(path))
    cells = matrix.cells()
    known = set(ALGORITHMS) | {"awac", "awac_samg", "cql_samg"}
    assert {cell.script for cell in cells} <= known
    labels = set(matrix.algorithms)
    assert all(cell.base in labels for cell in cells if cell.base)
    if path.parent.name == "benchmark":  # every method next to its base (an investigation has its own control)
        assert all(cell.base for cell in cells if cell.script in benchmark.BASES)
    for cell in cells:  # equal budget: a method's flags name the same iterations as its base's
        if cell.base:
            (base,) = [c for c in cells if (c.label, c.dataset, c.seed) == (cell.base, cell.dataset, cell.seed)]
            budget = lambda c: [c.args[i + 1] for i, a in enumerate(c.args) if a.endswith("_iterations")]  # noqa: E731
            assert budget(cell) == budget(base), (cell.label, cell.base)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "benchmark").glob("*.yaml")), ids=lambda p: p.name)
def test_selecting_one_algorithm_keeps_its_base(path):
    """`--algorithms iql_famo2o_random` (one label of a matrix) records the base the matrix names
    (iql; cql_2m for paper_gpu.yaml's cql_famo2o) in provenance.json, not the script's default."""
    full = {(cell.label, cell.dataset, cell.seed): cell.base for cell in benchmark.load_matrix(str(path)).cells()}
    labels = sorted({label for label, _, _ in full})
    for label in labels:
        options, _ = benchmark.parse_args(["--matrix", str(path), "--algorithms", label])
        cells = benchmark.build_matrix(options).cells()
        assert {cell.label for cell in cells} == {label}
        assert [cell.base for cell in cells] == [full[(c.label, c.dataset, c.seed)] for c in cells], label
    if path.name == "paper_gpu.yaml":
        options, _ = benchmark.parse_args(["--matrix", str(path), "--algorithms", "cql_famo2o"])
        assert {cell.base for cell in benchmark.build_matrix(options).cells()} == {"cql_2m"}


def write_fake_run(root: Path, name: str, env: str, seed: int, evals: list, samg: list = (),
                   training: list = ()) -> None:
    """A run directory by hand: evals = [(iteration, phase, return)], samg = [(iteration, p_mean)],
    training = [(iteration, episode return)]."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"env": env, "seed": seed, "offline_iterations": 20,
                                                         "online_iterations": 20}))
    records = [{"iteration": it, "eval/return_mean": ret, "eval/return_std": 0.0, "phase": phase}
               for it, phase, ret in evals]
    records += [{"iteration": it, "phase": 1, "samg/p_mean": p, "samg/p_zero_fraction": 1 - p} for it, p in samg]
    records += [{"iteration": it, "phase": 1, "train/episode_return": ret} for it, ret in training]
    records.sort(key=lambda r: r["iteration"])
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_aggregation_of_samg_runs_without_reference_scores(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "out"
    env = "o2o-test/swimmer/random-v0"
    for seed, shift in ((0, 0.0), (1, 2.0)):
        evals = [(10, 0, 1.0 + shift), (20, 0, 2.0 + shift), (25, 1, 0.0 + shift), (30, 1, 3.0 + shift),
                 (40, 1, 5.0 + shift)]
        # with --last-n 2 the window starts at the evaluation at 25: an episode logged at 25 ended after it
        # (episodes are logged at their last step's index, evaluations after it), one at 22 before it
        write_fake_run(root, f"awac__{env.replace('/', '-')}__s{seed}", env, seed, evals,
                       training=[(22, 100.0), (25, 8.0 + shift), (33, 4.0 + shift), (38, 6.0 + shift)])
        write_fake_run(root, f"awac_samg__{env.replace('/', '-')}__s{seed}", env, seed,
                       [(it, ph, r + 1.0) for it, ph, r in evals], samg=[(30, 0.5 + shift / 10), (40, 0.25)])
    write_fake_run(root, f"awac__{env.replace('/', '-')}__s2", env, 2, [(10, 0, 1.0)])  # unfinished: left out
    (tmp_path / "README.md").write_text(f"intro\n{aggregate.README_BEGIN}\nold\n{aggregate.README_END}\nend\n")
    assert aggregate.main([str(root), "--out", str(out), "--last-n", "2", "--readme", str(tmp_path / "README.md")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    awac, samg = summary["rows"]
    assert (awac["algorithm"], samg["algorithm"], samg["base"]) == ("awac", "awac_samg", "awac")
    assert awac["seeds"] == [0, 1] and awac["metric"] == "return"
    assert awac["offline_mean"] == 3.0 and awac["final_mean"] == 5.0  # (2, 4) and ((3+5)/2, (5+7)/2)
    assert awac["final_std"] == pytest.approx(statistics.stdev([4.0, 6.0]))
    assert awac["online_average_mean"] == pytest.approx(11 / 3)  # (0+3+5)/3 and (2+5+7)/3
    assert awac["online_average_std"] == pytest.approx(statistics.stdev([8 / 3, 14 / 3]))
    assert awac["training_episodes_mean"] == 7.0  # (8+4+6)/3 and (10+6+8)/3
    assert samg["training_episodes_mean"] is None
    assert samg["delta_vs_base"] == pytest.approx(1.0)
    assert any("unfinished" in line for line in summary["skipped"])
    table = (out / "table.md").read_text()
    assert "| awac_samg | 4.0 ± 1.4 (return) | 6.0 ± 1.4 (return) | 4.7 ± 1.4 (return) | n/a | +1.0 vs awac | 2 | " \
           "20 + 20 | [1] |" in table
    assert "| awac | 3.0 ± 1.4 (return) | 5.0 ± 1.4 (return) | 3.7 ± 1.4 (return) | 7.0 ± 1.4 (return) |" in table
    assert "no provenance.json" in table
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("intro\n<!-- benchmark-table:begin -->\n| dataset |") and "old" not in readme
    assert readme.endswith(table + "<!-- benchmark-table:end -->\nend\n")
    with open(out / "samg.csv") as f:
        p_mean = {r["iteration"]: float(r["mean"]) for r in csv.DictReader(f) if r["metric"] == "samg/p_mean"}
    assert p_mean == {"30": pytest.approx(0.6), "40": pytest.approx(0.25)}
    assert (out / f"samg_{env.replace('/', '-')}.png").read_bytes().startswith(PNG_SIGNATURE)


def test_curve_panels_of_one_dataset_share_their_y_axis(tmp_path, monkeypatch):
    root, out = tmp_path / "runs", tmp_path / "out"
    env = "o2o-test/swimmer/random-v0"
    # two families far apart in score: each gets its own panel, both on one scale
    for label, level in (("iql", 1.0), ("awac", 100.0)):
        write_fake_run(root, f"{label}__{env.replace('/', '-')}__s0", env, 0, [(20, 0, level), (40, 1, level + 1.0)])
    figures = []
    close = aggregate.plt.close
    monkeypatch.setattr(aggregate.plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    assert aggregate.main([str(root), "--out", str(out)]) == 0
    (curves,) = [fig for fig in figures if fig is not None and "evaluation score" in fig.get_suptitle()]
    panels = [ax for ax in curves.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in panels) == ["awac", "iql"]
    low, high = panels[0].get_ylim()
    assert low < 1.0 and high > 101.0
    assert all(ax.get_ylim() == (low, high) for ax in panels)


def test_provenance_checks_the_script_against_its_commit():
    """A launch from a dirty tree ran the committed script when the script's sha256 matches the file
    at the launch's commit; a script committed later is named by that commit; anything else is
    marked as uncommitted."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True).stdout

    script = "algorithms/iql_famo2o.py"
    changed = git("log", "-n", "1", "--format=%H", "--", script).decode().strip()  # last commit that changed it
    parent = git("rev-parse", f"{changed}~1").decode().strip()
    sha = {commit: hashlib.sha256(git("show", f"{commit}:{script}")).hexdigest() for commit in (changed, parent)}
    assert sha[changed] != sha[parent]
    launch = {"commit": parent, "dirty": True, "script_sha256": sha[parent]}
    assert aggregate.script_commit_note(launch, script) == " (script as committed, other files uncommitted)"
    assert aggregate.script_commit_note({**launch, "script_sha256": sha[changed]}, script) == \
        f" (script as committed in `{changed[:10]}`)"
    assert aggregate.script_commit_note({**launch, "script_sha256": "0" * 64}, script) == \
        " (script with uncommitted changes)"
    assert aggregate.script_commit_note({**launch, "dirty": False, "script_sha256": "0" * 64}, script) == ""


def test_provenance_names_the_data_of_every_launch():
    def run(*hashes):
        launches = [{"commit": "c" * 40, "dirty": False, "cpu": "cpu", "dataset_sha256": h} for h in hashes]
        return types.SimpleNamespace(provenance={"launches": launches, "matrix": "m.yaml"})

    assert "; dataset sha256 `aaaaaaaaaa`; matrix" in aggregate.provenance_text([run("a" * 64), run("a" * 64)])
    mixed = aggregate.provenance_text([run("a" * 64), run("a" * 64, "b" * 64)])
    assert "dataset sha256 `aaaaaaaaaa`, `bbbbbbbbbb` (runs trained on different data)" in mixed
    partly = aggregate.provenance_text([run("a" * 64), run(None)])
    assert "dataset sha256 `aaaaaaaaaa` (not recorded for some launches);" in partly
    assert "; dataset sha256 not recorded;" in aggregate.provenance_text([run(None)])


def test_a_commit_launched_clean_and_dirty_is_named_once():
    script = "algorithms/iql.py"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    sha = aggregate.git_blob_sha256(head, script)
    launches = [{"commit": head, "dirty": dirty, "cpu": "cpu", "script_sha256": sha} for dirty in (False, True)]
    run = types.SimpleNamespace(provenance={"launches": launches, "matrix": "m.yaml", "script": script})
    text = aggregate.provenance_text([run])
    assert text.startswith(f"commit `{head[:10]}` (script as committed, other files uncommitted); "), text
    clean = types.SimpleNamespace(provenance={**run.provenance, "launches": launches[:1]})
    assert aggregate.provenance_text([clean]).startswith(f"commit `{head[:10]}`; ")


def test_delta_vs_base_is_marked_when_the_base_trained_on_other_data(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "out"
    env = "o2o-test/swimmer/random-v0"
    evals = [(20, 0, 1.0), (40, 1, 2.0)]
    for label, sha in (("awac", "a" * 64), ("awac_samg", "b" * 64)):
        name = f"{label}__{env.replace('/', '-')}__s0"
        write_fake_run(root, name, env, 0, evals)
        launch = {"commit": None, "dirty": None, "dataset_sha256": sha}
        (root / name / "provenance.json").write_text(json.dumps({"algorithm": label, "launches": [launch]}))
    assert aggregate.main([str(root), "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "| +0.0 vs awac (other data) |" in table
    summary = json.loads((out / "summary.json").read_text())
    assert [row["dataset_sha256"] for row in summary["rows"]] == [["a" * 64], ["b" * 64]]


def test_delta_vs_base_is_marked_when_the_seeds_differ(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "out"
    env = "o2o-test/swimmer/random-v0"
    for label, seeds in (("iql", (0, 1)), ("iql_famo2o", (0,))):
        for seed in seeds:
            write_fake_run(root, f"{label}__{env.replace('/', '-')}__s{seed}", env, seed,
                           [(20, 0, 1.0), (40, 1, 2.0 + 2 * seed)])
    assert aggregate.main([str(root), "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    # final = mean of the (two) evaluations: 1.5 for seed 0, 2.5 for seed 1; 1.5 against their mean 2.0
    assert "| -0.5 vs iql (seeds 0 vs 0, 1) |" in table


def test_a_run_whose_data_changed_since_planning_is_not_launched(bench, tmp_path):
    run_dir = tmp_path / "runs" / bench["names"][0]
    run_dir.mkdir(parents=True)
    (run_dir / "provenance.json").write_text(json.dumps({"launches": [{"dataset_sha256": "0" * 64}]}))
    cell = benchmark.Cell("iql", "iql", bench["dataset"], 0, None, None, ())
    run = benchmark.Run(1, cell, run_dir, [sys.executable, "-c", "raise SystemExit('launched')"])
    matrix = benchmark.Matrix(algorithms={"iql": {}}, datasets=[bench["dataset"]], seeds=[0],
                              root=str(tmp_path / "runs"))
    options = argparse.Namespace(workers=1, poll=0.01, cpu_threads=1, device="cpu")
    assert benchmark.execute([run], matrix, options) == 1
    assert run.state == "failed" and "is not the data this run started on" in run.note
    assert run.process is None and not (run_dir / "stdout.log").exists()
