"""Score the grounding-cell task (:mod:`conceptvlm.data.grounding_cells`) by likelihood
over all 64 cells: the model's answer is the cell whose answer string it finds most
likely after the question; accuracy, accuracy within one cell (Chebyshev distance <= 1,
the gate), and the mean row and column errors in cells (raster merging of image patches
should hurt columns more than rows).
"""
from __future__ import annotations

import functools
import json
from typing import Optional, Sequence

import numpy as np

GATE_WITHIN_ONE = 0.80  # the R=1 model must reach this before merging variants are compared


def answer_cells(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """The answer cells of samples ``0..n-1``: the same draws as ``cell_sample``, without
    drawing the images."""
    import random

    from conceptvlm.data.grounding_cells import centre_cell, make_cell_scene

    cells = []
    for i in range(n):
        rng = random.Random(f"cells:{seed}:{i}")
        cells.append(centre_cell(rng.choice(make_cell_scene(rng))))
    return cells


@functools.lru_cache(maxsize=None)
def answer_prior_nats(tokens_per_answer: int, n: int = 20000, seed: int = 0) -> float:
    """Training loss per answer token of a model that ignores the image: the entropy of the
    centre cell (estimated over ``n`` scenes) spread over the answer's tokens (the rest of
    the answer, " r", " c", eos, is fixed and costs nothing). A run whose loss stays here
    has not learned to look: the prior is where grounding runs sit before they take off."""
    from conceptvlm.data.grounding_cells import GRID

    counts = np.zeros(GRID * GRID)
    for row, col in answer_cells(n, seed):
        counts[row * GRID + col] += 1
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum() / tokens_per_answer)


def cell_metrics(scores_NC: np.ndarray, target_rows: Sequence[int], target_cols: Sequence[int],
                 grid: int = 8) -> dict:
    """``scores_NC``: log-likelihood of each of the ``grid**2`` cells (row-major) per item.
    Ties go to the first cell (argmax)."""
    scores = np.asarray(scores_NC, dtype=float)
    if scores.ndim != 2 or scores.shape[1] != grid * grid:
        raise ValueError(f"scores must be [N, {grid * grid}], got {list(scores.shape)}")
    pred = scores.argmax(1)
    pr, pc = pred // grid, pred % grid
    tr, tc = np.asarray(target_rows), np.asarray(target_cols)
    dr, dc = np.abs(pr - tr), np.abs(pc - tc)
    return {"items": int(len(pred)), "accuracy": float(np.mean((dr == 0) & (dc == 0))),
            "within_one": float(np.mean(np.maximum(dr, dc) <= 1)),
            "row_error": float(dr.mean()), "col_error": float(dc.mean())}


def cell_loglikelihoods(model, tok, image_BCHW, question: str, tokens_per_image: int) -> np.ndarray:
    """Sum log-probability of each of the 64 cell answers after ``question`` about one image."""
    import torch

    from conceptvlm.data.grounding_cells import all_cell_answers
    from conceptvlm.data.templates import Text, encode_parts, vqa_prompt
    from conceptvlm.eval.generate import forward_logits
    from conceptvlm.eval.prompts import question_first

    prompt = vqa_prompt(question, question_first(model))  # the layout the model trained on
    seqs, targets = [], []
    for ans in all_cell_answers():
        ids, labels = encode_parts(prompt + [Text(" " + ans, loss=True)], tok, tokens_per_image,
                                   add_eos=False)
        seqs.append(ids.tolist())
        targets.append(labels)
    images = image_BCHW.unsqueeze(0).expand(len(seqs), *image_BCHW.shape)
    with torch.no_grad():
        logits_BLV, _ = forward_logits(model, seqs, tok.pad_id, images=images)
    logp_BLV = torch.log_softmax(logits_BLV, -1)
    out = np.zeros(len(seqs))
    for b, lab in enumerate(targets):
        pos = np.flatnonzero(lab >= 0)  # answer tokens; position t-1 predicts token t
        out[b] = float(logp_BLV[b, pos - 1, torch.as_tensor(lab[pos])].sum())
    return out


def evaluate_cells(model, tok, shards, limit: Optional[int] = None) -> dict:
    """Read the held-out cell samples and score each over all 64 cells."""
    from conceptvlm.data.counters import DataCounters
    from conceptvlm.data.decode import decode_image
    from conceptvlm.data.shards import expand_shards
    from conceptvlm.data.tario import iter_shard

    model.eval()
    scores, rows, cols = [], [], []
    for url in expand_shards(shards):
        for raw in iter_shard(url, DataCounters()):
            if limit is not None and len(scores) >= limit:
                break
            meta = json.loads(raw["json"])
            pixels = model.image_processor(decode_image(raw["jpg"], raw["__key__"]))
            scores.append(cell_loglikelihoods(model, tok, pixels, meta["question"], model.tokens_per_image))
            rows.append(meta["row"])
            cols.append(meta["col"])
    return cell_metrics(np.stack(scores), rows, cols)
