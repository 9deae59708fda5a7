"""The second experiment protocol itself (issue 16): trained-length windows, the leakage
check, seed pairing, the ±5% ratio rule, paired verdicts, the grounding-cell scorer."""
import json
import os
import random

import numpy as np
import pytest

from conceptvlm.experiments import protocol as P
from conceptvlm.experiments import stats as S


# ------------------------------------------------------------------------- trained length
def test_eval_window_never_exceeds_the_trained_row_length():
    assert P.eval_window(512) == 512
    assert P.eval_window(512, 256) == 256
    with pytest.raises(ValueError, match="exceeds the trained row length"):
        P.eval_window(256, 512)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 300])
def test_scoring_windows_fit_the_trained_length_and_cover_every_token(n):
    from conceptvlm.eval.text import rolling_windows

    ids = list(range(10, 10 + n))
    wins = rolling_windows(ids, bos_id=1, max_length=64)
    assert all(len(inp) <= 64 for inp, _ in wins)
    assert [t for _, tgt in wins for t in tgt] == ids
    ratio_windows = P.windows_of([1] + ids, 64)
    assert all(len(w) <= 64 for w in ratio_windows) and sum(ratio_windows, []) == [1] + ids


# ------------------------------------------------------------------------------- leakage
def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghij klmnop\n") for _ in range(n))


def test_window_hashes_match_a_slow_reference():
    text = _text(random.Random(1), 200)
    h = P.window_hashes(text, 8)
    same = {(i, j) for i in range(len(h)) for j in range(len(h)) if text[i:i + 8] == text[j:j + 8]}
    assert {(i, j) for i in range(len(h)) for j in range(len(h)) if h[i] == h[j]} == same
    assert len(P.window_hashes("x" * 7, 8)) == 0


def test_overlap_finds_a_planted_64_char_run_and_a_clean_split_measures_zero():
    rng = random.Random(0)
    train = [_text(rng, 3000) for _ in range(3)]
    held = [_text(rng, 2000) for _ in range(2)]
    clean = P.overlap(train, held)
    assert clean["shared_chars"] == 0 and clean["fraction"] == 0.0 and clean["docs"] == 2
    planted = held[0][:500] + "#" + train[1][1000:1064] + "#" + held[0][500:]  # '#' is in no training text
    leak = P.overlap(train, [planted, held[1]])
    assert leak["shared_chars"] == 64 and leak["docs_with_shared_run"] == 1
    mask = P.RunIndex(train).shared_mask(planted)
    assert mask[501:565].all() and not mask[:501].any() and not mask[565:].any()
    short = held[0][:500] + "#" + train[1][1000:1063] + "#" + held[0][500:]  # 63 characters: not a run
    assert P.overlap(train, [short])["shared_chars"] == 0


def test_clean_segments_cut_shared_runs_out_of_held_text():
    from conceptvlm.experiments.corpus_large import clean_segments

    rng = random.Random(2)
    train = _text(rng, 4000)
    a, b = _text(rng, 800), _text(rng, 900)
    idx = P.RunIndex([train])
    segs = clean_segments(a + "#" + train[100:300] + "#" + b, idx, min_chars=256)
    assert segs == [a + "#", "#" + b]
    assert P.overlap([train], segs)["shared_chars"] == 0


# -------------------------------------------------------------------- matched compute
@pytest.mark.parametrize("realised,ok", [(2.0, True), (2.1, True), (1.9, True), (2.11, False), (1.89, False),
                                         (None, False), (float("nan"), False)])
def test_ratio_within_five_percent_of_target(realised, ok):
    assert P.ratio_matched(realised, 2.0) is ok


def test_one_pass_steps_and_size_weights():
    assert P.one_pass_steps(10_000, 1000) == 10 and P.one_pass_steps(10_999, 1000) == 10
    assert P.one_pass_steps(10, 1000) == 1 and P.one_pass_steps(10_000, 1000, epochs=0.5) == 5
    assert P.size_weights({"a": 30, "b": 10}) == {"a": 0.75, "b": 0.25}


# --------------------------------------------------------------------------- statistics
def test_paired_interval_and_verdicts_on_made_up_numbers():
    b = {s: 3.0 + 0.1 * s for s in range(5)}
    a = {s: b[s] + d for s, d in enumerate([-0.1, -0.2, -0.3, -0.2, -0.2])}
    p = S.paired(a, b)
    assert p.n == 5 and p.mean == pytest.approx(-0.2) and p.sd == pytest.approx(0.0707107, rel=1e-5)
    half = 2.776445 * 0.0707107 / 5 ** 0.5  # t(0.975, 4)
    assert (p.lo, p.hi) == pytest.approx((-0.2 - half, -0.2 + half), rel=1e-5)
    assert S.verdict_less(p) == S.HOLDS
    assert S.verdict_less(S.paired(b, a)) == S.FAILS
    wide = S.paired({0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.1, 1: 1.2, 2: 1.3})  # mean -0.2, half-width 0.248
    assert S.verdict_less(wide) == S.INCONCLUSIVE
    assert S.verdict_less(S.paired({0: 1.0}, {0: 2.0})) == S.INCONCLUSIVE  # one seed: no interval
    nothing = S.paired({0: 1.0}, {})  # one variant has no rows yet: no number is printed for it
    assert S.verdict_less(nothing) == S.INCONCLUSIVE and "nan" not in nothing.fmt() and "none yet" in nothing.fmt()
    assert S.combine([S.HOLDS, S.HOLDS]) == S.HOLDS
    assert S.combine([S.HOLDS, S.INCONCLUSIVE]) == S.INCONCLUSIVE
    assert S.combine([S.INCONCLUSIVE, S.FAILS]) == S.FAILS
    assert S.verdict_not_worse(S.paired(a, b), margin=0.01) == S.FAILS  # a is worse (higher is better here)
    assert S.verdict_not_worse(S.paired(b, a), margin=0.01) == S.HOLDS


def test_seeds_needed_from_the_paired_spread():
    assert S.seeds_needed(0.1, 0.2) == 5  # already resolved at the headline minimum
    assert S.seeds_needed(0.1, 0.1) == 7  # t(5)/sqrt(6) = 1.05 > 1 >= t(6)/sqrt(7) = 0.92
    assert S.seeds_needed(0.1, 0.001) is None and S.seeds_needed(None, 0.1) is None
    assert S.verdict_within([2.0, 2.02, 1.98], 2.0, 0.05)[0] == S.HOLDS
    assert S.verdict_within([3.0, 3.1, 2.9], 2.0, 0.05)[0] == S.FAILS


def _row(variant, seed, bpb, router="cosine", matched=True, git="abc1234", order="o"):
    return {"variant": variant, "seed": seed, "router": router, "R": 2.0, "quick": False, "matched": matched,
            "git": git, "data_order": f"{order}{seed}", "held": {"all": {"bits_per_byte": bpb}}}


def test_training_time_of_a_row_counts_steps_a_killed_piece_left_out():
    from conceptvlm.experiments.plan_table import train_seconds

    assert train_seconds({"train_wall_s": 2084.0, "train_step_s_total": 2070.0}) == 2084.0  # one piece: wall time
    assert train_seconds({"train_wall_s": 1109.0, "train_step_s_total": 2482.0}) == 2482.0  # a killed piece's steps
    assert train_seconds({"train_wall_s": 12.0}) == 12.0  # rows before step times were summed


def test_ratio_claim_without_rows_says_so():
    from conceptvlm.experiments.verdicts import claim_lines

    claim = {"claims": [{"id": "r", "text": "ratios reached", "ratios": ["r4-a", "r4-b"]}]}
    assert claim_lines(claim, {}, None)[0].endswith("**inconclusive**. no rows yet for r4-a, r4-b.")


def test_an_inconclusive_not_worse_claim_says_how_many_seeds_would_resolve_it():
    from conceptvlm.experiments.verdicts import claim_lines, latest

    claim = {"claims": [{"id": "c", "text": "2d >= 1d", "not_worse": ["2d", "1d"], "metric": "cell_accuracy",
                         "margin": 0.01, "gated": True}]}

    def rows(acc_2d, acc_1d):
        return [{"variant": v, "seed": s, "matched": True, "held": {"cells": {"accuracy": x}}}
                for v, accs in (("2d", acc_2d), ("1d", acc_1d)) for s, x in enumerate(accs)]

    # differences 0.10, 0.25, -0.05: mean 0.10, sd 0.15; the interval must clear -0.01, so the
    # half-width t(n-1) 0.15 / sqrt(n) must fall below 0.11: n = 9 gives 0.115, n = 10 gives 0.107
    line = claim_lines(claim, latest(rows([0.9, 0.95, 0.85], [0.8, 0.7, 0.9])), True)[0]
    assert "**inconclusive**" in line and line.endswith(
        "(margin 0.01); ~10 seeds would resolve a difference this size; per seed s0 +0.100, s1 +0.250, s2 -0.050.")
    # one seed: no spread, no sizing; a gate that did not pass compares nothing
    assert "seeds would" not in claim_lines(claim, latest(rows([0.9], [0.8])), True)[0]
    assert "not compared (gate not passed)" in claim_lines(claim, latest(rows([0.9], [0.8])), False)[0]


def test_the_gate_is_decided_over_every_seed_of_the_yaml():
    from conceptvlm.experiments.verdicts import claim_lines, gate, latest

    exp = {"seeds": [0, 1, 2, 3, 4], "gate": {"variant": "r1", "metric": "within_one", "at_least": 0.8}}

    def rows(*within):
        return latest([{"variant": "r1", "seed": s, "held": {"cells": {"within_one": w}}}
                       for s, w in enumerate(within)])
    ok, line = gate(exp, rows(1.0, 1.0))  # 2 of 5 seeds: the other 3 could still sink it
    assert ok is None and "over 2 of its 5 seeds" in line and "**gate not decided yet**" in line
    ok, line = gate(exp, rows(0.98, 0.97, 0.26, 0.11))  # even a perfect fifth seed leaves the mean at 66%
    assert ok is False and "cannot lift it" in line
    assert gate(exp, rows(1.0, 1.0, 1.0, 1.0, 0.1))[0] is True  # a mean over seeds: 82%
    ok, line = gate(exp, rows(1.0, 1.0, 1.0, 0.5, 0.4))
    assert ok is False and "over its 5 seeds" in line and "cannot lift" not in line
    assert gate(exp, latest([]))[0] is None and gate({}, rows(1.0)) == (None, "")
    claim = {"claims": [{"id": "c", "text": "2d >= 1d", "not_worse": ["a", "b"], "metric": "cell_accuracy",
                         "gated": True}]}
    assert "not compared (gate not decided yet)" in claim_lines(claim, latest([]), None)[0]
    assert "not compared (gate not passed)" in claim_lines(claim, latest([]), False)[0]


def test_claims_leave_out_unmatched_rows_and_mixed_revisions_withhold_verdicts():
    from conceptvlm.experiments.report_v2 import pairing_problem, revision_problem
    from conceptvlm.experiments.verdicts import claim_lines, latest

    claim = {"claims": [{"id": "c", "text": "dyn < none", "chain": ["dyn", "none"], "metric": "held_bpb"}]}
    rows = [_row("none", s, 3.0 + 0.01 * s, router="none") for s in range(5)]
    rows += [_row("dyn", s, 2.8 + 0.01 * s + 0.005 * (s % 2)) for s in range(5)]
    line = claim_lines(claim, latest(rows), None)[0]
    assert "**holds**" in line and "over 5 seeds" in line
    rows[-1]["matched"] = rows[-2]["matched"] = False  # seeds 3, 4 of dyn miss their ratio
    line = claim_lines(claim, latest(rows), None)[0]
    assert "over 3 seeds" in line and "2 not-matched row(s) left out" in line
    # the interval excludes 0 on 3 seeds, but the protocol's minimum is 5: not a verdict yet
    assert "**inconclusive (reads 'holds' on 3 paired seed(s); the protocol needs 5)**" in line
    assert revision_problem(rows) is None
    rows[0]["git"] = "def5678"
    assert "2 revisions" in revision_problem(rows)
    for r in rows:
        r["git"] = "abc1234+dirty"
    assert "uncommitted" in revision_problem(rows)
    assert pairing_problem(latest(rows)) is None
    rows[1]["data_order"] = "other"
    assert "[1]" in pairing_problem(latest(rows))


def test_a_claims_table_is_read_at_its_newest_revision_and_a_sweep_keeps_its_mix():
    from conceptvlm.experiments.report_v2 import revision_problem, split_by_revision, superseded_lines
    from conceptvlm.experiments.verdicts import claim_lines, latest

    claim = {"claims": [{"id": "c", "text": "dyn < none", "chain": ["dyn", "none"], "metric": "held_bpb"}]}
    old = [dict(_row(v, 0, 3.0, git="aaa1111"), time="2026-12-01 10:00:00") for v in ("dyn", "none")]
    new = [dict(_row(v, s, 2.8 + (0.2 if v == "none" else 0.0) + 0.01 * s, git="bbb2222"),
                time=f"2026-12-06 0{s}:00:00") for v in ("dyn", "none") for s in range(5)]
    current, superseded = split_by_revision(claim, old + new)
    assert current == new and superseded == old and revision_problem(current) is None
    assert "**holds**" in claim_lines(claim, latest(current), None)[0]
    line = superseded_lines(superseded, current)[0]
    assert "2 run(s) made with older code (revision aaa1111): dyn seed 0, none seed 0" in line
    assert line.endswith("The table reruns at bbb2222.")
    # a later row from older code makes that revision the table's; the newer rows wait apart
    late = [dict(old[0], time="2026-12-07 00:00:00")]
    assert split_by_revision(claim, new + late) == (late, new)
    # a sweep decides nothing: it keeps every row, flagged
    assert split_by_revision({}, old + new) == (old + new, []) and superseded_lines([], new) == []
    assert "2 revisions" in revision_problem(old + new)


def test_a_claims_table_holds_only_rows_made_under_the_yamls_present_settings():
    from conceptvlm.experiments.report_v2 import current_rows, other_protocol_lines
    from conceptvlm.experiments.spec import protocol_key, with_quick

    exp = {"steps": 100, "overrides": ["optim.lr=1e-3"], "seeds": [0, 1], "notes": ["n"],
           "variants": [{"name": "dyn", "router": "cosine", "R": 2.0}, {"name": "none", "router": "none"}],
           "claims": [{"id": "c", "text": "dyn < none", "chain": ["dyn", "none"], "metric": "held_bpb"}],
           "quick": {"steps": 3, "variants": ["dyn"]}}
    dyn, none = exp["variants"]
    made = [dict(_row(v["name"], s, 3.0), protocol_key=protocol_key(exp, v), time=f"2026-12-06 0{s}:00:00")
            for v in (dyn, none) for s in (0, 1)]
    assert current_rows(exp, made) == (made, [], [])
    # what only reads the table (notes, claims, seeds, the gate) keeps its rows ...
    read = dict(exp, notes=["other"], seeds=[0, 1, 2], gate={"variant": "none", "metric": "held_bpb"})
    assert current_rows(read, made) == (made, [], [])
    # ... a change to how runs are made supersedes them, for every variant or for the one edited
    assert current_rows(dict(exp, overrides=["optim.lr=2e-3"]), made) == ([], made, [])
    assert current_rows(dict(exp, steps=200), made) == ([], made, [])
    edited = dict(exp, variants=[dict(dyn, R=4.0), none])
    assert current_rows(edited, made) == (made[2:], made[:2], [])
    assert "2 run(s) made under other settings" in other_protocol_lines(made[:2])[0]
    # rows from before rows carried the key stand while none of the table has one
    legacy = [{k: v for k, v in r.items() if k != "protocol_key"} for r in made]
    assert current_rows(exp, legacy) == (legacy, [], [])
    assert current_rows(exp, legacy + made[:1]) == (made[:1], legacy, [])
    # the quick form is keyed with its own steps
    quick = dict(made[0], quick=True, protocol_key=protocol_key(with_quick(exp), dyn))
    assert quick["protocol_key"] != made[0]["protocol_key"] and current_rows(exp, [quick])[0] == [quick]


def test_lr_sweep_names_the_best_lr_per_router():
    from conceptvlm.experiments.report_v2 import best_lr_lines
    from conceptvlm.experiments.verdicts import latest

    rows = []
    for lr, none_bpb, cos_bpb in ((1e-3, 3.2, 3.3), (2e-3, 3.1, 3.25), (4e-3, 3.15, 3.2)):
        rows.append(dict(_row(f"none-{lr}", 0, none_bpb, router="none"), lr=lr))
        rows.append(dict(_row(f"cosine-{lr}", 0, cos_bpb), lr=lr))
    line = best_lr_lines(latest(rows))[0]
    # none's best sits inside the swept range; cosine's is its highest lr, which is flagged
    assert line.startswith("Lowest held-out bpb per router: none at lr 0.002, cosine at lr 0.004 (the edge")
    assert line.count("edge") == 1
    assert best_lr_lines(latest(rows[:2])) == []  # one lr per router: not a sweep


def test_provenance_names_every_machine_and_the_newest_run_whatever_the_row_order():
    from conceptvlm.experiments.report_v2 import provenance_lines

    rows = [dict(_row("a", s, 3.0), machine=m, time=t, command="run x", wall_s=10.0, steps=100, code_rev="abc1234")
            for s, (m, t) in enumerate([("cpu A", "2026-12-06 02:50:33"), ("cpu B", "2026-12-06 01:37:19"),
                                        ("cpu A", "2026-11-29 18:58:32")])]
    cmd, machine, wall = provenance_lines(rows)
    assert cmd == "Command(s): `run x`  " and machine == "Machines: cpu A; cpu B  "
    assert wall.endswith("code revision abc1234; last run 2026-12-06 02:50:33.  ") and "30 s in all (3 runs)" in wall
    assert provenance_lines(rows[:1])[1] == "Machine: cpu A  "


def test_experiment_notes_print_under_the_table_and_a_mixed_sweep_is_only_flagged():
    from conceptvlm.experiments.report_v2 import note_lines, problem_lines

    assert note_lines({}) == []
    sweep = {"notes": ["rerun matched bit for bit"]}
    assert note_lines(sweep) == ["Note: rerun matched bit for bit", ""]
    assert problem_lines(sweep, None) == []
    assert problem_lines(sweep, "rows from 2 revisions")[0] == \
        "**Caution**: rows from 2 revisions (see the note under the table)."
    assert problem_lines({"claims": [{"id": "c"}]}, "rows from 2 revisions")[0].startswith("**Verdicts withheld**")


# ------------------------------------------------------------------- grounding cells
def test_cell_metrics_from_likelihoods_over_64_cells():
    from conceptvlm.experiments.grounding import cell_metrics

    scores = np.full((3, 64), -5.0)
    scores[0, 2 * 8 + 3] = 0.0  # right: (2, 3)
    scores[1, 4 * 8 + 1] = 0.0  # target (4, 3): row right, two columns off
    scores[2, 7 * 8 + 6] = 0.0  # target (6, 6): one row off
    m = cell_metrics(scores, [2, 4, 6], [3, 3, 6])
    assert m["items"] == 3
    assert m["accuracy"] == pytest.approx(1 / 3) and m["within_one"] == pytest.approx(2 / 3)
    assert m["row_error"] == pytest.approx(1 / 3) and m["col_error"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        cell_metrics(np.zeros((2, 10)), [0, 0], [0, 0])


def test_cell_samples_answer_the_centre_cell_of_the_named_shape():
    from conceptvlm.data.grounding_cells import all_cell_answers, cell_sample

    answers = all_cell_answers()
    assert len(set(answers)) == 64
    for i in range(30):
        meta = json.loads(cell_sample(i)["json"])
        assert cell_sample(i)["jpg"] == cell_sample(i)["jpg"]  # a pure function of (seed, index)
        shape = next(s for s in meta["scene"] if s[1] == meta["colour"])
        x1, y1, x2, y2 = shape[2]
        assert (meta["row"], meta["col"]) == (int((y1 + y2) / 2 // 8), int((x1 + x2) / 2 // 8))
        assert meta["answer"] == answers[meta["row"] * 8 + meta["col"]]
        assert 1 <= len(meta["scene"]) <= 3 and len({s[1] for s in meta["scene"]}) == len(meta["scene"])


def test_evaluate_cells_reads_held_out_shards_and_scores_every_item(tmp_path):
    """The evaluation the grounding rows come from, on real shards (a renamed import here
    once failed only after a full training run)."""
    import torch

    from conceptvlm.data.grounding_cells import write_cell_shards
    from conceptvlm.experiments.grounding import evaluate_cells
    from helpers import ByteTokenizer, tiny_vlm

    torch.manual_seed(0)
    shards = write_cell_shards(tmp_path / "cells", num=3, shard_size=2, seed=0, start_index=10**6)
    res = evaluate_cells(tiny_vlm(), ByteTokenizer(), shards)
    assert res["items"] == 3 and 0.0 <= res["accuracy"] <= res["within_one"] <= 1.0
    assert evaluate_cells(tiny_vlm(), ByteTokenizer(), shards, limit=2)["items"] == 2


@pytest.mark.parametrize("question_first", [False, True])
def test_cell_loglikelihoods_match_one_forward_per_candidate(question_first):
    import torch

    from conceptvlm.data.grounding_cells import all_cell_answers
    from conceptvlm.data.templates import Text, encode_parts, vqa_prompt
    from conceptvlm.experiments.grounding import cell_loglikelihoods
    from helpers import ByteTokenizer, tiny_vlm

    torch.manual_seed(0)
    model, tok = tiny_vlm(question_first=question_first), ByteTokenizer()
    model.eval()
    image = torch.rand(3, 64, 64, dtype=torch.float64)
    got = cell_loglikelihoods(model, tok, image, "Where is the red shape?", model.tokens_per_image)
    assert got.shape == (64,)
    for k in (0, 27, 63):  # slow reference: one unpadded forward per candidate
        ids, labels = encode_parts(vqa_prompt("Where is the red shape?", question_first)
                                   + [Text(" " + all_cell_answers()[k])], tok,
                                   model.tokens_per_image, add_eos=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.as_tensor(ids)[None], images=image[None]).logits[0], -1)
        pos = np.flatnonzero(labels >= 0)
        assert got[k] == pytest.approx(float(logp[pos - 1, torch.as_tensor(labels[pos])].sum()), abs=1e-4)


# -------------------------------------------------------------------- end to end (quick)
# A protocol-2 text experiment small enough for a unit test: a tiny corpus, BPE of 300.
TINY_P2 = """
protocol: 2
kind: text
claim: smoke
train_config: configs/train/tiny_text.yaml
corpus_large: {max_units: 8, bpe_vocab: 300, heldout_pct: 40, max_chars: 512, min_segment: 64}
tokenizer: bpe
"""

def test_protocol_2_quick_run_pairs_seeds_scores_at_trained_length_and_reports(tmp_path):
    """Two variants x two seeds of a tiny protocol-2 experiment, a few steps each."""
    pytest.importorskip("deepspeed")
    from conceptvlm.experiments.report import render_report
    from conceptvlm.experiments.runner import run_experiment

    exps = tmp_path / "exps"
    exps.mkdir()
    (exps / "p2.yaml").write_text(TINY_P2 + """epochs: 1.0
seeds: [0, 1]
eval_limit: 2
overrides: [data.seq_len=128, data.batch_size=4, data.shuffle_buffer=8, data.shuffle_initial=4, optim.warmup_steps=1]
variants:
  - {name: none, router: none, overrides: [model.joint_decoding=false]}
  - {name: fixed-topk, router: fixed, R: 2.0, realloc: topk}
claims:
  - {id: c, text: "fixed < none", chain: [fixed-topk, none], metric: held_bpb}
""")
    results = tmp_path / "results"
    rows = run_experiment(str(exps / "p2.yaml"), runs_root=tmp_path / "runs", results_dir=results)
    assert len(rows) == 4
    by = {(r["variant"], r["seed"]): r for r in rows}
    assert by["none", 0]["data_order"] == by["fixed-topk", 0]["data_order"] != by["none", 1]["data_order"]
    for r in rows:
        assert r["protocol"] == 2 and r["held"]["window"] == 128  # the trained row length
        assert r["steps"] >= 1 and set(r["epochs_seen"]) == {"english", "code"}
        # one pass, counted in packed rows (part padding): every source read once, none twice
        # (the mix is proportional to size; the last partial batch is left out)
        assert all(0.8 < e <= 1.0 for e in r["epochs_seen"].values()), (r["steps"], r["epochs_seen"])
        assert r["steps"] == r["rows_per_pass"] // 4  # batch 4: whole batches of one pass
        assert r["data"]["overlap"]["held/english"]["shared_chars"] == 0
        assert r["flops_linear_per_token"] > 0 and r["flops_attention_per_token"] > 0
        assert r["tokenizer"] == "bpe-300" and "ood" in r["held"]
    assert by["fixed-topk", 0]["knob"] == {"top_k": 4} and by["fixed-topk", 0]["matched"] is True
    md = open(render_report(results_dir=results, out=tmp_path / "results.md", experiments_dir=exps)).read()
    assert "# Second protocol" in md and "## p2" in md and "| fixed-topk | fixed | 2 |" in md
    assert "Held-out overlap with training" in md and "english 0 of" in md
    # a clean checkout draws the verdict, a dirty one withholds it: never both, never neither
    assert ("**Claim: fixed < none**" in md) != ("Verdicts withheld" in md)
    # the rows carry the key the report computes from the YAML; an edit to how runs are made supersedes them
    yaml_text = (exps / "p2.yaml").read_text()
    (exps / "p2.yaml").write_text(yaml_text.replace("optim.warmup_steps=1", "optim.warmup_steps=2"))
    md = open(render_report(results_dir=results, out=tmp_path / "results.md", experiments_dir=exps)).read()
    assert "No rows under the present protocol yet." in md and "**Claim: fixed < none**" not in md
    assert "4 run(s) made under other settings" in md


def test_plan_estimate_multiplies_measured_times_out_to_the_full_forms():
    from conceptvlm.experiments.plan import PLAN, estimate

    name = PLAN[1][1]
    timing = {name: {"step_s": 2.0, "eval_s": 10.0, "eval_units": 1000, "eval_unit": "token", "seeds": [0, 1, 2],
                     "n_variants": 4, "full_steps": 900, "full_eval_units": 36_000}}
    est = {e["experiment"]: e for e in estimate(timing)}
    e = est[name]
    assert e["runs"] == 12 and e["hours_per_run"] == pytest.approx((900 * 2.0 + 36 * 10.0) / 3600)
    assert e["hours"] == pytest.approx(12 * e["hours_per_run"])
    assert not est[PLAN[0][1]]["measured"]


def test_plan_table_counts_done_runs_and_prices_the_rest_at_their_mean_wall_time(tmp_path):
    import json

    from conceptvlm.experiments.plan import PLAN, TIMING_FILE
    from conceptvlm.experiments.plan_table import plan_lines

    name = PLAN[1][1]
    (tmp_path / TIMING_FILE).write_text(json.dumps({name: {
        "step_s": 2.0, "eval_s": 10.0, "eval_units": 1000, "eval_unit": "token", "seeds": [0, 1, 2],
        "n_variants": 4, "full_steps": 900, "full_eval_units": 36_000, "load_avg_1min": 0.5}}))
    rows = [{"variant": "a", "seed": 0, "wall_s": 3600.0}, {"variant": "a", "seed": 0, "wall_s": 1800.0},  # rerun
            {"variant": "b", "seed": 0, "wall_s": 600.0, "train_wall_s": 4800.0, "eval_wall_s": 600.0,  # resumed
             "steps": 900, "train_step_s_total": 2700.0},
            {"variant": "a", "seed": 1, "wall_s": 99.0, "quick": True}]
    lines = plan_lines(tmp_path, {name: rows})
    line = next(x for x in lines if f"| {name} |" in x)
    # 2 runs done (the last row of a rerun counts once, quick rows not at all); the resumed
    # run counts every piece: 0.5 + 1.5 = 2.0 h spent; 10 left at their mean 1.0 h; the
    # step time in runs is from the rows that log it
    assert line.endswith(f"| 2.00 | 0.5 on {os.cpu_count()} cores | 3.00 | 36,000 tokens | 7.2 | 2 | 2.0 | 10.0 |"), line
    assert any(x.startswith("Total: **12 CPU hours**: spent so far 2.0, left about 10") for x in lines), lines


def test_an_interrupted_run_resumes_to_the_uninterrupted_row_and_done_rows_are_skipped(tmp_path, monkeypatch):
    """A plan runs in pieces across processes: a run killed after a checkpoint continues
    from it and gives the same row as one that never stopped; a second invocation skips
    (variant, seed) pairs whose rows exist; --force starts over."""
    pytest.importorskip("deepspeed")
    import conceptvlm.train as train_mod
    from conceptvlm.experiments.runner import run_experiment

    (tmp_path / "p2.yaml").write_text(TINY_P2 + """steps: 6
save_every: 2
seeds: [0]
eval_limit: 2
overrides: [data.seq_len=128, data.batch_size=4, data.shuffle_buffer=8, data.shuffle_initial=4, optim.warmup_steps=1]
variants:
  - {name: cosine-topk, router: cosine, R: 2.0, realloc: topk}
""")
    exp, runs = str(tmp_path / "p2.yaml"), tmp_path / "runs"
    whole = run_experiment(exp, runs_root=runs, results_dir=tmp_path / "whole")[0]
    assert whole["train_pieces"] == 1 and whole["code_rev"] and len(whole["run_key"]) == 16
    assert run_experiment(exp, runs_root=runs, results_dir=tmp_path / "whole") == []  # done: skipped

    real_train = train_mod.train

    def killed_at_step_3(cfg, loss_hook=None):
        def hook(step, loss):
            if step >= 3:
                raise KeyboardInterrupt("session ended")
            return loss
        return real_train(cfg, hook)

    monkeypatch.setattr(train_mod, "train", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, runs_root=runs, results_dir=tmp_path / "pieces", force=True)  # starts over
    run_dir = runs / "p2" / "full" / "cosine-topk-s0"
    assert not (run_dir / "export").exists() and list((run_dir / "checkpoints").glob("step*"))
    from conceptvlm.experiments.runner import _killed_piece_seconds, _read_run_state
    killed_s = _killed_piece_seconds(_read_run_state(run_dir), run_dir)
    assert killed_s > 0  # the killed piece's training time is kept for the row
    monkeypatch.setattr(train_mod, "train", real_train)
    pieces = run_experiment(exp, runs_root=runs, results_dir=tmp_path / "pieces")[0]
    assert pieces["train_pieces"] == 2 and pieces["run_key"] == whole["run_key"]
    assert pieces["train_wall_s"] > killed_s
    assert pieces["held"]["all"]["bits_per_byte"] == whole["held"]["all"]["bits_per_byte"]  # bit for bit
    assert pieces["train"]["final_loss"] == whole["train"]["final_loss"]
    # another config is another run: its folder is cleared, not resumed
    other = run_experiment(exp, runs_root=runs, results_dir=tmp_path / "pieces", extra_overrides=["optim.lr=1e-3"])[0]
    assert other["run_key"] != whole["run_key"] and other["train_pieces"] == 1


def test_a_claimed_run_is_skipped_by_other_processes_and_free_once_released(tmp_path):
    import subprocess
    import sys

    from conceptvlm.experiments.runner import claim

    run_dir = tmp_path / "exp" / "full" / "cosine-s0"
    holder = ("import sys, time; from pathlib import Path; from conceptvlm.experiments.runner import claim\n"
              "with claim(Path(sys.argv[1])) as mine:\n    print(mine, flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "True"
        with claim(run_dir) as mine:
            assert mine is False  # another process runs it
    finally:
        proc.kill()
        proc.wait()
    with claim(run_dir) as mine:  # the lock died with its process
        assert mine is True


def test_code_revision_moves_with_the_code_a_run_executes_only(tmp_path, monkeypatch):
    """Rows and checkpoints are tied to the last commit touching the runs' code: report or
    docs edits leave it, vision edits leave text tables, model edits move both."""
    import subprocess

    from conceptvlm.experiments import revision as runner

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    def commit(path, text="x"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", "-A")
        git("commit", "-qm", path)
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    monkeypatch.setattr(runner, "REPO", tmp_path)
    model = commit("conceptvlm/model.py")
    assert runner.code_rev("text") == runner.code_rev("vlm") == model
    commit("conceptvlm/experiments/report_v2.py")
    commit("docs/results.md")
    assert runner.code_rev("text") == runner.code_rev("vlm") == model
    tower = commit("vision/towers.py")
    assert (runner.code_rev("text"), runner.code_rev("vlm")) == (model, tower)
    (tmp_path / "conceptvlm" / "model.py").write_text("edited")
    assert runner.code_rev("text") == model + "+dirty"


def test_code_left_out_of_the_revision_is_never_imported_by_a_run(tmp_path):
    """Editing a file that :data:`revision.NOT_RUN` leaves out keeps the rows of long
    experiments: that is only safe if no run executes it. Run the quick form of a text and
    a vision experiment and check that none of those files' modules was imported, and that
    the text run imported none of :data:`revision.TEXT_RUNS_SKIP`."""
    import json
    import subprocess
    import sys

    from conceptvlm.experiments.revision import NOT_RUN, REPO, SELF, TEXT_RUNS_SKIP, not_run_files
    from helpers import fresh_process_env

    script = (
        "import json, sys\n"
        "from conceptvlm.experiments.runner import run_experiment\n"
        f"kw = dict(quick=True, runs_root={str(tmp_path / 'runs')!r}, results_dir={str(tmp_path / 'rows')!r}, "
        "seeds=[0], steps=2)\n"
        "run_experiment('chunking_v2', variants=['cosine-topk'], **kw)\n"
        "print('modules', json.dumps(sorted(sys.modules)))\n"
        "run_experiment('grounding_cells', variants=['r4-hilbert-2d'], **kw)\n"
        "print('modules', json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=fresh_process_env(), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    text_run, imported = (set(json.loads(x.split(" ", 1)[1])) for x in out.stdout.splitlines()
                          if x.startswith("modules "))
    assert "conceptvlm.model" in text_run and "conceptvlm.data.grounding_cells" in imported  # the runs ran

    def module(path: str) -> str:
        parts = path[:-len(".py")].split("/")
        if parts[0] != "conceptvlm":  # data/, vision/, eval/ install as conceptvlm's subpackages
            parts = ["conceptvlm", *parts]
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = not_run_files()
    typos = [p for p in NOT_RUN if not any(f == p or f.startswith(p + "/") for f in files)]
    assert not typos, f"entries of NOT_RUN that name no tracked file: {typos}"
    left_out = [f for f in files if f.endswith(".py") and f != SELF]
    ran = [f for f in left_out if module(f) in imported]
    assert not ran, f"left out of the code revision but imported by a run: {ran}"
    skipped = [p.removeprefix(":(exclude)") for p in TEXT_RUNS_SKIP]
    ran = [f for f in skipped if module(f) in text_run]
    assert not ran, f"left out of the text tables' revision but imported by a text run: {ran}"


def test_run_key_does_not_depend_on_where_the_checkout_and_runs_live(tmp_path, monkeypatch):
    """The same run in another clone (or runs folder) keeps its key, so its rows are not
    rerun; a change inside the paths is still another run."""
    from conceptvlm.experiments import runner

    class Cfg:
        def __init__(self, repo, runs, shard="a.tar"):
            self.d = {"model_file": f"{repo}/configs/model/small.yaml", "train": {"out_dir": f"{runs}/e/full/x-s0"},
                      "data": {"shards": [f"{runs}/_data/{shard}"]}}

        def to_dict(self):
            return self.d

    exp = {"_code_rev": "abc1234", "eval_limit": None}
    keys = []
    for repo in (tmp_path / "main", tmp_path / "clone"):
        monkeypatch.setattr(runner, "REPO", repo)
        for runs in (repo / "runs" / "experiments", tmp_path / "elsewhere"):
            keys.append(runner.run_key(Cfg(repo, runs), exp, runs))
    assert len(set(keys)) == 1
    assert runner.run_key(Cfg(repo, runs, "b.tar"), exp, runs) != keys[0]
    assert runner.run_key(Cfg(repo, runs), {**exp, "_code_rev": "def5678"}, runs) != keys[0]


def test_grounding_prior_uses_the_samples_own_cells():
    """The prior the report prints comes from the same draws as the samples, and an
    image-blind model's loss is the cell entropy over the answer tokens."""
    import json

    from conceptvlm.data.grounding_cells import cell_sample
    from conceptvlm.experiments.grounding import answer_cells, answer_prior_nats

    metas = [json.loads(cell_sample(i)["json"]) for i in range(20)]
    assert answer_cells(20) == [(m["row"], m["col"]) for m in metas]
    prior = answer_prior_nats(7, n=3000)
    assert 0.45 < prior < np.log(64) / 7  # below uniform: centres keep off the edges


def test_a_timing_measured_on_an_older_form_of_the_yaml_is_flagged_stale(tmp_path):
    """The plan prices runs from one timing per stage; once the YAML changes what its runs do
    (steps, batch, variants), that timing is flagged, while edits to notes or claims are not."""
    import json

    from conceptvlm.experiments.plan import PLAN, TIMING_FILE, estimate, setup_digest
    from conceptvlm.experiments.plan_table import plan_lines
    from conceptvlm.experiments.runner import load_experiment

    name = PLAN[3][1]
    exp = load_experiment(name)
    current = setup_digest(exp)
    assert setup_digest({**exp, "notes": ["another note"], "claims": []}) == current
    assert setup_digest({**exp, "steps": int(exp["steps"]) + 1}) != current
    base = {"step_s": 1.0, "eval_s": 1.0, "eval_units": 10, "eval_unit": "item", "seeds": [0], "n_variants": 1,
            "full_steps": 10, "full_eval_units": 10}
    for setup, stale in ((current, False), ("0ld0ld0ld0ld", True), (None, None)):
        t = {**base, **({"setup": setup} if setup else {})}
        assert {e["experiment"]: e for e in estimate({name: t})}[name]["stale"] is stale
        (tmp_path / TIMING_FILE).write_text(json.dumps({name: t}))
        lines = plan_lines(tmp_path, {})
        assert any(f"--only {name}`" in x for x in lines) is bool(stale)
        assert any(f"| {name} |" in x and "(stale)" in x for x in lines) is bool(stale)
