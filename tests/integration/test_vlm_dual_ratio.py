"""Dual-modality chunking: separate text and image targets are both reached on held-out data."""
import math

import pytest
import torch

from conceptvlm.data import DataConfig, Source, build_loader, load_tokenizer
from conceptvlm.data.synthetic import write_synthetic_shards
from conceptvlm.experiments.vlm_runs import realised_ratios_vlm
from helpers import tiny_vlm

TARGET_TEXT, TARGET_IMAGE = 1.5, 3.0


@pytest.mark.slow
def test_per_modality_targets_hold_on_held_out_samples(tmp_path):
    for kind in ("caption", "vqa"):
        write_synthetic_shards(kind, tmp_path / "train", num=1200, shard_size=600, seed=0)
        write_synthetic_shards(kind, tmp_path / "held", num=100, shard_size=100, seed=0, start_index=10**6)
    tok = load_tokenizer(None)
    vlm = tiny_vlm(dtype=torch.float32, chunk={"target_ratio_text": TARGET_TEXT, "target_ratio_image": TARGET_IMAGE,
                                               "ratio_loss_weight_text": 1.0, "ratio_loss_weight_image": 0.3})

    def train_loader():
        sources = [Source(str(tmp_path / "train" / f"{k}-{{000000..000001}}.tar"), k) for k in ("caption", "vqa")]
        cfg = DataConfig(seq_len=256, batch_size=8, image_tokens_per_image=vlm.tokens_per_image, seed=0,
                         shuffle_buffer=200)
        return build_loader(sources, tok, cfg, image_transform=vlm.image_processor)

    steps = 300
    opt = torch.optim.AdamW(vlm.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    vlm.train()
    batches = iter(train_loader())
    first_loss = None
    for _ in range(steps):
        b = next(batches)
        out = vlm(b["input_ids"], labels=b["labels"], doc_ids=b["doc_ids"], images=b["images"])
        first_loss = first_loss if first_loss is not None else out.lm_loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()

    held = {k: [str(tmp_path / "held" / f"{k}-000000.tar")] for k in ("caption", "vqa")}
    realised = realised_ratios_vlm(vlm, tok, held)  # eval mode, eval-rule boundaries
    print(f"held-out realised ratios {realised} (targets text {TARGET_TEXT}, image {TARGET_IMAGE}); "
          f"first lm loss {first_loss:.3f}")
    assert abs(realised["text"] - TARGET_TEXT) / TARGET_TEXT < 0.15
    assert abs(realised["image"] - TARGET_IMAGE) / TARGET_IMAGE < 0.15
