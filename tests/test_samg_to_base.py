"""scripts/samg_to_base.py: a SAMG checkpoint becomes one its base file fine-tunes, offline data kept."""
import pytest
import torch


@pytest.mark.parametrize("name, base", [("awac_samg", "awac"), ("cql_samg", "cql")])
def test_base_file_fine_tunes_a_converted_samg_checkpoint(name, base, train_script, run_script, tmp_path):
    result = train_script(name, tmp_path, "--online_iterations", "0", "--name", "pretrain")
    assert result.returncode == 0, result.stderr[-2000:]
    source, target = tmp_path / "pretrain" / "offline.pt", tmp_path / "converted.pt"

    # Unconverted, the base file refuses the checkpoint ...
    refused = train_script(base, tmp_path, "--load_model", source, "--offline_iterations", "0", "--name", "refused")
    assert refused.returncode == 2 and f"written by {name}" in refused.stderr

    # ... converted, the networks are the SAMG run's, without SAMG's own state.
    result = run_script("scripts/samg_to_base.py", source, target)
    assert result.returncode == 0, result.stderr[-2000:]
    original, converted = (torch.load(p, weights_only=False) for p in (source, target))
    assert converted["algorithm"] == base and converted["converted_from"] == name
    assert "samg" in original["agent"] and set(converted["agent"]) == set(original["agent"]) - {"samg"}
    for key, tensor in original["agent"]["actor"].items():
        assert torch.equal(converted["agent"]["actor"][key], tensor)

    result = train_script(base, tmp_path, "--load_model", target, "--offline_iterations", "0", "--name", "finetune")
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "finetune" / "checkpoint.pt", weights_only=False)
    # The base file keeps the offline data (SAMG's online phase drops it) and updates from the first
    # online step (SAMG waits for samg_learning_starts transitions): 60 offline + 60 online updates.
    assert checkpoint["buffer"]["n_offline"] > 0 and checkpoint["buffer"]["online_added"] == 60
    assert checkpoint["agent"]["total_updates"] == 120


def test_refuses_other_checkpoints_and_overwriting(train_script, run_script, tmp_path):
    assert train_script("awac", tmp_path, "--online_iterations", "0", "--name", "awac").returncode == 0
    result = run_script("scripts/samg_to_base.py", tmp_path / "awac" / "offline.pt", tmp_path / "x.pt")
    assert result.returncode != 0 and "written by awac" in result.stderr and not (tmp_path / "x.pt").exists()
    result = run_script("scripts/samg_to_base.py", tmp_path / "missing.pt", tmp_path / "x.pt")
    assert result.returncode != 0 and "does not exist" in result.stderr
    assert train_script("awac_samg", tmp_path, "--online_iterations", "0", "--name", "samg").returncode == 0
    source = tmp_path / "samg" / "offline.pt"
    before = source.read_bytes()
    result = run_script("scripts/samg_to_base.py", source, source)
    assert result.returncode != 0 and "overwrite" in result.stderr and source.read_bytes() == before
