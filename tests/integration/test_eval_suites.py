"""``conceptvlm eval SUITE --checkpoint DIR`` end to end on an exported tiny VLM."""
import json

import pytest
import torch

from conceptvlm.cli import main
from conceptvlm.data import load_tokenizer
from conceptvlm.data.synthetic import write_synthetic_shards
from conceptvlm.export import export_model
from helpers import tiny_vlm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsuites")
    vlm = tiny_vlm(dtype=torch.float32)
    export_model(vlm, vlm.config, root / "model", tokenizer=load_tokenizer(None))
    for kind in ("vqa", "grounding", "text"):
        write_synthetic_shards(kind, root / kind, num=6, shard_size=6, seed=3)
    return root


@pytest.mark.parametrize("suite", ["vqa", "grounding", "text"])
def test_suite_writes_json_with_items_and_summary(exported, suite):
    out = exported / f"{suite}.json"
    argv = ["eval", suite, "--checkpoint", str(exported / "model"), "--data",
            str(exported / suite / f"{suite}-000000.tar"), "--batch-size", "3", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert len(result["items"]) == 6
    if suite == "vqa":
        assert 0.0 <= result["summary"]["overall"] <= 100.0
        assert all(len(it["answers"]) == 10 for it in result["items"])
    elif suite == "grounding":
        s = result["summary"]
        assert "unparseable" in s and s["n"] == 6 if "n" in s else True
    else:
        assert result["summary"]["bits_per_byte"] > 0


def test_longctx_suite_reports_accuracy_heatmap_and_ratio(exported):
    out = exported / "longctx.json"
    argv = ["eval", "longctx", "--checkpoint", str(exported / "model"), "--lengths", "300", "400",
            "--depths", "0", "1", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    assert set(summary["accuracy"]) == {"300", "400"}
    assert "text" in summary["ratio"]["300"]
    assert out.with_suffix(".png").exists()


def test_text_suite_needs_data(exported, capsys):
    assert main(["eval", "text", "--checkpoint", str(exported / "model")]) == 2
    assert "needs --data" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs --data"):  # --debug keeps the exception
        main(["--debug", "eval", "text", "--checkpoint", str(exported / "model")])
