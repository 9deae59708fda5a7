"""Every command turns expected failures into one line and exit code 2 (``--debug`` shows
the traceback): missing and empty files, bad configs, unknown tasks, wrong checkpoint layouts."""
import shutil

import pytest
import torch

from conceptvlm.cli import main
from conceptvlm.data.tokenizer import ByteTokenizer
from conceptvlm.export import save_model_dir
from helpers import tiny_vlm

# (command line with {tmp} / {good} placeholders, a fragment the message must contain)
CASES = [
    ("eval text --checkpoint {tmp}/empty --data x.txt", "holds no exported model"),
    ("eval vqa --checkpoint {tmp}/run --data x.tar", "pass {tmp}/run/export"),
    ("eval text --checkpoint {good} --data {tmp}/missing.txt", "missing.txt"),
    ("eval grounding --checkpoint {good} --data {tmp}/missing-{{000000..000001}}.tar", "not found"),
    ("eval harness --checkpoint {good} --tasks no_such_task", "unknown lm-eval task"),
    ("eval lmms --checkpoint {tmp}/run --tasks t", "pass {tmp}/run/export"),
    ("eval longctx --checkpoint {tmp}/missing", "checkpoint folder not found"),
    ("score vqa --predictions {tmp}/bad.json --annotations {tmp}/bad.json", "bad.json: not valid JSON"),
    ("score grounding --predictions {tmp}/missing.json --annotations {tmp}/missing.json", "missing.json"),
    ("flops --config {tmp}/typo.yaml", "d_modell"),
    ("convert --baseline {tmp}/empty --config configs/train/tiny_text.yaml --out {tmp}/conv", "no exported model"),
    ("shards synthetic --kind caption --out {tmp}/afile --num 2", "afile is in the way"),
    ("shards from-folder --images {tmp}/missing --annotations {tmp}/a.jsonl --out {tmp}/o", "not found"),
    ("tokenizer train {tmp}/missing.txt --vocab-size 300 --out {tmp}/tok", "missing.txt"),
    ("bench moe --model-config {tmp}/missing.yaml", "model config not found"),
    ("bench data --kind nonsense --num 2", "unknown kind"),
    ("bench inference --lengths abc", "'abc' is not a length"),
    ("bench inference --lengths 64 --batch 0", "--batch: batch sizes must be >= 1"),
    ("bench train --lengths abc", "'abc' is not a length"),
    ("bench train --docs 0", "'0' must be at least 1"),
    ("bench decode-profile --length 0", "'0' is not a positive length"),
    ("bench decode-profile --batch 0", "'0' must be at least 1"),
    ("experiment run no_such_experiment", "unknown experiment"),
    ("experiment rescore no_such_experiment", "unknown experiment"),
    ("experiment report --results {tmp}/missing", "results folder not found"),
    ("generate --checkpoint {tmp}/run --prompt hi", "pass {tmp}/run/export"),
    ("generate --checkpoint {good} --prompt hi --image {tmp}/afile", "afile"),
    ("generate --checkpoint {tmp}/damaged --prompt hi", "model.safetensors does not match its sha256"),
    ("generate --checkpoint {tmp}/truncated --prompt hi", "model.safetensors is not a readable safetensors file"),
    ("generate --checkpoint {good} --input {tmp}/req.jsonl", "a row needs a string 'prompt'"),
    ("generate --checkpoint {good} --prompt hi --top-p 0", "top_p"),
    ("export --hf {tmp}/hf --checkpoint {tmp}/empty", "no exported model"),
    ("demo --out {tmp}/afile", "afile is in the way"),
    ("train --config {tmp}/missing.yaml", "train config not found"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    (tmp / "bad.json").write_text("not json")
    (tmp / "typo.yaml").write_text("d_modell: 32\n")
    (tmp / "afile").write_text("x")
    (tmp / "req.jsonl").write_text('{"prompt": 1}\n')
    vlm = tiny_vlm(dtype=torch.float32)
    good = save_model_dir(vlm.state_dict(), vlm.config, tmp / "good", ByteTokenizer())
    save_model_dir(vlm.state_dict(), vlm.config, tmp / "run" / "export", ByteTokenizer())
    # flipped bytes inside the weights (caught by the manifest), and a truncated copy of a
    # folder from before manifests (caught by safetensors itself)
    for name in ("damaged", "truncated"):
        shutil.copytree(good, tmp / name)
    weights = tmp / "damaged" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    (tmp / "truncated" / "manifest.json").unlink()
    (tmp / "truncated" / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:100])
    return tmp, good


@pytest.mark.parametrize("line,fragment", CASES, ids=[c[0].split(" --")[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(bad_inputs, line, fragment, capsys, monkeypatch, repo_root):
    tmp, good = bad_inputs
    monkeypatch.chdir(repo_root)
    argv = line.format(tmp=tmp, good=good).split()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0] and fragment.format(tmp=tmp) in lines[0]
    assert "Traceback" not in out + err


def test_debug_shows_the_traceback(bad_inputs):
    tmp, _ = bad_inputs
    from conceptvlm.errors import UserError
    with pytest.raises(UserError):
        main(["--debug", "generate", "--checkpoint", str(tmp / "empty"), "--prompt", "hi"])
    with pytest.raises(UserError):  # anywhere on the line
        main(["generate", "--checkpoint", str(tmp / "empty"), "--prompt", "hi", "--debug"])


def test_bugs_keep_their_traceback(monkeypatch):
    import conceptvlm.bench.flops as flops

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(flops, "print_accounting", broken)
    with pytest.raises(ZeroDivisionError):
        main(["flops", "--config", "configs/model/tiny.yaml"])


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    """argparse's own errors too: one line naming the command and the argument, no usage dump."""
    assert main(["bench", "scan", "--shapes", "4x4096"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "conceptvlm bench scan" in err and "shape must look like" in err
    assert main(["--help"]) == 0
