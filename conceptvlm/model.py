"""ConceptMoE: the assembly.

``ids -> embed -> encoder layers -> chunk -> concept model -> dechunk -> decoder layers
(joint decoding) -> norm -> lm_head``. With router ``none`` every token is a concept
and the model is exactly a plain MoE with ``n_layers`` layers (the baseline).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import RMSNorm, Visibility, rope_rotation
from .block import Block
from .chunk import TEXT, ChunkRouter, Chunks, RatioTargets, chunk_statistics, forced_boundaries, gather_rows, \
    locate_concepts
from .concept_model import ConceptModel
from .config import ModelConfig
from .decoding_state import ConceptState, InferenceState
from .dechunk import dechunk
from .moe import GroupedExperts, MoEOutput
from .positions import positions_in_document
from .precision import upcast

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, L, V]
    loss: Optional[torch.Tensor] = None  # lm_loss + aux_loss (when labels are given)
    lm_loss: Optional[torch.Tensor] = None  # mean next-token cross-entropy over labelled positions
    aux_loss: Optional[torch.Tensor] = None  # weighted balance + z + ratio losses
    balance_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None
    ratio_loss: Optional[torch.Tensor] = None  # weighted sum over modalities
    chunk_stats: dict = field(default_factory=dict)  # {"text": {"ratio", "ratio_loss", ...}, "image": ...}
    expert_counts: list = field(default_factory=list)  # per MoE layer, tokens per expert
    # Valid tokens and concepts in the batch, 0-dim tensors: reading them is a host sync,
    # which a decode step should not pay for a number nobody reads.
    n_tokens: Optional[torch.Tensor] = None
    n_concepts: Optional[torch.Tensor] = None
    n_label_tokens: int = 0
    state: Optional["InferenceState"] = None  # caches after this call (use_cache=True)
    boundary: Optional[torch.Tensor] = None  # [B, L] bool, token starts a concept
    boundary_prob: Optional[torch.Tensor] = None  # [B, L] router probability p_t
    # A VLM in training: how far apart the projected patches of an image are (0-dim;
    # vision.projector.patch_spread), so a collapsed tower or projector shows in the logs.
    patch_spread: Optional[torch.Tensor] = None


def next_token_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor, doc_BL: torch.Tensor):
    """Mean cross-entropy of predicting ``labels[t+1]`` at position t within a document.

    A batch whose labels are all masked gives loss 0, not NaN.
    """
    target = labels_BL[:, 1:].clone()
    target[doc_BL[:, 1:] != doc_BL[:, :-1]] = IGNORE_INDEX  # never predict across documents
    logits = upcast(logits_BLV[:, :-1])  # float32 for half precision; float64 stays
    n = (target != IGNORE_INDEX).sum()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / n.clamp_min(1), int(n)


class ConceptMoE(nn.Module):
    """The ConceptMoE language model (DESIGN.md §2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        m = cfg.moe

        def blocks(n: int, joint: bool) -> nn.ModuleList:
            return nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, m.n_experts, m.top_k,
                                       m.expert_hidden, m.n_shared_experts, joint, cfg.norm_eps,
                                       **cfg.layer_options())
                                 for _ in range(n))

        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = blocks(cfg.n_encoder_layers, joint=False)
        self.router = ChunkRouter(cfg.chunk, cfg.d_model)
        self.concept_model = ConceptModel(cfg)
        self.decoder = blocks(cfg.n_decoder_layers, joint=cfg.joint_decoding)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, only: Optional[set[str]] = None) -> None:
        """Normal(0, init_std) weights; residual outputs scaled by 1/sqrt(2 * layers);
        joint-decoding projectors zero; the cosine router's projections identity.
        ``only``: the names of the modules to initialise (default: all)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, mod in self.named_modules():
            if only is not None and name not in only:
                continue
            if isinstance(mod, nn.Linear):
                if getattr(mod, "is_zero_init", False):
                    nn.init.zeros_(mod.weight)
                elif getattr(mod, "is_identity_init", False):
                    nn.init.eye_(mod.weight)
                else:
                    nn.init.normal_(mod.weight, 0.0, out_std if name.endswith(("wo", "w2")) else std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, 0.0, std)
            elif isinstance(mod, GroupedExperts):
                nn.init.normal_(mod.w1_EDH, 0.0, std)
                nn.init.normal_(mod.w3_EDH, 0.0, std)
                nn.init.normal_(mod.w2_EHD, 0.0, out_std)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --------------------------------------------------------------- forward
    def new_state(self) -> InferenceState:
        """Empty caches for :meth:`forward` with ``use_cache=True``."""
        return InferenceState.new(len(self.encoder), self.concept_model.n_cache_slots, len(self.decoder))

    def token_positions(self, doc_BL: torch.Tensor, valid_BL: torch.Tensor,
                        state: Optional[InferenceState] = None) -> torch.Tensor:
        """In-document positions of these tokens, continuing ``state``'s last token."""
        st = state if state is not None else self._stateless()
        prev = st.tokens.previous(doc_BL.shape[0], self.config.d_model, doc_BL.device, self.embed.weight.dtype)
        return positions_in_document(doc_BL, valid_BL, prev)

    def _stateless(self) -> InferenceState:
        return InferenceState.stateless(len(self.encoder), self.concept_model.n_cache_slots, len(self.decoder))

    def forward(self, input_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None, modality: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                use_cache: bool = False, state: Optional[InferenceState] = None,
                ratio_targets: Optional[RatioTargets] = None) -> ModelOutput:
        """Run the model on a batch, or on the next chunk of tokens after ``state``.

        Args:
            input_ids: ``[B, L]`` token ids (or give ``inputs_embeds [B, L, D]``).
            labels: ``[B, L]`` targets aligned with the inputs (``-100`` = no loss); the
                model shifts them, so position t is trained to predict ``labels[t+1]``.
            doc_ids: ``[B, L]`` document index per token in a packed row, ``-1`` on
                padding (default: one document, no padding).
            modality: ``[B, L]`` 0 text, 1 image patch, 2 image marker (default: text).
            positions: RoPE positions ``[B, L]`` or ``[B, L, 2]`` (default: index
                within the document).
            use_cache / state: incremental decoding. With ``use_cache`` the returned
                ``output.state`` holds the caches; pass it back with the next tokens
                (prefill = the prompt in one call, then one token per call). The
                logits equal one full forward pass over all tokens so far.
            ratio_targets: this step's target ratios (a training warm-up schedule);
                default the configured ``chunk.target_ratio_*``.
        """
        cfg = self.config
        if use_cache and state is None:
            state = self.new_state()
        st = state if state is not None else self._stateless()
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, L, D = h.shape
        if self.training and L > cfg.max_seq_len:
            # max_seq_len is the context the model trains at; evaluation may go beyond it on
            # purpose (the longctx suite measures extrapolation), training may not.
            raise ValueError(f"a training input of {L} positions exceeds model.max_seq_len={cfg.max_seq_len}")
        dev = h.device
        doc = torch.zeros(B, L, dtype=torch.long, device=dev) if doc_ids is None else doc_ids.to(dev)
        valid = doc >= 0
        mod = torch.full((B, L), TEXT, dtype=torch.long, device=dev) if modality is None else modality.to(dev)
        prev = st.tokens.previous(B, D, dev, h.dtype)
        pos1d = positions_in_document(doc, valid, prev)
        pos = pos1d if positions is None else positions.to(dev)

        moe_outs: list[MoEOutput] = []
        rope = rope_rotation(pos, cfg.attn_head_dim, cfg.rope_base, cfg.rope_scaling, h.dtype)
        # Default document ids: every token valid and of document 0, known without a host sync.
        known_doc = 0 if doc_ids is None else None
        vis = Visibility.build(doc, valid, st.tokens.index, known_doc=known_doc)
        for layer, cache in zip(self.encoder, st.tokens.encoder):
            h, out = layer(h, rope, vis, cache=cache)
            moe_outs.append(out)

        forced = forced_boundaries(doc, valid, mod, prev)
        p = self.router(h, forced, mod, prev, ratio_targets)
        chunks = locate_concepts(p, self.router.boundaries(p, forced, valid))
        z, z_last = self.concept_signal(h, chunks, pos, doc, moe_outs, st.concepts, known_doc)
        x = h + z
        for layer, cache in zip(self.decoder, st.tokens.decoder):
            x, out = layer(x, rope, vis, z_BLD=z if cfg.joint_decoding else None, cache=cache)
            moe_outs.append(out)
        logits = self.lm_head(self.norm(x))
        st.tokens.advance(prev, h, doc, valid, mod, forced, pos1d)
        st.concepts.advance(z_last)
        out = self._output(logits, labels, doc, valid, mod, chunks, moe_outs, ratio_targets,
                           statistics=not st.caching or labels is not None or self.training)
        out.state = state
        return out

    def concept_signal(self, h_BLD: torch.Tensor, chunks: Chunks, pos_BL: torch.Tensor, doc_BL: torch.Tensor,
                       moe_outs: list[MoEOutput], state: ConceptState, known_doc: Optional[int] = None):
        """Concepts through the concept model and back to tokens: ``z_{j(t)} * STE(conf_t)``
        (and each row's final EMA state). ``known_doc``: every token is valid and of this
        document (the caller knows it without reading a tensor)."""
        c = gather_rows(h_BLD, chunks.pos_BM)  # a concept is its boundary token's state
        c_pos = gather_rows(pos_BL, chunks.pos_BM)  # ... and keeps that token's position
        c_doc = torch.where(chunks.valid_BM, gather_rows(doc_BL, chunks.pos_BM), -1)
        run, rows, concept_doc = True, None, None
        if state.keeps and chunks.valid_BM.shape[1] == 1:  # a decode step: at most one concept per row
            starting = torch.nonzero(chunks.valid_BM[:, 0]).flatten()  # the step's one host sync
            run = starting.numel() > 0
            if starting.numel() == c.shape[0]:
                concept_doc = known_doc  # every row starts a concept
            elif state.index is not None and state.index.length > 0:
                # Only these rows compute, and only their concept caches are read.
                rows, concept_doc = starting, known_doc
        elif state.keeps:
            run = bool(chunks.valid_BM.any())
        if not run:
            update = torch.zeros_like(c)  # no row starts a concept: the concept model has nothing to do
        else:
            update, outs = self.concept_model(c, c_pos, c_doc, chunks.valid_BM, state.caches, state.index,
                                              rows=rows, known_doc=concept_doc)
            moe_outs.extend(outs)
        if self.config.chunk.residual_form == "output":  # ablation: smooth chat itself
            update = c + update
        return dechunk(update, chunks, state.z_BD)

    def _output(self, logits, labels, doc, valid, mod, chunks: Chunks, moe_outs,
                ratio_targets: Optional[RatioTargets], statistics: bool = True) -> ModelOutput:
        cfg = self.config
        if statistics:
            ratio, stats = chunk_statistics(chunks, mod, valid, cfg.chunk, self.training, ratio_targets)
        else:  # decoding step: nothing reads the per-modality statistics
            ratio, stats = logits.new_zeros(()), {}
        balance = torch.stack([o.balance_loss for o in moe_outs]).mean()
        zl = torch.stack([o.z_loss for o in moe_outs]).mean()
        aux = cfg.moe.aux_loss_weight * balance + cfg.moe.z_loss_weight * zl + ratio
        out = ModelOutput(logits=logits, aux_loss=aux, balance_loss=balance, z_loss=zl, ratio_loss=ratio,
                          chunk_stats=stats, expert_counts=[o.counts for o in moe_outs],
                          n_tokens=valid.sum(), n_concepts=chunks.valid_BM.sum(),
                          boundary=chunks.boundary_BL, boundary_prob=chunks.prob_BL.detach())
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels {list(labels.shape)} must match the inputs {list(logits.shape[:2])}")
            lm, n = next_token_loss(logits, labels.to(logits.device), doc)
            out.lm_loss, out.loss, out.n_label_tokens = lm, lm + aux, n
        return out
