"""Continual-training conversion: a baseline MoE (router none) trained with
`conceptvlm.train`, converted to a ConceptMoE with another layer split. With every token
a boundary and no reallocation it gives the baseline's logits; reallocation at conversion
(more experts, looping) is measured as a held-out loss change."""
import itertools

import pytest
import torch
import yaml

from conceptvlm.convert import convert_baseline, held_out_loss_change
from conceptvlm.data import DataConfig, Source, build_loader, load_tokenizer
from conceptvlm.data.synthetic import write_synthetic_shards
from conceptvlm.export import load_exported
from conceptvlm.train import train
from conceptvlm.train_config import load_train_config
from train_helpers import text_shards, train_yaml


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    d = tmp_path_factory.mktemp("baseline")
    shards = text_shards(d / "shards")
    cfg = load_train_config(train_yaml(d / "t.yaml", shards), [
        "model.chunk.router=none", "model.joint_decoding=false", "model.n_encoder_layers=1", "model.n_concept_layers=2",
        "model.n_decoder_layers=1", "train.steps=15", "train.export_at_end=true", "optim.lr=1e-2"])
    train(cfg)
    held = d / "held"
    write_synthetic_shards("text", held, num=16, shard_size=16, start_index=10**6)
    loader = build_loader([Source(str(held / "text-000000.tar"), "text")], load_tokenizer(None),
                          DataConfig(seq_len=64, batch_size=4, image_tokens_per_image=1, shuffle_buffer=0, epochs=1,
                                     rank=0, world_size=1))
    batches = list(itertools.islice(loader, 3))
    return d, d / "run" / "export", batches


def _target(d, name, *overrides):
    return load_train_config(train_yaml(d / f"{name}.yaml", "unused.tar"), [
        "model.n_encoder_layers=2", "model.n_concept_layers=1", "model.n_decoder_layers=1",  # re-split 1/2/1 -> 2/1/1
        "model.joint_decoding=true", *overrides])


def _logits(model, batches):
    """Logits at real tokens (padding positions carry no prediction)."""
    with torch.no_grad():
        return [model(input_ids=b["input_ids"], doc_ids=b["doc_ids"]).logits[b["doc_ids"] >= 0] for b in batches]


@pytest.mark.parametrize("router", ["none", "linear_forced"])
def test_conversion_identity_every_token_a_boundary(baseline, tmp_path, router):
    d, base_dir, batches = baseline
    cfg = _target(d, router, f"model.chunk.router={'none' if router == 'none' else 'linear'}")
    out = convert_baseline(base_dir, cfg, tmp_path / "conv")
    base, _ = load_exported(base_dir, dtype=torch.float64)
    conv, tok = load_exported(out, dtype=torch.float64)
    if router == "linear_forced":  # p = sigmoid(100) = 1 exactly: every token a boundary
        with torch.no_grad():
            conv.lm.router.score.weight.zero_()
            conv.lm.router.score.bias.fill_(100.0)
    assert tok is not None
    for a, b in zip(_logits(base, batches), _logits(conv, batches)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    written = yaml.safe_load((out / "train.yaml").read_text())
    assert written["train"]["init_from"] == str(out.resolve()) and written["ratio_schedule"]["enabled"]
    # the written config resumes training from the converted weights
    assert load_train_config(out / "train.yaml", ["data.sources=[]"]).ratio_schedule.start > 1.0


def test_joint_decoding_baseline_is_refused(baseline, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    from conceptvlm.config import ConfigError
    from conceptvlm.export import WEIGHTS

    d, base_dir, _ = baseline
    bad = tmp_path / "bad"
    shutil.copytree(base_dir, bad)
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg["model"]["joint_decoding"] = True
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    state = load_file(str(bad / WEIGHTS))
    shape = state["lm.decoder.0.attn.wqkv.weight"].shape
    state["lm.decoder.0.attn.uqkv.weight"] = torch.full(shape, 0.01)
    state["lm.decoder.0.z_norm.weight"] = torch.ones(shape[1])
    save_file(state, str(bad / WEIGHTS))
    (bad / "manifest.json").unlink()  # weights made by hand: the export's manifest no longer vouches for them
    with pytest.raises(ConfigError, match="not a plain MoE"):
        convert_baseline(bad, _target(d, "x", "model.chunk.router=none"), tmp_path / "out")


def test_reallocation_at_conversion_is_measured(baseline, tmp_path, capsys):
    d, base_dir, batches = baseline
    same = convert_baseline(base_dir, _target(d, "same", "model.chunk.router=none"), tmp_path / "same")
    more = convert_baseline(base_dir, _target(d, "more", "model.chunk.router=none", "model.concept.top_k=4",
                                              "model.concept.loops=2"), tmp_path / "more")
    r0 = held_out_loss_change(base_dir, same, batches)
    r1 = held_out_loss_change(base_dir, more, batches)
    assert abs(r0["delta"]) < 1e-5
    assert r1["delta"] != pytest.approx(0.0, abs=1e-4)
    with capsys.disabled():
        print(f"\nheld-out loss right after conversion: baseline {r1['baseline_loss']:.4f}, no reallocation "
              f"{r0['converted_loss']:.4f}, top_k 2->4 + 2 loops {r1['converted_loss']:.4f} "
              f"(change {r1['delta']:+.4f})")


def test_converted_model_continues_training_with_a_ratio_schedule(baseline, tmp_path):
    """The warm-up moves the target step by step; the export (after fewer steps than the
    warm-up) still records the configured target, as train_config.yaml does."""
    from conceptvlm.logging_utils import read_jsonl

    d, base_dir, _ = baseline
    out = convert_baseline(base_dir, _target(d, "cos", "model.chunk.router=cosine", "ratio_schedule.steps=4"),
                           tmp_path / "conv")
    shards = sorted((d / "shards").glob("text-*.tar"))
    cfg = load_train_config(out / "train.yaml", [f"data.sources=[{{shards: '{shards[0]}', kind: text}}]",
                                                 "train.steps=3", f"train.out_dir={tmp_path / 'cont'}",
                                                 "train.export_at_end=true"])
    assert cfg.train.steps <= cfg.ratio_schedule.steps
    configured = cfg.model.chunk.target_ratio_text
    result = train(cfg)
    rows = read_jsonl(tmp_path / "cont" / "metrics.jsonl")
    targets = [r["target_ratio/text"] for r in rows]
    assert targets[0] == pytest.approx(1.05) and targets[0] < targets[1] < targets[2] < 2.0
    # training starts from the converted weights, not from scratch (which starts at ln V = 6.24)
    assert rows[0]["lm_loss"] < 5.5 and len(result["losses"]) == 3
    exported = yaml.safe_load((tmp_path / "cont" / "export" / "config.yaml").read_text())
    trained = yaml.safe_load((tmp_path / "cont" / "export" / "train_config.yaml").read_text())
    assert exported["model"]["chunk"]["target_ratio_text"] == configured == 2.0
    assert exported["model"]["chunk"] == trained["model"]["chunk"]


def test_convert_never_replaces_a_non_empty_folder_without_overwrite(baseline, tmp_path, capsys):
    from conceptvlm.cli import main

    d, base_dir, _ = baseline
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = train_yaml(d / "ow.yaml", "unused.tar")
    argv = ["convert", "--baseline", str(base_dir), "--config", str(cfg), "--out", str(out),
            "model.chunk.router=none", "model.joint_decoding=true"]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().out and (out / "notes.txt").read_text() == "mine"
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()
    assert not list(tmp_path.glob(".old-*")) and not list(tmp_path.glob(".tmp-*"))
