"""Training configuration: nested dataclasses filled from YAML plus ``key=value`` overrides.

OmegaConf's structured configs do the merging (unknown keys and wrong types fail with
the key's name); value checks live in ``__post_init__``. ``load_train_config`` runs all
of it before any model, data or process group is touched, so a typo costs nothing.

A train YAML looks like::

    model_file: configs/model/tiny.yaml   # base ModelConfig (optional)
    model: {chunk: {router: none}}        # merged over the base
    vision: null                          # or a VisionConfig mapping -> ConceptVLM with a tower
    data: {sources: [{shards: "shards/text-{000000..000003}.tar", kind: text}], seq_len: 128, batch_size: 4}
    optim: {lr: 3e-3, warmup_steps: 10}
    parallel: {deepspeed_config: configs/deepspeed/zero1.json, ep_size: 1}
    train: {steps: 100, out_dir: runs/tiny}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .config import ConfigError, ImageOptions, ModelConfig, YamlConfig, _check, check_choices, load_config, \
    omegaconf_error
from .vision.config import VisionConfig

SourceKind = Literal["caption", "vqa", "grounding", "interleaved", "text"]
LongDocs = Literal["split", "drop"]
Optimizer = Literal["adamw", "sgd"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass
class SourceConfig:
    shards: Any = "???"  # a shard spec string or a list of them (data/shards.py)
    kind: SourceKind = "text"
    weight: float = 1.0
    caption_prompt: Optional[str] = None

    def __post_init__(self) -> None:
        check_choices(self, "data.sources[*].")
        _check(self.weight > 0, f"data.sources[*].weight must be > 0, got {self.weight}")


@dataclass
class DataSection:
    sources: list[SourceConfig] = field(default_factory=list)
    tokenizer: Optional[str] = None  # tokenizer.json / folder; None = byte-level default
    seq_len: int = 256
    batch_size: int = 4  # packed rows per micro-batch per rank
    seed: int = 0
    shuffle_buffer: int = 100
    shuffle_initial: int = 20
    resample: bool = True  # endless stream: steps, not epochs, end training
    num_workers: int = 0
    long_docs: LongDocs = "split"  # a document longer than seq_len: split at safe cuts, or drop it
    # Read the data as this many consecutive ranks would and concatenate their rows: one
    # process then sees exactly the global batch of a `virtual_ranks`-rank run.
    virtual_ranks: int = 1

    def __post_init__(self) -> None:
        check_choices(self, "data.")
        _check(self.virtual_ranks >= 1, f"data.virtual_ranks must be >= 1, got {self.virtual_ranks}")
        _check(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class OptimConfig:
    name: Optimizer = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1

    def __post_init__(self) -> None:
        check_choices(self, "optim.")
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        _check(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        _check(len(self.betas) == 2, f"optim.betas must have 2 values, got {self.betas}")


@dataclass
class ParallelConfig:
    deepspeed_config: str = "configs/deepspeed/zero1.json"
    zero_stage: Optional[int] = None  # overrides the JSON's zero_optimization.stage
    ep_size: int = 1  # expert-parallel group size (ZeRO 0-2 only)
    precision: Precision = "auto"  # auto: bf16 where CUDA has it, else fp32
    activation_checkpointing: bool = False  # torch.utils.checkpoint around every block

    def __post_init__(self) -> None:
        _check(self.zero_stage is None or self.zero_stage in (0, 1, 2, 3),
               f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.ep_size >= 1, f"parallel.ep_size must be >= 1, got {self.ep_size}")
        check_choices(self, "parallel.")


@dataclass
class RatioSchedule:
    """Target ratio moved from ``start`` to the model's R over ``steps`` (continual training)."""

    enabled: bool = False
    start: float = 1.05  # just above 1: the ratio loss has R/(R-1)
    steps: int = 1000

    def __post_init__(self) -> None:
        _check(self.start > 1.0, f"ratio_schedule.start must be > 1, got {self.start}")
        _check(self.steps >= 1, f"ratio_schedule.steps must be >= 1, got {self.steps}")

    def at(self, step: int, final: float) -> float:
        """The target at ``step``: linear from ``start`` to ``final`` over ``steps``."""
        frac = min(1.0, step / self.steps)
        return self.start + (final - self.start) * frac


@dataclass
class TrainSection:
    steps: int = 100  # optimizer steps
    seed: int = 0
    out_dir: str = "runs/train"
    init_from: Optional[str] = None  # an exported or converted model dir to start from
    resume: bool = True  # continue from out_dir/checkpoints/latest if it exists
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2  # checkpoints kept (0 = all)
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = True
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes (e.g. "lm.", "tower.")
    max_nonfinite_in_row: int = 3  # stop after this many skipped non-finite steps in a row
    export_at_end: bool = False  # write out_dir/export (config + safetensors + tokenizer)
    compile: bool = False  # torch.compile every transformer block (docs/training.md "Compiling")

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.save_every >= 0, f"train.save_every must be >= 0, got {self.save_every}")
        _check(self.keep_last >= 0, f"train.keep_last must be >= 0, got {self.keep_last}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.max_nonfinite_in_row >= 1, f"train.max_nonfinite_in_row must be >= 1, got {self.max_nonfinite_in_row}")


@dataclass
class TrainConfig(YamlConfig):
    model_file: Optional[str] = None  # a ModelConfig YAML used as the base of `model`
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: Optional[VisionConfig] = None  # None = text-only ConceptVLM
    image: ImageOptions = field(default_factory=ImageOptions)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ratio_schedule: RatioSchedule = field(default_factory=RatioSchedule)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        _check(self.model.moe.n_experts % self.parallel.ep_size == 0,
               f"parallel.ep_size={self.parallel.ep_size} must divide model.moe.n_experts={self.model.moe.n_experts}")
        # Expert parallelism's dispatch sizes its all-to-all from the routing (host values):
        # a graph break, which fullgraph compilation refuses.
        _check(not (self.train.compile and self.parallel.ep_size > 1),
               f"train.compile=true does not support parallel.ep_size={self.parallel.ep_size} > 1 "
               "(the expert all-to-all cannot be compiled); use one or the other")
        for s in self.data.sources:
            _check(s.shards not in (None, "", "???"), "data.sources[*].shards is required")
        # The model refuses longer inputs (ConceptMoE.forward); say so before any work.
        _check(self.data.seq_len <= self.model.max_seq_len,
               f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


def _find(name: str, config_path: Optional[str | Path]) -> Path:
    """A relative path as given (from the working directory), else next to the train
    YAML, else from the source checkout's root (``configs/model/tiny.yaml`` anywhere)."""
    p = Path(name)
    candidates = [p]
    if not p.is_absolute():
        if config_path is not None:
            candidates.append(Path(config_path).parent / p)
        candidates.append(Path(__file__).resolve().parents[1] / p)
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"model_file not found: {name}")


def _yaml_error(path: Any, e: Exception) -> ConfigError:
    """A YAML syntax error as one line: file, line, column, what (tabs get a hint)."""
    mark = getattr(e, "problem_mark", None)
    name = getattr(mark, "name", "")
    if name and not name.startswith("<"):
        path = name  # the file it happened in (the train YAML or its model_file)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    try:  # PyYAML no longer names the character; look at it
        tab = mark is not None and Path(str(path)).read_text()[mark.index] == "\t"
    except (OSError, IndexError, UnicodeDecodeError):
        tab = False
    hint = ": a tab (indent YAML with spaces)" if tab else ""
    return ConfigError(f"{where}: not valid YAML: {problem}{hint}")


def preflight(cfg: TrainConfig, world_size: int = 1) -> None:
    """Checks against the file system, before any model, data or process group exists:
    shards, tokenizer, ``init_from``, ``out_dir``, and enough shards for every reader."""
    from .data import load_tokenizer
    from .data.shards import expand_shards

    d = cfg.data
    readers = world_size * d.virtual_ranks * max(1, d.num_workers)
    for i, s in enumerate(d.sources):
        try:
            urls = expand_shards(s.shards)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.sources[{i}].shards: {e}") from None
        _check(d.resample or len(urls) >= readers,
               f"data.sources[{i}].shards: {len(urls)} shard(s) for {readers} readers ({world_size} rank(s) x "
               f"{d.virtual_ranks} virtual rank(s) x {max(1, d.num_workers)} worker(s)) with data.resample=false: "
               "each reader needs a shard; lower data.num_workers, write more shards or set data.resample=true")
    if d.tokenizer is not None:
        try:
            load_tokenizer(d.tokenizer)
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception on a bad file
            raise ConfigError(f"data.tokenizer: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if cfg.train.init_from:
        from .export import CONFIG, WEIGHTS

        src = Path(cfg.train.init_from)
        missing = [n for n in (CONFIG, WEIGHTS) if not (src / n).is_file()]
        _check(not missing, f"train.init_from={src}: not an exported model folder (missing {', '.join(missing)})")
    out = Path(cfg.train.out_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    _check(blocker is None, f"train.out_dir={out}: {blocker} exists and is not a folder")


def load_train_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                      data: Optional[dict] = None) -> TrainConfig:
    """YAML file (or a mapping) + ``key=value`` overrides -> a validated :class:`TrainConfig`.

    ``model_file`` (in the YAML or an override) is loaded first and the ``model`` section
    merged over it. Every problem raises :class:`ConfigError` naming the key.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"train config not found: {path}")
            raw = OmegaConf.load(path)
        else:
            raw = OmegaConf.create(data or {})
        for o in overrides or []:
            if "=" not in o:
                raise ConfigError(f"override {o!r} is not key=value")
        if overrides:
            try:
                raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
            except (TypeError, ValueError) as e:  # e.g. an index into a list: OmegaConf cannot merge it
                raise ConfigError(f"overrides {' '.join(overrides)}: {e} (set lists in the YAML)") from None
        if not isinstance(raw, type(OmegaConf.create({}))):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        model_file = raw.get("model_file")
        if model_file:
            model_file = _find(model_file, path)
            raw.model_file = str(model_file)
            base = OmegaConf.load(model_file)
            raw = OmegaConf.merge(raw, {"model": OmegaConf.merge(base, raw.get("model") or {})})
        return load_config(TrainConfig, OmegaConf.to_container(raw, resolve=True))
    except OmegaConfBaseException as e:
        raise omegaconf_error(e) from None
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
