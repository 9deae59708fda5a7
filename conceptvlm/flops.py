"""Compute accounting: parameters, activated FLOPs, attention-map FLOPs, KV-cache bytes.

Everything is computed from a :class:`ModelConfig` alone (no weights); the counts are
checked against a model built on the meta device (:func:`built_parameter_counts`).

Definitions (per token, batch 1):

* **parts** of the parameters: ``embedding`` (input table), ``lm_head`` (0 when tied),
  ``attention`` (wqkv wo), ``joint_projectors`` (uqkv of the decoder),
  ``moe_router`` (expert gate), ``experts`` (routed SwiGLU experts), ``shared_experts``,
  ``chunk_router`` (the chunk module), ``concept_projections`` (proj_in / proj_out of a
  widened concept model) and ``norms``.
* **activated** parameters: the weights one token touches: top-k of the routed experts,
  everything else whole. Concept-model weights count once even when looped.
* **linear FLOPs per token** = ``2 x`` activated params of every matmul a token runs
  (the embedding lookup and the norms are not matmuls and count 0; ``lm_head`` counts).
  The concept model runs once per *concept*: its part is scaled by ``1/R``, and its
  layers (not the projections) by ``loops``. With router ``none``, ``R = 1``.
* **attention-map FLOPs** of a causal prefill of length L: ``QK^T`` and ``AV`` over the
  ``L(L+1)/2`` unmasked pairs, ``2 x 2 x n_heads x head_dim`` per pair per layer;
  token-level layers at L, concept layers at ``M ~ L/R`` (x loops).
* **KV-cache bytes**: ``2 x n_kv_heads x head_dim x length x dtype_bytes`` per layer;
  token-level layers hold L entries, each concept layer (x loops: every loop has its
  own cache) holds M. Same keys as ``InferenceState.kv_bytes()``.

The paper matches *activated FLOPs excluding the attention map* and *total parameters*
between a baseline MoE and ConceptMoE (:func:`match_compute`; one function per
strategy: :func:`match_topk`, :func:`match_loops`, :func:`match_width`). The printed
report is ``conceptvlm flops`` (``bench/flops.py``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from .config import ModelConfig

PARTS = ("embedding", "lm_head", "attention", "joint_projectors", "moe_router", "experts",
         "shared_experts", "chunk_router", "concept_projections", "norms")
NOT_MATMUL = ("embedding", "norms")  # parts that cost no linear-layer FLOPs
STRATEGIES = ("topk", "loops", "width")


# ----------------------------------------------------------------------------- helpers
def effective_ratio(cfg: ModelConfig, ratio: Optional[float] = None) -> float:
    """Tokens per concept: 1 for router ``none``, else ``ratio`` (default the text target)."""
    if cfg.chunk.router == "none":
        return 1.0
    return float(ratio if ratio is not None else cfg.chunk.target_ratio_text)


def fixed_router_concepts(length: int, ratio: float) -> int:
    """Concepts the ``fixed`` router makes in one document of ``length`` tokens:
    a boundary where ``floor(pos / R)`` changes, i.e. ``floor((L-1)/R) + 1``."""
    return 0 if length <= 0 else int(math.floor((length - 1) / ratio)) + 1


def n_concepts(cfg: ModelConfig, length: int, ratio: Optional[float] = None) -> float:
    """Concepts for ``length`` tokens: exact for ``none``/``fixed``, ``L/R`` otherwise."""
    R = effective_ratio(cfg, ratio)
    if cfg.chunk.router == "none":
        return float(length)
    if cfg.chunk.router == "fixed":
        return float(fixed_router_concepts(length, R))
    return length / R


def _zeros() -> dict[str, float]:
    return {p: 0 for p in PARTS}


def _block(d: int, n_heads: int, n_kv: int, n_experts: int, top_k: int, hidden: int, n_shared: int,
           joint: bool, opts: dict) -> tuple[dict, dict]:
    """(total, activated) parameters of one :class:`conceptvlm.block.Block`, by part
    (``opts``: :meth:`ModelConfig.layer_options`)."""
    hd = opts["head_dim"] or d // n_heads
    q, kv = n_heads * hd, n_kv * hd
    tot, act = _zeros(), _zeros()
    tot["attention"] = d * q + 2 * d * kv + q * d + (q + 2 * kv if opts["qkv_bias"] else 0) \
        + (d if opts["out_bias"] else 0)
    tot["joint_projectors"] = (d * q + 2 * d * kv) if joint else 0
    qk_norm = {"none": 0, "full": q + kv, "head": 2 * hd}[opts["qk_norm"]]
    tot["norms"] = 2 * d + (d if joint else 0) + qk_norm
    tot["moe_router"] = d * n_experts
    tot["experts"] = 3 * n_experts * d * hidden
    shared = (opts["shared_hidden"] or hidden * n_shared) if n_shared else 0
    tot["shared_experts"] = 3 * d * shared + (d if opts["shared_gate"] and n_shared else 0)
    act.update(tot)
    act["experts"] = 3 * top_k * d * hidden
    return tot, act


def _add(acc: dict, part: dict, times: float = 1.0) -> None:
    for k, v in part.items():
        acc[k] += v * times


def _stages(cfg: ModelConfig) -> dict[str, dict[str, dict]]:
    """Per stage (``token``: embedding, encoder, chunk router, decoder, head;
    ``concept_layers``: one pass of the concept layers; ``concept_io``: proj in/out),
    the ``total`` and ``activated`` parameters by part."""
    m, d, V = cfg.moe, cfg.d_model, cfg.vocab_size
    out = {s: {"total": _zeros(), "activated": _zeros()} for s in ("token", "concept_layers", "concept_io")}
    tok = out["token"]
    for k in ("total", "activated"):
        tok[k]["embedding"] = V * d
        tok[k]["lm_head"] = 0 if cfg.tie_embeddings else V * d
        tok[k]["norms"] = d  # final norm
        tok[k]["chunk_router"] = {"cosine": 2 * d * d, "linear": 2 * d + 1}.get(cfg.chunk.router, 0)
    opts = cfg.layer_options()
    enc = _block(d, cfg.n_heads, cfg.n_kv_heads, m.n_experts, m.top_k, m.expert_hidden, m.n_shared_experts, False,
                 opts)
    dec = _block(d, cfg.n_heads, cfg.n_kv_heads, m.n_experts, m.top_k, m.expert_hidden, m.n_shared_experts,
                 cfg.joint_decoding, opts)
    for i, k in enumerate(("total", "activated")):
        _add(tok[k], enc[i], cfg.n_encoder_layers)
        _add(tok[k], dec[i], cfg.n_decoder_layers)
    dc = cfg.concept_d_model
    con = _block(dc, cfg.concept_n_heads, cfg.concept_n_kv_heads, m.n_experts, cfg.concept_top_k,
                 cfg.concept_expert_hidden, m.n_shared_experts, False, cfg.layer_options(concept=True))
    for i, k in enumerate(("total", "activated")):
        _add(out["concept_layers"][k], con[i], cfg.n_concept_layers)
        out["concept_io"][k]["concept_projections"] = 2 * d * dc if dc != d else 0
    return out


# ---------------------------------------------------------------------- parameters
@dataclass
class ParamCounts:
    """Parameters by part (see module docstring); ``concept_*`` is the concept model's share."""

    total: dict[str, int]
    activated: dict[str, int]
    concept_total: dict[str, int]
    concept_activated: dict[str, int]

    @property
    def n_total(self) -> int:
        return sum(self.total.values())

    @property
    def n_activated(self) -> int:
        return sum(self.activated.values())

    @property
    def n_activated_non_embedding(self) -> int:
        """Activated parameters excluding the input embedding and the LM head."""
        return self.n_activated - self.activated["embedding"] - self.activated["lm_head"]


def parameter_counts(cfg: ModelConfig) -> ParamCounts:
    """Total and activated parameters of the model ``cfg`` builds, by part."""
    st = _stages(cfg)
    res = {}
    for k in ("total", "activated"):
        whole, conc = _zeros(), _zeros()
        for s in st:
            _add(whole, st[s][k])
        _add(conc, st["concept_layers"][k])
        _add(conc, st["concept_io"][k])
        res[k] = ({p: int(v) for p, v in whole.items()}, {p: int(v) for p, v in conc.items()})
    return ParamCounts(res["total"][0], res["activated"][0], res["total"][1], res["activated"][1])


def _part_of(name: str) -> str:
    if name == "embed.weight":
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("router."):
        return "chunk_router"
    if name.startswith(("concept_model.proj_in", "concept_model.proj_out")):
        return "concept_projections"
    if "norm" in name.split(".")[-2]:
        return "norms"
    if ".attn.uqkv." in name:
        return "joint_projectors"
    if ".attn." in name:
        return "attention"
    if ".moe.router." in name:
        return "moe_router"
    if ".moe.experts." in name:
        return "experts"
    if ".moe.shared." in name or ".moe.shared_gate." in name:
        return "shared_experts"
    raise KeyError(f"no accounting part for parameter {name!r}")


def built_parameter_counts(cfg: ModelConfig, device: str = "meta") -> dict[str, int]:
    """Build ``ConceptMoE(cfg)`` (on the meta device: no memory, any size) and sum
    ``numel`` of its parameters by part; tied weights count once."""
    import torch

    from .model import ConceptMoE

    with torch.device(device):
        model = ConceptMoE(cfg)
    counts = {p: 0 for p in PARTS}
    for name, p in model.named_parameters():  # deduplicates tied parameters
        counts[_part_of(name)] += p.numel()
    return counts


# ------------------------------------------------------------------------- FLOPs
def linear_flops_per_token(cfg: ModelConfig, ratio: Optional[float] = None) -> dict[str, float]:
    """Activated linear-layer FLOPs per token, by part, plus ``concept_model`` (its share)
    and ``all``. Concept-model parts are scaled by ``1/R`` (and its layers by ``loops``)."""
    R = effective_ratio(cfg, ratio)
    st = _stages(cfg)
    flops = _zeros()
    _add(flops, st["token"]["activated"], 2.0)
    conc = _zeros()
    _add(conc, st["concept_layers"]["activated"], 2.0 * cfg.concept.loops / R)
    _add(conc, st["concept_io"]["activated"], 2.0 / R)
    _add(flops, conc)
    for p in NOT_MATMUL:
        flops[p] = 0.0
        conc[p] = 0.0
    flops = {p: float(v) for p, v in flops.items()}
    flops["concept_model"] = float(sum(conc.values()))
    flops["all"] = float(sum(flops[p] for p in PARTS))
    return flops


def _attn_width(cfg: ModelConfig, concept: bool) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) of token-level or concept layers."""
    if concept:
        return cfg.concept_n_heads, cfg.concept_n_kv_heads, cfg.concept_head_dim
    return cfg.n_heads, cfg.n_kv_heads, cfg.attn_head_dim


def attention_map_flops(cfg: ModelConfig, length: int, ratio: Optional[float] = None,
                        concepts: Optional[float] = None) -> dict[str, float]:
    """FLOPs of ``QK^T`` and ``AV`` for a causal prefill of ``length`` tokens (batch 1):
    ``{"token_layers", "concept_layers", "all"}``. ``concepts`` overrides ``M``."""
    M = n_concepts(cfg, length, ratio) if concepts is None else concepts
    h, _, hd = _attn_width(cfg, False)
    hc, _, hdc = _attn_width(cfg, True)
    tok = (cfg.n_encoder_layers + cfg.n_decoder_layers) * 4.0 * h * hd * length * (length + 1) / 2
    con = cfg.n_concept_layers * cfg.concept.loops * 4.0 * hc * hdc * M * (M + 1) / 2
    return {"token_layers": tok, "concept_layers": con, "all": tok + con}


def prefill_flops(cfg: ModelConfig, length: int, ratio: Optional[float] = None) -> dict[str, float]:
    """Linear + attention-map FLOPs of a prefill of ``length`` tokens (batch 1)."""
    lin = linear_flops_per_token(cfg, ratio)["all"] * length
    att = attention_map_flops(cfg, length, ratio)["all"]
    return {"linear": lin, "attention_map": att, "all": lin + att}


def kv_cache_bytes(cfg: ModelConfig, length: int, ratio: Optional[float] = None, dtype_bytes: int = 4,
                   batch: int = 1, concepts: Optional[float] = None) -> dict[str, float]:
    """KV cache held after ``length`` tokens: ``{"encoder", "concept", "decoder", "total"}``
    (the keys of ``InferenceState.kv_bytes()``). ``concepts`` overrides ``M``."""
    M = n_concepts(cfg, length, ratio) if concepts is None else concepts
    _, kv, hd = _attn_width(cfg, False)
    _, kvc, hdc = _attn_width(cfg, True)
    per_tok = 2 * batch * kv * hd * dtype_bytes
    out = {"encoder": cfg.n_encoder_layers * per_tok * length,
           "concept": cfg.n_concept_layers * cfg.concept.loops * 2 * batch * kvc * hdc * dtype_bytes * M,
           "decoder": cfg.n_decoder_layers * per_tok * length}
    out["total"] = out["encoder"] + out["concept"] + out["decoder"]
    return out


def decode_step_flops(cfg: ModelConfig, context: int, ratio: Optional[float] = None) -> float:
    """Average FLOPs of one decode step at ``context`` cached tokens: linear FLOPs per token
    plus one query's attention; the concept model runs on a ``1/R`` share of the steps
    over ``context/R`` cached concepts."""
    R = effective_ratio(cfg, ratio)
    h, _, hd = _attn_width(cfg, False)
    hc, _, hdc = _attn_width(cfg, True)
    att = (cfg.n_encoder_layers + cfg.n_decoder_layers) * 4.0 * h * hd * context
    att += cfg.n_concept_layers * cfg.concept.loops * 4.0 * hc * hdc * (context / R) / R
    return linear_flops_per_token(cfg, R)["all"] + att


def expected_active_experts(n_experts: int, top_k: int, tokens: float) -> float:
    """Distinct experts one MoE layer reads for ``tokens`` tokens in one call:
    ``E * (1 - (1 - k/E)^tokens)``, the expectation when every token picks its top-k
    independently and uniformly (``k`` at one token, towards ``E`` as the batch grows).
    A trained router is neither uniform nor independent; this is the load-balanced case."""
    if tokens <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def _weights_read(stage: dict, n_experts: int, top_k: int, tokens: float) -> float:
    """Matmul parameters a stage reads in one call over ``tokens`` tokens: every weight
    but the routed experts once, and each expert some token activates once (the
    embedding is a lookup: one row per token, not counted)."""
    once = sum(v for p, v in stage["activated"].items() if p not in ("embedding", "experts"))
    return once + stage["total"]["experts"] * expected_active_experts(n_experts, top_k, tokens) / n_experts


def decode_step_bytes(cfg: ModelConfig, context: int, ratio: Optional[float] = None,
                      dtype_bytes: int = 4, batch: int = 1) -> dict[str, float]:
    """Average bytes read per decode step of ``batch`` rows at ``context`` cached tokens each.

    Weights are read once per step for the whole batch: every matmul weight of the
    token-level layers and head, and the routed experts some row activates
    (:func:`expected_active_experts`). The concept model runs for the rows that start a
    concept; with the rows' boundaries spread evenly over the period (the benchmark
    staggers them) that is ``b/R`` rows on a ``min(1, b/R)`` share of the steps (batch 1:
    one row on ``1/R`` of the steps), its layers once per loop. The KV cache is read per
    row by every layer that runs for it (concept layers hold ``context/R`` entries)."""
    R = effective_ratio(cfg, ratio)
    st = _stages(cfg)
    E = cfg.moe.n_experts
    share = min(1.0, batch / R)  # steps on which some row starts a concept
    rows = batch / (R * share)  # rows that start one on such a step
    w = _weights_read(st["token"], E, cfg.moe.top_k, batch)
    w += share * (cfg.concept.loops * _weights_read(st["concept_layers"], E, cfg.concept_top_k, rows)
                  + _weights_read(st["concept_io"], E, cfg.concept_top_k, rows))
    kv = kv_cache_bytes(cfg, context, R, dtype_bytes, batch=batch, concepts=context / R)
    kv_read = kv["encoder"] + kv["decoder"] + kv["concept"] / R
    return {"weights": w * dtype_bytes, "kv": kv_read, "all": w * dtype_bytes + kv_read}


def predicted_speedups(baseline: ModelConfig, concept: ModelConfig, length: int, ratio: float,
                       dtype_bytes: int = 4, batch: int = 1) -> dict[str, float]:
    """Predicted ConceptMoE speedups over the baseline at ``length``: prefill (batch 1)
    from FLOPs, decode of ``batch`` rows from bytes moved per step, and the KV-cache
    reductions."""
    kb, kc = kv_cache_bytes(baseline, length, dtype_bytes=dtype_bytes), kv_cache_bytes(concept, length, ratio,
                                                                                      dtype_bytes)
    return {
        "prefill": prefill_flops(baseline, length)["all"] / prefill_flops(concept, length, ratio)["all"],
        "decode": decode_step_bytes(baseline, length, dtype_bytes=dtype_bytes, batch=batch)["all"]
        / decode_step_bytes(concept, length, ratio, dtype_bytes, batch=batch)["all"],
        "decode_flops": decode_step_flops(baseline, length) / decode_step_flops(concept, length, ratio),
        "kv_concept_model": kb["concept"] / max(kc["concept"], 1),
        "kv_total": kb["total"] / max(kc["total"], 1),
    }


# --------------------------------------------------------------- compute matching
def baseline_of(cfg: ModelConfig) -> ModelConfig:
    """The plain MoE a ConceptMoE config is compared with: same layers, router ``none``,
    no joint decoding, no reallocation."""
    d = copy.deepcopy(cfg.to_dict())
    d["chunk"]["router"] = "none"
    d["joint_decoding"] = False
    d["concept"] = {}
    return ModelConfig.from_dict(d)


@dataclass
class MatchResult:
    """A compute-matched ConceptMoE proposal and how far it is from the baseline."""

    strategy: str
    ratio: float
    config: ModelConfig
    knob: dict  # the concept settings proposed, e.g. {"top_k": 4}
    ideal: float  # the real-valued knob that would match exactly
    flops_baseline: float  # linear FLOPs per token (attention map excluded)
    flops_concept: float
    flops_mismatch_pct: float  # 100 * (concept - baseline) / baseline
    flops_tolerance_pct: float  # half of one knob step: the best an integer knob can guarantee
    params_baseline: int
    params_concept: int
    params_mismatch_pct: float
    note: str = ""
    candidates: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.strategy}: {self.knob} (ideal {self.ideal:.3g}) -> activated FLOPs "
                f"{self.flops_mismatch_pct:+.2f}% (tolerance ±{self.flops_tolerance_pct:.2f}%), total params "
                f"{self.params_mismatch_pct:+.2f}%. {self.note}")


def concept_config(base: dict, R: float, router: str, joint: bool, **concept) -> ModelConfig:
    """The ConceptMoE of a baseline's config dict at ratio ``R`` with these concept settings."""
    d = copy.deepcopy(base)
    d["chunk"]["router"] = router
    d["chunk"]["target_ratio_text"] = R
    d["joint_decoding"] = joint
    d["concept"] = concept
    return ModelConfig.from_dict(d)


@dataclass
class _Matching:
    """What a strategy needs: the baseline, builders and the FLOPs target."""

    base: ModelConfig
    build: Callable[..., ModelConfig]  # concept settings -> ConceptMoE config
    flops: Callable[[ModelConfig], float]  # linear FLOPs per token at R
    target: float  # the baseline's
    max_loops: int
    max_width_factor: float


# Each strategy returns (candidates [(knob, config)], ideal knob value, FLOPs of one knob step, note).
def match_topk(m: _Matching) -> tuple[list, float, float, str]:
    """More activated experts per concept (integer top-k, at most ``n_experts``)."""
    lo, hi = m.flops(m.build(top_k=1)), m.flops(m.build(top_k=2))
    step = hi - lo
    ideal = 1 + (m.target - lo) / step
    ks = sorted({min(max(int(math.floor(ideal)) + j, 1), m.base.moe.n_experts) for j in (0, 1)})
    return ([({"top_k": k}, m.build(top_k=k)) for k in ks], ideal, step,
            "total params match up to the chunk module and joint projectors; FLOPs move "
            "in steps of one expert per concept")


def match_loops(m: _Matching) -> tuple[list, float, float, str]:
    """The concept layers run ``n`` times with shared weights (at most ``max_loops``)."""
    lo, hi = m.flops(m.build(loops=1)), m.flops(m.build(loops=2))
    step = hi - lo
    ideal = 1 + (m.target - lo) / step
    ns = sorted({min(max(int(math.floor(ideal)) + j, 1), m.max_loops) for j in (0, 1)})
    return ([({"loops": n}, m.build(loops=n)) for n in ns], ideal, step,
            "total params match up to the chunk module and joint projectors; FLOPs move in "
            "steps of one pass over the concept layers (R far from an integer cannot match)")


def match_width(m: _Matching) -> tuple[list, float, float, str]:
    """A wider concept model: heads in steps of one GQA group, expert hidden fine-tuned."""
    base = m.base
    hd, group = base.attn_head_dim, base.n_heads // base.n_kv_heads  # the token layers' head size (head_dim if set)
    H = base.moe.expert_hidden
    widths, uniform = [], []
    h = base.n_heads
    while h * hd <= m.max_width_factor * base.d_model:  # heads in steps of one GQA group
        dc = h * hd
        widths.append(dict(d_model=dc, n_heads=h, n_kv_heads=h // group))
        hid = max(8, int(round(H * dc / base.d_model / 8)) * 8)
        uniform.append(m.flops(m.build(**widths[-1], expert_hidden=hid)))
        h += group
    # ideal width under uniform scaling (expert hidden ~ width), interpolated
    ideal, near = float(widths[-1]["d_model"]), len(widths) - 1
    for i in range(1, len(uniform)):
        if uniform[i - 1] <= m.target <= uniform[i]:
            w0, w1 = widths[i - 1]["d_model"], widths[i]["d_model"]
            ideal = w0 + (m.target - uniform[i - 1]) / (uniform[i] - uniform[i - 1]) * (w1 - w0)
            near = i - 1 if ideal - w0 < w1 - ideal else i
            break
    # at the nearest width, the expert hidden size (multiples of 8) fine-tunes the FLOPs
    knob = dict(widths[near])
    f8 = m.flops(m.build(**knob, expert_hidden=16)) - m.flops(m.build(**knob, expert_hidden=8))
    f0 = m.flops(m.build(**knob, expert_hidden=8)) - f8
    hid = max(8, int(round((m.target - f0) / f8)) * 8)
    cands = [({**knob, "expert_hidden": hh}, m.build(**knob, expert_hidden=hh)) for hh in (hid - 8, hid, hid + 8)
             if hh >= 8]
    return (cands, ideal, f8,
            "heads added at the same head dim, expert hidden fine-tuned in steps of 8; linear FLOPs "
            "and params both grow with width: matching FLOPs multiplies the concept model's params "
            "by ~R, so total params cannot match")


STRATEGY_FUNCTIONS = {"topk": match_topk, "loops": match_loops, "width": match_width}


def match_compute(baseline_cfg: ModelConfig, R: float, strategy: str = "topk", router: Optional[str] = None,
                  joint_decoding: bool = True, max_loops: int = 8, max_width_factor: float = 4.0) -> MatchResult:
    """Propose the concept model's reallocation so ConceptMoE at ratio ``R`` matches the
    baseline's activated linear FLOPs per token (attention map excluded) and total params.

    The baseline is ``baseline_of(baseline_cfg)`` (router ``none``, no joint decoding).
    What each strategy can match:

    * ``topk``: more activated experts per concept. Total params are unchanged, so they
      match up to the chunk module and joint projectors ConceptMoE adds; FLOPs match up
      to one expert step (integer top-k, at most ``n_experts``).
    * ``loops``: the concept layers run ``n`` times with shared weights. Params as for
      ``topk``; FLOPs move in steps of a whole pass over the concept layers, so only
      ``R`` near an integer matches (R = 1.5 cannot: 1 loop is -33%, 2 loops +33% of the
      concept model).
    * ``width``: a wider concept model (heads added at the same head dim, kv heads keeping
      the GQA group, expert hidden scaled alike, plus proj_in/out). Params and linear FLOPs
      of a layer both grow ~ width^2, so matching FLOPs (x R) also multiplies the concept
      model's params by ~R: total params cannot match (reported, not hidden).

    The residual mismatches are returned in % of the baseline.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if R <= 1:
        raise ValueError(f"R must be > 1, got {R}")
    base = baseline_of(baseline_cfg)
    bd = base.to_dict()
    router = router or (baseline_cfg.chunk.router if baseline_cfg.chunk.router != "none" else "cosine")
    m = _Matching(base=base, build=lambda **c: concept_config(bd, R, router, joint_decoding, **c),
                  flops=lambda c: linear_flops_per_token(c, R)["all"], target=linear_flops_per_token(base)["all"],
                  max_loops=max_loops, max_width_factor=max_width_factor)
    cands, ideal, step, note = STRATEGY_FUNCTIONS[strategy](m)
    best_knob, best_cfg = min(cands, key=lambda kc: abs(m.flops(kc[1]) - m.target))
    fc, target = m.flops(best_cfg), m.target
    p_base, p_c = parameter_counts(base).n_total, parameter_counts(best_cfg).n_total
    return MatchResult(strategy=strategy, ratio=R, config=best_cfg, knob=best_knob, ideal=float(ideal),
                       flops_baseline=target, flops_concept=fc, flops_mismatch_pct=100 * (fc - target) / target,
                       flops_tolerance_pct=100 * 0.5 * step / target + 1e-9, params_baseline=p_base,
                       params_concept=p_c, params_mismatch_pct=100 * (p_c - p_base) / p_base, note=note,
                       candidates=[k for k, _ in cands])
