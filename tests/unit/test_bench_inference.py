"""The inference benchmark's interleaved measurement: turn order, per-period ratios,
spreads, staggered batch rows, and a quick run whose JSON is consistent with itself."""
import itertools
import json
import statistics

import pytest
import torch

from conceptvlm import ConceptMoE
from conceptvlm.bench.inference import BenchModel, decode_states, run_inference_bench
from conceptvlm.bench.interleave import period_ratios, period_sums, round_robin, spread

TINY = BenchModel(d_model=32, n_heads=4, n_kv_heads=2, n_layers=4, n_experts=4, top_k=2, expert_hidden=32,
                  vocab_size=64)


def test_round_robin_alternates_and_times_each_call_alone():
    calls, ticks = [], itertools.count()
    clock = lambda: float(next(ticks))  # noqa: E731 (each call takes exactly one tick)
    times = round_robin({"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))}, 3, clock)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]  # order rotates per round
    assert times == {"a": [1.0] * 3, "b": [1.0] * 3}


def test_period_ratios_and_spread_by_hand():
    base, other = [2.0, 4.0, 3.0, 3.0], [1.0, 2.0, 1.0, 5.0]
    assert period_ratios(base, other, 2) == [6.0 / 3.0, 6.0 / 6.0]
    assert period_sums(other, 2) == [3.0, 6.0]
    with pytest.raises(ValueError, match="whole periods"):
        period_ratios(base, other, 3)
    s = spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["median"], s["q25"], s["q75"], s["iqr"]) == (3.0, 2.0, 4.0, 2.0) and s["iqr_rel"] == pytest.approx(2 / 3)
    assert spread([7.0])["iqr"] == 0.0


def test_staggered_rows_start_concepts_at_different_steps():
    """Batch 4 at R = 2 from prompts of 12 and 11 tokens, tiled: each row starts one concept
    every two decode steps, odd rows a step after even ones, and each row decodes its own
    next tokens."""
    cfg = TINY.baseline(64).to_dict()
    cfg["chunk"] = {"router": "fixed", "target_ratio_text": 2.0, "target_ratio_image": 2.0}
    model = ConceptMoE(type(TINY.baseline(64)).from_dict(cfg)).eval()
    ids = torch.randint(0, 64, (4, 20), generator=torch.Generator().manual_seed(0))
    states, next_BT = decode_states({"m": model}, ids, 12, batch=4, period=2)
    next_BT = next_BT["m"]
    assert next_BT.shape == (4, 8) and next_BT[:, 0].tolist() == [ids[0, 12], ids[1, 11], ids[2, 12], ids[3, 11]]
    state, starts = states["m"], []
    with torch.inference_mode():
        for i in range(6):
            out = model(next_BT[:, i:i + 1], state=state)
            state = out.state
            starts.append(out.boundary[:, 0].tolist())
    by_row = list(zip(*starts))
    assert by_row[0] == by_row[2] == (True, False) * 3 and by_row[1] == by_row[3] == (False, True) * 3


def test_quick_interleaved_run_reports_consistent_medians_and_distributions(tmp_path):
    out = tmp_path / "inf.json"
    threads = torch.get_num_threads()
    try:  # one thread: on a shared 2-core machine tiny ops in a 2-thread pool wait on busy cores
        res = run_inference_bench(lengths=(24,), ratios=(2.0,), variants=("efficiency",), decode_steps=7,
                                  batches=(1, 2), repeats=3, model=TINY, out=str(out), threads=1)
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file() and data["config"]["decode_steps"] == 8  # whole periods of 2
    (pre,) = data["prefill"]
    assert len(pre["prefill_s_samples"]) == len(pre["prefill_s_samples_baseline"]) == 3
    per_repeat = [a / b for a, b in zip(pre["prefill_s_samples_baseline"], pre["prefill_s_samples"])]
    assert pre["prefill_speedup"] == pytest.approx(statistics.median(per_repeat))
    assert pre["prefill_speedup_q25"] <= pre["prefill_speedup"] <= pre["prefill_speedup_q75"]
    assert [r["batch"] for r in data["decode"]] == [1, 2]
    for r in data["decode"]:
        a, b = r["decode_step_s_baseline"], r["decode_step_s"]
        assert len(a) == len(b) == 8 and len(r["decode_period_ratios"]) == 4
        assert r["decode_period_ratios"] == pytest.approx(period_ratios(a, b, 2))
        assert r["decode_speedup"] == pytest.approx(statistics.median(r["decode_period_ratios"]))
        assert r["decode_speedup_q25"] <= r["decode_speedup"] <= r["decode_speedup_q75"]
        assert r["decode_tok_s"] == pytest.approx(r["batch"] * 2 / statistics.median(period_sums(b, 2)))
        assert r["decode_vs_predicted"] == pytest.approx(r["decode_speedup"] / r["decode_predicted"])
    b1, b2 = data["decode"]
    # per row: the baseline's rows hold 24 tokens each (nothing to stagger), ConceptMoE's 24 and 23
    assert b2["kv_bytes_baseline"]["total"] == b1["kv_bytes_baseline"]["total"] * 2
    assert b2["kv_bytes"]["encoder"] == b1["kv_bytes"]["encoder"] * (24 + 23) // 24
    assert b1["kv_bytes"] == {k: int(v) for k, v in b1["kv_bytes_predicted"].items()}
    assert b2["decode_bytes_baseline"] > b1["decode_bytes_baseline"]
    assert set(res["goals"]["met"]) >= {"decode_16k_batch1", "decode_16k_batch8"}


def test_bad_batch_is_refused():
    with pytest.raises(ValueError, match="--batch"):
        run_inference_bench(lengths=(24,), batches=(0,), model=TINY, out=None)


def test_models_that_miss_their_ratio_are_refused():
    """After prefill each model holds one concept per R tokens, or the timings compare
    other models (what a fixed router rounding its positions would do)."""
    from conceptvlm.bench.inference import check_realised_ratios, realised_ratio

    cfg = TINY.baseline(400).to_dict()
    cfg["chunk"] = {"router": "fixed", "target_ratio_text": 2.0, "target_ratio_image": 2.0}
    torch.manual_seed(0)
    model = ConceptMoE(type(TINY.baseline(400)).from_dict(cfg)).eval()
    with torch.inference_mode():
        state = model(torch.randint(0, 64, (1, 300)), use_cache=True).state
    assert realised_ratio(state) == 2.0
    check_realised_ratios({("efficiency", 2.0): state}, 300, "float32")
    with pytest.raises(RuntimeError, match=r"efficiency R=3 holds 2.00 tokens per concept"):
        check_realised_ratios({("efficiency", 3.0): state}, 300, "float32")
