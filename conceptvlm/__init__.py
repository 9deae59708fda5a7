"""ConceptVLM: vision-language MoE models whose language backbone runs on concepts.

Public entry points: :class:`ModelConfig`, :class:`ConceptMoE` (language model),
:class:`VLMConfig` and :class:`ConceptVLM` (vision tower + projector + ConceptMoE; the
vision stack itself is imported when a model with a tower is built).
"""
from .config import ChunkConfig, ConceptConfig, ConfigError, ModelConfig, MoEConfig, VLMConfig
from .model import ConceptMoE, ModelOutput
from .vlm import ConceptVLM

__all__ = ["ModelConfig", "MoEConfig", "ChunkConfig", "ConceptConfig", "ConfigError", "VLMConfig",
           "ConceptMoE", "ConceptVLM", "ModelOutput"]
__version__ = "0.1.0"
