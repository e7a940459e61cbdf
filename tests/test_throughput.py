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


def test_readme_speed_table_is_the_committed_measurement():
    """Every number of the README's speed table is results/throughput.csv's, rounded as shown."""
    rows = {(r["file"], r["phase"], r["threads"]): r for r in csv.DictReader(open(REPO / "results" / "throughput.csv"))}
    readme = (REPO / "README.md").read_text()
    header = "| file | 1 thread, offline | 1 thread, online | 2 threads, offline | 2 threads, online |"
    table = readme[readme.index(header):].split("\n\n")[0].splitlines()[2:]
    columns = [("offline", "1"), ("online", "1"), ("offline", "2"), ("online", "2")]
    seen = set()
    for line in table:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = cells[0].strip("`")
        file = "cql.py (straightforward)" if name.startswith("cql.py, straightforward") else name
        for (phase, threads), shown in zip(columns, cells[1:5]):
            if shown:
                assert shown == f"{float(rows[(file, phase, threads)]['ms_per_update']):.2f}", (file, phase, threads)
                seen.add((file, phase, threads))
        ratios = [part.strip().rstrip("x") for part in cells[5].split("slower")[0].split("/") if part.strip()]
        if ratios:  # online vs base (offline for the straightforward CQL, which has no online row)
            phase = "offline" if file == "cql.py (straightforward)" else "online"
            assert ratios == [f"{float(rows[(file, phase, t)]['vs_base']):.2f}" for t in ("1", "2")], file
    assert seen == set(rows), set(rows) - seen
