"""Model configurations: nested dataclasses, filled from YAML, validated on construction.

:class:`ModelConfig` (the language model) and :class:`VLMConfig` (it, the vision tower's
:class:`~conceptvlm.vision.config.VisionConfig` and how images enter the sequence) live
here; ``train_config.py`` nests them into the training config. There is one loader,
:func:`load_config`: YAML only fills the dataclasses (through OmegaConf's structured
configs, which reject unknown keys, wrong types and values outside a ``Literal``'s
choices with the offending key in the message); every value check lives in
``__post_init__`` so a config built in Python is checked the same way.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, get_args, get_origin, get_type_hints

from .vision.config import VisionConfig

Router = Literal["cosine", "linear", "fixed", "none"]
ResidualForm = Literal["update", "output"]
LossRate = Literal["threshold", "sampled"]
ImagePositions = Literal["1d", "2d"]
ImageOrder = Literal["raster", "hilbert"]
QKNorm = Literal["none", "full", "head"]

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


def _check(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``cond`` (every config module's checks)."""
    if not cond:
        raise ConfigError(msg)


def check_choices(cfg: Any, prefix: str = "") -> None:
    """Every ``Literal`` field of the dataclass ``cfg`` holds one of its choices.

    OmegaConf checks YAML values already; this covers configs built in Python."""
    hints = get_type_hints(type(cfg), vars(sys.modules[type(cfg).__module__]))
    for f in fields(cfg):
        choices = get_args(hints[f.name]) if get_origin(hints[f.name]) is Literal else ()
        value = getattr(cfg, f.name)
        _check(not choices or value in choices, f"{prefix}{f.name} must be one of {choices}, got {value!r}")


class YamlConfig:
    """``from_dict`` / ``from_yaml`` through :func:`load_config`; ``to_dict`` / ``save_yaml``."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a (possibly partial) nested mapping; unknown keys and bad values are errors."""
        return load_config(cls, data)

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, overrides: Optional[list[str]] = None) -> C:
        """Load a YAML file (optionally with ``key.sub=value`` overrides)."""
        data = read_yaml(path, overrides)
        try:
            return load_config(cls, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


@dataclass
class MoEConfig:
    """Token-choice top-k MoE feed-forward used by every layer."""

    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 1024
    n_shared_experts: int = 0  # always-on SwiGLU experts of the same hidden size
    aux_loss_weight: float = 0.01  # load-balancing loss (Switch-style)
    z_loss_weight: float = 0.001  # router z-loss (ST-MoE)
    # Pretrained-checkpoint specifics (defaults: today's models). Renormalise the top-k
    # gates to sum to 1: None = when top_k > 1; OLMoE false, Mixtral true, Qwen per config.
    norm_topk_prob: Optional[bool] = None
    shared_expert_hidden: Optional[int] = None  # shared SwiGLU width (default expert_hidden * n_shared)
    shared_expert_gate: bool = False  # shared output * sigmoid(g . x) (Qwen2-MoE)

    def __post_init__(self) -> None:
        _check(self.n_experts >= 1, f"moe.n_experts must be >= 1, got {self.n_experts}")
        _check(1 <= self.top_k <= self.n_experts,
               f"moe.top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        _check(self.expert_hidden >= 1, f"moe.expert_hidden must be >= 1, got {self.expert_hidden}")
        _check(self.n_shared_experts >= 0, "moe.n_shared_experts must be >= 0")
        _check(self.aux_loss_weight >= 0 and self.z_loss_weight >= 0, "moe loss weights must be >= 0")
        _check(self.shared_expert_hidden is None or self.shared_expert_hidden >= 1,
               f"moe.shared_expert_hidden must be >= 1, got {self.shared_expert_hidden}")
        _check(self.n_shared_experts >= 1 or (self.shared_expert_hidden is None and not self.shared_expert_gate),
               "moe.shared_expert_hidden / moe.shared_expert_gate need moe.n_shared_experts >= 1")


@dataclass
class ChunkConfig:
    """Where concept boundaries go and how strongly the ratio loss pulls them."""

    router: Router = "cosine"
    target_ratio_text: float = 2.0  # R for text positions (tokens per concept)
    target_ratio_image: float = 2.0  # R for image-patch positions
    ratio_loss_weight_text: float = 0.03
    ratio_loss_weight_image: float = 0.03
    sharpen: float = 6.0  # s in p~ = p^(1/s); 1 disables sharpening
    threshold: float = 0.5  # eval-mode boundary rule b = [p >= threshold]
    residual_form: ResidualForm = "update"  # update (DESIGN §2) | output (reference demo ablation)
    # F of the ratio loss from the eval-rule boundaries ("threshold": the realised ratio
    # is what reaches the target) or from the sampled training ones ("sampled", the paper's).
    loss_rate: LossRate = "threshold"
    # Sample boundaries in training (the paper's sharpened Bernoulli) or use the eval
    # rule throughout (deterministic training; H-Net style).
    sample_in_training: bool = True
    # Weight of the split loss (chunk.split_loss): pushes the top 1/R of a modality's p
    # in the batch above the threshold and the rest below. It spreads p where content
    # makes many positions alike (flat image backgrounds), so the eval rule can realise
    # 1/R instead of flipping between all and none of them. 0 disables.
    split_loss_weight_text: float = 0.0
    split_loss_weight_image: float = 0.0

    def __post_init__(self) -> None:
        check_choices(self, "chunk.")
        for name in ("target_ratio_text", "target_ratio_image"):
            r = getattr(self, name)
            _check(r > 1.0, f"chunk.{name} must be > 1 (the ratio loss has R/(R-1)), got {r}")
        _check(self.sharpen >= 1.0, f"chunk.sharpen must be >= 1, got {self.sharpen}")
        _check(0.0 < self.threshold < 1.0, f"chunk.threshold must be in (0, 1), got {self.threshold}")
        _check(self.ratio_loss_weight_text >= 0 and self.ratio_loss_weight_image >= 0,
               "chunk ratio loss weights must be >= 0")
        _check(self.split_loss_weight_text >= 0 and self.split_loss_weight_image >= 0,
               "chunk split loss weights must be >= 0")


@dataclass
class ConceptConfig:
    """Implicit compute reallocation in the concept model (None / 1 = like the baseline)."""

    top_k: Optional[int] = None  # activated experts per concept (default: moe.top_k)
    loops: int = 1  # run the concept layers this many times with shared weights
    d_model: Optional[int] = None  # concept width (default: model d_model)
    n_heads: Optional[int] = None  # heads at the concept width (default: n_heads)
    n_kv_heads: Optional[int] = None
    expert_hidden: Optional[int] = None  # default: moe.expert_hidden

    def __post_init__(self) -> None:
        _check(self.loops >= 1, f"concept.loops must be >= 1, got {self.loops}")


@dataclass
class ModelConfig(YamlConfig):
    """ConceptMoE language model: encoder layers -> chunk -> concept layers -> dechunk -> decoder layers."""

    vocab_size: int = 512
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads % n_kv_heads == 0
    n_encoder_layers: int = 1
    n_concept_layers: int = 2
    n_decoder_layers: int = 1
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    rope_scaling: float = 1.0  # linear position interpolation: positions / rope_scaling
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    joint_decoding: bool = True  # decoder attention also sees the dechunked concept signal
    # Pretrained-checkpoint specifics (conceptvlm.hf_config); the defaults are today's models.
    head_dim: Optional[int] = None  # per-head width (default d_model // n_heads; Qwen3 sets it)
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2-MoE)
    attn_out_bias: bool = False  # bias on the attention output projection
    qk_norm: QKNorm = "none"  # full: RMSNorm over the whole q/k projection (OLMoE) | head: per head (Qwen3)
    moe: MoEConfig = field(default_factory=MoEConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    concept: ConceptConfig = field(default_factory=ConceptConfig)

    def __post_init__(self) -> None:
        # Nested configs may arrive as dicts when built in Python from a plain mapping.
        for name, cls in (("moe", MoEConfig), ("chunk", ChunkConfig), ("concept", ConceptConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, load_config(cls, getattr(self, name), prefix=f"{name}."))
        check_choices(self)
        _check(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        _check(self.d_model >= 1, f"d_model must be >= 1, got {self.d_model}")
        _check(self.max_seq_len >= 1, f"max_seq_len must be >= 1, got {self.max_seq_len}")
        _check(self.n_heads >= 1 and self.n_kv_heads >= 1, "n_heads and n_kv_heads must be >= 1")
        _check(self.head_dim is not None or self.d_model % self.n_heads == 0,
               f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} (or set head_dim)")
        _check(self.head_dim is None or (self.head_dim >= 2 and self.head_dim % 2 == 0),
               f"head_dim must be even and >= 2 for RoPE, got {self.head_dim}")
        _check(self.n_heads % self.n_kv_heads == 0,
               f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        _check(self.attn_head_dim % 2 == 0, "head dim must be even for RoPE")
        _check(self.n_encoder_layers >= 0 and self.n_decoder_layers >= 0, "layer counts must be >= 0")
        _check(self.n_concept_layers >= 1, f"n_concept_layers must be >= 1, got {self.n_concept_layers}")
        _check(self.rope_scaling >= 1.0, f"rope_scaling must be >= 1, got {self.rope_scaling}")
        c = self.concept
        _check(c.top_k is None or 1 <= c.top_k <= self.moe.n_experts,
               f"concept.top_k must be in [1, moe.n_experts={self.moe.n_experts}], got {c.top_k}")
        cd, ch, ckv = self.concept_d_model, self.concept_n_heads, self.concept_n_kv_heads
        _check(self._same_heads or cd % ch == 0, f"concept d_model={cd} must be divisible by concept n_heads={ch}")
        _check(ch % ckv == 0, f"concept n_heads={ch} must be a multiple of concept n_kv_heads={ckv}")
        _check(self.concept_head_dim % 2 == 0, "concept head dim must be even for RoPE")

    # Resolved concept-model settings (reallocation defaults to "same as baseline").
    @property
    def concept_top_k(self) -> int:
        return self.concept.top_k or self.moe.top_k

    @property
    def concept_d_model(self) -> int:
        return self.concept.d_model or self.d_model

    @property
    def concept_n_heads(self) -> int:
        return self.concept.n_heads or self.n_heads

    @property
    def concept_n_kv_heads(self) -> int:
        return self.concept.n_kv_heads or self.n_kv_heads

    @property
    def concept_expert_hidden(self) -> int:
        return self.concept.expert_hidden or self.moe.expert_hidden

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def _same_heads(self) -> bool:
        """The concept model keeps the token layers' width and heads (so their head size too)."""
        return self.concept_d_model == self.d_model and self.concept_n_heads == self.n_heads

    @property
    def concept_head_dim(self) -> int:
        return self.attn_head_dim if self._same_heads else self.concept_d_model // self.concept_n_heads

    def layer_options(self, concept: bool = False) -> dict[str, Any]:
        """Keyword arguments of :class:`conceptvlm.block.Block` beyond the basic shape."""
        m = self.moe
        return {"head_dim": self.concept_head_dim if concept else self.attn_head_dim, "qkv_bias": self.qkv_bias,
                "out_bias": self.attn_out_bias, "qk_norm": self.qk_norm, "norm_topk": m.norm_topk_prob,
                "shared_hidden": m.shared_expert_hidden, "shared_gate": m.shared_expert_gate}

    @property
    def n_layers(self) -> int:
        return self.n_encoder_layers + self.n_concept_layers + self.n_decoder_layers


@dataclass
class ImageOptions:
    """How images enter the token sequence (``vlm.py``)."""

    image_positions: ImagePositions = "1d"  # 2d: (row, column) rotary positions for patches
    image_order: ImageOrder = "raster"  # hilbert: patches along a Hilbert curve
    # VQA and grounding prompts put the question before the image, so the (causal) model's
    # patches can attend to it; training data and the evaluators follow it (data.templates).
    question_first: bool = False

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class VLMConfig(ImageOptions, YamlConfig):
    """The language model, the vision side and how images enter the sequence."""

    model: ModelConfig = field(default_factory=ModelConfig)
    vision: Optional[VisionConfig] = None  # None: text only
    image_token_id: int = 259  # defaults: conceptvlm.data.ByteTokenizer's ids (see with_tokenizer)
    image_start_id: int = 260
    image_end_id: int = 261

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = load_config(ModelConfig, self.model, prefix="model.")
        if isinstance(self.vision, dict):
            self.vision = load_config(VisionConfig, self.vision, prefix="vision.")
        super().__post_init__()
        ids = (self.image_token_id, self.image_start_id, self.image_end_id)
        _check(len(set(ids)) == 3 and all(0 <= i < self.model.vocab_size for i in ids),
              f"image token ids {ids} must be distinct and inside vocab_size={self.model.vocab_size}")

    def with_tokenizer(self, tokenizer) -> "VLMConfig":
        """Take the image token ids from ``tokenizer``; its vocabulary must fit the model's."""
        _check(tokenizer.vocab_size <= self.model.vocab_size,
              f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {self.model.vocab_size}; "
              "raise model.vocab_size")
        self.image_token_id = tokenizer.image_id
        self.image_start_id = tokenizer.image_start_id
        self.image_end_id = tokenizer.image_end_id
        self.__post_init__()
        return self


def read_yaml(path: str | Path, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """A YAML mapping with ``key.sub=value`` overrides merged in (interpolations resolved)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config not found: {path}")
    raw = OmegaConf.load(path)
    if overrides:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    data = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(cls: type[C], data: Any, prefix: str = "") -> C:
    """The one loader: a mapping -> a validated ``cls`` (any config dataclass here).

    A structured merge through OmegaConf: unknown keys, wrong types and values outside a
    ``Literal`` name the key; the dataclasses' own checks then run on construction.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), data)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise omegaconf_error(e, prefix) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a nested dataclass's own check (VisionConfig)
        raise ConfigError(f"{prefix}{e}" if prefix else str(e)) from None


def omegaconf_error(e: Exception, prefix: str = "") -> ConfigError:
    """An OmegaConf merge/validation error as a ConfigError naming the key."""
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return ConfigError(f"bad config key {prefix}{key}: {msg}" if key else f"bad config: {msg}")
