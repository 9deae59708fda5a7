"""Import of transformers MoE checkpoints, checked against transformers itself: tiny random
OLMoE / Qwen2-MoE / Qwen3-MoE / Mixtral models (their own classes, save_pretrained),
converted, must give transformers' logits (float32, batched, right-padded, eager
attention) and its greedy generation; with a real chunk router forced to put a boundary
at every token and zero joint projectors, too (the conversion identity)."""
import pytest
import torch
import yaml

from conceptvlm.export import load_exported
from conceptvlm.generate import cached_generate
from conceptvlm.hf_import import convert_from_hf
from hf_helpers import TEXTS, make_checkpoint

FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral"]
TOKENIZER_VOCAB = 280  # hf_helpers.write_tokenizer; the checkpoints' vocab_size is 300


def split_yaml(path, router="none", joint=True, **model):
    """A text train config splitting the checkpoint's 3 layers 1 / 1 / 1."""
    path.write_text(yaml.safe_dump({
        "model": {"n_encoder_layers": 1, "n_concept_layers": 1, "n_decoder_layers": 1, "joint_decoding": joint,
                  "chunk": {"router": router}, **model},
        "train": {"out_dir": str(path.parent / "run")}}))
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(d / "ckpt", request.param)
    out = convert_from_hf(d / "ckpt", split_yaml(d / "t.yaml"), d / "out").out_dir
    return request.param, d, hf, out


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TOKENIZER_VOCAB, (3, 14), generator=g)
    doc = torch.zeros(3, 14, dtype=torch.long)
    doc[1, 9:] = -1  # right padding
    doc[2, 5:] = -1
    return ids, doc


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _compare_logits(model, hf):
    ids, doc = _batch()
    valid = doc >= 0
    with torch.no_grad():
        ours = model(input_ids=ids, doc_ids=doc).logits[..., :TOKENIZER_VOCAB]
        theirs = hf(input_ids=ids, attention_mask=valid.long()).logits[..., :TOKENIZER_VOCAB]
    return _rel(ours[valid], theirs[valid])


def test_logits_equal_transformers(converted):
    _, _, hf, out = converted
    model, _ = load_exported(out)
    assert _compare_logits(model, hf) < 1e-5


def test_greedy_generation_equals_transformers_generate(converted):
    _, _, hf, out = converted
    model, tok = load_exported(out)
    prompts = [tok.encode(TEXTS[0]), tok.encode(TEXTS[2])[:7]]
    ours = cached_generate(model, prompts, max_new_tokens=20, eos_id=None, pad_id=tok.pad_id)
    for p, mine in zip(prompts, ours):
        with torch.no_grad():
            g = hf.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                            eos_token_id=None, pad_token_id=tok.pad_id)
        assert mine == g[0, len(p):].tolist()


def test_conversion_identity_every_token_a_boundary(converted, tmp_path):
    family, d, hf, _ = converted
    out = convert_from_hf(d / "ckpt", split_yaml(tmp_path / "t.yaml", router="linear"), tmp_path / "out").out_dir
    model, _ = load_exported(out)
    assert all(float(b.attn.uqkv.weight.detach().abs().max()) == 0 for b in model.lm.decoder)  # joint projectors zero
    with torch.no_grad():  # p = sigmoid(100) = 1: every token a boundary
        model.lm.router.score.weight.zero_()
        model.lm.router.score.bias.fill_(100.0)
    assert _compare_logits(model, hf) < 1e-5


def test_train_yaml_continues_with_the_ratio_warm_up(converted):
    _, d, _, out = converted
    t = yaml.safe_load((out / "train.yaml").read_text())
    assert t["ratio_schedule"]["enabled"] is True
    assert t["train"]["init_from"] == str(out.resolve())
    assert t["data"]["tokenizer"] == str(out.resolve())
    assert t["model"]["vocab_size"] == 300 and t["model"]["n_encoder_layers"] == 1
    conv = yaml.safe_load((out / "conversion.yaml").read_text())
    assert conv["added_tokens"] == ["<|image|>", "<|image_start|>", "<|image_end|>"]


def test_tokenizer_from_the_checkpoint(converted):
    _, _, hf, out = converted
    model, tok = load_exported(out)
    for text in TEXTS + ["<|endoftext|> spelled out stays text", "  leading spaces\nand ünïcödé ✓"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == tok.pad_id == tok._tok.token_to_id("<|endoftext|>")  # the checkpoint's own eos
    added = [tok.image_id, tok.image_start_id, tok.image_end_id]
    assert sorted(added) == [280, 281, 282]  # appended after the tokenizer's vocabulary
    emb = hf.get_input_embeddings().weight
    mean = emb.double().mean(0).float()
    for i in added:  # new rows start at the mean of the checkpoint's rows, embedding and head
        assert torch.allclose(model.lm.embed.weight[i], mean, atol=1e-6)
        assert torch.allclose(model.lm.lm_head.weight[i], hf.lm_head.weight.double().mean(0).float(), atol=1e-6)
    assert model.config.image_token_id == tok.image_id


def test_vocabulary_grows_when_the_tokens_do_not_fit(tmp_path):
    """A checkpoint whose vocab_size equals its tokenizer's: embedding and head get new rows."""
    hf = make_checkpoint(tmp_path / "ckpt", "mixtral", vocab=TOKENIZER_VOCAB)
    out = convert_from_hf(tmp_path / "ckpt", split_yaml(tmp_path / "t.yaml"), tmp_path / "out").out_dir
    model, tok = load_exported(out)
    assert model.config.model.vocab_size == TOKENIZER_VOCAB + 3 == tok.vocab_size
    assert _compare_logits(model, hf) < 1e-5
    mean = hf.get_input_embeddings().weight.double().mean(0).float()
    assert torch.allclose(model.lm.embed.weight[TOKENIZER_VOCAB:], mean.expand(3, -1), atol=1e-6)


def test_recipe_config_converts_with_reallocation(tmp_path, repo_root):
    """docs/pretrained.md's stage-1 config (its concept.top_k only valid with the
    checkpoint's experts), split to fit the tiny checkpoint; reallocation is measured, not identical."""
    make_checkpoint(tmp_path / "ckpt", "olmoe")
    over = ["model.n_encoder_layers=1", "model.n_concept_layers=1", "model.n_decoder_layers=1",
            "model.concept.top_k=4", "data.seq_len=64", f"train.out_dir={tmp_path / 'run'}"]
    out = convert_from_hf(tmp_path / "ckpt", repo_root / "configs/train/olmoe_concept_text.yaml", tmp_path / "out",
                          over).out_dir
    model, _ = load_exported(out)
    assert model.config.model.concept_top_k == 4 and model.config.model.moe.n_experts == 8
    assert model.config.model.chunk.router == "cosine" and model.config.model.qk_norm == "full"
    t = yaml.safe_load((out / "train.yaml").read_text())
    assert t["parallel"]["ep_size"] == 8 and t["ratio_schedule"]["enabled"]
