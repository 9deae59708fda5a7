"""Experiments package: the corpus split, a 3-step runner smoke run, the report."""
import json

import pytest

from conceptvlm.experiments.corpus import CorpusSpec, pieces, split_units


def test_corpus_split_is_deterministic_and_disjoint_by_file():
    spec = CorpusSpec(heldout_pct=30, max_files=40)
    a, b = split_units(spec), split_units(spec)
    assert a == b
    for domain in ("english", "code"):
        train = {n for n, _ in a[domain]["train"]}
        held = {n for n, _ in a[domain]["held"]}
        assert train and held and not (train & held)
    other = split_units(CorpusSpec(heldout_pct=30, max_files=40, salt="other"))
    assert {n for n, _ in other["code"]["held"]} != {n for n, _ in a["code"]["held"]}


def test_pieces_cover_text_within_limit():
    text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(200)) + "x" * 250
    ps = list(pieces(text, 100))
    assert all(len(p) <= 100 for p in ps) and "".join(ps) == text


def _run_yaml(tmp_path, name: str, text: str) -> tuple[list, list]:
    """Write experiment ``name`` and run it under ``tmp_path``: (returned rows, saved rows)."""
    pytest.importorskip("deepspeed")
    from conceptvlm.experiments.runner import run_experiment

    exp = tmp_path / f"{name}.yaml"
    exp.write_text(text)
    rows = run_experiment(str(exp), runs_root=tmp_path / "runs", results_dir=tmp_path / "results")
    return rows, json.loads((tmp_path / "results" / f"{name}.json").read_text())


def test_runner_smoke_writes_a_result_row(tmp_path):
    rows, saved = _run_yaml(tmp_path, "smoke", """
kind: text
train_config: configs/train/tiny_text.yaml
corpus: {heldout_pct: 20, max_chars: 256, max_files: 10}
eval_limit: 2
steps: 3
seeds: [0]
overrides: [model.vocab_size=262, data.seq_len=64, data.batch_size=2, data.shuffle_buffer=10, optim.warmup_steps=1]
variants:
  - {name: cosine-topk, router: cosine, R: 2.0, realloc: topk}
""")
    assert len(rows) == len(saved) == 1
    row = saved[0]
    assert row["variant"] == "cosine-topk" and row["knob"] == {"top_k": 4}
    assert row["held"]["all"]["bits_per_byte"] > 0 and row["held"]["all"]["realised_ratio"] >= 1
    assert row["flops_per_token"] > 0 and row["flops_baseline_per_token"] > 0


def _fake_row(variant, router, bpb, seed=0):
    return {"experiment": "chunking_ablation", "variant": variant, "seed": seed, "router": router,
            "R": 1.0 if router == "none" else 2.0, "steps": 10, "quick": True,
            "command": "conceptvlm experiment run chunking_ablation --quick", "machine": "test cpu",
            "git": "abc", "time": "2026-01-01 00:00:00", "data": {"docs": {"held/code": 3}},
            "params_total": 1000, "params_activated": 800, "realloc": "topk", "knob": {"top_k": 4},
            "flops_baseline_per_token": 100.0, "flops_per_token": 102.0, "flops_per_token_realised": 101.0,
            "tokens_per_step": 64, "train": {"text": 2.0}, "train_wall_s": 1.0, "wall_s": 2.0,
            "held": {"english": {"bits_per_byte": bpb}, "code": {"bits_per_byte": bpb + 0.1},
                     "all": {"bits_per_byte": bpb + 0.05, "realised_ratio": 1.0 if router == "none" else 2.1}}}


def test_report_renders_from_fake_results(tmp_path):
    from conceptvlm.experiments.report import render_report

    res = tmp_path / "results"
    res.mkdir()
    rows = [_fake_row("none", "none", 2.5), _fake_row("cosine-topk", "cosine", 2.4),
            _fake_row("fixed-topk", "fixed", 2.6)]
    (res / "chunking_ablation.json").write_text(json.dumps(rows))
    exps = tmp_path / "exps"
    exps.mkdir()
    (exps / "chunking_ablation.yaml").write_text("kind: text\n")
    (exps / "router_2d.yaml").write_text("kind: vlm\n")
    md = render_report(results_dir=res, out=tmp_path / "results.md", experiments_dir=exps)
    text = open(md).read()
    assert "cosine-topk" in text and "**holds**" in text
    assert "conceptvlm experiment run router_2d" in text  # listed as not run
    assert (res / "chunking_ablation_quick_10.png").exists()


def test_vlm_runner_measures_held_out_ratios_and_rescore_restores_them(tmp_path):
    from conceptvlm.experiments.runner import rescore_held_ratios

    _, rows = _run_yaml(tmp_path, "vlm_smoke", """
kind: vlm
train_config: configs/train/tiny_vlm.yaml
synthetic: {caption: [16, 8], vqa: [16, 8], grounding: [8, 4], text: [8, 4]}
eval_limit: 4
steps: 3
seeds: [0]
overrides: [model.vocab_size=262, data.batch_size=2, data.shuffle_buffer=4, optim.warmup_steps=1]
variants:
  - {name: cosine, router: cosine, R: 1.5, overrides: [model.chunk.target_ratio_image=3.0]}
""")
    exp = str(tmp_path / "vlm_smoke.yaml")
    kw = dict(runs_root=tmp_path / "runs", results_dir=tmp_path / "results")
    path = tmp_path / "results" / "vlm_smoke.json"
    ratio, tokens = rows[0]["held"]["ratio"], rows[0]["held"]["tokens"]
    assert set(ratio) == {"text", "image", "all"} and all(r >= 1 for r in ratio.values())
    assert set(tokens) == {"text", "image"} and tokens["image"] > 0
    # the linear FLOPs follow the ratio over all positions, image and text each at its own
    # target (3.0 and 1.5) or at what it realised
    from conceptvlm import flops
    from conceptvlm.experiments.vlm_runs import target_ratio_all
    from conceptvlm.export import load_exported

    model_cfg = load_exported(tmp_path / "runs" / "vlm_smoke" / "full" / "cosine-s0" / "export")[0].config.model
    n = tokens["text"] + tokens["image"]
    target = n / (tokens["text"] / 1.5 + tokens["image"] / 3.0)
    assert target_ratio_all({m: (k, 0) for m, k in tokens.items()}, {"text": 1.5, "image": 3.0}) == \
        pytest.approx(target)
    assert rows[0]["flops_per_token"] == pytest.approx(flops.linear_flops_per_token(model_cfg, target)["all"])
    assert rows[0]["flops_per_token_realised"] == pytest.approx(
        flops.linear_flops_per_token(model_cfg, ratio["all"])["all"])
    del rows[0]["held"]["ratio"]  # a row written before held-out ratios were measured
    path.write_text(json.dumps(rows))
    assert rescore_held_ratios(exp, **kw) == 1
    assert json.loads(path.read_text())[0]["held"]["ratio"] == pytest.approx(ratio)
    assert rescore_held_ratios(exp, **kw) == 0  # nothing left to add


@pytest.mark.parametrize("text,says", [("{not json", "not valid JSON"), ('{"a": 1}', "expected a JSON list"),
                                       ("[3]", "expected a JSON list")])
def test_a_broken_results_file_stops_a_run_before_anything_is_built(tmp_path, text, says):
    """A results file that cannot be read would otherwise make every run look undone, and
    the row of the first run to finish would be lost when it cannot be appended."""
    from conceptvlm.errors import UserError
    from conceptvlm.experiments.runner import run_experiment

    results = tmp_path / "results"
    results.mkdir()
    (results / "chunking_v2.json").write_text(text)
    with pytest.raises(UserError, match=f"chunking_v2.json: {says}"):
        run_experiment("chunking_v2", quick=True, runs_root=tmp_path / "runs", results_dir=results)
    assert not (tmp_path / "runs").exists()  # no corpus, tokenizer or run folder was made
    assert (results / "chunking_v2.json").read_text() == text  # and the file is left as it was


def test_rows_are_appended_atomically_and_a_failed_write_keeps_every_earlier_row(tmp_path, monkeypatch):
    from conceptvlm import manifest
    from conceptvlm.experiments.runner import append_result, read_rows

    path = tmp_path / "x.json"
    append_result({"variant": "a", "seed": 0}, path)
    append_result({"variant": "a", "seed": 1}, path)
    assert read_rows(path) == [{"variant": "a", "seed": 0}, {"variant": "a", "seed": 1}]

    def killed(src, dst):  # the process dies between writing the new file and renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(manifest.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        append_result({"variant": "a", "seed": 2}, path)
    assert read_rows(path) == [{"variant": "a", "seed": 0}, {"variant": "a", "seed": 1}]
    assert {p.name for p in tmp_path.iterdir()} == {".x.json.lock", "x.json"}  # no temporary file left


def test_the_report_names_the_file_and_row_it_cannot_read(tmp_path):
    from conceptvlm.errors import UserError
    from conceptvlm.experiments.report import render_report

    res, exps = tmp_path / "results", tmp_path / "exps"
    res.mkdir()
    exps.mkdir()
    (exps / "chunking_ablation.yaml").write_text("kind: text\n")
    good = _fake_row("none", "none", 2.5)
    (res / "chunking_ablation.json").write_text(json.dumps([good, {k: v for k, v in good.items() if k != "time"}]))
    with pytest.raises(UserError, match=r"chunking_ablation.json: row 1 lacks time"):
        render_report(results_dir=res, out=tmp_path / "results.md", experiments_dir=exps)
    (res / "chunking_ablation.json").write_text("[{")
    with pytest.raises(UserError, match="chunking_ablation.json: not valid JSON"):
        render_report(results_dir=res, out=tmp_path / "results.md", experiments_dir=exps)


def _cells_exp(n_train: int = 40, n_held: int = 8) -> dict:
    return {"name": "t", "kind": "vlm", "synthetic": {"cells": [n_train, n_held]}}


def test_runs_started_together_build_the_data_once_and_each_sees_all_of_it(tmp_path, monkeypatch):
    """Two processes on one experiment used to race: the second saw the first's half-written
    shard folder and trained on the one shard written so far (grounding_cells seed 1)."""
    import threading
    import time

    from conceptvlm.data import grounding_cells
    from conceptvlm.experiments.runner import prepare_run_data

    write, calls = grounding_cells.write_cell_shards, []

    def slow_write(out_dir, num, shard_size, **kw):  # one shard at a time, slowly
        calls.append(num)
        paths = write(out_dir, num, shard_size=10, **kw)
        time.sleep(0.3)
        return paths

    monkeypatch.setattr(grounding_cells, "write_cell_shards", slow_write)
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(prepare_run_data(_cells_exp(), tmp_path)))
               for _ in range(2)]
    for t in threads:  # flock locks conflict between two open() calls, threads included
        t.start()
    for t in threads:
        t.join()
    assert calls == [40, 8]  # built once, by whichever came first
    shards = [d["train_sources"][0]["shards"] for d in seen]
    assert shards[0] == shards[1] and len(shards[0]) == 4  # 40 samples, 10 per shard


def test_a_killed_shard_writer_leaves_nothing_that_is_reused(tmp_path, monkeypatch):
    from conceptvlm.data import grounding_cells
    from conceptvlm.experiments.runner import prepare_run_data

    write = grounding_cells.write_cell_shards

    def dies_after_one_shard(out_dir, num, shard_size, **kw):
        write(out_dir, 5, shard_size=5, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(grounding_cells, "write_cell_shards", dies_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_run_data(_cells_exp(), tmp_path)
    cells = tmp_path / "_data" / "synthetic" / "train"
    assert [p.name for p in cells.iterdir()] == ["cells-40.partial"]
    monkeypatch.setattr(grounding_cells, "write_cell_shards", write)
    data = prepare_run_data(_cells_exp(), tmp_path)
    assert [p.name for p in cells.iterdir()] == ["cells-40"] and len(data["train_sources"][0]["shards"]) == 1


def test_a_run_that_reads_fewer_shards_has_another_data_order(tmp_path):
    """The pairing check's fingerprint covers the shard list, not only the first batches."""
    from conceptvlm.experiments.run2 import data_fingerprint
    from conceptvlm.experiments.runner import load_experiment, prepare_run_data, run_config

    exp = {**load_experiment("grounding_cells", quick=True), "_code_rev": "x", "synthetic": {"cells": [501, 8]}}
    data = prepare_run_data(exp, tmp_path)
    variant = exp["variants"][0]
    full = data_fingerprint(run_config(exp, variant, 0, data, tmp_path, True)[0])
    assert data_fingerprint(run_config(exp, exp["variants"][1], 0, data, tmp_path, True)[0]) == full  # paired
    fewer = {**data, "train_sources": [{**data["train_sources"][0], "shards": data["train_sources"][0]["shards"][:1]}]}
    assert data_fingerprint(run_config(exp, variant, 0, fewer, tmp_path, True)[0]) != full
