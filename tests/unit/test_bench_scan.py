"""The scan benchmark's quick form runs and reports consistent ratios."""
import json

from conceptvlm.bench.scan import run_scan_bench


def test_scan_bench_quick_form(tmp_path):
    rows = run_scan_bench([(2, 100, 8)], repeats=2, out=str(tmp_path / "scan.json"))
    (row,) = rows
    s = row["seconds"]
    assert abs(row["loop_over_scan"] - s["loop"] / s["scan"]) < 1e-12
    assert abs(row["scan_over_clone"] - s["scan"] / s["clone"]) < 1e-12
    saved = json.loads((tmp_path / "scan.json").read_text())
    assert saved["rows"][0]["D"] == 8 and len(saved["rows"][0]["samples"]["scan"]) == 2
