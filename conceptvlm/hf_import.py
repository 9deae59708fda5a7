"""``conceptvlm convert --from-hf``: a transformers MoE checkpoint becomes a ConceptMoE.

The checkpoint (a local directory, or a hub id fetched through ``huggingface_hub`` and
read from its cache when ``HF_HUB_OFFLINE=1``) gives the architecture
(:mod:`conceptvlm.hf_config`), the weights (:mod:`conceptvlm.hf_weights`) and the
tokenizer; the train config gives the layer split, chunking and reallocation, as in
:func:`conceptvlm.convert.convert_baseline`. With router ``none`` the written model
computes the checkpoint's function; with any router, every token a boundary and the
zero-initialised joint projectors, too (the conversion identity).

Memory: the target model is built on the meta device (shapes only), the checkpoint is
read one layer at a time and the output written one tensor at a time, so peak memory is
about one layer plus the process itself, whatever the model's size.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import yaml

from .checkpoint import check_replaceable
from .config import ModelConfig, VLMConfig
from .convert import NEW_PARAM_MARKERS, _check_compatible, block_prefixes, load_target, train_yaml_for
from .export import write_model_dir
from .hf_config import HFImportError, architecture_fields, load_hf_config, model_configs, read_architecture
from .hf_weights import LayerMapper
from .safetensors_stream import ShardedReader, StreamingWriter
from .train_config import TrainConfig
from .vlm import ConceptVLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer; never pickles


@dataclass
class ImportReport:
    out_dir: Path
    family: str
    parameters: int
    checkpoint_bytes: int
    peak_rss_bytes: int  # of this process so far (ru_maxrss)
    seconds: float
    added_tokens: list[str]


def resolve_source(source: str) -> Path:
    """A local model directory as is; ``org/name`` through the hub (or its offline cache)."""
    p = Path(source)
    if p.is_dir():
        return p
    if p.exists() or source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise HFImportError(f"{source}: not a model directory, nor a hub id of the form org/name")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=HUB_FILES))
    except Exception as e:  # offline without a cached copy, unknown repo, no network: one line
        first = (str(e).splitlines() or [""])[0]
        raise HFImportError(f"{source}: not found on the hub or in its local cache ({type(e).__name__}: {first})") \
            from None


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _fresh_parameters(model: ConceptVLM, keys: list[str]) -> dict[str, torch.Tensor]:
    """Initial values of the parameters the checkpoint does not have (chunk router, joint
    projectors, their norms): the model's own init, applied to those modules alone."""
    lm = model.lm
    paths = sorted({k[len("lm."):].rsplit(".", 1)[0] for k in keys})
    for p in paths:
        lm.get_submodule(p).to_empty(device="cpu", recurse=False)
    torch.manual_seed(0)
    lm.reset_parameters(only=set(paths))
    state = model.state_dict()
    return {k: state[k] for k in keys}


def _dotlist(fields: dict, prefix: str) -> list[str]:
    """``{"moe": {"top_k": 8}}`` -> ``["model.moe.top_k=8"]`` (OmegaConf override syntax)."""
    out = []
    for k, v in fields.items():
        if isinstance(v, dict):
            out += _dotlist(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={'null' if v is None else v}")
    return out


def convert_from_hf(source: Union[str, Path], config: Union[str, Path, TrainConfig, ModelConfig],
                    out_dir: Union[str, Path], overrides: Optional[list[str]] = None,
                    dtype: Union[str, torch.dtype] = torch.float32, overwrite: bool = False) -> ImportReport:
    """Write a ConceptMoE model directory (``export.load_exported`` reads it) from a
    transformers OLMoE / Qwen2-MoE / Qwen3-MoE / Mixtral checkpoint; with a train config,
    also its ``train.yaml`` (ratio warm-up on, ``init_from`` and tokenizer set here). A
    non-empty ``out_dir`` is replaced only with ``overwrite``."""
    from .data.tokenizer import load_pretrained_tokenizer

    check_replaceable(out_dir, overwrite)
    t0 = time.time()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model_dir = resolve_source(str(source))
    family = read_architecture(model_dir)
    hf = load_hf_config(model_dir)
    reader = ShardedReader(model_dir)
    try:
        tok = load_pretrained_tokenizer(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise HFImportError(str(e)) from None
    fields = architecture_fields(hf, family)
    hf_vocab = fields["vocab_size"]
    fields["vocab_size"] = max(hf_vocab, tok.vocab_size)
    # The checkpoint's architecture goes in before the train config is validated (its
    # concept.top_k may only make sense with the checkpoint's expert count).
    arch = [] if isinstance(config, (TrainConfig, ModelConfig)) else _dotlist(fields, "model.")
    tcfg, train_model = load_target(config, list(overrides or []) + arch)
    if tcfg is not None and tcfg.vision is not None:
        raise HFImportError("the train config has a vision section: convert the language model with a text train "
                            "config, then add the tower in the VLM stage (train.init_from the converted directory)")
    base, target = model_configs(fields, train_model, hf.num_hidden_layers)
    _check_compatible(base, target)
    vcfg = VLMConfig(model=target, image_token_id=tok.image_id, image_start_id=tok.image_start_id,
                     image_end_id=tok.image_end_id)
    with torch.device("meta"):
        model = ConceptVLM(vcfg)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("patch_order")}
    new_keys = [k for k in state if any(m in k for m in NEW_PARAM_MARKERS)]
    fresh = _fresh_parameters(model, new_keys)

    prefixes = block_prefixes(target)
    layer_of = {k: next((i for i, p in enumerate(prefixes) if k.startswith(p)), -1) for k in state}
    order = sorted(state, key=lambda k: layer_of[k])  # model-level tensors, then layer by layer
    mapper = LayerMapper(reader, family, target)
    extra = {"conversion.yaml": yaml.safe_dump({
        "source": str(source), "architecture": family, "dtype": str(dtype).replace("torch.", ""),
        "added_tokens": tok.added, "new_parameters": sorted(new_keys)}, sort_keys=False)}
    if tcfg is not None:
        extra["train.yaml"] = train_yaml_for(tcfg, Path(out_dir), model=target, tokenizer_dir=Path(out_dir))

    def write_weights(path: Path) -> None:
        writer = StreamingWriter(path, [(k, dtype, tuple(state[k].shape)) for k in order])
        current, tensors = None, {}
        for k in order:
            i = layer_of[k]
            if i != current:  # the next layer (or the model-level tensors), read at once
                current = i
                tensors = ({"lm." + n: t for n, t in mapper.embeddings(hf_vocab, target.vocab_size,
                                                                       tok.added_ids).items()}
                           if i < 0 else {prefixes[i] + n: t for n, t in mapper.layer(i).items()})
            t = fresh[k] if k in fresh else tensors.pop(k, None)
            if t is None:
                raise HFImportError(f"{k}: nothing in the checkpoint maps to this parameter")
            writer.write(k, t)
        writer.close()
        unread = reader.unread(ignore=("rotary_emb.inv_freq",))  # old checkpoints saved that buffer
        if unread:  # a tensor the config did not announce (a bias, a norm): the model would differ
            raise HFImportError(f"checkpoint tensor {unread[0]} has no place in the converted model"
                                + (f" (and {len(unread) - 1} more)" if len(unread) > 1 else ""))

    write_model_dir(vcfg, out_dir, write_weights, tok, extra, overwrite)
    n_params = sum(v.numel() for k, v in state.items() if not (target.tie_embeddings and k == "lm.lm_head.weight"))
    return ImportReport(Path(out_dir), family, n_params, reader.nbytes, peak_rss_bytes(), time.time() - t0, tok.added)

