"""Model directories in the transformers layout, and telling the two layouts apart.

``conceptvlm export --hf OUT --checkpoint DIR`` turns an exported model (``config.yaml`` +
``model.safetensors``) into what the hub ecosystem reads:

* ``config.json``: transformers' config with ``auto_map`` pointing at the shipped code and
  the full ConceptVLM config under ``conceptvlm``;
* ``configuration_conceptvlm.py`` + ``modeling_conceptvlm.py``: a ``PretrainedConfig`` /
  ``PreTrainedModel`` wrapper (:mod:`conceptvlm.hf_remote`); the model modules come from
  the installed ``conceptvlm`` package, not from a copy (see ``modeling_conceptvlm.py``);
* ``model.safetensors`` (keys under ``model.``), the tokenizer files, and
  ``preprocessor_config.json`` (the image processor: CLIP-style fields, plus the tower's
  own data config that :class:`conceptvlm.vision.ImageProcessor` is rebuilt from).

``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` loads it;
:func:`conceptvlm.export.load_exported` reads either layout (:func:`read_model_dir`).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import UserError

HF_CONFIG = "config.json"
NATIVE_CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
HF_PREFIX = "model."
REMOTE_FILES = ("configuration_conceptvlm.py", "modeling_conceptvlm.py")
AUTO_MAP = {"AutoConfig": "configuration_conceptvlm.ConceptVLMConfig",
            "AutoModelForCausalLM": "modeling_conceptvlm.ConceptVLMForCausalLM",
            "AutoModel": "modeling_conceptvlm.ConceptVLMForCausalLM"}


def read_model_dir(path: str | Path) -> tuple[dict[str, Any], str]:
    """``(ConceptVLM config dict, weight-key prefix)`` of a model directory in either layout.

    Anything else raises :class:`UserError` saying what the folder is and which folder
    to pass instead (a training run's ``export/``, say).
    """
    import yaml

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint folder not found: {path}",
                        "pass the export/ folder of a training run (or an `export --hf` folder)")
    if (path / NATIVE_CONFIG).is_file() and (path / WEIGHTS).is_file():
        data = yaml.safe_load((path / NATIVE_CONFIG).read_text())
        if isinstance(data, dict) and "model" in data:
            return data, ""
    if (path / HF_CONFIG).is_file() and (path / WEIGHTS).is_file():
        try:
            data = json.loads((path / HF_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path / HF_CONFIG} is not valid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("conceptvlm"), dict):
            return data["conceptvlm"], HF_PREFIX
        raise UserError(f"{path} holds a transformers model that is not a ConceptVLM (no 'conceptvlm' in config.json)",
                        "pass a folder written by `conceptvlm export --hf` or a training run's export/")
    raise UserError(f"{path} holds no exported model (config.yaml + model.safetensors)", _layout_hint(path))


def _layout_hint(path: Path) -> str:
    if (path / "export" / WEIGHTS).is_file():
        return f"it is a training run folder: pass {path / 'export'}"
    if (path / "checkpoints").is_dir() or (path.name == "checkpoints"):
        return ("it is a training run without an export: training writes export/ at the end "
                "(train.export_at_end=true), or pass the export/ of a finished run")
    if (path / "latest").is_file() or any(p.name.startswith("step") for p in path.iterdir() if p.is_dir()):
        return "it looks like a DeepSpeed checkpoint folder: pass the run's export/ folder instead"
    return "pass the export/ folder of a training run (or an `export --hf` folder)"


def image_processor_config(model: torch.nn.Module) -> Optional[dict[str, Any]]:
    """``preprocessor_config.json`` for the model's tower (None without one). The CLIP-style
    fields mirror timm's eval transform (resize the short side to ``size / crop_pct``,
    centre-crop, scale to [0, 1], normalise); ``conceptvlm_data_config`` is exact."""
    tower = getattr(model, "tower", None)
    if tower is None:
        return None
    dc = dict(tower.data_config)
    backend = tower.config.backend
    if backend == "timm":
        _, h, w = dc["input_size"]
        short = math.floor(h / dc.get("crop_pct", 1.0))
        mean, std, interp = dc["mean"], dc["std"], dc.get("interpolation", "bicubic")
    else:  # open_clip PreprocessCfg: square resize, then crop
        size = dc.get("size", 224)
        h, w = (size, size) if isinstance(size, int) else size
        short, mean, std, interp = h, dc.get("mean"), dc.get("std"), dc.get("interpolation", "bicubic")
    resample = {"nearest": 0, "bilinear": 2, "bicubic": 3}.get(interp, 3)
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": int(short)}, "resample": resample, "do_center_crop": True,
            "crop_size": {"height": int(h), "width": int(w)}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
            "conceptvlm_backend": backend, "conceptvlm_data_config": _jsonable(dc),
            "tokens_per_image": int(model.tokens_per_image)}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _tokenizer_files(tokenizer: Any, out: Path) -> None:
    """The tokenizer as saved by conceptvlm, plus ``tokenizer_config.json`` so transformers'
    ``PreTrainedTokenizerFast`` reads a BPE ``tokenizer.json`` (the byte-level default has no
    transformers counterpart; its marker file is still written)."""
    from .data.tokenizer import SPECIAL_TOKENS

    tokenizer.save(out)
    if (out / "tokenizer.json").is_file():
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS["bos"],
               "eos_token": SPECIAL_TOKENS["eos"], "pad_token": SPECIAL_TOKENS["pad"],
               "additional_special_tokens": [SPECIAL_TOKENS[k] for k in ("image", "image_start", "image_end")]}
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def export_hf(checkpoint: str | Path, out: str | Path, push_to_hub: Optional[str] = None,
              private: bool = False, overwrite: bool = False) -> Path:
    """Write the transformers layout of the model in ``checkpoint`` to ``out`` (atomically;
    a non-empty ``out`` is replaced only with ``overwrite``); with ``push_to_hub`` also
    upload the folder to that hub repository (needs a network and a token:
    ``huggingface-cli login`` or ``HF_TOKEN``)."""
    from importlib import resources

    from safetensors.torch import save_file

    from .checkpoint import check_replaceable, publish_folder
    from .manifest import write_manifest
    from .export import load_exported, vlm_config_dict

    out = Path(out)
    check_replaceable(out, overwrite)  # before loading anything
    model, tokenizer = load_exported(checkpoint)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = vlm_config_dict(model.config)
    lm = cfg["model"]
    config = {"architectures": ["ConceptVLMForCausalLM"], "model_type": "conceptvlm", "auto_map": AUTO_MAP,
              "torch_dtype": "float32", "vocab_size": lm["vocab_size"], "hidden_size": lm["d_model"],
              "max_position_embeddings": lm["max_seq_len"], "conceptvlm": _jsonable(cfg)}
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        _tokenizer_files(tokenizer, tmp)
    (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2))
    state = {HF_PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    for name in REMOTE_FILES:
        (tmp / name).write_text(resources.files("conceptvlm.hf_remote").joinpath(name).read_text())
    proc = image_processor_config(model)
    if proc is not None:
        (tmp / "preprocessor_config.json").write_text(json.dumps(proc, indent=2))
    write_manifest(tmp)  # transformers ignores it; load_exported checks the folder against it
    publish_folder(tmp, out, overwrite)
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=push_to_hub, commit_message="conceptvlm export --hf")
    return out
