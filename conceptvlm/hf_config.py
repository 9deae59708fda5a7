"""What a transformers MoE checkpoint's ``config.json`` means as a :class:`ModelConfig`.

Four architectures, each with its own specifics (read from transformers' modelling
code, pinned in setup.cfg):

==================== ======================= ==================================================
architecture         attention               feed-forward
==================== ======================= ==================================================
OlmoeForCausalLM     RMSNorm over the whole  softmax top-k, ``norm_topk_prob`` (false in
                     q / k projection         OLMoE-1B-7B: gates do not sum to 1)
Qwen2MoeForCausalLM  q/k/v biases            softmax top-k, ``norm_topk_prob``; one shared
                                             expert of its own width times ``sigmoid(g . x)``
Qwen3MoeForCausalLM  RMSNorm per head        softmax top-k, ``norm_topk_prob``
MixtralForCausalLM   plain                   top-k renormalised (softmax over the top-k logits)
==================== ======================= ==================================================

Everything else they share: pre-norm RMSNorm blocks, SwiGLU experts, rotate-half RoPE
(the weight mapping turns it into our interleaved pairs), GQA. A field whose value the
model cannot reproduce (sliding windows, dense layers between MoE layers, a rope
scaling other than linear, another activation) is an :class:`HFImportError` naming it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig

ARCHITECTURES = {"OlmoeForCausalLM": "olmoe", "Qwen2MoeForCausalLM": "qwen2_moe",
                 "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"}
ROPE_TYPES = ("default", "linear")


class HFImportError(ConfigError):
    """A transformers checkpoint that cannot be imported faithfully (the message says why and where)."""


def read_architecture(model_dir: Path) -> str:
    """The checkpoint's family (``olmoe`` ...) from ``config.json``'s ``architectures``."""
    path = model_dir / "config.json"
    try:
        archs = json.loads(path.read_text()).get("architectures") or []
    except FileNotFoundError:
        raise HFImportError(f"{model_dir}: no config.json (not a transformers model directory)") from None
    except (json.JSONDecodeError, AttributeError) as e:
        raise HFImportError(f"{path}: not a JSON object ({e})") from None
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise HFImportError(f"{path}: architecture {arch!r} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch]


def load_hf_config(model_dir: Path):
    """transformers' own config object (it normalises older ``rope_theta`` / ``rope_scaling``
    fields into ``rope_parameters``)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)


def _refuse(cond: bool, field: str, value: Any, why: str) -> None:
    if cond:
        raise HFImportError(f"config.json field {field}={value!r} cannot be represented: {why}")


def _rope(hf) -> dict[str, Any]:
    rp = dict(getattr(hf, "rope_parameters", None) or {})
    kind = rp.get("rope_type", "default")
    _refuse(kind not in ROPE_TYPES, "rope_parameters.rope_type", kind,
            f"supported rope scalings are {', '.join(ROPE_TYPES)}")
    partial = rp.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) or 1.0
    _refuse(partial != 1.0, "partial_rotary_factor", partial, "RoPE rotates every head dimension here")
    return {"rope_base": float(rp.get("rope_theta", 10000.0)),
            "rope_scaling": float(rp["factor"]) if kind == "linear" else 1.0}


def _no_dense_layers(hf) -> None:
    """Qwen-MoE can interleave dense MLP layers; every layer here is a MoE layer."""
    only = list(getattr(hf, "mlp_only_layers", None) or [])
    _refuse(bool(only), "mlp_only_layers", only, "every layer is a MoE layer here")
    step = getattr(hf, "decoder_sparse_step", 1)
    _refuse(step != 1, "decoder_sparse_step", step, "every layer is a MoE layer here")


def _no_sliding_window(hf) -> None:
    if hasattr(hf, "use_sliding_window"):
        _refuse(bool(hf.use_sliding_window), "use_sliding_window", hf.use_sliding_window,
                "attention is full-length here")
    else:
        sw = getattr(hf, "sliding_window", None)
        _refuse(sw is not None, "sliding_window", sw, "attention is full-length here")


def architecture_fields(hf, family: str) -> dict[str, Any]:
    """The :class:`ModelConfig` fields a checkpoint fixes (a nested mapping: ``moe`` inside).

    The layer split, chunking, reallocation and losses are the train config's business.
    """
    act = getattr(hf, "hidden_act", "silu")
    _refuse(act != "silu", "hidden_act", act, "experts are SwiGLU (silu) here")
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    fields: dict[str, Any] = {
        "vocab_size": hf.vocab_size, "d_model": hf.hidden_size, "n_heads": heads,
        "n_kv_heads": getattr(hf, "num_key_value_heads", None) or heads,
        "head_dim": None if head_dim * heads == hf.hidden_size else head_dim,
        "max_seq_len": hf.max_position_embeddings, "norm_eps": float(hf.rms_norm_eps),
        "tie_embeddings": bool(getattr(hf, "tie_word_embeddings", False)), **_rope(hf),
        "qkv_bias": False, "attn_out_bias": False, "qk_norm": "none",
    }
    n_experts = getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts")
    moe: dict[str, Any] = {"n_experts": n_experts, "top_k": hf.num_experts_per_tok, "n_shared_experts": 0,
                           "shared_expert_hidden": None, "shared_expert_gate": False}
    if family == "olmoe":
        _refuse(getattr(hf, "clip_qkv", None) is not None, "clip_qkv", hf.clip_qkv, "q/k/v are not clipped here")
        bias = bool(getattr(hf, "attention_bias", False))
        fields.update(qk_norm="full", qkv_bias=bias, attn_out_bias=bias)
        moe.update(expert_hidden=hf.intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob))
    elif family in ("qwen2_moe", "qwen3_moe"):
        _no_dense_layers(hf)
        _no_sliding_window(hf)
        moe.update(expert_hidden=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob))
        if family == "qwen2_moe":
            fields["qkv_bias"] = bool(getattr(hf, "qkv_bias", True))
            shared = getattr(hf, "shared_expert_intermediate_size", 0) or 0
            if shared:
                moe.update(n_shared_experts=1, shared_expert_hidden=shared, shared_expert_gate=True)
        else:
            bias = bool(getattr(hf, "attention_bias", False))
            fields.update(qk_norm="head", qkv_bias=bias, attn_out_bias=bias)
    else:  # mixtral
        _no_sliding_window(hf)
        moe.update(expert_hidden=hf.intermediate_size, norm_topk_prob=True)
    fields["moe"] = moe
    return fields


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_configs(fields: dict[str, Any], train_model: ModelConfig, n_layers: int) -> tuple[ModelConfig, ModelConfig]:
    """``(baseline, target)``: the checkpoint as a plain MoE (router ``none``), and the
    ConceptMoE the train config asks for (its split, chunking and reallocation over the
    checkpoint's architecture)."""
    base = ModelConfig.from_dict(_merged(fields, {
        "n_encoder_layers": 0, "n_concept_layers": n_layers, "n_decoder_layers": 0, "joint_decoding": False,
        "chunk": {"router": "none"}}))
    target = ModelConfig.from_dict(_merged(train_model.to_dict(), fields))
    if target.n_layers != n_layers:
        raise HFImportError(f"the train config splits {target.n_layers} layers (n_encoder_layers + n_concept_layers + "
                            f"n_decoder_layers) but the checkpoint has num_hidden_layers={n_layers}")
    return base, target
