"""ModelConfig: YAML loading and clear errors for bad keys and values."""
import pytest

import dataclasses

from conceptvlm import ConfigError, ModelConfig, VLMConfig
from conceptvlm.config import ChunkConfig


def test_tiny_yaml_loads(repo_root):
    cfg = ModelConfig.from_yaml(repo_root / "configs/model/tiny.yaml")
    assert cfg.chunk.router == "cosine" and cfg.moe.n_experts >= cfg.moe.top_k


@pytest.mark.parametrize("override, needle", [
    ("moe.topk=2", "moe.topk"),
    ("d_model=wide", "d_model"),
    ("moe.top_k=99", "moe.top_k"),
    ("chunk.target_ratio_text=1.0", "target_ratio_text"),
    ("chunk.router=magic", "chunk.router"),
    ("n_kv_heads=3", "n_kv_heads"),
    ("concept.top_k=99", "concept.top_k"),
    ("concept.loops=0", "concept.loops"),
    ("chunk.split_loss_weight_image=-1", "split loss"),
    ("d_model=-4", "d_model must be >= 1"),  # divisible by n_heads, still not a width
    ("max_seq_len=0", "max_seq_len"),
])
def test_bad_values_name_the_key(repo_root, override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        ModelConfig.from_yaml(repo_root / "configs/model/tiny.yaml", [override])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_yaml(tmp_path / "nope.yaml")


def test_roundtrip(tmp_path):
    cfg = ModelConfig(concept={"loops": 2, "top_k": 3})
    cfg.save_yaml(tmp_path / "c.yaml")
    assert ModelConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_choices_are_checked_when_built_in_python_too():
    with pytest.raises(ConfigError, match=r"chunk\.router must be one of"):
        ChunkConfig(router="magic")
    with pytest.raises(ConfigError, match=r"qk_norm must be one of"):
        ModelConfig(qk_norm="l2")
    with pytest.raises(ConfigError, match="image_order"):
        VLMConfig(image_order="zigzag")
    with pytest.raises(ConfigError, match="backend"):
        VLMConfig.from_dict({"vision": {"name": "vit_tiny_patch16_224", "backend": "jax"}})


def test_vlm_config_roundtrips_through_the_export_dict():
    from conceptvlm.export import vlm_config_dict, vlm_config_from_dict
    from conceptvlm.vision import tiny_vision_config

    cfg = VLMConfig(model=ModelConfig(concept={"loops": 2}), vision=tiny_vision_config(checkpoint="w.safetensors"),
                    image_positions="2d", image_order="hilbert")
    back = vlm_config_from_dict(vlm_config_dict(cfg))
    assert back == dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, checkpoint=None))
