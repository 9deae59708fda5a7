"""Has a vision tower collapsed? How far apart an exported model's patch vectors are.

A tower trained from scratch can drift to one output for every patch: the language model
then sees a constant image, and a grounding run sits at the answer prior however long it
trains (grounding_cells, R=1, before its tower was frozen). This measures it, at the
tower's output and after the projector, over real images:

- ``spread``: the std of a patch vector across the patches of one image, per feature,
  times sqrt(width), over the mean patch norm; dimensionless. A random tiny tower gives
  about 0.33, trained towers that localise about 1, the collapsed one 0.07 (0.04 after
  the projector).
- ``position``: the std over grid positions of the per-position mean over images (is
  "where" in the vectors at all), per feature.

``conceptvlm experiment tower-spread EXPORT... --data SHARDS`` prints one line per model.
"""
from __future__ import annotations

from typing import Optional

from conceptvlm.vision.projector import COLLAPSED_BELOW, patch_spread


def spread_of(vectors_NPD) -> dict:
    """``vectors_NPD``: ``[images, patches, width]``."""
    x = vectors_NPD.float()
    return {"within_std": float(x.std(1).mean()), "norm": float(x.norm(dim=-1).mean()),
            "spread": float(patch_spread(x)), "position": float(x.mean(0).std(0).mean())}


def tower_spread(model, images_NCHW) -> dict:
    """``{"tower": {...}, "projector": {...}, "collapsed": bool}`` of ``model`` on the images
    (already through its ``image_processor``)."""
    import torch

    if getattr(model, "tower", None) is None:
        raise ValueError("this model has no vision tower")
    if images_NCHW.shape[0] < 2:
        raise ValueError("need at least 2 images (the position spread compares images)")
    model.eval()
    with torch.no_grad():
        tower = model.tower(images_NCHW)
        projected = model.projector(tower)
    n = images_NCHW.shape[0]
    out = {"tower": spread_of(tower.reshape(n, -1, tower.shape[-1])),
           "projector": spread_of(projected.reshape(n, -1, projected.shape[-1])), "images": n}
    out["collapsed"] = min(out["tower"]["spread"], out["projector"]["spread"]) < COLLAPSED_BELOW
    return out


def images_from_shards(shards: str, processor, limit: int = 32):
    """``(images, skipped)``: the images of the first ``limit`` samples of an image-text
    shard spec, decoded as training decodes them and through ``processor``; a sample
    without a readable image is skipped and counted (as the evaluators do)."""
    import torch

    from conceptvlm.data.counters import DataCounters
    from conceptvlm.data.samples import ImageOptions, image_member
    from conceptvlm.eval.datasets import _parsed

    opts, counters = ImageOptions.for_transform(processor), DataCounters()
    pixels = [processor(img) for _, img in _parsed(shards, limit, counters, lambda raw: image_member(raw, opts)[0])]
    if len(pixels) < 2:
        raise ValueError(f"{shards}: fewer than 2 readable images in the first {limit} samples "
                         f"({counters.skipped} skipped)")
    return torch.stack(pixels), counters.skipped


def report_line(name: str, s: dict) -> str:
    t, p = s["tower"], s["projector"]
    verdict = "COLLAPSED" if s["collapsed"] else "ok"
    return (f"{name}: tower spread {t['spread']:.3f} (std {t['within_std']:.3g}, norm {t['norm']:.3g}, position "
            f"{t['position']:.3g}); after projector {p['spread']:.3f} (std {p['within_std']:.3g}, norm "
            f"{p['norm']:.3g}, position {p['position']:.3g}) over {s['images']} images"
            + (f" ({s['skipped']} unreadable skipped)" if s.get("skipped") else "") + f": {verdict}")


def run(exports: list[str], data: str, limit: int = 32, out: Optional[str] = None) -> list[dict]:
    """Measure each exported model on the same images; print a line each."""
    import json
    from pathlib import Path

    from conceptvlm.export import load_exported

    rows = []
    for path in exports:
        model, _ = load_exported(path)
        if getattr(model, "image_processor", None) is None:
            raise ValueError(f"{path}: a text-only model has no tower to measure")
        images, skipped = images_from_shards(data, model.image_processor, limit)
        s = tower_spread(model, images)
        s["skipped"] = skipped
        print(report_line(path, s), flush=True)
        rows.append({"export": path, **s})
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))
    return rows
