"""``conceptvlm export --hf``: transformers loads the directory offline and gives the
logits of ``load_exported``; ``load_exported`` reads both layouts."""
import json

import pytest
import torch

from conceptvlm.data.tokenizer import ByteTokenizer
from conceptvlm.export import load_exported, save_model_dir
from helpers import interleaved_row, tiny_vlm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from conceptvlm.hf_export import export_hf

    root = tmp_path_factory.mktemp("hf")
    vlm = tiny_vlm(dtype=torch.float32, image_positions="2d", image_order="hilbert")
    native = save_model_dir(vlm.state_dict(), vlm.config, root / "export", ByteTokenizer())
    hf = export_hf(native, root / "hf")
    return native, hf


def test_directory_has_the_transformers_layout(exported):
    _, hf = exported
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_conceptvlm.ConceptVLMForCausalLM"
    assert cfg["model_type"] == "conceptvlm" and cfg["conceptvlm"]["image_order"] == "hilbert"
    for name in ("model.safetensors", "configuration_conceptvlm.py", "modeling_conceptvlm.py",
                 "preprocessor_config.json", "byte_tokenizer.json"):
        assert (hf / name).is_file(), name
    proc = json.loads((hf / "preprocessor_config.json").read_text())
    assert proc["crop_size"] == {"height": 64, "width": 64} and proc["tokens_per_image"] == 16


def test_auto_model_gives_the_logits_of_load_exported(exported, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    native, hf = exported
    ref, _ = load_exported(native)
    auto = AutoModelForCausalLM.from_pretrained(str(hf), trust_remote_code=True).eval()
    rows = [interleaved_row(ref, [None, "what colour? "]), interleaved_row(ref, ["a ", None, " b"])[:-2]]
    L = max(map(len, rows))
    ids = torch.tensor([r + [256] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref(ids, doc_ids=torch.where(mask.bool(), 0, -1), images=images).logits
        got = auto(input_ids=ids, attention_mask=mask, pixel_values=images).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=0)


def test_load_exported_reads_both_layouts(exported):
    native, hf = exported
    a, tok_a = load_exported(native)
    b, tok_b = load_exported(hf)
    ids = torch.tensor([[257, 1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
    assert type(tok_a) is type(tok_b)


def test_wrong_layouts_name_the_folder_to_pass(tmp_path, exported):
    from conceptvlm.errors import UserError

    native, _ = exported
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="training run without an export"):
        load_exported(run)
    (run / "export").symlink_to(native)
    with pytest.raises(UserError, match=f"pass {run / 'export'}"):
        load_exported(run)
    with pytest.raises(UserError, match="not found"):
        load_exported(tmp_path / "missing")


def test_export_hf_never_replaces_a_folder_without_overwrite(exported, tmp_path):
    from conceptvlm.config import ConfigError
    from conceptvlm.hf_export import export_hf

    native, _ = exported
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not empty"):
        export_hf(native, out)
    assert (out / "mine.txt").read_text() == "keep"
    export_hf(native, out, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "config.json").is_file()
