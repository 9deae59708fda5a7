"""``conceptvlm demo``: the embedded default, end to end on CPU in under ten minutes.

1. writes synthetic webdataset shards (captions, VQA, grounding, text; train and held-out),
2. trains the tiny ConceptVLM (cosine router, text target 1.5, image target 3) and the
   same model with router ``none`` (the baseline MoE) side by side, one trainer process
   each (``python -m conceptvlm.train``: DeepSpeed, ZeRO-1),
3. evaluates both exported models: text bits-per-byte, VQA accuracy (overall and per
   question type), grounding Acc@0.5, against blind baselines (the most frequent answer
   to the same question in training) and against the same model shown blank images,
4. writes ``report.md`` with loss curves, realised ratios per modality over training and
   boundary pictures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

TRAIN_CONFIG = "configs/train/tiny_vlm.yaml"
KINDS = {"caption": (1500, 40), "vqa": (3000, 200), "grounding": (1500, 100), "text": (800, 60)}
# Sampling weights of the training mix: mostly the image tasks the tiny model can learn in
# a few minutes (VQA, captions); grounding and plain text keep a share.
WEIGHTS = {"vqa": 2.0, "caption": 1.0, "grounding": 0.5, "text": 0.5}
# name -> (router, image positions, image patch order)
# (The 2D-aware variant, Hilbert order + 2D positions, is compared with this one in the
# router_2d experiment: configs/experiments/router_2d.yaml.)
MODELS = {"ConceptMoE": ("cosine", "1d", "raster"),
          "baseline MoE": ("none", "1d", "raster")}


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_")


def _shards(root: Path, seed: int) -> dict[str, dict[str, str]]:
    """Train and held-out shards per kind (held-out samples use disjoint indices)."""
    from .data.synthetic import write_synthetic_shards

    specs: dict[str, dict[str, str]] = {"train": {}, "held": {}}
    for kind, (n_train, n_held) in KINDS.items():
        for split, n, start in (("train", n_train, 0), ("held", n_held, 10**6)):
            d = root / split / kind
            if not d.exists():
                write_synthetic_shards(kind, d, num=n, shard_size=500, seed=seed, start_index=start)
            paths = sorted(str(p) for p in d.glob("*.tar"))
            specs[split][kind] = paths
    return specs


def _train_config(name: str, variant: tuple[str, str, str], specs: dict, out: Path, steps: int, seed: int):
    """The demo's train config for one model: ``configs/train/tiny_vlm.yaml`` + the demo mix."""
    from omegaconf import OmegaConf

    from .train_config import load_train_config

    router, positions, order = variant
    run_dir = out / "runs" / _slug(name)
    sources = [{"shards": paths, "kind": kind, "weight": WEIGHTS.get(kind, 1.0)}
               for kind, paths in specs["train"].items()]
    base = OmegaConf.to_container(OmegaConf.load(_repo_file(TRAIN_CONFIG)))
    base["data"]["sources"] = sources
    return load_train_config(None, overrides=[
        f"model.chunk.router={router}", f"image.image_positions={positions}", f"image.image_order={order}",
        "model.chunk.target_ratio_text=1.5", "model.chunk.target_ratio_image=3.0",
        "model.chunk.ratio_loss_weight_text=1.0", "model.chunk.ratio_loss_weight_image=0.3",
        "model.chunk.split_loss_weight_image=0.3", "model.vocab_size=262", f"train.steps={steps}",
        f"train.out_dir={run_dir}", f"train.seed={seed}",
        "train.export_at_end=true", "train.save_every=0", "train.progress=false", "data.batch_size=8",
        "data.shuffle_buffer=500", f"optim.warmup_steps={max(steps // 20, 1)}"], data=base)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _train_all(configs: dict) -> dict[str, Path]:
    """Train the models side by side, one process each with an equal share of the cores.

    Small models use cores poorly (two threads train a tiny model only ~1.4x faster
    than one), so two one-thread runs at once finish ~1.4x sooner than one after the
    other. Each run is the real trainer (``python -m conceptvlm.train``) on a config
    written next to its outputs; its log is ``runs/NAME/train.log``.
    """
    from .train import _yaml, free_port

    todo = {name: cfg for name, cfg in configs.items() if not (Path(cfg.train.out_dir) / "export").exists()}
    width = max(1, min(len(todo), _cores()))
    threads = max(1, _cores() // width)
    pending, running, failed = list(todo.items()), [], []
    while pending or running:
        while pending and len(running) < width:
            name, cfg = pending.pop(0)
            run_dir = Path(cfg.train.out_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "train.yaml").write_text(_yaml(cfg))
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MASTER_PORT=str(free_port()))
            log = open(run_dir / "train.log", "w")
            print(f"[demo] training {name} (router {cfg.model.chunk.router}) for {cfg.train.steps} steps, "
                  f"{threads} thread(s) -> {run_dir}", flush=True)
            proc = subprocess.Popen([sys.executable, "-m", "conceptvlm.train", "--config", str(run_dir / "train.yaml")],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((name, run_dir, proc, log))
        time.sleep(0.5)
        for item in list(running):
            name, run_dir, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode:
                tail = (run_dir / "train.log").read_text().splitlines()[-15:]
                failed.append(f"{name} (exit {proc.returncode}); last lines of {run_dir / 'train.log'}:\n"
                              + "\n".join(tail))
    if failed:
        raise RuntimeError("demo training failed: " + "\n".join(failed))
    return {name: Path(cfg.train.out_dir) / "export" for name, cfg in configs.items()}


def _repo_file(rel: str) -> Path:
    """A config shipped in the source checkout (works from any working directory)."""
    p = Path(rel)
    return p if p.is_file() else Path(__file__).resolve().parents[1] / rel


def _blind_vqa_baseline(train_specs: list[str], held: list[Any]) -> dict[str, Any]:
    """Accuracy of answering without the image: the most frequent training answer overall,
    and the most frequent training answer to the same question text (the "question
    prior", overall and per question type)."""
    from .data.counters import DataCounters
    from .data.shards import expand_shards
    from .data.tario import iter_shard
    from .eval.vqa import summarize, vqa_accuracy

    per_q: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    counters = DataCounters()
    for url in expand_shards(train_specs):
        for raw in iter_shard(url, counters):
            meta = json.loads(raw["json"])
            answer = Counter(meta["answers"]).most_common(1)[0][0]
            per_q[meta["question"]][answer] += 1
            overall[answer] += 1
    top = overall.most_common(1)[0][0]
    prior = summarize([{"accuracy": vqa_accuracy(per_q[s.question].most_common(1)[0][0] if per_q[s.question]
                                                 else top, s.answers), "question_type": s.question_type}
                       for s in held])
    return {"most_frequent_answer": 100 * sum(vqa_accuracy(top, s.answers) for s in held) / len(held),
            "question_prior": prior["overall"], "question_prior_per_type": prior["perQuestionType"]}


def _vqa_blank_images(model, tokenizer, held: list[Any], out_path: Path) -> dict:
    """VQA with every image replaced by a blank one (the normalised mean colour): what the
    model answers from the question alone. Far below the real-image accuracy = it reads
    the image."""
    import dataclasses

    import torch

    from .eval.vqa_runner import run_vqa

    blank = [dataclasses.replace(s, image=torch.zeros_like(s.image)) for s in held]
    return run_vqa(model, tokenizer, blank, image_tokens_per_image=model.tokens_per_image, batch_size=16,
                   out_path=out_path)["summary"]


def _plots(out: Path, metrics: dict[str, list[dict]]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in metrics.items():
        ax.plot([r["step"] for r in rows], [r["lm_loss"] for r in rows], label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training LM loss (nats/token)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("ConceptMoE vs the same MoE without chunking")
    fig.tight_layout()
    paths["loss"] = "loss.png"
    fig.savefig(out / paths["loss"], dpi=110)
    plt.close(fig)

    rows = metrics["ConceptMoE"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for mod, target, colour in (("text", 1.5, "tab:blue"), ("image", 3.0, "tab:red")):
        steps = [r["step"] for r in rows if f"eval_ratio/{mod}" in r]
        ax.plot(steps, [r[f"eval_ratio/{mod}"] for r in rows if f"eval_ratio/{mod}" in r], color=colour,
                lw=1, label=f"{mod} (eval rule)")
        ax.plot(steps, [r[f"ratio/{mod}"] for r in rows if f"ratio/{mod}" in r], color=colour, lw=0.6,
                alpha=0.4, label=f"{mod} (sampled)")
        ax.axhline(target, color=colour, ls="--", lw=1, label=f"{mod} target {target}")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens per concept")
    ax.set_ylim(1, 6)
    ax.legend(fontsize=8, ncol=3)
    ax.set_title("Realised compression ratio per modality (training batches)")
    fig.tight_layout()
    paths["ratio"] = "ratio.png"
    fig.savefig(out / paths["ratio"], dpi=110)
    plt.close(fig)
    return paths


def _boundary_picture(out: Path, models: dict, tokenizer, held_caption: list[str]) -> str:
    """Boundaries of the trained ConceptMoE variants on a held-out caption with its image."""
    import torch

    from .data.counters import DataCounters
    from .data.samples import caption_document
    from .data.shards import expand_shards
    from .data.tario import iter_shard
    from .data.templates import encode_parts
    from .viz import boundary_figure

    raw = next(iter_shard(expand_shards(held_caption)[0], DataCounters()))
    parts, images = caption_document(raw)
    model = next(iter(models.values()))
    ids, _ = encode_parts(parts, tokenizer, model.tokens_per_image)
    pixels = torch.stack([model.image_processor(im) for im in images])

    def piece(i: int) -> str:
        return tokenizer.decode([i])

    boundary_figure(models, torch.tensor([list(ids)]), pixels, piece, out / "boundaries.png")
    return "boundaries.png"


def run_demo(out: str | Path = "demo_out", steps: int = 1500, seed: int = 0) -> dict:
    """Run the whole demo; returns the summary (also written to ``OUT/summary.json``)."""
    import torch

    from .eval.datasets import vqa_samples_from_shards
    from .eval.suites import evaluate
    from .export import load_exported
    from .logging_utils import read_jsonl

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] writing synthetic shards under {out / 'shards'}", flush=True)
    specs = _shards(out / "shards", seed)
    exports = _train_all({name: _train_config(name, variant, specs, out, steps, seed)
                          for name, variant in MODELS.items()})
    t_train = time.time() - t0

    results: dict[str, dict] = {}
    models = {}
    held_vqa = None
    for name, path in exports.items():
        model, tok = load_exported(path)
        models[name] = model
        torch.manual_seed(seed)
        r = {}
        for suite, data in (("text", specs["held"]["text"]), ("vqa", specs["held"]["vqa"]),
                            ("grounding", specs["held"]["grounding"])):
            res = evaluate(suite, model, tok, data=data, batch_size=16,
                           out_path=out / "eval" / f"{_slug(name)}_{suite}.json")
            r[suite] = res["summary"]
        held_vqa = held_vqa or vqa_samples_from_shards(specs["held"]["vqa"], model.image_processor)
        r["vqa_blank_images"] = _vqa_blank_images(model, tok, held_vqa,
                                                  out / "eval" / f"{_slug(name)}_vqa_blank_images.json")
        results[name] = r
        print(f"[demo] {name}: bits/byte {r['text']['bits_per_byte']:.3f}, VQA {r['vqa']['overall']:.1f}% "
              f"(blank images: {r['vqa_blank_images']['overall']:.1f}%), "
              f"grounding Acc@0.5 {r['grounding'].get('accuracy', 0):.1f}%", flush=True)

    blind = _blind_vqa_baseline(specs["train"]["vqa"], held_vqa)
    metrics = {name: read_jsonl(Path(p).parent / "metrics.jsonl") for name, p in exports.items()}
    plots = _plots(out, metrics)
    plots["boundaries"] = _boundary_picture(out, {"ConceptMoE": models["ConceptMoE"]}, tok, specs["held"]["caption"])
    summary = {"steps": steps, "seed": seed, "train_seconds": t_train, "total_seconds": time.time() - t0,
               "results": results, "blind_vqa": blind, "plots": plots,
               "final_train_ratio": {m: metrics["ConceptMoE"][-1].get(f"eval_ratio/{m}") for m in ("text", "image")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    _report(out, summary)
    print(f"[demo] done in {summary['total_seconds']:.0f} s: {out / 'report.md'}", flush=True)
    return summary


QUESTION_TYPE_NAMES = {"count": "how many shapes", "count_shape": "how many <shape>s", "colour": "colour of <shape>",
                       "shape": "shape of <colour> object", "where": "where is <object>",
                       "exists": "is there <colour> <shape>", "exists_colour": "is there <colour> object",
                       "background": "background colour"}


def _report(out: Path, s: dict) -> None:
    rows = []
    for name, r in s["results"].items():
        g = r["grounding"]
        rows.append(f"| {name} | {r['text']['bits_per_byte']:.3f} | {r['text']['perplexity']:.2f} | "
                    f"{r['vqa']['overall']:.1f} | {r['vqa_blank_images']['overall']:.1f} | "
                    f"{g.get('accuracy', 0):.1f} | {g.get('unparseable', 0)} |")
    b = s["blind_vqa"]
    names = list(s["results"])
    type_rows = []
    for qt, prior in b["question_prior_per_type"].items():
        cells = " | ".join(f"{s['results'][n]['vqa']['perQuestionType'].get(qt, 0):.1f}" for n in names)
        type_rows.append(f"| {QUESTION_TYPE_NAMES.get(qt, qt)} | {cells} | {prior:.1f} |")
    ratio = {m: "n/a" if r is None else f"{r:.2f}" for m, r in s["final_train_ratio"].items()}
    text = f"""# ConceptVLM demo report

Tiny ConceptVLM (64x64 images, 2-block ViT, 4-layer MoE LM, 4 experts top-2) trained for
{s['steps']} steps on synthetic captions, VQA, grounding and text, on CPU: ConceptMoE with
the cosine router (text target 1.5, image target 3) and the baseline: the same model with
router `none` (every token a concept: a plain MoE), trained side by side (one process
each). Training took {s['train_seconds']:.0f} s for both models; the whole demo
{s['total_seconds']:.0f} s.

## Held-out results

| model | text bits/byte | text perplexity | VQA accuracy (%) | VQA, blank images (%) | grounding Acc@0.5 (%) | unparseable boxes |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Blind VQA baselines (no image): most frequent answer {b['most_frequent_answer']:.1f}%,
most frequent answer to the same question {b['question_prior']:.1f}% (the question
prior). "Blank images" is the same model with every image replaced by a blank one: the
gap to the real-image accuracy is what the model reads from the image.

VQA accuracy (%) per question type:

| question type | {" | ".join(names)} | question prior |
|---|{"---|" * len(names)}---|
{chr(10).join(type_rows)}

Realised compression on the last training batch (eval rule): text
{ratio['text']}, image {ratio['image']} (targets 1.5 and 3).

## Loss curves

![loss]({s['plots']['loss']})

## Compression ratio per modality over training

![ratio]({s['plots']['ratio']})

## Where the concepts are (held-out caption)

![boundaries]({s['plots']['boundaries']})
"""
    (out / "report.md").write_text(text)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="synthetic shards -> train ConceptVLM and a baseline on CPU -> "
                                           "evaluate -> report.md with plots")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: (run_demo(a.out, a.steps, a.seed), 0)[1])
