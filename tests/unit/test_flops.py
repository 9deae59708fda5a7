"""Compute accounting (conceptvlm.flops) against real models, and the inference bench's plumbing."""
import argparse

import pytest
import torch

from conceptvlm import ConceptMoE, ModelConfig
from conceptvlm.flops import (PARTS, STRATEGIES, attention_map_flops, baseline_of, built_parameter_counts,
                              decode_step_bytes, expected_active_experts, fixed_router_concepts, kv_cache_bytes,
                              linear_flops_per_token, match_compute, parameter_counts, predicted_speedups)
from helpers import tiny_config

VARIANTS = {
    "plain": {},
    "realloc_topk_loops": dict(concept={"top_k": 3, "loops": 2}),
    "shared_experts": dict(moe={"n_shared_experts": 2}),
    "no_joint_linear_router": dict(joint_decoding=False, chunk={"router": "linear"}),
    "widened": dict(concept={"d_model": 48, "n_heads": 6, "n_kv_heads": 3, "expert_hidden": 40}),
    "tied_fixed": dict(tie_embeddings=True, chunk={"router": "fixed"}),
    "baseline_none": dict(chunk={"router": "none"}, joint_decoding=False),
}


def headline_baseline() -> ModelConfig:
    return ModelConfig.from_dict(dict(
        vocab_size=512, d_model=256, n_heads=8, n_kv_heads=2, n_encoder_layers=1, n_concept_layers=22,
        n_decoder_layers=1, joint_decoding=False, chunk=dict(router="none"),
        moe=dict(n_experts=8, top_k=2, expert_hidden=512)))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_counts_equal_a_built_model(name):
    cfg = tiny_config(**VARIANTS[name])
    torch.manual_seed(0)
    model = ConceptMoE(cfg)
    counts = parameter_counts(cfg)
    assert counts.n_total == sum(p.numel() for p in model.parameters())
    assert counts.total == built_parameter_counts(cfg, device="cpu") == built_parameter_counts(cfg)  # meta too
    assert set(counts.total) == set(PARTS)
    # activated: only the routed experts are partial
    for p in PARTS:
        if p != "experts":
            assert counts.activated[p] == counts.total[p]
    m = cfg.moe
    expert = 3 * cfg.d_model * m.expert_hidden
    assert counts.activated["experts"] == expert * m.top_k * (cfg.n_encoder_layers + cfg.n_decoder_layers) + \
        3 * cfg.concept_d_model * cfg.concept_expert_hidden * cfg.concept_top_k * cfg.n_concept_layers


@pytest.mark.parametrize("name", ["plain", "shared_experts", "baseline_none"])
def test_baseline_flops_are_twice_the_activated_matmul_params(name):
    base = baseline_of(tiny_config(**VARIANTS[name]))
    c = parameter_counts(base)
    matmul_params = c.n_activated - c.activated["embedding"] - c.activated["norms"]
    assert linear_flops_per_token(base)["all"] == pytest.approx(2 * matmul_params, rel=1e-12)


def test_concept_model_flops_scale_with_one_over_R_and_loops():
    cfg = tiny_config(concept={"d_model": 48, "n_heads": 6, "n_kv_heads": 3})
    f1 = linear_flops_per_token(cfg, 1.0 + 1e-9)["concept_model"]
    for R in (1.5, 2.0, 4.0):
        f = linear_flops_per_token(cfg, R)
        assert f["concept_model"] == pytest.approx(f1 / R, rel=1e-6)
        # token-level parts do not depend on R
        assert f["all"] - f["concept_model"] == pytest.approx(
            linear_flops_per_token(cfg, 3.0)["all"] - linear_flops_per_token(cfg, 3.0)["concept_model"])
    looped = tiny_config(concept={"loops": 3})
    one = tiny_config()
    assert linear_flops_per_token(looped, 2.0)["concept_model"] == pytest.approx(
        3 * linear_flops_per_token(one, 2.0)["concept_model"])


def test_concept_attention_map_flops_fall_by_about_R_squared():
    cfg = tiny_config(chunk={"router": "cosine"})
    L = 8192
    a1 = attention_map_flops(cfg, L, concepts=L)["concept_layers"]
    for R in (1.5, 2.0, 4.0):
        a = attention_map_flops(cfg, L, R)
        assert a1 / a["concept_layers"] == pytest.approx(R * R, rel=2e-3)
        assert a["token_layers"] == attention_map_flops(cfg, L, 1.01)["token_layers"]  # token layers unchanged


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("R", [1.5, 2.0])
def test_match_compute_lands_within_its_stated_tolerance(strategy, R):
    res = match_compute(headline_baseline(), R, strategy, router="fixed")
    assert abs(res.flops_mismatch_pct) <= res.flops_tolerance_pct
    assert res.flops_concept == pytest.approx(linear_flops_per_token(res.config, R)["all"])
    assert res.config.chunk.router == "fixed" and res.config.chunk.target_ratio_text == R
    if strategy in ("topk", "loops"):  # params move only by the chunk module + joint projectors
        assert abs(res.params_mismatch_pct) < 0.5
    else:  # width: params grow with the FLOPs (documented, reported)
        assert res.params_mismatch_pct > 20
    ConceptMoE(res.config) if strategy != "width" else None  # noqa: B018 (the proposal builds)


def test_match_compute_fine_grained_experts_match_closely():
    """With fine-grained experts top-k steps are small: R = 2 matches within 2%."""
    d = headline_baseline().to_dict()
    d["moe"] = dict(n_experts=64, top_k=8, expert_hidden=64)
    res = match_compute(ModelConfig.from_dict(d), 2.0, "topk")
    assert abs(res.flops_mismatch_pct) < 2.0 and res.knob["top_k"] > 8


@pytest.mark.parametrize("concept", [{}, {"loops": 2}, {"d_model": 48, "n_heads": 6, "n_kv_heads": 3}])
@pytest.mark.parametrize("R", [1.5, 2.5])
def test_kv_bytes_equal_what_a_real_prefill_holds(concept, R):
    cfg = tiny_config(chunk={"router": "fixed", "target_ratio_text": R}, concept=concept)
    torch.manual_seed(0)
    model = ConceptMoE(cfg).eval()
    L, B = 37, 2
    ids = torch.randint(0, cfg.vocab_size, (B, L + 5))
    with torch.inference_mode():
        out = model(ids[:, :L], use_cache=True)
        assert fixed_router_concepts(L, R) == out.n_concepts // B
        assert out.state.kv_bytes() == kv_cache_bytes(cfg, L, R, dtype_bytes=4, batch=B)
        for t in range(L, L + 5):  # and after decoding a few tokens
            out = model(ids[:, t:t + 1], state=out.state)
        assert out.state.kv_bytes() == kv_cache_bytes(cfg, L + 5, R, dtype_bytes=4, batch=B)
    base = baseline_of(cfg)
    with torch.inference_mode():
        held = ConceptMoE(base).eval()(ids[:, :L], use_cache=True).state.kv_bytes()
    assert held == kv_cache_bytes(base, L, dtype_bytes=4, batch=B)
    if not concept:  # the concept model's cache is R times smaller (up to rounding)
        assert held["concept"] / kv_cache_bytes(cfg, L, R, batch=B)["concept"] == pytest.approx(L / fixed_router_concepts(L, R))


def test_headline_prediction_matches_the_issue():
    """Width 256, 24 layers, top-2 of 8: at 16k the attention map dominates, prefill ~2.8x at R=2."""
    base = headline_baseline()
    eff = ModelConfig.from_dict({**base.to_dict(), "chunk": {"router": "fixed", "target_ratio_text": 2.0},
                                 "joint_decoding": True})
    sp = predicted_speedups(base, eff, 16384, 2.0)
    assert sp["prefill"] == pytest.approx(2.8, abs=0.05)
    assert sp["kv_concept_model"] == pytest.approx(2.0, rel=1e-3)
    assert 1.0 < sp["kv_total"] < 2.0 and 2.0 < sp["decode"] < 3.0


@pytest.mark.parametrize("name,total", [("paper_vlm_60b", 60e9), ("paper_ct_90b", 90e9)])
def test_paper_scale_configs_land_on_the_stated_totals(repo_root, name, total):
    cfg = ModelConfig.from_yaml(repo_root / "configs" / "model" / f"{name}.yaml")
    counts = parameter_counts(baseline_of(cfg))
    assert counts.n_total == pytest.approx(total, rel=0.02)
    if name == "paper_vlm_60b":
        assert counts.n_activated == pytest.approx(2.5e9, rel=0.05)
    # the shipped reallocation is compute-matched (linear FLOPs within 2%)
    fb, fc = linear_flops_per_token(baseline_of(cfg))["all"], linear_flops_per_token(cfg)["all"]
    assert abs(fc / fb - 1) < 0.02


def test_decode_bytes_at_a_batch_by_hand():
    """Width 256, 24 layers, top-2 of 8, float32, 1000 cached tokens per row. Per layer:
    attention 256*256 + 2*256*64 + 256*256 = 163840, MoE router 256*8 = 2048, norms 512,
    one expert 3*256*512 = 393216; head 512*256 + final norm 256; KV 2*2*32*4 = 512 bytes
    per token and layer. The efficiency model's decoder adds the joint projectors
    (256*256 + 2*256*64 = 98304) and a norm (256)."""
    base = headline_baseline()
    eff = ModelConfig.from_dict({**base.to_dict(), "chunk": {"router": "fixed", "target_ratio_text": 2.0},
                                 "joint_decoding": True})
    layer, expert, head, L = 163840 + 2048 + 512, 393216, 512 * 256 + 256, 1000
    # batch 1 is the one-token model: top-2 experts per layer, every layer's KV cache
    b1 = decode_step_bytes(base, L)
    assert b1 == decode_step_bytes(base, L, batch=1)
    assert b1["weights"] == 4 * (24 * (layer + 2 * expert) + head) and b1["kv"] == 24 * 512 * L
    e1 = decode_step_bytes(eff, L, 2.0)
    tok = 2 * layer + 98304 + 256 + head
    assert e1["weights"] == pytest.approx(4 * (tok + 2 * 2 * expert + 22 * (layer + 2 * expert) / 2))
    assert e1["kv"] == pytest.approx(2 * 512 * L + 22 * 512 * (L / 2) / 2)
    # batch 8: expected distinct experts 8 * (1 - (6/8)^8) per token layer; the concept
    # model runs every step for the 4 rows that start a concept (8 * (1 - (6/8)^4) experts),
    # each reading its own half-length concept cache
    b8, e8 = decode_step_bytes(base, L, batch=8), decode_step_bytes(eff, L, 2.0, batch=8)
    assert b8["weights"] == pytest.approx(4 * (24 * (layer + 8 * (1 - 0.75 ** 8) * expert) + head))
    assert b8["kv"] == 8 * 24 * 512 * L
    assert e8["weights"] == pytest.approx(4 * (tok + 2 * 8 * (1 - 0.75 ** 8) * expert
                                               + 22 * (layer + 8 * (1 - 0.75 ** 4) * expert)))
    assert e8["kv"] == pytest.approx(8 * 2 * 512 * L + 4 * 22 * 512 * (L / 2))
    assert predicted_speedups(base, eff, L, 2.0, batch=8)["decode"] == pytest.approx(b8["all"] / e8["all"])
    assert expected_active_experts(8, 2, 1) == 2 and expected_active_experts(8, 2, 10 ** 4) == pytest.approx(8)


def test_cli_registration(repo_root, capsys):
    from conceptvlm.bench.flops import print_accounting, register
    from conceptvlm.bench.inference import register_bench

    report = print_accounting(str(repo_root / "configs/model/tiny.yaml"), 2.0, "topk", lengths=(64,))
    assert report["meta_device_total"] == report["concept"]["total"] and "compute match topk" in capsys.readouterr().out

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    register(sub)
    bench = sub.add_parser("bench").add_subparsers(dest="kind")
    register_bench(bench)
    a = parser.parse_args(["flops", "--config", "x.yaml", "--ratio", "2", "--match", "loops"])
    assert a.ratio == 2.0 and a.match == "loops" and callable(a.func)
    a = parser.parse_args(["bench", "inference", "--lengths", "1k", "2k", "--quick"])
    assert a.quick and a.lengths == [1024, 2048] and a.batch == [1] and a.repeats == 3  # parsed by the parser
    a = parser.parse_args(["bench", "inference", "--batch", "1", "8", "32"])
    assert a.batch == [1, 8, 32] and a.decode_steps == 200

