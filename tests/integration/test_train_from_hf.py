"""Continual training from a transformers checkpoint: `convert --from-hf` with a text train
config writes train.yaml (ratio warm-up on, init_from and tokenizer set), and
`conceptvlm.train` runs from it on CPU and lowers the loss."""
import torch
import yaml

from conceptvlm.hf_import import convert_from_hf
from conceptvlm.train import train
from conceptvlm.train_config import load_train_config
from hf_helpers import make_checkpoint
from train_helpers import text_shards, train_yaml


def test_training_from_a_converted_checkpoint_lowers_the_loss(tmp_path):
    make_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    shards = text_shards(tmp_path / "shards", num=100)
    cfg_path = train_yaml(tmp_path / "t.yaml", shards, model={
        "n_encoder_layers": 1, "n_concept_layers": 1, "n_decoder_layers": 1, "chunk": {"router": "cosine"}},
        optim={"lr": 1e-2, "warmup_steps": 0}, train={"steps": 12})
    out = convert_from_hf(tmp_path / "ckpt", cfg_path, tmp_path / "conv").out_dir
    written = yaml.safe_load((out / "train.yaml").read_text())
    assert written["ratio_schedule"]["enabled"] and written["model"]["moe"]["shared_expert_gate"] is True
    cfg = load_train_config(out / "train.yaml", ["ratio_schedule.steps=8"])
    assert cfg.train.init_from == str(out.resolve()) and cfg.model.qkv_bias
    losses = train(cfg)["losses"]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, losses


def test_converted_language_model_starts_a_vlm(tmp_path):
    """The VLM stage: train.init_from the converted (text) directory with a vision section;
    the language model's weights load, the tower and projector keep their own init."""
    from dataclasses import asdict

    from safetensors.torch import load_file

    from conceptvlm.data import load_tokenizer
    from conceptvlm.train import build_model
    from conceptvlm.vision import tiny_vision_config

    make_checkpoint(tmp_path / "ckpt", "olmoe")
    cfg_path = train_yaml(tmp_path / "t.yaml", "unused.tar", model={
        "n_encoder_layers": 1, "n_concept_layers": 1, "n_decoder_layers": 1})
    out = convert_from_hf(tmp_path / "ckpt", cfg_path, tmp_path / "conv").out_dir
    d = yaml.safe_load((out / "train.yaml").read_text())
    d["vision"] = asdict(tiny_vision_config())
    (tmp_path / "vlm.yaml").write_text(yaml.safe_dump(d))
    cfg = load_train_config(tmp_path / "vlm.yaml")
    model, vcfg = build_model(cfg, load_tokenizer(cfg.data.tokenizer))
    assert model.tower is not None and vcfg.image_token_id == 280
    lm_state = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in lm_state.items())
