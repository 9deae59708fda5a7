"""transformers configuration of an exported ConceptVLM (shipped next to its weights).

The whole model configuration sits under the ``conceptvlm`` key of ``config.json``,
exactly as ``conceptvlm export`` writes it to ``config.yaml``; the fields transformers
itself reads (``vocab_size``, ``hidden_size``, ...) are copies for its tools.
"""
from transformers import PretrainedConfig


class ConceptVLMConfig(PretrainedConfig):
    """``conceptvlm``: the ConceptVLM config dict (language model, vision tower, image tokens)."""

    model_type = "conceptvlm"

    def __init__(self, conceptvlm=None, **kwargs):
        self.conceptvlm = dict(conceptvlm or {})
        lm = self.conceptvlm.get("model", {})
        kwargs.setdefault("vocab_size", lm.get("vocab_size"))
        kwargs.setdefault("hidden_size", lm.get("d_model"))
        kwargs.setdefault("max_position_embeddings", lm.get("max_seq_len"))
        super().__init__(**kwargs)
