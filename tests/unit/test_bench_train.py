"""``conceptvlm bench train``: its quick form, FLOPs prediction and goal logic."""
import json

import pytest
import torch

from conceptvlm.bench.train import (bench_configs, document_lengths, memory_fit, run_train_bench, train_goals,
                                    training_flops)
from conceptvlm.flops import prefill_flops


def test_document_lengths_sum_to_the_row():
    g = torch.Generator().manual_seed(0)
    for L, n in ((2048, 4), (1000, 3), (17, 2)):
        docs = document_lengths(L, n, g)
        assert sum(docs) == L and len(docs) == n and min(docs) > 0


def test_training_flops_is_three_forward_passes_summed_over_documents():
    base, cmoe = bench_configs("tiny", 4096, 2.0)
    assert base.chunk.router == "none" and cmoe.chunk.router == "fixed" and cmoe.joint_decoding
    assert training_flops(base, [1000]) == pytest.approx(3 * prefill_flops(base, 1000)["all"])
    two = training_flops(cmoe, [600, 400], 2.0)
    assert two == pytest.approx(3 * (prefill_flops(cmoe, 600, 2.0)["all"] + prefill_flops(cmoe, 400, 2.0)["all"]))


def test_memory_fit_tells_linear_from_quadratic():
    L = [2048, 4096, 8192, 16384]
    assert abs(memory_fit(L, [1e6 + 300 * x for x in L])["quadratic_share"]) < 1e-6
    assert memory_fit(L, [1e6 + 300 * x + 0.05 * x * x for x in L])["quadratic_share"] > 0.5


def test_goal_lines():
    row = lambda L, sp, pred, mfu: {"config": "efficiency", "length": L, "speedup": sp, "predicted": pred,  # noqa: E731
                                    "vs_predicted": sp / pred, "mfu": {"baseline": mfu},
                                    "peak_step_bytes": {"baseline": None, "conceptmoe": None}}
    goals = train_goals([row(2048, 1.0, 2.0, 0.1), row(4096, 1.9, 2.0, 0.45), row(8192, 1.5, 2.0, 0.3)])
    assert goals["met"]["speedup_90pct"] is False and "L=8192: 75%" in goals["lines"][0]
    assert goals["met"]["mfu_40pct_4k"] is True


def test_quick_form_runs_and_writes_json(tmp_path):
    payload = run_train_bench(["tiny"], lengths=[128, 192, 256], n_docs=2, steps=1, out=str(tmp_path / "t.json"))
    saved = json.loads((tmp_path / "t.json").read_text())
    assert len(saved["rows"]) == 3 and (tmp_path / "t.png").is_file()
    for r in payload["rows"]:
        assert r["speedup"] == pytest.approx(r["step_s"]["baseline"] / r["step_s"]["conceptmoe"])
        assert r["predicted"] == pytest.approx(r["train_flops"]["baseline"] / r["train_flops"]["conceptmoe"])
        assert sum(r["documents"]) == r["length"] and r["predicted"] > 1
        assert r["saved_activation_bytes"]["baseline"] > 0


def test_memory_only_form_measures_memory_without_timing(tmp_path):
    payload = run_train_bench(["tiny"], lengths=[128, 192, 256], n_docs=2, out=str(tmp_path / "m.json"),
                              memory_only=True)
    assert (tmp_path / "m.png").is_file() and payload["config"]["memory_only"]
    for r in payload["rows"]:
        assert "speedup" not in r and "step_s" not in r
        saved = r["saved_activation_bytes"]
        assert 0 < saved["conceptmoe"] < saved["baseline"]  # R = 2 halves the concept layers' activations
    met = payload["goals"]["met"]
    assert "speedup_90pct" not in met and {"saved_linear/tiny/baseline", "saved_linear/tiny/conceptmoe"} <= set(met)
