"""transformers wrapper of an exported ConceptVLM (shipped next to its weights).

The modules themselves come from the installed ``conceptvlm`` package (``pip install
conceptvlm``): the model spans a dozen modules plus timm / open_clip vision towers, and a
second copy here would drift from the code that trained it. This file only adapts the
calling convention: ``attention_mask`` (1 = token, 0 = padding) becomes the model's
``doc_ids`` (0 / -1), ``pixel_values`` are the images of the rows' image blocks in order.
"""
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_conceptvlm import ConceptVLMConfig

try:
    from conceptvlm.export import vlm_config_from_dict
    from conceptvlm.vlm import ConceptVLM
except ImportError as e:  # the directory needs the package that defines the model
    raise ImportError("this model directory needs the conceptvlm package: pip install conceptvlm") from e


class ConceptVLMForCausalLM(PreTrainedModel):
    """``ConceptVLM`` under transformers' ``AutoModelForCausalLM`` (weights under ``model.``)."""

    config_class = ConceptVLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = []

    def __init__(self, config: ConceptVLMConfig):
        super().__init__(config)
        self.model = ConceptVLM(vlm_config_from_dict(config.conceptvlm))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """The weights come from the checkpoint; only the buffer that is derived from the
        config and never saved (transformers builds the model on the meta device) is set here."""
        if isinstance(module, ConceptVLM):
            module.patch_order.copy_(module.default_patch_order())

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None, **kwargs):
        doc_ids = None if attention_mask is None else torch.where(attention_mask.bool(), 0, -1)
        out = self.model(input_ids, labels=labels, doc_ids=doc_ids, images=pixel_values)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)
