"""Tiny random transformers MoE checkpoints (their own config classes and save_pretrained),
with a small byte-level BPE tokenizer, for the import tests. Shapes exercise GQA (4 query
heads over 2 key/value heads), several experts per token, and each family's specifics."""
from __future__ import annotations

from pathlib import Path

import torch

TEXTS = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat and looked at the hat",
         "language models read tokens; concepts merge them", "héllo wörld — unicode, tabs\tand  spaces"] * 4
EOS = "<|endoftext|>"


def write_tokenizer(directory: Path, vocab_size: int = 280) -> int:
    """A byte-level BPE with an eos token (:data:`EOS`), as a transformers checkpoint ships it."""
    from conceptvlm.bench.hf_import_memory import write_tokenizer as write

    return write(directory, vocab_size, TEXTS, EOS)


def hf_config(family: str, vocab: int = 300, layers: int = 3):
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, initializer_range=0.1, max_position_embeddings=256)
    if family == "olmoe":
        return T.OlmoeConfig(intermediate_size=16, num_experts=8, norm_topk_prob=False, **common)
    if family == "qwen2_moe":
        return T.Qwen2MoeConfig(intermediate_size=16, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                num_experts=8, norm_topk_prob=False, rope_theta=1e6, **common)
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(intermediate_size=16, moe_intermediate_size=16, num_experts=8, head_dim=16,
                                norm_topk_prob=True, **common)
    if family == "mixtral":
        return T.MixtralConfig(intermediate_size=16, num_local_experts=8, **common)
    raise ValueError(family)


def make_checkpoint(directory: Path, family: str, vocab: int = 300, seed: int = 0, **save_kwargs):
    """Save a random ``family`` model (and a tokenizer) to ``directory``; returns the model."""
    import transformers as T

    cfg = hf_config(family, vocab)
    cfg._attn_implementation = "eager"
    cls = {"olmoe": T.OlmoeForCausalLM, "qwen2_moe": T.Qwen2MoeForCausalLM, "qwen3_moe": T.Qwen3MoeForCausalLM,
           "mixtral": T.MixtralForCausalLM}[family]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # untrained norms are all ones: make them matter (QK-norm order, eps)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), **save_kwargs)
    write_tokenizer(directory)
    return model
