"""Data for ConceptVLM: webdataset shard readers, tokenizers, templates, packing, writers.

Layouts, the batch contract and the resume guarantee: ``docs/data.md``.
"""
from .counters import BadSample, DataCounters
from .images import default_image_transform
from .packing import PackConfig, Packer
from .pipeline import DataConfig, PackedDataset, PackedLoader, Source, build_loader
from .templates import IGNORE, IMAGE_PLACEHOLDER, encode_parts, encode_prompt, grounding_prompt, vqa_prompt
from .tokenizer import SPECIAL_TOKENS, load_pretrained_tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "BadSample", "DataCounters", "default_image_transform", "PackConfig", "Packer", "DataConfig",
    "PackedDataset", "PackedLoader", "Source", "build_loader", "IGNORE", "IMAGE_PLACEHOLDER",
    "encode_parts", "encode_prompt", "grounding_prompt", "vqa_prompt", "SPECIAL_TOKENS",
    "load_tokenizer", "load_pretrained_tokenizer", "train_bpe_tokenizer",
]
