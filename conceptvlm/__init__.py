"""ConceptVLM: vision-language MoE models whose language backbone runs on concepts.

Public entry points: :class:`ModelConfig`, :class:`ConceptMoE` (language model) and
``conceptvlm.ConceptVLM`` (vision tower + projector + ConceptMoE).
"""
from .config import ChunkConfig, ConceptConfig, ConfigError, ModelConfig, MoEConfig
from .model import ConceptMoE, ModelOutput

__all__ = ["ModelConfig", "MoEConfig", "ChunkConfig", "ConceptConfig", "ConfigError",
           "ConceptMoE", "ModelOutput"]
__version__ = "0.1.0"
