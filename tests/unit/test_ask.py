"""Asking a model about images: batched decoding equals per-row decoding, sampling options,
stop strings, streaming, ``model.generate`` and ``conceptvlm generate`` on one code path."""
import json

import pytest
import torch
from PIL import Image

from conceptvlm.ask import GenerationOptions, generate_texts
from conceptvlm.data.tokenizer import ByteTokenizer
from conceptvlm.generate import cached_generate, next_tokens, stream_generate
from helpers import tiny_vlm

TOK = ByteTokenizer()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from 2 threads on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm(dtype=torch.float64, image_order="hilbert")


def _images():
    return [Image.new("RGB", (64, 48), c) for c in ((220, 20, 20), (20, 20, 220), (30, 200, 30))]


PROMPTS = ["Question: what colour is it? Answer:", "hi", "<image> and <image>: same?"]


def _image_lists():
    red, blue, green = _images()
    return [[red], [], [blue, green]]


def test_batched_decoding_equals_per_row(vlm):
    opts = GenerationOptions(max_new_tokens=6)
    batched = generate_texts(vlm, TOK, PROMPTS, _image_lists(), opts)
    alone = [generate_texts(vlm, TOK, [p], [im], opts)[0] for p, im in zip(PROMPTS, _image_lists())]
    assert batched == alone
    assert all(len(a) > 0 for a in batched)


def test_sampling_per_row_seeds_do_not_depend_on_the_batch(vlm):
    opts = GenerationOptions(max_new_tokens=5, temperature=1.5, top_p=0.9)
    batched = generate_texts(vlm, TOK, PROMPTS, _image_lists(), opts, seeds=[7, 8, 9])
    alone = [generate_texts(vlm, TOK, [p], [im], opts, seeds=[s])[0]
             for p, im, s in zip(PROMPTS, _image_lists(), (7, 8, 9))]
    assert batched == alone
    # a tiny nucleus keeps only the most likely token: sampling becomes greedy
    greedy = generate_texts(vlm, TOK, PROMPTS, _image_lists(), GenerationOptions(max_new_tokens=5))
    nucleus = generate_texts(vlm, TOK, PROMPTS, _image_lists(),
                             GenerationOptions(max_new_tokens=5, temperature=1.0, top_p=1e-6, seed=0))
    assert nucleus == greedy


def test_top_p_samples_only_inside_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = [torch.Generator().manual_seed(0)]
    drawn = {next_tokens(logits, 1.0, 0.7, g)[0] for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are outside
    drawn = {next_tokens(logits, 1.0, 1.0, g)[0] for _ in range(300)}
    assert drawn == {0, 1, 2, 3}


def test_stop_strings_cut_the_answer_and_the_stream_adds_up(vlm):
    full = generate_texts(vlm, TOK, PROMPTS[:1], _image_lists()[:1], GenerationOptions(max_new_tokens=8))[0]
    stop = full[2:4]
    pieces = []
    opts = GenerationOptions(max_new_tokens=8, stop=(stop,))
    cut = generate_texts(vlm, TOK, PROMPTS[:1], _image_lists()[:1], opts, on_text=lambda r, s: pieces.append(s))[0]
    assert cut == full[:full.index(stop)]
    assert "".join(pieces) == cut


def test_stream_yields_the_tokens_cached_generate_returns(vlm):
    prompts = [[TOK.bos_id] + TOK.encode("abc"), [TOK.bos_id] + TOK.encode("a longer prompt")]
    steps = list(stream_generate(vlm, prompts, max_new_tokens=[3, 5], eos_id=None, pad_id=TOK.pad_id))
    rows = [[s[i] for s in steps if s[i] is not None] for i in range(2)]
    assert rows == cached_generate(vlm, prompts, max_new_tokens=[3, 5], eos_id=None, pad_id=TOK.pad_id)
    assert [len(r) for r in rows] == [3, 5]


def test_model_generate_is_the_same_loop(vlm):
    red = _images()[0]
    expected = generate_texts(vlm, TOK, [PROMPTS[0]], [[red]], GenerationOptions(max_new_tokens=6))[0]
    assert vlm.generate(TOK, PROMPTS[0], [red], max_new_tokens=6) == expected
    assert vlm.generate(TOK, [PROMPTS[0]], [[red]], max_new_tokens=6) == [expected]


def test_bad_options_and_placeholder_counts_are_errors(vlm):
    from conceptvlm.errors import UserError
    with pytest.raises(ValueError, match="top_p"):
        GenerationOptions(top_p=0)
    with pytest.raises(UserError, match="placeholder"):
        generate_texts(vlm, TOK, ["<image> <image>"], [[_images()[0]]])


def test_cli_generate_input_file_equals_per_row(vlm, tmp_path, capsys):
    from conceptvlm.cli import main
    from conceptvlm.export import save_model_dir, vlm_config_dict

    ckpt = save_model_dir({k: v.float() for k, v in vlm.state_dict().items()}, vlm.config, tmp_path / "export", TOK)
    (tmp_path / "img").mkdir()
    for name, im in zip(("red", "blue", "green"), _images()):
        im.save(tmp_path / "img" / f"{name}.png")
    rows = [{"id": 1, "prompt": PROMPTS[0], "image": "img/red.png"}, {"id": 2, "prompt": PROMPTS[1]},
            {"id": 3, "prompt": PROMPTS[2], "image": ["img/blue.png", "img/green.png"]}]
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["generate", "--checkpoint", str(ckpt), "--input", str(req), "--batch-size", "2",
                 "--max-new-tokens", "5"]) == 0
    out = [json.loads(line) for line in (tmp_path / "req.answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [1, 2, 3]
    from conceptvlm.export import load_exported
    model, tok = load_exported(ckpt)
    for r, o in zip(rows, out):
        images = [str(tmp_path / p) for p in ([r["image"]] if isinstance(r.get("image"), str) else r.get("image", []))]
        assert o["answer"] == model.generate(tok, r["prompt"], images, max_new_tokens=5)
    # one prompt, streamed to stdout
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(ckpt), "--image", str(tmp_path / "img/red.png"),
                 "--prompt", PROMPTS[0], "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == model.generate(tok, PROMPTS[0], [str(tmp_path / "img/red.png")],
                                                     max_new_tokens=5) + "\n"
    assert vlm_config_dict(model.config)["image_order"] == "hilbert"
