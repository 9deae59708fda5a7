"""``conceptvlm bench decode-profile``: ops, host syncs and time of decode steps."""
import json

import torch

from conceptvlm.bench.decode_profile import run_decode_profile, staggered_state
from conceptvlm.bench.inference import BenchModel
from conceptvlm.model import ConceptMoE

TINY = BenchModel(d_model=32, n_heads=4, n_kv_heads=2, n_layers=4, n_experts=4, top_k=2, expert_hidden=32,
                  vocab_size=64)


def test_staggered_rows_hold_their_own_prompt_lengths():
    model = ConceptMoE(TINY.baseline(64)).eval()
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        state, next_at = staggered_state(model, ids, 16, batch=5, period=3)
    assert state.tokens.index.lengths.tolist() == [16, 15, 14, 16, 15]
    assert next_at.tolist() == [16, 15, 14, 16, 15]


def test_quick_profile_counts_ops_and_syncs(tmp_path):
    out = tmp_path / "profile.json"
    res = run_decode_profile(length=32, batches=(1, 2), steps=2, warm=1, out=str(out), spec=TINY, threads=None)
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["batch"]) for r in rows] == [(r["model"], r["batch"]) for r in res["results"]]
    assert len(rows) == 4
    for r in rows:
        assert r["ms_per_step"] > 0 and r["aten_ops_per_step"] > 0 and r["top_ops"]
        assert r["host_syncs_per_step"] >= 0
