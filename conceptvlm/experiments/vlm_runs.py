"""Vision experiment runs (``kind: vlm``): their data and their held-out scoring.

Kept apart from :mod:`.runner` so that a text run never imports it: an edit here (the
grounding protocol, say) leaves the text tables' code revision, and their tens of CPU
hours of runs, standing (:data:`.revision.TEXT_RUNS_SKIP`; a test checks the import).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .protocol import ratio_matched


def _synthetic_dir(root: Path, split: str, kind: str, n: int, start: int) -> list[str]:
    """The shards of ``n`` synthetic samples of ``kind`` (written once, then reused). They
    are written into a ``.partial`` folder renamed into place when complete, so a folder
    that exists is whole: a process killed while writing leaves nothing that is reused."""
    import shutil

    from conceptvlm.data.grounding_cells import write_cell_shards
    from conceptvlm.data.synthetic import write_synthetic_shards

    d = root / "synthetic" / split / f"{kind}-{n}"  # experiments with other sizes don't share
    if not d.exists():
        partial = d.with_name(d.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # what a killed writer left
        if kind == "cells":  # the grounding-cell task (VQA samples)
            write_cell_shards(partial, num=n, shard_size=500, seed=0, start_index=start)
        else:
            write_synthetic_shards(kind, partial, num=n, shard_size=500, seed=0, start_index=start)
        partial.rename(d)
    return sorted(str(p) for p in d.glob("*.tar"))


def _kind(name: str) -> str:
    return "vqa" if name == "cells" else name  # cell samples train with the ordinary VQA reader


def prepare_vlm_data(exp: dict, root: Path) -> dict:
    """``{"train_sources", "held", "train_eval", "info"}`` of a vision experiment."""
    specs: dict[str, dict[str, list[str]]] = {"train": {}, "held": {}}
    for kind, (n_train, n_held) in exp["synthetic"].items():
        for split, n, start in (("train", n_train, 0), ("held", n_held, 10**6)):
            specs[split][kind] = _synthetic_dir(root, split, kind, n, start)
    weights = exp.get("weights", {})
    return {"train_sources": [{"shards": s, "kind": _kind(k), "weight": float(weights.get(k, 1.0))}
                              for k, s in specs["train"].items()],
            "held": specs["held"], "train_eval": {}, "info": {"synthetic": exp["synthetic"]}}


# ---------------------------------------------------------------------------- scoring
def _evaluate_suites(model, tok, held: dict, limit: Optional[int], out_dir: Path) -> dict:
    from conceptvlm.eval.suites import evaluate

    res = {}
    for suite, kind in (("text", "text"), ("vqa", "vqa"), ("grounding", "grounding")):
        if kind in held:
            s = evaluate(suite, model, tok, data=held[kind], limit=limit, batch_size=16,
                         out_path=out_dir / f"eval_{suite}.json")["summary"]
            res[suite] = {k: v for k, v in s.items() if isinstance(v, (int, float, str))}
    return res


def realised_ratios_vlm(model, tok, held: dict) -> dict:
    """Tokens per concept of each modality (eval rule) over the held-out caption, VQA and
    grounding-cell documents, packed as in training, and of all positions (``all``)."""
    return ratios_of(modality_counts(model, tok, held))


def ratios_of(counts: dict[str, tuple[int, int]]) -> dict:
    """``{modality: tokens / concepts, "all": ...}`` from :func:`modality_counts`."""
    if not counts:
        return {}
    total = tuple(sum(c[i] for c in counts.values()) for i in (0, 1))
    return {m: n / max(k, 1) for m, (n, k) in {**counts, "all": total}.items()}


def target_ratio_all(counts: dict[str, tuple[int, int]], targets: dict[str, float]) -> float:
    """The ratio over all positions at which each modality would sit exactly at its target,
    with the held-out mix of modalities: ``N / sum_m(N_m / R_m)``. Linear FLOPs per token
    scale with it (image positions merging 4:1 cost less than text positions at 1.5)."""
    n = sum(c[0] for c in counts.values())
    concepts = sum(c[0] / targets.get(m, 1.0) for m, c in counts.items())
    return n / concepts if concepts else 1.0


def modality_counts(model, tok, held: dict) -> dict[str, tuple[int, int]]:
    """``{modality: (tokens, concepts)}`` (eval-rule boundaries) over the held-out caption,
    VQA and grounding-cell documents, packed as in training."""
    import torch

    from conceptvlm.data import DataConfig, Source, build_loader
    from conceptvlm.eval.prompts import question_first

    kinds = [k for k in ("caption", "vqa", "cells") if k in held]
    if not kinds:
        return {}
    cfg = DataConfig(seq_len=256, batch_size=8, image_tokens_per_image=model.tokens_per_image, seed=0, epochs=1,
                     shuffle_buffer=0, question_first=question_first(model))
    loader = build_loader([Source(held[k], _kind(k)) for k in kinds], tok, cfg, image_transform=model.image_processor)
    tokens: dict[str, int] = {}
    bounds: dict[str, int] = {}
    model.eval()
    with torch.no_grad():
        for b in loader:
            out = model(b["input_ids"], doc_ids=b["doc_ids"], images=b["images"])
            for m, st in out.chunk_stats.items():
                tokens[m] = tokens.get(m, 0) + int(st["tokens"])
                bounds[m] = bounds.get(m, 0) + int(st["eval_boundaries"])
    return {m: (tokens[m], bounds[m]) for m in tokens}


def boundary_picture(model, tok, held: dict, path: Path, label: str) -> Optional[str]:
    """Concept regions of ``model`` on the first held-out caption sample (image + text)."""
    import torch

    from conceptvlm.data.counters import DataCounters
    from conceptvlm.data.samples import caption_document
    from conceptvlm.data.shards import expand_shards
    from conceptvlm.data.tario import iter_shard
    from conceptvlm.data.templates import encode_parts
    from conceptvlm.viz import boundary_figure

    if "caption" not in held or getattr(model, "image_processor", None) is None:
        return None
    raw = next(iter_shard(expand_shards(held["caption"])[0], DataCounters()))
    parts, images = caption_document(raw)
    ids, _ = encode_parts(parts, tok, model.tokens_per_image)
    pixels = torch.stack([model.image_processor(im) for im in images])
    path.parent.mkdir(parents=True, exist_ok=True)
    boundary_figure({label: model}, torch.tensor([list(ids)]), pixels, lambda i: tok.decode([i]), path)
    return path.name


def score_vlm_run(row: dict, model, tok, exp: dict, variant: dict, cfg, data: dict, run_dir: Path,
                  results_dir: Path) -> tuple[float, float]:
    """Fill ``row`` with the held-out scores of one vision run (suites, per-modality
    ratios, grounding cells, boundary picture); returns the ratio over all positions,
    realised and at the targets, which the run's linear FLOPs per token follow."""
    import time

    limit = exp.get("eval_limit")
    row["held"] = _evaluate_suites(model, tok, data["held"], limit, run_dir)
    counts = modality_counts(model, tok, data["held"])
    row["held"]["ratio"] = ratios_of(counts)
    row["held"]["tokens"] = {m: n for m, (n, _) in counts.items()}
    if "cells" in data["held"]:
        from .grounding import evaluate_cells

        t_eval = time.time()
        row["held"]["cells"] = evaluate_cells(model, tok, data["held"]["cells"], limit)
        row["eval_wall_s"] = time.time() - t_eval
        ratio = row["held"]["ratio"]
        row.update(protocol=2, image_order=cfg.image.image_order, image_positions=cfg.image.image_positions,
                   matched=variant["router"] == "none" or (
                       ratio_matched(ratio.get("text"), row["R"]) and ratio_matched(ratio.get("image"), row["R_image"])))
    if variant["router"] != "none":
        pic = results_dir / f"{exp['name']}_{variant['name']}_s{row['seed']}_boundaries.png"
        row["boundary_picture"] = boundary_picture(model, tok, data["held"], pic, f"{variant['name']} seed {row['seed']}")
    targets = {"text": row["R"], "image": row["R_image"] or 1.0} if variant["router"] != "none" else {}
    return row["held"]["ratio"].get("all", row["R"]), target_ratio_all(counts, targets)
