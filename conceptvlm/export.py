"""Self-contained model directories: ``config.yaml`` + ``model.safetensors`` + tokenizer.

``export_model`` works from any ZeRO stage and expert-parallel size (ZeRO-3 partitions
are gathered, sharded experts all-gathered back into ``[E, ...]`` weights) and writes
the keys of a plain :class:`ConceptVLM`. ``load_exported`` needs neither DeepSpeed nor
a process group.

Every export carries ``manifest.json`` (each file's size and sha256, written last), and
its weights are checked against it when loaded, so a truncated copy or flipped bytes stop
with one line instead of loading a silently different model. The text files (config,
tokenizer) are not: users edit them, and their parsers check them. Folders without a
manifest (written by older versions) still load.
"""
from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import yaml

from .config import VLMConfig
from .errors import UserError
from .manifest import MANIFEST, verify_manifest, write_manifest
from .vlm import ConceptVLM

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"


def vlm_config_dict(cfg: VLMConfig) -> dict[str, Any]:
    """``cfg.to_dict()`` without the tower's checkpoint path and open_clip tag: the weights
    travel in model.safetensors, so nothing need be fetched again."""
    d = cfg.to_dict()
    if d["vision"] is not None:
        d["vision"]["checkpoint"] = None
        d["vision"]["pretrained"] = None
    return d


def vlm_config_from_dict(d: dict[str, Any]) -> VLMConfig:
    """The config of an exported directory, through the one loader (``VLMConfig.from_dict``)."""
    return VLMConfig.from_dict(d)


def _gathered(model: torch.nn.Module):
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective (every rank calls it): the plain ConceptVLM state dict, in float32 on CPU."""
    from .expert_parallel import full_state_dict

    with _gathered(model):
        sd = full_state_dict(model)
        return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in sd.items()}


def save_model_dir(state: dict[str, torch.Tensor], cfg: VLMConfig, out_dir: str | Path, tokenizer=None,
                   extra_files: Optional[dict[str, str]] = None, overwrite: bool = False) -> Path:
    """Write a model directory atomically (temp dir, then rename). A non-empty ``out_dir``
    is replaced only with ``overwrite`` (``ConfigError`` otherwise, before writing)."""
    from safetensors.torch import save_file

    return write_model_dir(cfg, out_dir, lambda path: save_file(state, str(path)), tokenizer, extra_files, overwrite)


def write_model_dir(cfg: VLMConfig, out_dir: str | Path, write_weights: Callable[[Path], None], tokenizer=None,
                    extra_files: Optional[dict[str, str]] = None, overwrite: bool = False) -> Path:
    """:func:`save_model_dir` with the weights file written by ``write_weights(path)``
    (a streaming writer for models that do not fit in memory twice)."""
    from .checkpoint import check_replaceable, publish_folder

    out = Path(out_dir)
    check_replaceable(out, overwrite)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG).write_text(yaml.safe_dump(vlm_config_dict(cfg), sort_keys=False))
    try:
        write_weights(tmp / WEIGHTS)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion leaves nothing behind
        raise
    if tokenizer is not None:
        tokenizer.save(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    write_manifest(tmp)
    return publish_folder(tmp, out, overwrite)


def export_model(model: torch.nn.Module, cfg: VLMConfig, out_dir: str | Path, tokenizer=None,
                 train_config_yaml: Optional[str] = None, overwrite: bool = False) -> Optional[Path]:
    """Collective. ``model``: the (possibly DeepSpeed-wrapped or expert-parallel) ConceptVLM;
    ``overwrite``: replace a non-empty ``out_dir``."""
    model = getattr(model, "module", model)
    state = full_model_state(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = None
    if rank == 0:
        extra = {"train_config.yaml": train_config_yaml} if train_config_yaml else None
        path = save_model_dir(state, cfg, out_dir, tokenizer, extra, overwrite)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an exported model folder, after checking the folder against its
    manifest. :class:`UserError` (one line naming the file) for a damaged folder or a
    weights file that is not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if (path / MANIFEST).is_file():
        problem = verify_manifest(path, only=[WEIGHTS])
        if problem:
            raise UserError(f"{path}: the exported model is damaged: {problem}",
                            "export it again (or copy it again from where it was exported)")
    try:
        return load_file(str(path / WEIGHTS))
    except SafetensorError as e:
        raise UserError(f"{path / WEIGHTS} is not a readable safetensors file ({e})") from None


def load_exported(path: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """``(model, tokenizer)`` from an exported directory (this module's layout or the
    transformers one of ``export --hf``); the model is in eval mode. The tokenizer is None
    when the directory holds none."""
    from .data import load_tokenizer
    from .hf_export import read_model_dir

    path = Path(path)
    cfg_dict, prefix = read_model_dir(path)
    cfg = vlm_config_from_dict(cfg_dict)
    model = ConceptVLM(cfg)
    state = {k[len(prefix):]: v for k, v in load_weights(path).items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("patch_order")]
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device=device, dtype=dtype).eval()
    try:
        tok = load_tokenizer(path)
    except FileNotFoundError:
        tok = None
    return model, tok
