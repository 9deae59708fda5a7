"""`VisionConfig`: which vision tower to build, which features to take, how to project them.

The config is plain data (YAML fills it); every check lives in `__post_init__` so a bad
value fails when the config is made, with a message that names the field, rather than
deep inside timm or open_clip at model-build time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Backend = Literal["timm", "open_clip"]
FreezeMode = Literal["all", "none", "last_n"]
ProjectorKind = Literal["mlp", "linear"]
Reduction = Literal["none", "pixel_shuffle", "avg_pool"]
PosEmbedInit = Literal["default", "sincos2d"]
BACKENDS, FREEZE_MODES = get_args(Backend), get_args(FreezeMode)
POS_EMBED_INITS = get_args(PosEmbedInit)
PROJECTORS, REDUCTIONS = get_args(ProjectorKind), get_args(Reduction)


@dataclass
class VisionConfig:
    """Vision tower + projector settings.

    Attributes:
        name: timm model name (``backend='timm'``, e.g. ``vit_large_patch14_clip_336``) or
            open_clip model name (``backend='open_clip'``, e.g. ``ViT-B-16``), built with
            random weights; or a hub name, ``hf-hub:timm/...`` (timm) or ``hf-hub:org/repo``
            (open_clip), whose config and weights come through huggingface_hub (from its
            local cache when ``HF_HUB_OFFLINE=1``).
        backend: ``'timm'`` or ``'open_clip'``.
        pretrained: open_clip pretrained tag for ``name`` (``ViT-SO400M-14-SigLIP`` +
            ``webli``): weights from open_clip's registry, through huggingface_hub.
        checkpoint: local weights file (``.safetensors``, ``.pt``/``.bin``/``.pth``; a full
            open_clip checkpoint with ``visual.*`` keys is fine) or None for random weights.
        image_size: square input side in pixels; None keeps the model's own default.
        feature_layer: index of the transformer block whose output is used, Python-style
            (``-1`` last block, ``-2`` penultimate as in LLaVA). Blocks after it are removed.
        keep_cls_token: prepend the class token to the patch tokens.
        freeze: ``'all'`` (frozen, kept in eval mode), ``'none'`` or ``'last_n'``.
        train_last_n: with ``freeze='last_n'``, how many of the last used blocks train.
        projector: ``'mlp'`` (Linear-GELU-Linear, LLaVA-1.5) or ``'linear'``.
        reduction: ``'none'``, ``'pixel_shuffle'`` (r x r neighbours concatenated into
            channels) or ``'avg_pool'`` (r x r mean) before projecting.
        reduction_factor: r; 1 with ``reduction='none'``, >= 2 otherwise.
        model_kwargs: extra keyword arguments for ``timm.create_model`` or
            ``open_clip.create_model`` (e.g. ``depth``/``embed_dim`` for a tiny timm ViT,
            ``vision_cfg`` for a custom open_clip tower).
        pos_embed_init: ``'default'`` (the library's: a learned position table drawn with
            std 0.02) or ``'sincos2d'``: a tower built with random weights starts its
            learned position table at the fixed 2D sin-cos embedding (as MAE does), so
            patch features say where the patch is from the first step. A random tiny tower
            with the default barely learns where things are (measured on the grounding
            cells task: 28% within one cell after 750 steps, against 100% after 500 with
            sincos2d; docs/results.md). Pretrained weights replace it, so it is refused
            with ``checkpoint``, ``pretrained`` or a hub name.
    """

    name: str
    backend: Backend = "timm"
    checkpoint: str | None = None
    pretrained: str | None = None
    image_size: int | None = None
    feature_layer: int = -2
    keep_cls_token: bool = False
    freeze: FreezeMode = "all"
    train_last_n: int = 0
    projector: ProjectorKind = "mlp"
    reduction: Reduction = "none"
    reduction_factor: int = 1
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pos_embed_init: PosEmbedInit = "default"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"VisionConfig.name must be a non-empty model name, got {self.name!r}")
        _check_choice("backend", self.backend, BACKENDS)
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, (str, os.PathLike)) or not str(self.checkpoint):
                raise ValueError(
                    f"VisionConfig.checkpoint must be a local file path or None, got {self.checkpoint!r}"
                )
            self.checkpoint = os.fspath(self.checkpoint)
        if self.pretrained is not None:
            if self.backend != "open_clip" or not isinstance(self.pretrained, str) or not self.pretrained:
                raise ValueError(f"VisionConfig.pretrained={self.pretrained!r}: an open_clip pretrained tag "
                                 "(backend='open_clip'); timm hub weights are named 'hf-hub:timm/...'")
            if self.from_hub_name:
                raise ValueError(f"VisionConfig.pretrained={self.pretrained!r} with hub name {self.name!r}: "
                                 "the hub repository already names the weights")
        if self.image_size is not None:
            _check_int("image_size", self.image_size, minimum=1)
        _check_int("feature_layer", self.feature_layer)
        if not isinstance(self.keep_cls_token, bool):
            raise ValueError(f"VisionConfig.keep_cls_token must be a bool, got {self.keep_cls_token!r}")
        _check_choice("freeze", self.freeze, FREEZE_MODES)
        _check_int("train_last_n", self.train_last_n, minimum=0)
        if self.freeze == "last_n" and self.train_last_n < 1:
            raise ValueError("VisionConfig: freeze='last_n' needs train_last_n >= 1")
        if self.freeze != "last_n" and self.train_last_n != 0:
            raise ValueError(
                f"VisionConfig: train_last_n={self.train_last_n} is only used with freeze='last_n' "
                f"(freeze is {self.freeze!r}); leave it at 0"
            )
        _check_choice("projector", self.projector, PROJECTORS)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_int("reduction_factor", self.reduction_factor, minimum=1)
        if self.reduction == "none" and self.reduction_factor != 1:
            raise ValueError(
                f"VisionConfig: reduction_factor={self.reduction_factor} has no effect with "
                "reduction='none'; set reduction to 'pixel_shuffle' or 'avg_pool', or the factor to 1"
            )
        if self.reduction != "none" and self.reduction_factor < 2:
            raise ValueError(
                f"VisionConfig: reduction={self.reduction!r} needs reduction_factor >= 2, "
                f"got {self.reduction_factor}"
            )
        if self.keep_cls_token and self.reduction != "none":
            # The class token has no cell in the patch grid, so it cannot be pooled or shuffled.
            raise ValueError(
                "VisionConfig: keep_cls_token=True cannot be combined with "
                f"reduction={self.reduction!r}; drop the class token or use reduction='none'"
            )
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(
                f"VisionConfig.model_kwargs must be a dict, got {type(self.model_kwargs).__name__}"
            )
        _check_choice("pos_embed_init", self.pos_embed_init, POS_EMBED_INITS)
        if self.pos_embed_init != "default" and (self.downloads or self.checkpoint is not None):
            raise ValueError(
                f"VisionConfig.pos_embed_init={self.pos_embed_init!r} initialises a tower built with random "
                "weights; pretrained weights (checkpoint, pretrained tag or hub name) would replace it: "
                "leave it at 'default'"
            )
        if "pretrained" in self.model_kwargs:
            raise ValueError(
                "VisionConfig.model_kwargs must not set 'pretrained': use VisionConfig.pretrained (an "
                "open_clip tag), an 'hf-hub:' name, or VisionConfig.checkpoint (a local weights file)"
            )


    @property
    def from_hub_name(self) -> bool:
        """``name`` is a hub repository (``hf-hub:...``): config and weights come from it."""
        return self.name.startswith("hf-hub:")

    @property
    def downloads(self) -> bool:
        """Weights come through huggingface_hub (or its cache)."""
        return self.from_hub_name or self.pretrained is not None


def tiny_vision_config(**overrides: Any) -> VisionConfig:
    """A timm ViT small enough for tests and the CPU demo (builds in a few milliseconds).

    64x64 input, 8x8 patches (an 8x8 grid, 64 tokens), width 64, 2 blocks, 2 heads,
    features from the last block, trainable (random weights are no use frozen).
    Keyword arguments override any field.
    """
    fields: dict[str, Any] = dict(
        name="vit_tiny_patch16_224",
        backend="timm",
        image_size=64,
        feature_layer=-1,
        freeze="none",
        model_kwargs=dict(patch_size=8, embed_dim=64, depth=2, num_heads=2),
    )
    fields.update(overrides)
    return VisionConfig(**fields)


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(map(repr, choices))
        raise ValueError(f"VisionConfig.{field_name} must be one of {allowed}; got {value!r}")


def _check_int(field_name: str, value: Any, minimum: int | None = None) -> None:
    # bool is an int subclass; `feature_layer: true` in YAML is a typo, not layer 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"VisionConfig.{field_name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"VisionConfig.{field_name} must be >= {minimum}, got {value}")
