"""The chunk module: where concept boundaries go, and the ratio loss that sets how many.

Routers give a boundary probability ``p_t`` per token (DESIGN.md §2):

* ``cosine`` (the paper's): ``p_t = clamp((1 - cos(Wq h_t, Wk h_{t-1})) / 2, 0, 1)``;
  a token unlike its predecessor starts a new concept.
* ``linear``: a learned scorer ``sigmoid(a . h_t + b . h_{t-1} + c)`` (ablation).
* ``fixed``: a boundary every R tokens of a segment (ablation; no learning).
* ``none``: every token is a boundary, i.e. the plain MoE.

``p_t = 1`` is forced at the first token, at every document start of a packed row and
wherever the modality changes (text / image patches / image markers), so no concept
spans two documents or two modalities. Training samples ``b ~ Bernoulli(sharpen(p))``;
evaluation thresholds ``b = [p >= threshold]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ChunkConfig
from .decoding_state import Previous
from .loss import global_mean, reduce_sums
from .positions import segment_positions
from .precision import compute_dtype

# Modality ids of each position (the VLM's modality mask); markers belong to no loss.
TEXT, IMAGE, MARKER = 0, 1, 2
MODALITY_NAMES = {TEXT: "text", IMAGE: "image"}


class RatioTargets(NamedTuple):
    """Target compression ratio R (tokens per concept) of each modality's positions."""

    text: float
    image: float

    @classmethod
    def of(cls, cfg: ChunkConfig) -> "RatioTargets":
        """The configured targets."""
        return cls(cfg.target_ratio_text, cfg.target_ratio_image)


def ratio_loss(boundary: torch.Tensor, prob: torch.Tensor, target_ratio: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Compression-ratio loss over the positions where ``mask`` is true.

    ``L = R/(R-1) * ((R-1) F G + (1-F)(1-G))`` with ``F = mean(b)`` (no gradient) and
    ``G = mean(p)``. ``dL/dG = R/(R-1) ((R-1) F - (1-F))`` vanishes exactly at
    ``F = 1/R`` and otherwise pushes the boundary rate towards ``1/R``; ``L = 1`` at
    ``F = G = 1/R``. Returns a zero (still attached to ``prob``) when no position counts.
    """
    if target_ratio <= 1.0:
        raise ValueError(f"target_ratio must be > 1, got {target_ratio}")
    b = boundary.detach().to(prob.dtype)
    if mask is None:
        F_rate, G = b.mean(), prob.mean()
    else:
        m = mask.to(prob.dtype)
        n = m.sum()
        if n.item() == 0:
            return prob.sum() * 0.0
        F_rate, G = (b * m).sum() / n, (prob * m).sum() / n
    return ratio_loss_from_rates(F_rate, G, target_ratio)


def ratio_loss_from_rates(F_rate: torch.Tensor, G: torch.Tensor, R: float) -> torch.Tensor:
    """``R/(R-1) * ((R-1) F G + (1-F)(1-G))`` (see :func:`ratio_loss`)."""
    R = float(R)
    return R / (R - 1.0) * ((R - 1.0) * F_rate * G + (1.0 - F_rate) * (1.0 - G))


def split_loss(p_N: torch.Tensor, R: float) -> torch.Tensor:
    """Binary cross-entropy of ``p`` against "boundary" for its top ``round(N/R)``
    positions and "no boundary" for the rest (the split taken from the detached ``p``).

    The ratio loss moves the *mean* of p, through G, by the same amount at every
    position; where many positions have nearly equal p (identical background patches)
    the eval rule then flips all of them at once and the realised ratio oscillates
    between ~1 and the whole image (measured in the demo mix: image ratio 1.1 to 64 for
    a target of 3). This term instead separates the positions the router ranks highest
    from the rest, so the threshold realises 1/R; ties are broken by whatever small
    differences p has, which the term then widens.
    """
    n = p_N.shape[0]
    k = int(round(n / float(R)))
    if n == 0 or k <= 0 or k >= n:
        return p_N.sum() * 0.0
    target = torch.zeros_like(p_N)
    target[torch.topk(p_N.detach(), k).indices] = 1.0
    eps = 1e-6
    return F.binary_cross_entropy(p_N.clamp(eps, 1 - eps), target)


def sharpen(p: torch.Tensor, s: float) -> torch.Tensor:
    """``p^(1/s)`` above 0.5, ``1 - (1-p)^(1/s)`` below: pushes sampling towards 0/1."""
    if s == 1.0:
        return p
    return torch.where(p > 0.5, p.clamp_min(0).pow(1.0 / s), 1.0 - (1.0 - p).clamp_min(0).pow(1.0 / s))


def _with_prev(x_BL: torch.Tensor, prev_B: torch.Tensor) -> torch.Tensor:
    """``x`` shifted right by one along L, the first slot taken from ``prev``."""
    return torch.cat([prev_B[:, None].to(x_BL.dtype), x_BL[:, :-1]], 1)


def forced_boundaries(doc_BL: torch.Tensor, valid_BL: torch.Tensor, modality_BL: torch.Tensor,
                      prev: Optional[Previous] = None) -> torch.Tensor:
    """True at the first real token of a row, document starts and modality changes
    (image markers always), each judged against the token before (``prev`` for the
    first token of a call; default: nothing came before)."""
    if prev is None:
        prev = Previous.nothing(doc_BL.shape[0], 1, doc_BL.device, torch.float32)
    start = ((doc_BL != _with_prev(doc_BL, prev.doc)) | (modality_BL != _with_prev(modality_BL, prev.modality))
             | ~_with_prev(valid_BL, prev.valid) | (modality_BL == MARKER))
    return start & valid_BL


class ChunkRouter(nn.Module):
    """Boundary probabilities ``p_BL`` from encoder states ``h_BLD`` (forced positions = 1)."""

    def __init__(self, cfg: ChunkConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        if cfg.router == "cosine":
            self.wq = nn.Linear(d_model, d_model, bias=False)
            self.wk = nn.Linear(d_model, d_model, bias=False)
            for w in (self.wq, self.wk):
                w.is_identity_init = True  # start as plain cosine similarity of h_t, h_{t-1}
        elif cfg.router == "linear":
            self.score = nn.Linear(2 * d_model, 1, bias=True)

    def forward(self, h_BLD: torch.Tensor, forced_BL: torch.Tensor, modality_BL: torch.Tensor,
                prev: Previous, targets: Optional[RatioTargets] = None) -> torch.Tensor:
        """``prev``: the token before (zeros when nothing came before); ``targets`` (the
        ``fixed`` router's spacing) default to the configured ones."""
        router = self.cfg.router
        h_prev = _with_prev(h_BLD, prev.h) if router in ("cosine", "linear") else None
        if router == "cosine":
            q = F.normalize(self.wq(h_BLD), dim=-1)
            k = F.normalize(self.wk(h_prev), dim=-1)  # k_{t-1}; zeros before the first token
            cos = (q * k).sum(-1)
            p = torch.clamp((1.0 - cos) / 2.0, 0.0, 1.0)
        elif router == "linear":
            p = torch.sigmoid(self.score(torch.cat([h_BLD, h_prev], -1)).squeeze(-1))
        elif router == "fixed":
            # Positions in >= float32: bf16 holds integers exactly only up to 256, and
            # past that the spacing drifts (10.5 tokens per concept at R = 2 by 2k tokens).
            pos = segment_positions(forced_BL, prev.segment_pos).to(compute_dtype(h_BLD.dtype))
            R_text, R_image = targets or RatioTargets.of(self.cfg)
            R = torch.where(modality_BL == IMAGE, R_image, R_text)
            p = (torch.floor(pos / R) != torch.floor((pos - 1) / R)).to(h_BLD.dtype)
        else:  # none
            p = torch.ones(h_BLD.shape[:2], dtype=h_BLD.dtype, device=h_BLD.device)
        return torch.where(forced_BL, torch.ones_like(p), p.to(h_BLD.dtype))

    def boundaries(self, p_BL: torch.Tensor, forced_BL: torch.Tensor, valid_BL: torch.Tensor) -> torch.Tensor:
        """Sampled (training) or thresholded (eval) boundaries; never on padding."""
        if self.training and self.cfg.sample_in_training and learned_router(self.cfg):
            # NaN p (diverged weights) would stop torch.bernoulli; its loss is non-finite
            # too, so let the trainer's guard skip and count the micro-batch instead.
            b = torch.bernoulli(sharpen(p_BL.detach(), self.cfg.sharpen).nan_to_num(0.0)).bool()
        else:
            b = p_BL >= self.cfg.threshold
        return (b | forced_BL) & valid_BL


@dataclass
class Chunks:
    """Where the concepts are. ``M`` = max concepts per row in the batch."""

    prob_BL: torch.Tensor  # router probability, forced positions = 1
    boundary_BL: torch.Tensor  # bool, token starts a concept
    concept_of_BL: torch.Tensor  # index j(t) of the concept token t belongs to
    pos_BM: torch.Tensor  # token index of each concept's boundary (0 on padding)
    valid_BM: torch.Tensor  # bool, real concept (rows have different counts)


def locate_concepts(prob_BL: torch.Tensor, boundary_BL: torch.Tensor) -> Chunks:
    """Per-row boundary positions, padded to the batch's max count (no loop over positions)."""
    counts_B = boundary_BL.sum(1)
    L = boundary_BL.shape[1]
    # One token per row (a decode step) has at most one concept: no need to read the count.
    M = 1 if L <= 1 or not boundary_BL.numel() else max(int(counts_B.max()), 1)
    # A stable sort of "not a boundary" puts each row's boundary indices first, in order.
    order = torch.argsort((~boundary_BL).to(torch.int8), dim=1, stable=True)[:, :M]
    valid_BM = torch.arange(M, device=prob_BL.device)[None, :] < counts_B[:, None]
    pos_BM = torch.where(valid_BM, order, torch.zeros_like(order))
    concept_of = (torch.cumsum(boundary_BL.long(), 1) - 1).clamp_min(0)
    return Chunks(prob_BL, boundary_BL, concept_of, pos_BM, valid_BM)


def gather_rows(x_BL: torch.Tensor, idx_BM: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, m]]`` for ``x`` of shape [B, L] or [B, L, D]."""
    if x_BL.dim() == 2:
        return torch.gather(x_BL, 1, idx_BM)
    return torch.gather(x_BL, 1, idx_BM[..., None].expand(-1, -1, x_BL.shape[-1]))


def learned_router(cfg: ChunkConfig) -> bool:
    return cfg.router in ("cosine", "linear")


def chunk_statistics(chunks: Chunks, modality_BL: torch.Tensor, valid_BL: torch.Tensor,
                     cfg: ChunkConfig, across_ranks: bool = False, targets: Optional[RatioTargets] = None
                     ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Weighted ratio loss (summed over modalities) and per-modality statistics.

    ``targets``: this step's R per modality (a warm-up schedule passes its current
    values; the default is the configured targets, which the config keeps).

    F and G of each modality's loss are taken over that modality's positions only;
    image markers belong to neither. ``ratio`` is tokens / boundaries in the batch.

    With ``across_ranks`` (training under data parallelism) F and G are taken over the
    global batch (``loss.global_mean``), so N ranks train exactly like one process on the
    same global batch. The statistics stay per rank.
    """
    p, b = chunks.prob_BL, chunks.boundary_BL
    # The boundaries the eval rule would place. Taking the loss's F from them (the
    # default) pulls the *realised* (eval-mode) rate to 1/R; F from the sampled training
    # boundaries leaves a gap wherever p clusters near the threshold (measured: image
    # ratio 3.9 on held-out data for a target of 3 after 300 steps).
    b_eval = p.detach() >= cfg.threshold
    b_loss = b if cfg.loss_rate == "sampled" else b_eval
    masks = {mod: valid_BL & (modality_BL == mod) for mod in MODALITY_NAMES}
    # Per modality: positions, loss boundaries, sum of p (the only term with a gradient).
    local = torch.stack([torch.stack([m.sum().to(p.dtype), (b_loss & m).sum().to(p.dtype), (p * m).sum()])
                         for m in masks.values()])
    glob, world = reduce_sums(local, across_ranks)
    learned = learned_router(cfg)
    targets = targets or RatioTargets.of(cfg)
    total = p.sum() * 0.0
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for i, (mod, name) in enumerate(MODALITY_NAMES.items()):
        mask = masks[mod]
        n_g = glob[i, 0]
        if n_g.item() == 0:
            continue
        R = targets.text if mod == TEXT else targets.image
        weight = cfg.ratio_loss_weight_text if mod == TEXT else cfg.ratio_loss_weight_image
        F_rate = (glob[i, 1] / n_g).to(p.dtype)
        G = global_mean(local[i, 2], glob[i, 2], n_g, world)
        loss = ratio_loss_from_rates(F_rate, G, R)
        if learned:
            total = total + weight * loss
        split_weight = cfg.split_loss_weight_text if mod == TEXT else cfg.split_loss_weight_image
        split = None
        if learned and split_weight > 0:  # over this rank's positions (a rank-local top-k)
            split = split_loss(p[mask], R)  # forced positions: p = 1, no gradient, always in the top
            total = total + split_weight * split
        n = mask.sum()
        if n.item() == 0:
            continue
        nb = (b & mask).sum()
        nb_eval = (b_eval & mask).sum()
        stats[name] = {
            "ratio": n.float() / nb.clamp_min(1).float(),  # of the boundaries this forward used
            "eval_ratio": n.float() / nb_eval.clamp_min(1).float(),  # what evaluation would realise
            "boundary_rate": nb.float() / n.float(),
            "mean_prob": (p.detach() * mask).sum() / n,
            "ratio_loss": loss.detach(),
            **({"split_loss": split.detach()} if split is not None else {}),
            "tokens": n.detach(),
            "boundaries": nb.detach(),
            "eval_boundaries": nb_eval.detach(),
        }
    return total, stats
