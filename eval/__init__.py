"""Evaluation suites: text (perplexity, bits-per-byte, multiple choice, lm-eval harness),
long context (passkey, needle, loss by position), VQA and grounding.

Modules: ``vqa`` / ``grounding`` (metrics, readers, file scoring), ``text``,
``harness``, ``longctx``, ``vqa_runner`` / ``grounding_runner`` (generate + score),
``generate`` (greedy loop; replaceable by a cached generator), ``cli`` (``score``).
"""
from .grounding import box_iou_accuracy, score_grounding
from .vqa import score_vqa, vqa_accuracy

__all__ = ["box_iou_accuracy", "score_grounding", "score_vqa", "vqa_accuracy"]
