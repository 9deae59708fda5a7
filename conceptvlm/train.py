"""Training under DeepSpeed: ``python -m conceptvlm.train --config FILE [key=value ...]``.

The same module runs under the launcher (``deepspeed --num_gpus N --module
conceptvlm.train --config FILE ...``) and in a plain process (the rendezvous variables
are set to a single rank on a free port when absent; gloo on CPU). Per optimizer step:
``grad_accum`` micro-batches, each ``engine(batch) -> engine.backward(loss) ->
engine.step()``; DeepSpeed does ZeRO, clipping, accumulation and the LR schedule.

The loss is ``loss.training_loss``: data-parallel runs equal one process on the global
batch (every quantity is a global mean, ``loss.global_mean`` states how); the metrics
are measured apart from it (``logging_utils.StepMetrics``). A non-finite loss
(agreed across ranks) drops the micro-batch without a backward pass; after
``train.max_nonfinite_in_row`` in a row the run stops with :class:`NonFiniteLossError`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import yaml

from .checkpoint import CheckpointError, NonFiniteWeightsError
from .chunk import RatioTargets
from .config import ConfigError
from .train_config import TrainConfig, load_train_config, preflight


REPO_ROOT = Path(__file__).resolve().parents[1]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


# ----------------------------------------------------------------------------- setup
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (gloo without CUDA)."""
    if dist.is_initialized():
        return
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    from .quiet import prepare_deepspeed_comm

    prepare_deepspeed_comm(int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def use_bf16(cfg: TrainConfig) -> bool:
    p = cfg.parallel.precision
    if p == "bf16":
        return True
    return p == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def deepspeed_config(cfg: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """The JSON file with the run's batch, clipping and precision filled in; checks ZeRO-3 x EP."""
    path = Path(cfg.parallel.deepspeed_config)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path  # configs/deepspeed/*.json of a source checkout, from any directory
    if not path.is_file():
        raise ConfigError(f"parallel.deepspeed_config: file not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.deepspeed_config: {path} is not valid JSON: {e}") from None
    zero = ds.setdefault("zero_optimization", {})
    if cfg.parallel.zero_stage is not None:
        zero["stage"] = cfg.parallel.zero_stage
    stage = int(zero.get("stage", 0))
    if stage == 3 and cfg.train.compile:
        raise ConfigError("train.compile=true with ZeRO stage 3 is not supported: ZeRO-3 gathers every layer's "
                          "weights in module hooks inside the compiled blocks. Use ZeRO stage 0-2 or train.compile=false.")
    if stage == 3 and cfg.parallel.ep_size > 1:
        raise ConfigError(f"parallel.ep_size={cfg.parallel.ep_size} with ZeRO stage 3 is not supported: DeepSpeed "
                          "refuses its MoE layers under ZeRO-3. Use ep_size=1 with ZeRO-3 (experts are then sharded "
                          "as ordinary parameters) or ZeRO stage 0-2 for expert parallelism.")
    if stage == 3:  # else DeepSpeed swaps torch.nn.functional.linear process-wide, for good
        zero.setdefault("memory_efficient_linear", False)
    if stage in (1, 2) and cfg.parallel.ep_size > 1:  # what DeepSpeed's ZeRO-1/2 MoE path requires
        zero["contiguous_gradients"] = True
        zero["reduce_scatter"] = True
    micro = cfg.data.batch_size * cfg.data.virtual_ranks
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=cfg.optim.grad_accum,
              train_batch_size=micro * cfg.optim.grad_accum * world_size, gradient_clipping=cfg.optim.grad_clip,
              bf16={"enabled": use_bf16(cfg)}, fp16={"enabled": False})
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


VISION_PARTS = ("tower.", "projector.")


def build_model(cfg: TrainConfig, tokenizer):
    """A ConceptVLM (text-only when ``vision`` is null) with the tokenizer's image ids."""
    from .config import VLMConfig
    from .vlm import ConceptVLM

    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens")
    vcfg = VLMConfig(model=cfg.model, vision=cfg.vision, image_token_id=tokenizer.image_id,
                     image_start_id=tokenizer.image_start_id, image_end_id=tokenizer.image_end_id,
                     **asdict(cfg.image))
    model = ConceptVLM(vcfg)
    if cfg.train.init_from:
        from .export import load_weights

        state = load_weights(cfg.train.init_from)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if not any(k.startswith(VISION_PARTS) for k in state):
            # A language model (e.g. converted from a pretrained checkpoint) starting a VLM:
            # the tower keeps its own (hub) weights and the projector its fresh init.
            missing = [k for k in missing if not k.startswith(VISION_PARTS)]
        if [k for k in missing if not k.endswith("patch_order")] or unexpected:
            raise ConfigError(f"train.init_from={cfg.train.init_from}: weights do not fit the model config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model, vcfg


def apply_freeze(model: torch.nn.Module, prefixes: Sequence[str]) -> int:
    """``requires_grad=False`` for parameters whose name starts with any prefix; returns the count."""
    names = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        if not any(n.startswith(p) for n in names):
            raise ConfigError(f"train.freeze: no parameter name starts with {p!r}")
    n = 0
    for name, param in model.named_parameters():
        if any(name.startswith(p) for p in prefixes):
            param.requires_grad_(False)
            n += param.numel()
    return n


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Wrap every transformer block's forward in ``torch.utils.checkpoint`` (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    from .block import Block

    n = 0
    for m in model.modules():
        if isinstance(m, Block):
            def forward(*args, _orig=m.forward, **kwargs):
                if not torch.is_grad_enabled():
                    return _orig(*args, **kwargs)
                return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

            m.forward = forward
            n += 1
    return n


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine to ``min_lr_ratio`` at ``train.steps``."""
    o, total = cfg.optim, cfg.train.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    """Param groups (decay / no decay), split into expert groups with DeepSpeed's helper."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": cfg.optim.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("train.freeze leaves no trainable parameter")
    if any(is_moe_param(p) for g in groups for p in g["params"]):
        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    o = cfg.optim
    if o.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    else:
        opt = torch.optim.SGD(groups, lr=o.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return opt, sched


def build_loaders(cfg: TrainConfig, tokenizer, model) -> list:
    """One loader per virtual rank of this process (``data.virtual_ranks``, normally 1)."""
    from .data import DataConfig, Source, build_loader

    d = cfg.data
    if not d.sources:
        raise ConfigError("data.sources is empty")
    rank, world = dist.get_rank(), dist.get_world_size()
    v = d.virtual_ranks
    sources = [Source(s.shards, s.kind, s.weight, s.caption_prompt) for s in d.sources]
    per_image = model.tokens_per_image or 1  # text-only: no image blocks
    transform = getattr(model, "image_processor", None)
    loaders = []
    for i in range(v):
        dcfg = DataConfig(seq_len=d.seq_len, batch_size=d.batch_size, image_tokens_per_image=per_image, seed=d.seed,
                          shuffle_buffer=d.shuffle_buffer, shuffle_initial=d.shuffle_initial, resample=d.resample,
                          num_workers=d.num_workers, long_docs=d.long_docs, rank=rank * v + i, world_size=world * v,
                          question_first=cfg.image.question_first)
        loaders.append(build_loader(sources, tokenizer, dcfg, image_transform=transform))
    return loaders


def next_batch(iters: list) -> dict:
    """The next micro-batch (rows of every virtual rank concatenated). The global torch RNG
    is left untouched: a DataLoader draws its base seed from it when an iterator starts,
    which would shift the chunk router's sampling after a resume."""
    state = torch.get_rng_state()
    try:
        return _cat_batches([next(it) for it in iters])
    finally:
        torch.set_rng_state(state)


def _cat_batches(batches: list[dict]) -> dict:
    if len(batches) == 1:
        return batches[0]
    out = {}
    for k in batches[0]:
        vals = [b[k] for b in batches if b.get(k) is not None]
        out[k] = torch.cat(vals, 0) if vals and isinstance(vals[0], torch.Tensor) else batches[0][k]
    return out


# ----------------------------------------------------------------------------- training
def train(cfg: TrainConfig, loss_hook: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None) -> dict:
    """Run (or resume) training; returns ``{"steps", "losses", "out_dir"}`` (losses of the
    steps this call ran).

    ``loss_hook(step, loss) -> loss`` may replace the loss before the finiteness check
    (fault-injection in tests).
    """
    import deepspeed

    from .checkpoint import save_checkpoint
    from .data import load_tokenizer
    from .expert_parallel import parallelize_moe
    from .export import export_model
    from .data.counters import skip_summary
    from .logging_utils import MetricLogger, StepMetrics, collapse_warning, grad_norm, skipped_counters
    from .loss import training_loss
    from .resume import resume

    deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # config errors before any work
    preflight(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_cfg = deepspeed_config(cfg, world)
    if world % cfg.parallel.ep_size:
        raise ConfigError(f"parallel.ep_size={cfg.parallel.ep_size} must divide the world size {world}")

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model, vcfg = build_model(cfg, tokenizer)
    apply_freeze(model, cfg.train.freeze)
    parallelize_moe(model, cfg.parallel.ep_size)
    if cfg.train.compile:
        from .block import compile_blocks

        compile_blocks(model)  # before checkpointing wraps the blocks: it then re-runs the compiled forward
    if cfg.parallel.activation_checkpointing:
        enable_activation_checkpointing(model)
    opt, sched = build_optimizer(cfg, model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg,
                                           dist_init_required=False)
    torch.manual_seed(cfg.train.seed + 1 + rank)  # per-rank sampling (chunk router) stream
    loaders = build_loaders(cfg, tokenizer, engine.module)

    out_dir = Path(cfg.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    resolved = _yaml(cfg)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "config.yaml").write_text(resolved)
        (out_dir / "config.yaml").write_text(resolved)

    step, nonfinite_total = 0, 0
    if cfg.train.resume:
        say = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
        st = resume(engine, sched, loaders, ckpt_dir, yaml.safe_load(resolved), say)
        if st is not None:
            step, nonfinite_total = st["step"], st.get("nonfinite_total", 0)
    iters = [iter(ld) for ld in loaders]
    device = engine.device
    log = MetricLogger(out_dir, cfg.train.steps, step, enabled=rank == 0, tensorboard=cfg.train.tensorboard,
                       progress=cfg.train.progress)
    gas = cfg.optim.grad_accum
    losses: list[float] = []
    in_row, manual_norm, warned_collapse = 0, None, False
    schedule, final = cfg.ratio_schedule, RatioTargets.of(cfg.model.chunk)

    def trainer_state() -> dict:
        return {"data": [ld.state_dict() for ld in loaders], "nonfinite_total": nonfinite_total}

    try:
        while step < cfg.train.steps:
            # This step's targets go into the forward; the model's config keeps the final ones.
            targets = RatioTargets(schedule.at(step, final.text), schedule.at(step, final.image)) \
                if schedule.enabled else None
            t0 = time.perf_counter()
            step_metrics, done = StepMetrics(), 0
            while done < gas:
                batch = next_batch(iters)
                images = batch.get("images")
                out = engine(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device),
                             doc_ids=batch["doc_ids"].to(device),
                             images=images.to(device) if images is not None and images.numel() else None,
                             ratio_targets=targets)
                if loss_hook is not None:
                    out.loss = loss_hook(step, out.loss)
                    out.lm_loss = out.loss - out.aux_loss
                loss, info = training_loss(out)
                if info["nonfinite"]:
                    nonfinite_total += 1
                    in_row += 1
                    log.message(f"step {step}: non-finite loss, micro-batch skipped ({in_row} in a row)")
                    if in_row >= cfg.train.max_nonfinite_in_row:
                        raise NonFiniteLossError(
                            f"stopping: {in_row} non-finite losses in a row at step {step} "
                            f"(train.max_nonfinite_in_row={cfg.train.max_nonfinite_in_row}); "
                            "lower optim.lr, raise optim.warmup_steps or check the data")
                    continue
                in_row = 0
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
                    manual_norm = grad_norm(engine.module)  # ZeRO-0 keeps no norm of its own
                engine.step()
                step_metrics.add(out, info["lm_loss"])
                done += 1
            step += 1
            dt = time.perf_counter() - t0
            metrics = step_metrics.result(world)
            losses.append(metrics["loss"])
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                gn = engine.get_global_grad_norm() if engine.zero_optimization_stage() > 0 else manual_norm
                metrics.update(lr=sched.get_last_lr()[0], grad_norm=float(gn) if gn is not None else float("nan"),
                               tokens_per_s=metrics["tokens"] / dt, concepts_per_s=metrics["concepts"] / dt,
                               nonfinite_skipped=nonfinite_total, step_time_s=dt, **skipped_counters(loaders))
                if targets is not None:
                    metrics["target_ratio/text"] = targets.text
                log.log(step, metrics)
                collapsed = collapse_warning(metrics)
                if collapsed and not warned_collapse:  # once: the metric carries on in metrics.jsonl
                    log.message(f"step {step}: {collapsed}")
                    warned_collapse = True
            log.advance()
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                save_checkpoint(engine, ckpt_dir, step, trainer_state(), cfg.train.keep_last, resolved)
        save_checkpoint(engine, ckpt_dir, step, trainer_state(), cfg.train.keep_last, resolved)
        log.message(skip_summary(skipped_counters(loaders)))  # skipped_counters is a collective: all ranks
        if cfg.train.export_at_end:
            # out_dir/export belongs to this run (a rerun or resume replaces its own export)
            export_model(engine.module, vcfg, out_dir / "export", tokenizer, resolved, overwrite=True)
    finally:
        log.close()
    return {"steps": step, "losses": losses, "out_dir": str(out_dir)}


def _yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- CLI
def _configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", required=True, help="train YAML (configs/train/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3 parallel.ep_size=2")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_train_config(args.config, args.overrides)
        deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    own_group = not dist.is_initialized()  # a caller's process group (tests, notebooks) stays up
    try:
        result = train(cfg)
    except (NonFiniteLossError, NonFiniteWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        last = f"{result['losses'][-1]:.4f}" if result["losses"] else "n/a"
        print(f"trained to step {result['steps']} (last loss {last}); outputs in {result['out_dir']}")
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``conceptvlm train`` (sets ``func``)."""
    p = subparsers.add_parser("train", help="train under DeepSpeed (also runs under the deepspeed launcher)")
    _configure_parser(p)
    p.set_defaults(func=run)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .quiet import quiet_library_warnings

    quiet_library_warnings()
    parser = _configure_parser(argparse.ArgumentParser(prog="conceptvlm.train", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
