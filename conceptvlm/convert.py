"""Continual-training conversion: a baseline MoE (router ``none``) becomes a ConceptMoE.

The baseline's ``n`` layers, in order, are re-split into the target's encoder /
concept / decoder layers (``n_encoder + n_concept + n_decoder == n``); embeddings, norm
and head are copied; the new chunk router keeps its own init (cosine: identity
projections) and the decoder's joint-decoding projectors ``U*`` are zero. With every
token a boundary and no reallocation the converted model computes the baseline's
function (DESIGN.md §3, conversion identity). Reallocation that keeps weight shapes
(``concept.top_k``, ``concept.loops``) is allowed and measured with
:func:`held_out_loss_change`, not assumed harmless; a wider concept model is refused.

The written directory has the exported layout (``export.py``) plus, when a train
config was given, ``train.yaml``: that config with ``train.init_from`` pointing at the
directory and ``ratio_schedule.enabled`` so training moves the target ratio from just
above 1 to R.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import yaml

from .checkpoint import check_replaceable
from .config import ConfigError, ModelConfig, VLMConfig
from .export import load_exported, save_model_dir
from .train_config import TrainConfig, load_train_config
from .vlm import ConceptVLM

NEW_PARAM_MARKERS = ("lm.router.", ".attn.uqkv.", ".z_norm.")


def block_prefixes(cfg: ModelConfig, root: str = "lm.") -> list[str]:
    """State-dict prefixes of the layers in execution order (encoder, concept, decoder)."""
    return ([f"{root}encoder.{i}." for i in range(cfg.n_encoder_layers)]
            + [f"{root}concept_model.layers.{i}." for i in range(cfg.n_concept_layers)]
            + [f"{root}decoder.{i}." for i in range(cfg.n_decoder_layers)])


def _check_compatible(base: ModelConfig, target: ModelConfig) -> None:
    if base.chunk.router != "none":
        raise ConfigError(f"baseline must be a plain MoE (chunk.router none), got router {base.chunk.router!r}")
    if target.n_layers != base.n_layers:
        raise ConfigError(f"target has {target.n_layers} layers (encoder+concept+decoder), baseline {base.n_layers}")
    for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "tie_embeddings"):
        if getattr(target, name) != getattr(base, name):
            raise ConfigError(f"model.{name} differs: baseline {getattr(base, name)}, target {getattr(target, name)}")
    for name in ("n_experts", "expert_hidden", "n_shared_experts"):
        if getattr(target.moe, name) != getattr(base.moe, name):
            raise ConfigError(f"model.moe.{name} differs from the baseline")
    if (target.concept_d_model, target.concept_expert_hidden, target.concept_n_heads, target.concept_n_kv_heads) != \
            (base.d_model, base.moe.expert_hidden, base.n_heads, base.n_kv_heads):
        raise ConfigError("conversion cannot change the concept model's width or expert size "
                          "(reallocate with concept.top_k or concept.loops instead)")


def load_target(config: Union[str, Path, TrainConfig, ModelConfig],
                overrides: Optional[list[str]] = None) -> tuple[Optional[TrainConfig], ModelConfig]:
    """``(train config or None, target model config)`` from a train YAML or a config object."""
    if isinstance(config, ModelConfig):
        return None, config
    tcfg = config if isinstance(config, TrainConfig) else load_train_config(config, overrides)
    return tcfg, tcfg.model


def train_yaml_for(tcfg: TrainConfig, out: Path, model: Optional[ModelConfig] = None,
                   tokenizer_dir: Optional[Path] = None) -> str:
    """The train config to continue from the converted directory ``out``: ``init_from``
    set, the ratio warm-up on (target ratio from just above 1 to R), and optionally the
    converted model's config and tokenizer."""
    d = tcfg.to_dict()
    d["model_file"] = None
    if model is not None:
        d["model"] = model.to_dict()
    if tokenizer_dir is not None:
        d["data"]["tokenizer"] = str(tokenizer_dir.resolve())
    d["train"]["init_from"] = str(out.resolve())
    d["ratio_schedule"]["enabled"] = True
    return yaml.safe_dump(d, sort_keys=False)


def convert_state(base_state: dict[str, torch.Tensor], base: ModelConfig, target: ModelConfig,
                  new_model: ConceptVLM) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map baseline keys onto the target's layer split; returns (state, dropped keys)."""
    src_pref, dst_pref = block_prefixes(base), block_prefixes(target)
    target_keys = set(new_model.state_dict())
    out, dropped = {}, []
    for k, v in base_state.items():
        nk = k
        for s, d in zip(src_pref, dst_pref):
            if k.startswith(s):
                nk = d + k[len(s):]
                break
        if any(m in nk for m in NEW_PARAM_MARKERS) or nk not in target_keys:
            if ".attn.uqkv." in k and bool(v.abs().max() > 0):
                raise ConfigError(f"baseline parameter {k} is non-zero: a model trained with joint decoding is "
                                  "not a plain MoE baseline (train the baseline with model.joint_decoding=false)")
            dropped.append(k)  # baseline joint projectors / router: the target starts them fresh
            continue
        out[nk] = v
    return out, dropped


def convert_baseline(baseline_dir: Union[str, Path], config: Union[str, Path, TrainConfig, ModelConfig],
                     out_dir: Union[str, Path], overrides: Optional[list[str]] = None, overwrite: bool = False) -> Path:
    """Write a ConceptMoE model directory converted from an exported baseline MoE.

    ``config``: a train YAML (its ``model`` is the target; ``train.yaml`` is written next to
    the weights) or a :class:`TrainConfig` / :class:`ModelConfig`. A non-empty ``out_dir``
    is replaced only with ``overwrite``.
    """
    check_replaceable(out_dir, overwrite)
    base_model, tok = load_exported(baseline_dir)
    bcfg: VLMConfig = base_model.config
    tcfg, target = load_target(config, overrides)
    _check_compatible(bcfg.model, target)
    vcfg = dataclasses.replace(bcfg, model=target)
    torch.manual_seed(0)
    new = ConceptVLM(vcfg)
    state, dropped = convert_state(base_model.state_dict(), bcfg.model, target, new)
    missing, unexpected = new.load_state_dict(state, strict=False)
    bad = [k for k in missing if not any(m in k for m in NEW_PARAM_MARKERS) and not k.endswith("patch_order")]
    if bad or unexpected:
        raise RuntimeError(f"conversion left parameters unset: {bad[:5]} / unexpected {unexpected[:5]}")
    extra = {"conversion.yaml": yaml.safe_dump({"baseline": str(baseline_dir), "dropped_keys": dropped,
                                                "new_parameters": sorted(missing)}, sort_keys=False)}
    out = Path(out_dir)
    if tcfg is not None:
        extra["train.yaml"] = train_yaml_for(tcfg, out)
    full = {k: v.detach().float().clone().contiguous() for k, v in new.state_dict().items() if not k.endswith("patch_order")}
    return save_model_dir(full, vcfg, out, tok, extra, overwrite)


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted next-token loss of ``model`` (eval mode) over packed batches."""
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        out = model(input_ids=b["input_ids"], labels=b["labels"], doc_ids=b.get("doc_ids"), images=b.get("images"))
        total += float(out.lm_loss) * out.n_label_tokens
        n += out.n_label_tokens
    return total / max(n, 1)


def held_out_loss_change(baseline_dir: Union[str, Path], converted_dir: Union[str, Path],
                         batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Held-out LM loss of the baseline and of the converted model right after conversion."""
    base, _ = load_exported(baseline_dir)
    conv, _ = load_exported(converted_dir)
    b, c = held_out_loss(base, batches), held_out_loss(conv, batches)
    return {"baseline_loss": b, "converted_loss": c, "delta": c - b}


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``conceptvlm convert (--baseline DIR | --from-hf PATH_OR_HUB_ID) --config FILE --out DIR [key=value ...]``."""
    p = subparsers.add_parser("convert", help="turn a baseline MoE or a transformers MoE checkpoint into a ConceptMoE")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--baseline", help="exported baseline model directory (router none)")
    src.add_argument("--from-hf", help="transformers OLMoE / Qwen2-MoE / Qwen3-MoE / Mixtral directory or hub id")
    p.add_argument("--config", required=True, help="train YAML whose model section is the target")
    p.add_argument("--out", required=True, help="output model directory (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written weights (--from-hf)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the train config")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    try:
        if args.from_hf:
            from .hf_import import convert_from_hf

            rep = convert_from_hf(args.from_hf, args.config, args.out, args.overrides, args.dtype,
                                  overwrite=args.overwrite)
            out = rep.out_dir
            print(f"{rep.family}: {rep.parameters / 1e6:.1f}M parameters in {rep.seconds:.1f}s; checkpoint "
                  f"{rep.checkpoint_bytes / 2**30:.2f} GiB, peak RSS {rep.peak_rss_bytes / 2**30:.2f} GiB "
                  f"({rep.peak_rss_bytes / max(rep.checkpoint_bytes, 1):.2f}x)"
                  + (f"; tokens added: {' '.join(rep.added_tokens)}" if rep.added_tokens else ""))
        else:
            out = convert_baseline(args.baseline, args.config, args.out, args.overrides, overwrite=args.overwrite)
    except ConfigError as e:  # refused checkpoints too (HFImportError, CheckpointError); the rest: cli.main
        print(f"config error: {e}")
        return 2
    print(f"converted {args.baseline or args.from_hf} -> {out}; continue training with: "
          f"conceptvlm train --config {Path(out) / 'train.yaml'}")
    return 0
