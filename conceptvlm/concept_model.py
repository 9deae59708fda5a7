"""The concept model: MoE layers over the (shorter) concept sequence.

Compute saved by chunking is re-spent here ("implicit compute allocation"):
more activated experts (``concept.top_k``), looping the layers ``concept.loops``
times with shared weights, or a wider hidden size (``concept.d_model``, entered and
left through linear projections). The model returns the *update* it makes to each
concept, ``u = out(layers(in(c)) - in(c))``, which the dechunk smooths.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .attention import Visibility, rope_rotation
from .decoding_state import CacheIndex, KVCache
from .block import Block
from .config import ModelConfig
from .moe import MoEOutput


class ConceptModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, dc = cfg.d_model, cfg.concept_d_model
        self.widened = dc != d
        self.proj_in = nn.Linear(d, dc, bias=False) if self.widened else nn.Identity()
        self.proj_out = nn.Linear(dc, d, bias=False) if self.widened else nn.Identity()
        self.layers = nn.ModuleList(
            Block(dc, cfg.concept_n_heads, cfg.concept_n_kv_heads, cfg.moe.n_experts, cfg.concept_top_k,
                  cfg.concept_expert_hidden, cfg.moe.n_shared_experts, joint=False, eps=cfg.norm_eps,
                  **cfg.layer_options(concept=True))
            for _ in range(cfg.n_concept_layers))

    @property
    def n_cache_slots(self) -> int:
        return self.cfg.concept.loops * len(self.layers)

    def forward(self, c_BMD: torch.Tensor, pos_BM: torch.Tensor, doc_BM: torch.Tensor, valid_BM: torch.Tensor,
                caches: Optional[list[KVCache]] = None,
                index: Optional[CacheIndex] = None, rows: Optional[torch.Tensor] = None,
                known_doc: Optional[int] = None) -> tuple[torch.Tensor, list[MoEOutput]]:
        """The update of each concept ``[B, M, D]`` (and each MoE layer's output).

        ``caches`` / ``index``: the concept stack's KV caches (incremental decoding);
        ``rows``: a decode step in which only these rows start a concept (the others get
        a zero update, compute nothing and read none of their keys); ``known_doc``: every
        concept computed is valid and of this document (no host sync to find out).
        """
        cfg = self.cfg
        if rows is not None:  # decode step: only these rows start a concept
            full_shape = c_BMD.shape
            c_BMD, pos_BM, doc_BM, valid_BM = c_BMD[rows], pos_BM[rows], doc_BM[rows], valid_BM[rows]
        x0 = self.proj_in(c_BMD)
        rope = rope_rotation(pos_BM, cfg.concept_head_dim, cfg.rope_base,
                             cfg.rope_scaling, x0.dtype)
        vis = Visibility.build(doc_BM, valid_BM, index, rows=rows, known_doc=known_doc)
        x, moe_outs = x0, []
        for loop in range(cfg.concept.loops):
            for i, layer in enumerate(self.layers):
                cache = caches[loop * len(self.layers) + i] if caches is not None else None
                x, out = layer(x, rope, vis, cache=cache)
                moe_outs.append(out)
        update = self.proj_out(x - x0)
        if rows is not None:
            update = update.new_zeros(full_shape).index_copy(0, rows, update)
        return update, moe_outs
