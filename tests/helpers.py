"""Small builders shared by tests (imported as ``helpers``)."""
from __future__ import annotations

import torch

from conceptvlm import ConceptMoE, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """configs/model/tiny.yaml's shape, with nested overrides like chunk={"router": "fixed"}."""
    base = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, n_encoder_layers=1,
                n_concept_layers=2, n_decoder_layers=1, max_seq_len=256,
                moe=dict(n_experts=4, top_k=2, expert_hidden=32),
                chunk=dict(router="cosine", target_ratio_text=2.0, target_ratio_image=3.0))
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return ModelConfig.from_dict(base)


# Model variants every mechanism invariant is checked on: each router, looping with more
# activated experts, a wider concept model (with GQA), no joint decoding, the output form.
MODEL_VARIANTS = {
    "cosine": {},
    "linear": dict(chunk={"router": "linear"}),
    "fixed": dict(chunk={"router": "fixed", "target_ratio_text": 2.5}),
    "none": dict(chunk={"router": "none"}),
    "loops_topk": dict(concept={"loops": 2, "top_k": 3}),
    "wide": dict(concept={"d_model": 48, "n_heads": 4, "n_kv_heads": 2}),
    "no_joint": dict(joint_decoding=False),
    "output_form": dict(chunk={"residual_form": "output"}),
}


def packed_batch(B=2, L=24, vocab=64):
    """Two rows: three documents; two documents then padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[0, 8:] = 1
    doc[0, 15:] = 2
    doc[1, 11:] = 1
    doc[1, 19:] = -1  # padding
    return ids, doc


class ByteTokenizer:
    """UTF-8 bytes 0-255 plus specials: a lossless stand-in tokenizer for evaluator tests."""
    pad_id, bos_id, eos_id, image_id, image_start_id, image_end_id = 256, 257, 258, 259, 260, 261
    vocab_size = 262

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_model(dtype=torch.float64, seed: int = 0, **overrides) -> ConceptMoE:
    torch.manual_seed(seed)
    return ConceptMoE(tiny_config(**overrides)).to(dtype).eval()


def make_forced_all_boundaries(model: ConceptMoE) -> None:
    """Linear router with zero weights and a huge bias: p = sigmoid(100) = 1.0 exactly (float64)."""
    with torch.no_grad():
        model.router.score.weight.zero_()
        model.router.score.bias.fill_(100.0)


def tiny_vlm(dtype=torch.float64, seed: int = 0, image_positions: str = "1d", image_order: str = "raster",
             question_first: bool = False, **model_overrides):
    """A ConceptVLM with the tiny timm tower, 2x2 pixel-shuffle -> 16 tokens per 64px image."""
    from conceptvlm.vision import tiny_vision_config
    from conceptvlm.vlm import ConceptVLM, VLMConfig

    torch.manual_seed(seed)
    cfg = VLMConfig(model=tiny_config(vocab_size=262, **model_overrides),
                    vision=tiny_vision_config(reduction="pixel_shuffle", reduction_factor=2),
                    image_positions=image_positions, image_order=image_order, question_first=question_first)
    return ConceptVLM(cfg).to(dtype).eval()


def interleaved_row(vlm, parts) -> list[int]:
    """``parts``: list of str (text, as bytes) or None (an image block)."""
    c = vlm.config
    ids = []
    for p in parts:
        if p is None:
            ids += [c.image_start_id] + [c.image_token_id] * vlm.tokens_per_image + [c.image_end_id]
        else:
            ids += list(p.encode())
    return ids


# Rendezvous variables that in-process training tests leave behind (their port is still
# bound by this process) and accelerator hints: a fresh process must start without them.
RENDEZVOUS_VARS = {"DS_ACCELERATOR", "CONCEPTVLM_SHM_COMM", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                   "MASTER_PORT"}


def fresh_process_env(**extra: str) -> dict[str, str]:
    """The environment of a new process as a user starts it (see :data:`RENDEZVOUS_VARS`)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(extra)
    return env
