"""``conceptvlm experiment tower-spread``: a collapsed tower (one vector for every patch) is
told apart from a working one, on exported models, with a clear exit code."""
import io
import json

import pytest
import torch

from conceptvlm.cli import main
from conceptvlm.data import load_tokenizer
from conceptvlm.data.grounding_cells import write_cell_shards
from conceptvlm.experiments.tower_spread import COLLAPSED_BELOW, spread_of, tower_spread
from conceptvlm.export import export_model
from conceptvlm.vlm import ConceptVLM, VLMConfig
from helpers import tiny_config, tiny_vlm


def collapse(vlm) -> None:
    """Every patch the same vector: no pixel reaches the output, one position-free table."""
    with torch.no_grad():
        vlm.tower.model.patch_embed.proj.weight.zero_()
        vlm.tower.model.pos_embed.copy_(vlm.tower.model.pos_embed.mean(1, keepdim=True))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("spread")
    tok = load_tokenizer(None)
    for name, broken in (("fresh", False), ("collapsed", True)):
        vlm = tiny_vlm(dtype=torch.float32)
        if broken:
            collapse(vlm)
        export_model(vlm, vlm.config, root / name, tokenizer=tok)
    text = ConceptVLM(VLMConfig(model=tiny_config(vocab_size=262), vision=None))
    export_model(text, text.config, root / "text", tokenizer=tok)
    write_cell_shards(root / "cells", num=8, shard_size=8)
    return root


def test_spread_is_zero_for_identical_patches_and_positive_otherwise():
    same = torch.ones(3, 16, 8) * torch.randn(8)
    assert spread_of(same)["spread"] == pytest.approx(0.0, abs=1e-6)
    s = spread_of(torch.randn(3, 16, 8))
    assert 0.8 < s["spread"] < 1.2  # iid features: std ~1 per feature, norm ~sqrt(width)


def test_a_collapsed_tower_is_flagged_and_a_random_one_is_not(exports):
    from conceptvlm.experiments.tower_spread import images_from_shards
    from conceptvlm.export import load_exported

    results = {}
    for name in ("fresh", "collapsed"):
        model, _ = load_exported(exports / name)
        images, skipped = images_from_shards(str(exports / "cells" / "cells-000000.tar"), model.image_processor,
                                             limit=6)
        assert skipped == 0
        results[name] = tower_spread(model, images)
    assert results["fresh"]["images"] == 6 and not results["fresh"]["collapsed"]
    assert results["fresh"]["tower"]["spread"] > 2 * COLLAPSED_BELOW
    assert results["collapsed"]["collapsed"] and results["collapsed"]["tower"]["spread"] < 1e-3


def test_cli_exit_code_says_whether_any_model_collapsed(exports, tmp_path, capsys):
    data = str(exports / "cells" / "cells-000000.tar")
    out = tmp_path / "spread.json"
    assert main(["experiment", "tower-spread", str(exports / "fresh"), "--data", data, "--out", str(out)]) == 0
    assert ": ok" in capsys.readouterr().out
    assert main(["experiment", "tower-spread", str(exports / "fresh"), str(exports / "collapsed"),
                 "--data", data]) == 1
    assert "COLLAPSED" in capsys.readouterr().out
    assert [r["collapsed"] for r in json.loads(out.read_text())] == [False]


def test_an_unreadable_image_is_skipped_and_counted(exports, tmp_path, capsys):
    import tarfile

    src, dst = exports / "cells" / "cells-000000.tar", tmp_path / "broken.tar"
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for i, member in enumerate(tin.getmembers()):
            data = tin.extractfile(member).read()
            if i == 0 and member.name.endswith(".jpg"):
                data = b"not a jpeg"
                member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    assert main(["experiment", "tower-spread", str(exports / "fresh"), "--data", str(dst)]) == 0
    assert "over 7 images (1 unreadable skipped): ok" in capsys.readouterr().out


def test_cli_errors_are_one_line(exports, capsys):
    data = str(exports / "cells" / "cells-000000.tar")
    assert main(["experiment", "tower-spread", str(exports / "text"), "--data", data]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tower" in err[0]
    assert main(["experiment", "tower-spread", str(exports / "fresh"), "--data", str(exports / "nope.tar")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_training_logs_the_patch_spread_and_warns_once_it_collapses():
    """A VLM in training reports how far apart its projected patches are (the same number
    ``tower-spread`` prints after the projector); the step metrics average it over the
    micro-batches that had images, and a value under the threshold gives one log line."""
    from conceptvlm.logging_utils import StepMetrics, collapse_warning
    from helpers import interleaved_row

    vlm = tiny_vlm(dtype=torch.float32)
    ids = torch.tensor([interleaved_row(vlm, ["ab", None, "cd"])])
    pics = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    vlm.train()
    spread = vlm(ids, labels=ids.clone(), images=pics).patch_spread
    with torch.no_grad():
        expected = spread_of(vlm.embed_images(pics))["spread"]
    assert float(spread) == pytest.approx(expected, rel=1e-5) and expected > COLLAPSED_BELOW
    vlm.eval()  # inference pays nothing for it
    assert vlm(ids, images=pics).patch_spread is None

    steps = StepMetrics()
    text_ids = torch.tensor([interleaved_row(vlm, ["abcd"])])
    text_only = vlm(text_ids, labels=text_ids.clone())
    vlm.train()
    with_images = vlm(ids, labels=ids.clone(), images=pics)
    for out in (with_images, text_only):
        steps.add(out, float(out.lm_loss.detach()))
    assert steps.result(1)["image/patch_spread"] == pytest.approx(float(with_images.patch_spread))
    assert collapse_warning({"lm_loss": 1.0}) is None
    assert collapse_warning({"image/patch_spread": 0.3}) is None
    line = collapse_warning({"image/patch_spread": 0.04})
    assert "0.040 < 0.15" in line and "train.freeze=[tower.,projector.]" in line
