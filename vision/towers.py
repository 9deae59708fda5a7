"""`VisionTower`: a timm ViT or an open_clip visual tower that turns images into patch features.

Both libraries expose ``forward_intermediates`` (features after chosen blocks) and
``prune_intermediate_layers`` (drop the blocks after them), so one code path serves both:
build with random weights (or a hub tower's own, through huggingface_hub: ``hf-hub:``
names, open_clip pretrained tags), load a local checkpoint, cut the model after
``feature_layer``, freeze per config.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .checkpoint import load_module_weights, read_state_dict, select_module_keys
from .config import VisionConfig


class VisionTower(nn.Module):
    """Images ``[N, 3, H, W]`` -> patch features ``[N, P, width]`` from block ``feature_layer``.

    ``P = num_patches`` (row-major over ``grid``), plus one leading class token when
    ``config.keep_cls_token``. Features are the raw block output (no final norm), as in LLaVA.

    Attributes:
        config: the `VisionConfig` it was built from.
        width: feature size Dv.
        grid: (rows, cols) of patches.
        num_patches: rows * cols.
        num_tokens: tokens per image returned by `forward` (num_patches [+ 1]).
        image_size: (H, W) the tower expects.
        data_config: the backend's own preprocessing settings (timm data config or
            open_clip ``preprocess_cfg``); `ImageProcessor.from_tower` builds on it.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        if config.backend == "timm":
            model = _create_timm(config)
            features = model
        else:
            model = _create_open_clip_visual(config)
            # open_clip wraps timm trunks (EVA, SigLIP, ...) in TimmModel: features come
            # from the trunk, while weights load into the wrapper so `visual.trunk.*` keys fit.
            features = getattr(model, "trunk", model)
        _check_supported(features, config)
        self.data_config = (
            _timm_data_config(model) if config.backend == "timm" else dict(model.preprocess_cfg)
        )
        # timm's feature API serves timm models and open_clip timm trunks alike.
        api = "open_clip" if hasattr(features, "transformer") else "timm"
        if config.pos_embed_init == "sincos2d":
            _init_sincos2d(features, api)
        if config.checkpoint is not None:
            self._load_checkpoint(model, config.checkpoint)
        self._api = api
        self.model = features

        depth = len(self.blocks)
        if not -depth <= config.feature_layer < depth:
            raise ValueError(
                f"feature_layer={config.feature_layer} is out of range for {config.name!r}, "
                f"which has {depth} blocks (valid: {-depth}..{depth - 1})"
            )
        # Blocks after the feature layer never influence the output: drop them (and the
        # final norm / pooling head) to save compute and memory.
        self._index = config.feature_layer % depth
        self.model.prune_intermediate_layers(indices=[self._index], prune_norm=True, prune_head=True)

        self.width = _width(self.model, self._api)
        self.grid = _grid(self.model, self._api)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_tokens = self.num_patches + int(config.keep_cls_token)
        self.image_size = _image_size(self.model, self._api)
        if config.image_size is not None and self.image_size != (config.image_size,) * 2:
            # open_clip builds timm trunks at the size their name implies, ignoring image_size.
            raise ValueError(
                f"{config.backend} model {config.name!r} was built for {self.image_size[0]}x"
                f"{self.image_size[1]} images, not image_size={config.image_size}; "
                "set image_size to match (or to None) or pick a model of that size"
            )
        if config.backend == "open_clip":
            # Its preprocess size comes from the wrapper, which can disagree with a timm
            # trunk (see above); the module that sees the pixels decides.
            self.data_config["size"] = self.image_size
        self._apply_freeze()

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        """The transformer blocks in use (after pruning to ``feature_layer``)."""
        return self.model.transformer.resblocks if self._api == "open_clip" else self.model.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [N, 3, H, W]`` (already normalised by `ImageProcessor`) -> ``[N, P, width]``."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(
                f"VisionTower({self.config.name!r}) expects images of shape [N, 3, "
                f"{self.image_size[0]}, {self.image_size[1]}], got {list(images.shape)}; "
                "use the tower's ImageProcessor to resize them"
            )
        x = images.to(dtype=next(self.model.parameters()).dtype)
        keep_cls = self.config.keep_cls_token
        if self._api == "timm":
            out = self.model.forward_intermediates(
                x, indices=[self._index], return_prefix_tokens=keep_cls, norm=False,
                output_fmt="NLC", intermediates_only=True,
            )[0]
            patches_NPD, prefix_NKD = out if keep_cls else (out, None)
        else:
            out = self.model.forward_intermediates(
                x, indices=[self._index], output_fmt="NLC", intermediates_only=True,
                output_extra_tokens=keep_cls,
            )
            patches_NPD = out["image_intermediates"][0]
            prefix_NKD = out["image_intermediates_prefix"][0] if keep_cls else None
        if prefix_NKD is not None:
            # Prefix = [class token, register tokens...]; only the class token is kept.
            patches_NPD = torch.cat([prefix_NKD[:, :1], patches_NPD], dim=1)
        return patches_NPD

    def train(self, mode: bool = True) -> VisionTower:
        """As `nn.Module.train`, but a fully frozen tower stays in eval mode.

        Why: frozen weights should give the features they were trained to give, without
        dropout / drop-path noise (and without BatchNorm statistics drifting).
        """
        super().train(mode)
        if self.config.freeze == "all":
            self.model.eval()
        return self

    def _apply_freeze(self) -> None:
        cfg = self.config
        for p in self.model.parameters():
            p.requires_grad_(cfg.freeze == "none")
        if cfg.freeze == "last_n":
            blocks = self.blocks
            if cfg.train_last_n > len(blocks):
                raise ValueError(
                    f"train_last_n={cfg.train_last_n} but {cfg.name!r} uses only {len(blocks)} "
                    f"block(s) up to feature_layer={cfg.feature_layer}"
                )
            for block in list(blocks)[-cfg.train_last_n:]:
                block.requires_grad_(True)
        if cfg.freeze == "all":
            self.model.eval()

    def _load_checkpoint(self, model: nn.Module, path: str) -> None:
        state = select_module_keys(read_state_dict(path), model.state_dict().keys())
        ignore: tuple[str, ...] = ()
        if self.config.backend == "timm":
            state = _fit_timm_pos_embed(state, model)
            # Built with num_classes=0: a classifier in the file is expected and unused.
            ignore = (model.pretrained_cfg.get("classifier") or "head") + ".", "head."
        load_module_weights(model, state, path, ignore_prefixes=ignore)


def _create_timm(config: VisionConfig) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = dict(num_classes=0)
    if config.image_size is not None:
        kwargs["img_size"] = config.image_size
    kwargs.update(config.model_kwargs)
    try:
        with _hub_errors(config):
            return timm.create_model(config.name, pretrained=config.downloads, **kwargs)
    except (RuntimeError, TypeError) as err:  # unknown name / keyword the model lacks
        raise ValueError(f"cannot build timm model {config.name!r} with {kwargs}: {err}") from err


@contextlib.contextmanager
def _hub_errors(config: VisionConfig) -> Iterator[None]:
    """Hub look-ups that fail (offline without a cached copy, unknown repository) as one line."""
    if not config.downloads:
        yield
        return
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, FileNotFoundError, OSError) as err:
        first = (str(err).splitlines() or [""])[0]
        raise ValueError(f"cannot fetch the weights of {config.name!r}"
                         + (f" ({config.pretrained!r})" if config.pretrained else "")
                         + f" from the hub or its local cache: {type(err).__name__}: {first}") from None


def _create_open_clip_visual(config: VisionConfig) -> nn.Module:
    import open_clip

    try:
        with _quiet_open_clip(), _hub_errors(config):
            # pretrained_text=False: some configs would otherwise fetch a Hugging Face text model.
            clip = open_clip.create_model(
                config.name, pretrained=config.pretrained, load_weights=config.downloads, pretrained_image=False,
                pretrained_text=False, force_image_size=config.image_size, require_pretrained=config.downloads,
                **config.model_kwargs,
            )
    except RuntimeError as err:  # unknown names are a RuntimeError listing every model
        raise ValueError(f"cannot build open_clip model {config.name!r}: {str(err)[:300]}") from err
    visual = clip.visual  # the text tower is dropped with `clip`
    if hasattr(visual, "patch_dropout"):
        # Dropping patches at train time would break the fixed grid the projector and the
        # LM's image positions rely on.
        visual.patch_dropout = nn.Identity()
    return visual


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's root-logger warning "No pretrained weights loaded ... initialized
    randomly": it is expected here, and misleading when a checkpoint is loaded next."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _check_supported(model: nn.Module, config: VisionConfig) -> None:
    needed = ("forward_intermediates", "prune_intermediate_layers")
    if config.backend == "timm" or hasattr(model, "patch_embed"):
        needed += ("patch_embed", "blocks")
    else:
        needed += ("transformer", "grid_size")
    if not all(hasattr(model, attr) for attr in needed):
        raise ValueError(
            f"{config.backend} model {config.name!r} ({type(model).__name__}) is not a ViT-style tower "
            f"(needs {', '.join(needed)}); VisionTower supports patch-token vision transformers"
        )
    patch_drop = getattr(model, "patch_drop", None)
    if patch_drop is not None and not isinstance(patch_drop, nn.Identity):
        raise ValueError(f"{config.name!r}: patch dropout is not supported (it breaks the patch grid)")
    if config.keep_cls_token:
        has_cls = (
            getattr(model, "class_embedding", None) is not None
            or getattr(model, "cls_token", None) is not None
        )
        if not has_cls:
            raise ValueError(f"keep_cls_token=True but {config.name!r} has no class token")


def _timm_data_config(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    # The pretrained cfg describes the name's default size (e.g. 224); the model built
    # here may be smaller or larger, so take the input size from the model itself.
    height, width = model.patch_embed.img_size
    return resolve_data_config({"input_size": (3, height, width)}, model=model)


def _fit_timm_pos_embed(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resample a checkpoint's absolute position embedding to this model's patch grid."""
    pos = state.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    if pos is None or own is None or pos.shape == own.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
    if (pos.shape[1] - prefix) ** 0.5 % 1:
        return state  # not a square grid: leave it to the shape-mismatch error
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix
    )
    return state


def _width(model: nn.Module, api: str) -> int:
    return int(model.transformer.width if api == "open_clip" else model.embed_dim)


def _init_sincos2d(model: nn.Module, api: str) -> None:
    """Set the learned position table of a randomly built ViT to timm's fixed 2D sin-cos
    embedding over its patch grid (rows then columns); prefix (class) positions get 0."""
    from timm.layers import build_sincos2d_pos_embed

    table = model.positional_embedding if api == "open_clip" else getattr(model, "pos_embed", None)
    if not isinstance(table, torch.Tensor):
        raise ValueError("VisionConfig.pos_embed_init='sincos2d' needs a tower with a learned position table "
                         f"({type(model).__name__} has none)")
    rows, cols = _grid(model, api)
    dim = table.shape[-1]
    if dim % 4:
        raise ValueError(f"VisionConfig.pos_embed_init='sincos2d' needs a width divisible by 4, got {dim}")
    grid = build_sincos2d_pos_embed([rows, cols], dim).to(table.dtype)
    with torch.no_grad():
        flat = table.view(-1, dim)  # timm [1, prefix + P, D], open_clip [prefix + P, D]
        flat.zero_()
        flat[flat.shape[0] - rows * cols:] = grid


def _grid(model: nn.Module, api: str) -> tuple[int, int]:
    rows, cols = model.grid_size if api == "open_clip" else model.patch_embed.grid_size
    return int(rows), int(cols)


def _image_size(model: nn.Module, api: str) -> tuple[int, int]:
    height, width = model.image_size if api == "open_clip" else model.patch_embed.img_size
    return int(height), int(width)
