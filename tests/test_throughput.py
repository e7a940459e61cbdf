"""The throughput measurement runs end to end (quick mode) and writes its tables."""
import csv
import subprocess
import sys

from conftest import REPO


def test_quick_throughput_writes_tables(tmp_path):
    files = "iql.py,iql_famo2o.py,cql.py (straightforward)"
    result = subprocess.run([sys.executable, "scripts/throughput.py", "--quick", "--files", files,
                             "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "throughput.csv")))
    assert {(r["file"], r["phase"]) for r in rows} == {
        ("iql.py", "offline"), ("iql.py", "online"), ("iql_famo2o.py", "offline"), ("iql_famo2o.py", "online"),
        ("cql.py (straightforward)", "offline")}
    for row in rows:
        assert float(row["ms_per_update"]) > 0 and float(row["gflop_per_update"]) > 0
    markdown = (tmp_path / "throughput.md").read_text()
    assert "Matmul peak" in markdown and "vs base" in markdown and "(iql.py)" in markdown


def test_compiled_step_matches_eager():
    """The --compile rows time the same math: one compiled training step gives eager's losses."""
    sys.path.insert(0, str(REPO / "scripts"))
    import torch
    import throughput

    metrics = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        step, _, _ = throughput.training_step(throughput.ENTRY_BY_FILE["iql.py"], "online", torch.device("cpu"),
                                              compiled)
        metrics[compiled] = {key: float(value) for key, value in step().items()}
    assert metrics[False].keys() == metrics[True].keys()
    for key, value in metrics[False].items():  # float32 kernels fused differently: rounding-level differences
        assert abs(metrics[True][key] - value) <= 1e-4 * max(1.0, abs(value)), key
