"""Referring-expression grounding: Acc@0.5 IoU, RefCOCO/+/g readers, file scoring.

Conventions: annotations (COCO instances) give boxes as pixel ``[x, y, w, h]``; everything
here compares pixel ``[x1, y1, x2, y2]``. Model answers are box text in the one format of
``conceptvlm.data.boxes`` (``"[x1, y1, x2, y2]"`` on a 0-999 grid), parsed with the image
size; an answer with no box is unparseable, counts as wrong and is counted.
An item is correct when ``IoU >= threshold`` (0.5: the standard Acc@0.5).
"""
from __future__ import annotations

import pickle
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torchvision.ops import box_iou

from conceptvlm.data.boxes import parse_box, xywh_to_xyxy

from .io import read_json

Box = Sequence[float]


def box_ious(pred_boxes: Sequence[Optional[Box]], gt_boxes: Sequence[Box]) -> list[Optional[float]]:
    """IoU of each prediction with its own ground truth (the ``box_iou`` diagonal);
    None where the prediction is None. Boxes are pixel xyxy."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} predictions for {len(gt_boxes)} ground truths")
    have = [i for i, p in enumerate(pred_boxes) if p is not None]
    out: list[Optional[float]] = [None] * len(pred_boxes)
    if have:
        p_N4 = torch.tensor([list(map(float, pred_boxes[i])) for i in have], dtype=torch.float64)
        g_N4 = torch.tensor([list(map(float, gt_boxes[i])) for i in have], dtype=torch.float64)
        iou_N = box_iou(p_N4, g_N4).diagonal()
        for i, v in zip(have, iou_N.tolist()):
            out[i] = v
    return out


def box_iou_accuracy(pred_boxes: Sequence[Optional[Box]], gt_boxes: Sequence[Box],
                     threshold: float = 0.5) -> float:
    """Fraction of predictions with ``IoU >= threshold`` against their ground truth.

    Both in pixel xyxy; a None prediction (unparseable answer) counts as wrong.
    """
    ious = box_ious(pred_boxes, gt_boxes)
    if not ious:
        return 0.0
    return sum(1 for v in ious if v is not None and v >= threshold) / len(ious)


# ----------------------------------------------------------------------------- readers

class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and scalars only (what ``refs(unc).p`` holds).

    A pickle names every class or function it rebuilds through ``find_class``; refusing
    all of them (and persistent ids, which the base class already refuses) means no code
    from the file can run: only dicts, lists, tuples, sets, strings, bytes, numbers,
    booleans and None come out.
    """

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle's hook
        raise pickle.UnpicklingError(f"it references {module}.{name}; only plain data is allowed")


def load_plain_pickle(path: Union[str, Path]) -> object:
    """A pickle of plain data (no classes, no functions), or ``ValueError`` naming the file.

    ``encoding="latin1"``: the RefCOCO files were written by Python 2, whose ``str`` is bytes.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _DataOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError, OverflowError) as exc:
        raise ValueError(f"{path}: refused to unpickle ({exc}); convert it to refs.json "
                         "if it comes from elsewhere") from None


def _load_refs(path: Path) -> list[dict]:
    if path.suffix in (".p", ".pkl", ".pickle"):
        data = load_plain_pickle(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of refs, got {type(data).__name__}")
        return data
    data = read_json(path)
    return data["refs"] if isinstance(data, dict) else data


def read_refcoco(refs_path: Union[str, Path], instances_path: Union[str, Path],
                 splits: Optional[Sequence[str]] = None) -> list[dict]:
    """RefCOCO / RefCOCO+ / RefCOCOg in their usual form -> one item per expression.

    ``refs_path``: the refs list (``refs(unc).p`` / ``refs(umd).p`` pickle, or JSON) with
    ``ref_id, ann_id, image_id, split, sentences[{sent_id, sent}]``; ``instances_path``:
    the COCO instances json (``images`` with sizes, ``annotations`` with xywh ``bbox``).
    Items: ``sent_id, ref_id, image_id, split, sentence, file_name, width, height,
    bbox`` (pixel xyxy).
    """
    inst = read_json(instances_path)
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    items = []
    for ref in _load_refs(Path(refs_path)):
        if splits is not None and ref["split"] not in splits:
            continue
        im, ann = images[ref["image_id"]], anns[ref["ann_id"]]
        for s in ref["sentences"]:
            items.append({"sent_id": s["sent_id"], "ref_id": ref["ref_id"],
                          "image_id": ref["image_id"], "split": ref["split"],
                          "sentence": s.get("sent", s.get("raw")),
                          "file_name": im.get("file_name"), "width": im["width"],
                          "height": im["height"], "bbox": list(xywh_to_xyxy(ann["bbox"]))})
    return items


def read_grounding_annotations(path: Union[str, Path]) -> list[dict]:
    """A dataset folder (``refs(*).p`` or ``refs.json`` + ``instances.json``) or a json /
    jsonl list of items as :func:`read_refcoco` returns them (``bbox`` pixel xyxy)."""
    path = Path(path)
    if path.is_dir():
        refs = sorted(path.glob("refs*.p")) + sorted(path.glob("refs*.json"))
        if not refs or not (path / "instances.json").exists():
            raise FileNotFoundError(f"{path}: expected refs(*).p or refs*.json and instances.json")
        return read_refcoco(refs[0], path / "instances.json")
    return list(read_json(path))


# ----------------------------------------------------------------------------- scoring

def score_items(items: Sequence[dict], threshold: float = 0.5) -> dict:
    """Per-split Acc@threshold over items holding ``pred_box`` (pixel xyxy or None),
    ``bbox`` and ``split``; fills each item's ``iou`` and ``correct``."""
    ious = box_ious([it["pred_box"] for it in items], [it["bbox"] for it in items])
    per_split: dict = defaultdict(lambda: {"n": 0, "correct": 0, "unparseable": 0})
    for it, iou in zip(items, ious):
        it["iou"] = iou
        it["correct"] = iou is not None and iou >= threshold
        for name in ["all"] + ([it["split"]] if it.get("split") else []):
            s = per_split[name]
            s["n"] += 1
            s["correct"] += int(it["correct"])
            s["unparseable"] += int(it["pred_box"] is None)
    for name, s in per_split.items():
        s["accuracy"] = round(100.0 * s["correct"] / s["n"], 2) if s["n"] else 0.0
    overall = per_split.pop("all", {"n": 0, "correct": 0, "unparseable": 0, "accuracy": 0.0})
    return {"n": overall["n"], "accuracy": overall["accuracy"],
            "unparseable": overall["unparseable"], "threshold": threshold,
            "per_split": dict(sorted(per_split.items()))}


def score_grounding(predictions_path: Union[str, Path], annotations_path: Union[str, Path],
                    threshold: float = 0.5) -> dict:
    """Score predictions ``[{"sent_id": ..., "answer": "[x1, y1, x2, y2]"}]`` (box text on
    the 0-999 grid) or ``[{"sent_id": ..., "box": [x1, y1, x2, y2]}]`` (pixel xyxy).

    Returns ``{"summary": {n, accuracy, unparseable, per_split, missing}, "items": [...]}``;
    accuracies in percent. Annotated expressions without a prediction are ``missing``.
    """
    gts = {str(it["sent_id"]): it for it in read_grounding_annotations(annotations_path)}
    items, unknown = [], []
    for p in read_json(predictions_path):
        gt = gts.get(str(p["sent_id"]))
        if gt is None:
            unknown.append(p["sent_id"])
            continue
        if p.get("box") is not None:
            pred = [float(v) for v in p["box"]]
        else:
            parsed = parse_box(str(p.get("answer", "")), gt["width"], gt["height"])
            pred = list(parsed) if parsed is not None else None
        items.append({**gt, "answer": p.get("answer"), "pred_box": pred})
    if unknown:
        raise ValueError(f"{len(unknown)} predictions for sent ids not in the annotations, "
                         f"e.g. {unknown[:3]}")
    summary = score_items(items, threshold)
    summary["missing"] = len(gts) - len({str(it["sent_id"]) for it in items})
    return {"summary": summary, "items": items}
