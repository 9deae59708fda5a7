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
    assert set(summary["results"]) == {"ConceptMoE", "baseline MoE"}
    for name, r in summary["results"].items():
        assert r["text"]["bits_per_byte"] > 0 and 0 <= r["vqa"]["overall"] <= 100
        assert 0 <= r["vqa_blank_images"]["overall"] <= 100
        assert (out / "runs" / name.lower().replace(" ", "_") / "train.log").is_file()
    # every question type of the synthetic VQA is scored, and has a blind prior to compare with
    types = set(summary["blind_vqa"]["question_prior_per_type"])
    assert {"count", "colour", "background", "exists_colour"} <= types
    assert "| background colour |" in report
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
