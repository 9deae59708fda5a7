"""The README's main command, shortened: shards -> two trainings -> evaluation -> report."""
import json

import pytest

from conceptvlm.demo import run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_the_report(tmp_path):
    summary = run_demo(tmp_path / "demo", steps=12, seed=0)
    out = tmp_path / "demo"
    report = (out / "report.md").read_text()
    for png in ("loss.png", "ratio.png", "boundaries.png"):
        assert (out / png).stat().st_size > 1000 and png in report
    assert set(summary["results"]) == {"ConceptMoE", "ConceptMoE 2D", "baseline MoE"}
    for r in summary["results"].values():
        assert r["text"]["bits_per_byte"] > 0 and 0 <= r["vqa"]["overall"] <= 100
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
