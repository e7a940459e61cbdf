"""End-to-end checks of every algorithm script: phases, checkpoints, resume, fine-tuning a
pretrained checkpoint, determinism, --help, bad input, the copy-paste promise, shared blocks."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALGORITHMS, REPO, SAMG_LEARNING_STARTS, tiny_args

import sync_shared_blocks


HELP_TEXT = {"iql": "Expectile of the value loss", "cql": "Weight of the conservative penalty offline",
             "awac": "Temperature lambda of the advantage weights"}


def updates(name: str, offline: int, online: int) -> int:
    """SAMG files update online only once their (empty at the switch) buffer holds enough data."""
    return offline + (online - SAMG_LEARNING_STARTS + 1 if name.endswith("samg") else online)


def read_metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_iterations(records: list) -> list:
    return [r["iteration"] for r in records if "eval/normalized_score" in r]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_offline_switch_online_checkpoint_and_resume(name, train_script, tmp_path):
    # A run that stops 20 steps into the online phase, as if killed right after a checkpoint ...
    first = train_script(name, tmp_path, "--online_iterations", "20", "--name", "run")
    assert_ok(first)
    run_dir = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "checkpoint.pt", "offline.pt"} <= {p.name for p in run_dir.iterdir()}
    checkpoint = load(run_dir / "checkpoint.pt")
    assert checkpoint["iteration"] == 80 and checkpoint["buffer"]["online_added"] == 20
    assert checkpoint["agent"]["online"] is True and load(run_dir / "offline.pt")["agent"]["online"] is False
    records = read_metrics(run_dir)
    assert {r["phase"] for r in records if "phase" in r} == {0, 1}
    assert "normalized score after the offline phase" in first.stdout

    # ... continues from its checkpoint: counters go on and no online transition is lost.
    second = train_script(name, tmp_path, "--name", "run", "--resume", "true")
    assert_ok(second)
    assert "Resuming" in second.stdout and "at iteration 80 with 20 online transitions" in second.stdout
    final = load(run_dir / "checkpoint.pt")
    assert final["iteration"] == 120 and final["buffer"]["online_added"] == 60
    assert final["agent"]["total_updates"] == updates(name, 60, 60)
    assert final["buffer"]["n_offline"] == (0 if name.endswith("samg") else checkpoint["buffer"]["n_offline"])
    assert torch.equal(final["buffer"]["rows"][:20], checkpoint["buffer"]["rows"])
    records = read_metrics(run_dir)
    assert eval_iterations(records) == [40, 60, 80, 120]
    episodes = [r for r in records if "train/episode_return" in r]
    assert all("train/normalized_return" in r and r["iteration"] > 60 for r in episodes)
    if name.endswith("famo2o"):
        family = [json.loads(line) for line in (run_dir / "family_scores.jsonl").read_text().splitlines()]
        assert sorted({(row["iteration"], row["phase"]) for row in family}) == [(60, 0), (80, 1), (120, 1)]
        betas = {"iql_famo2o": {1.0, 2.0, 3.0, 4.0, 5.0}, "cql_famo2o": {0.5, 0.75, 1.0, 1.25, 1.5}}[name]
        assert len(family) == 3 * 5 and {row["beta"] for row in family} == betas


@pytest.mark.parametrize("name", ALGORITHMS)
def test_fine_tune_a_pretrained_checkpoint(name, train_script, tmp_path):
    assert_ok(train_script(name, tmp_path, "--online_iterations", "0", "--name", "pretrain"))
    offline = tmp_path / "pretrain" / "offline.pt"
    assert offline.exists()
    result = train_script(name, tmp_path, "--load_model", offline, "--offline_iterations", "0", "--name", "finetune")
    assert_ok(result)
    checkpoint = load(tmp_path / "finetune" / "checkpoint.pt")
    assert checkpoint["iteration"] == 60 and checkpoint["buffer"]["online_added"] == 60
    assert checkpoint["agent"]["total_updates"] == updates(name, 60, 60)  # 60 offline updates loaded
    records = read_metrics(tmp_path / "finetune")
    assert eval_iterations(records)[0] == 0  # the pretrained policy is scored before fine-tuning


@pytest.mark.parametrize("name", ALGORITHMS)
def test_same_seed_same_metrics(name, train_script, tmp_path):
    runs = []
    for run in ("a", "b"):
        assert_ok(train_script(name, tmp_path, "--name", run, "--online_iterations", "30"))
        runs.append([{k: v for k, v in r.items() if not k.startswith("time")} for r in read_metrics(tmp_path / run)])
    assert runs[0] == runs[1]
    assert len(runs[0]) > 5


@pytest.mark.parametrize("name", ALGORITHMS)
def test_help_lists_every_field_with_its_comment(name, run_script):
    result = run_script(f"algorithms/{name}.py", "--help")
    assert_ok(result)
    text = " ".join(result.stdout.split())  # argparse wraps help lines
    assert "Minari dataset id; the environment is recovered from it" in text
    assert HELP_TEXT[name.split("_")[0]] in text and "--offline_iterations" in text
    if name.endswith("famo2o"):
        assert "Balance mode: adaptive (FamO2O)" in text


@pytest.mark.parametrize("name", ALGORITHMS)
def test_file_copied_alone_still_runs(name, hopper_dataset, tmp_path):
    lonely = tmp_path / "elsewhere"
    lonely.mkdir()
    shutil.copy(REPO / "algorithms" / f"{name}.py", lonely / "train.py")
    args = [*tiny_args(name), "--offline_iterations", "20", "--online_iterations", "20", "--eval_freq", "20"]
    result = subprocess.run([sys.executable, "train.py", "--env", hopper_dataset, *args], cwd=lonely,
                            capture_output=True, text=True, timeout=600)
    assert_ok(result)
    assert list((lonely / "runs").glob("*/checkpoint.pt"))


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("dataset, message", [
    ("unknown", "is not in the local Minari store"),
    ("nan_dataset", "NaN/inf values in 'states'"),
    ("mismatched_dataset", "does not belong to this environment"),
    ("empty_dataset", "contains no transitions"),
])
def test_bad_input_gives_a_clear_message(name, dataset, message, request, run_script, tmp_path):
    dataset_id = "o2o-test/nothing/here-v0" if dataset == "unknown" else request.getfixturevalue(dataset)
    result = run_script(f"algorithms/{name}.py", "--env", dataset_id, *tiny_args(name), "--checkpoints_path", tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")


def test_shared_blocks_are_identical_across_algorithm_files():
    files = sync_shared_blocks.algorithm_files()
    assert {f.stem for f in files} >= set(ALGORITHMS)
    assert sync_shared_blocks.differences(files) == []
    expected = {"utilities", "data", "replay buffer", "evaluation and online interaction", "logging", "checkpoints"}
    for path in files:
        samg = {"samg"} if path.stem.endswith("samg") else set()
        assert set(sync_shared_blocks.shared_blocks(path.read_text())) == expected | samg, path.name


def test_shared_block_check_detects_drift(tmp_path):
    original = (REPO / "algorithms" / "iql.py").read_text()
    drifted = original.replace("def set_seed(seed: int) -> None:", "def set_seed(seed: int) -> None:  # edited")
    assert drifted != original
    (tmp_path / "a.py").write_text(original)
    (tmp_path / "b.py").write_text(drifted)
    problems = sync_shared_blocks.differences([tmp_path / "a.py", tmp_path / "b.py"])
    assert problems == ["block 'utilities' has 2 different versions: a.py | b.py"]
    assert sync_shared_blocks.sync(tmp_path / "a.py", [tmp_path / "b.py"]) == [tmp_path / "b.py"]
    assert (tmp_path / "b.py").read_text() == original


@pytest.mark.parametrize("name", ALGORITHMS)
def test_committed_configs_parse(name, load_algorithm):
    import pyrallis

    module = load_algorithm(name)
    paths = sorted((REPO / "configs" / name).glob("*.yaml"))
    assert paths, f"configs/{name}/ has no config"
    for path in paths:
        config = pyrallis.parse(config_class=module.TrainConfig, config_path=str(path), args=[])
        env = path.stem.split("_")[0]
        assert config.env == f"o2o/{env}/medium-replay-v0", path
        assert config.offline_iterations >= 1000000 and config.online_iterations == 1000000, path
