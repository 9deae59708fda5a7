"""The tiny ConceptVLM trains on synthetic caption + VQA shards (per-modality ratio
statistics logged), and the projector-alignment stage trains only the projector."""
import math

import torch

from conceptvlm.data import load_tokenizer
from conceptvlm.data.synthetic import write_synthetic_shards
from conceptvlm.export import load_exported
from conceptvlm.logging_utils import read_jsonl
from conceptvlm.train import build_model, train
from conceptvlm.train_config import load_train_config
from train_helpers import REPO


def _shards(tmp_path):
    cap = write_synthetic_shards("caption", tmp_path / "cap", num=40, shard_size=40)
    vqa = write_synthetic_shards("vqa", tmp_path / "vqa", num=40, shard_size=40)
    return f"[{{shards: '{cap[0]}', kind: caption}}, {{shards: '{vqa[0]}', kind: vqa}}]"


def _quiet(tmp_path, name):
    return ["train.steps=3", "data.batch_size=2", "data.shuffle_buffer=10", "data.shuffle_initial=2",
            "train.progress=false", "train.tensorboard=false", f"train.out_dir={tmp_path / name}",
            "train.save_every=0", "train.export_at_end=true"]


def test_tiny_vlm_trains_and_logs_both_modalities(tmp_path):
    cfg = load_train_config(REPO / "configs/train/tiny_vlm.yaml",
                            [f"data.sources={_shards(tmp_path)}", *_quiet(tmp_path, "vlm")])
    result = train(cfg)
    assert all(math.isfinite(x) for x in result["losses"])
    rows = read_jsonl(tmp_path / "vlm" / "metrics.jsonl")
    for key in ("ratio/text", "ratio/image", "ratio_loss/text", "ratio_loss/image", "tokens_per_s",
                "concepts_per_s", "balance_loss", "z_loss", "expert_load/layer0/max_over_mean", "image/patch_spread"):
        assert key in rows[-1], key
    model, tok = load_exported(tmp_path / "vlm" / "export")
    assert model.tower is not None and model.tokens_per_image == 64


def test_projector_alignment_trains_only_the_projector(tmp_path):
    cfg = load_train_config(REPO / "configs/train/tiny_vlm_align.yaml",
                            [f"data.sources={_shards(tmp_path)}", *_quiet(tmp_path, "align"), "optim.lr=1e-2"])
    torch.manual_seed(cfg.train.seed)  # the trainer builds its initial weights the same way
    init, _ = build_model(cfg, load_tokenizer(None))
    train(cfg)
    trained, _ = load_exported(tmp_path / "align" / "export")
    before, after = init.state_dict(), trained.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector"}
