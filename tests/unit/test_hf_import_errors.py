"""What `convert --from-hf` does with checkpoints it cannot or must not import faithfully
(one line naming the problem, exit code 2), and the storage forms it reads: sharded
safetensors with an index, bfloat16 output, a hub id read from the offline cache."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptvlm.cli import main
from conceptvlm.config import ConfigError
from conceptvlm.export import load_exported
from conceptvlm.hf_import import convert_from_hf
from hf_helpers import make_checkpoint
from test_hf_import import _compare_logits, split_yaml


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    d = tmp_path_factory.mktemp("olmoe")
    return make_checkpoint(d / "ckpt", "olmoe"), d / "ckpt"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _cli_error(capsys, ckpt, tmp_path):
    rc = main(["convert", "--from-hf", str(ckpt), "--config", str(split_yaml(tmp_path / "t.yaml")),
               "--out", str(tmp_path / "out-cli")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    return lines[0]


def test_unsupported_architecture_lists_the_supported_ones(olmoe, tmp_path, capsys):
    d = _copy(olmoe[1], tmp_path / "ckpt")
    _edit_config(d, architectures=["LlamaForCausalLM"])
    msg = _cli_error(capsys, d, tmp_path)
    assert "'LlamaForCausalLM' is not supported" in msg and "Qwen3MoeForCausalLM" in msg and "MixtralForCausalLM" in msg


@pytest.mark.parametrize("field,value,needle", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
     "rope_parameters.rope_type='yarn'"),
    ("clip_qkv", 8.0, "clip_qkv=8.0"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
])
def test_field_that_cannot_be_represented_is_named(olmoe, tmp_path, capsys, field, value, needle):
    d = _copy(olmoe[1], tmp_path / "ckpt")
    _edit_config(d, **{field: value})
    msg = _cli_error(capsys, d, tmp_path)
    assert needle in msg and "cannot be represented" in msg


def test_qwen_sliding_window_and_dense_layers_are_refused(tmp_path):
    make_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    _edit_config(tmp_path / "ckpt", use_sliding_window=True, sliding_window=16)
    with pytest.raises(ConfigError, match="use_sliding_window=True cannot be represented"):
        convert_from_hf(tmp_path / "ckpt", split_yaml(tmp_path / "t.yaml"), tmp_path / "out")
    _edit_config(tmp_path / "ckpt", use_sliding_window=False, mlp_only_layers=[1])
    with pytest.raises(ConfigError, match=r"mlp_only_layers=\[1\] cannot be represented"):
        convert_from_hf(tmp_path / "ckpt", split_yaml(tmp_path / "t.yaml"), tmp_path / "out")


def test_tensor_of_the_wrong_shape_names_its_key(olmoe, tmp_path, capsys):
    d = _copy(olmoe[1], tmp_path / "ckpt")
    state = load_file(str(d / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(state, str(d / "model.safetensors"))
    msg = _cli_error(capsys, d, tmp_path)
    assert "model.layers.1.self_attn.k_proj.weight has shape [8, 32]" in msg


def test_tensor_the_config_does_not_announce_is_refused(olmoe, tmp_path):
    d = _copy(olmoe[1], tmp_path / "ckpt")
    state = load_file(str(d / "model.safetensors"))
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)  # but attention_bias is false
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ConfigError, match="checkpoint tensor model.layers.0.self_attn.o_proj.bias has no place"):
        convert_from_hf(d, split_yaml(tmp_path / "t.yaml"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp-out").exists()  # nothing half-written


def test_layer_split_must_cover_the_checkpoint(olmoe, tmp_path):
    with pytest.raises(ConfigError, match="num_hidden_layers=3"):
        convert_from_hf(olmoe[1], split_yaml(tmp_path / "t.yaml", n_concept_layers=2), tmp_path / "out")


def test_sharded_checkpoint_bfloat16_and_a_missing_shard(olmoe, tmp_path, capsys):
    hf, _ = olmoe
    hf.save_pretrained(str(tmp_path / "ckpt"), max_shard_size="100KB")
    shutil.copy(olmoe[1] / "tokenizer.json", tmp_path / "ckpt")
    shutil.copy(olmoe[1] / "tokenizer_config.json", tmp_path / "ckpt")
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("model-*.safetensors"))
    assert len(shards) > 1
    out = convert_from_hf(tmp_path / "ckpt", split_yaml(tmp_path / "t.yaml"), tmp_path / "out").out_dir
    assert _compare_logits(load_exported(out)[0], hf) < 1e-5
    out16 = convert_from_hf(tmp_path / "ckpt", split_yaml(tmp_path / "t.yaml"), tmp_path / "out16", dtype="bfloat16")
    full, half = load_file(str(out / "model.safetensors")), load_file(str(out16.out_dir / "model.safetensors"))
    assert half.keys() == full.keys()
    assert all(torch.equal(half[k], v.to(torch.bfloat16)) for k, v in full.items())  # rounding, nothing else
    (tmp_path / "ckpt" / shards[-1]).unlink()
    assert f"shard {shards[-1]} named in the index is missing" in _cli_error(capsys, tmp_path / "ckpt", tmp_path)


def test_hub_id_is_read_from_the_offline_cache(olmoe, tmp_path, monkeypatch):
    """A hub-cache layout (models--org--name/snapshots/REV + refs/main) and HF_HUB_OFFLINE=1."""
    hf, src = olmoe
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-olmoe" / "snapshots" / ("0" * 40)
    shutil.copytree(src, snap)
    (cache / "models--acme--tiny-olmoe" / "refs").mkdir()
    (cache / "models--acme--tiny-olmoe" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    out = convert_from_hf("acme/tiny-olmoe", split_yaml(tmp_path / "t.yaml"), tmp_path / "out").out_dir
    model, _ = load_exported(out)
    assert _compare_logits(model, hf) < 1e-5
    with pytest.raises(ConfigError, match="acme/missing: not found on the hub or in its local cache"):
        convert_from_hf("acme/missing", split_yaml(tmp_path / "t.yaml"), tmp_path / "out2")
