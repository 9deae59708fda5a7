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


def tiny_model(dtype=torch.float64, seed: int = 0, **overrides) -> ConceptMoE:
    torch.manual_seed(seed)
    return ConceptMoE(tiny_config(**overrides)).to(dtype).eval()


def make_forced_all_boundaries(model: ConceptMoE) -> None:
    """Linear router with zero weights and a huge bias: p = sigmoid(100) = 1.0 exactly (float64)."""
    with torch.no_grad():
        model.router.score.weight.zero_()
        model.router.score.bias.fill_(100.0)
