"""VQA / grounding runners and the long-context suite with scripted stand-in models."""
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from conceptvlm.data.boxes import format_box
from conceptvlm.eval.grounding_runner import GroundingSample, run_grounding
from conceptvlm.eval.longctx import (loss_by_position, needle_prompt, passkey_prompt,
                                     position_buckets, run_retrieval)
from conceptvlm.eval.vqa_runner import VQASample, run_vqa
from helpers import ByteTokenizer

TOK = ByteTokenizer()
V = TOK.vocab_size


class Out:
    def __init__(self, logits):
        self.logits = logits


class ScriptedVLM(torch.nn.Module):
    """Answers ``answers[k]`` after the prompt (which ends with ':'), where ``k`` is the value its
    image is filled with; checks the image-token block and that images arrive in row order."""

    def __init__(self, answers, n_img, question_first=False):
        super().__init__()
        self.answers, self.n_img, self.calls = answers, n_img, []
        self.config = SimpleNamespace(question_first=question_first)  # the layout the runners must follow

    def forward(self, input_ids, doc_ids=None, images=None):
        B, L = input_ids.shape
        logits = torch.zeros(B, L, V)
        starts = (input_ids == TOK.image_start_id).sum(1).tolist()
        assert images is not None and images.shape[0] == sum(starts)
        self.calls.append(B)
        img = 0
        for b in range(B):
            n = int((doc_ids[b] >= 0).sum())
            ids = input_ids[b, :n].tolist()
            i = ids.index(TOK.image_start_id)
            assert ids[0] == TOK.bos_id and (i > 1) == self.config.question_first  # question first: text, then image
            assert ids[i + 1:i + 1 + self.n_img] == [TOK.image_id] * self.n_img
            assert ids[i + 1 + self.n_img] == TOK.image_end_id
            target = self.answers[int(images[img].mean())]
            img += starts[b]
            end = max(i for i, t in enumerate(ids) if t == ord(":"))
            done = TOK.decode(ids[end + 1:])
            nxt = ord(target[len(done)]) if len(done) < len(target) else TOK.eos_id
            logits[b, n - 1, nxt] = 10.0
        return Out(logits)


def _img(k):
    return torch.full((3, 4, 4), float(k))


@pytest.mark.parametrize("question_first", [False, True])
def test_run_vqa_batched_scores_and_writes_json(tmp_path, question_first):
    model = ScriptedVLM({0: "Two", 1: "a dog.", 2: "blue"}, n_img=3, question_first=question_first)
    samples = [VQASample(1, _img(0), "How many?", ["2"] * 10, "number"),
               VQASample(2, _img(1), "What animal?", ["dog"] * 2 + ["cat"] * 8, "other"),
               VQASample(3, _img(2), "Color?", ["red"] * 10, "other")]
    res = run_vqa(model, TOK, samples, image_tokens_per_image=3, batch_size=2,
                  out_path=tmp_path / "vqa.json")
    assert [it["prediction"] for it in res["items"]] == ["Two", "a dog.", "blue"]
    assert [it["accuracy"] for it in res["items"]] == pytest.approx([1.0, 0.6, 0.0])
    assert res["summary"]["overall"] == 53.33
    assert res["summary"]["perAnswerType"] == {"number": 100.0, "other": 30.0}
    assert max(model.calls) == 2
    assert json.loads((tmp_path / "vqa.json").read_text())["summary"]["n"] == 3


@pytest.mark.parametrize("question_first", [False, True])
def test_run_grounding_parses_boxes_per_split(tmp_path, question_first):
    W, H = 200, 100
    gt = (20.0, 10.0, 120.0, 60.0)
    model = ScriptedVLM({0: format_box(gt, W, H), 1: format_box((100, 40, 200, 100), W, H),
                         2: "no idea"}, n_img=2, question_first=question_first)
    samples = [GroundingSample(0, _img(0), "the man", gt, W, H, "testA"),
               GroundingSample(1, _img(1), "the man", gt, W, H, "testA"),
               GroundingSample(2, _img(2), "the dog", gt, W, H, "testB")]
    res = run_grounding(model, TOK, samples, image_tokens_per_image=2, batch_size=3,
                        out_path=tmp_path / "g.json")
    s = res["summary"]
    assert s["unparseable"] == 1 and s["n"] == 3 and s["accuracy"] == pytest.approx(33.33)
    assert s["per_split"]["testA"]["accuracy"] == 50.0
    assert s["per_split"]["testB"] == {"n": 1, "correct": 0, "unparseable": 1, "accuracy": 0.0}
    assert res["items"][0]["iou"] > 0.98
    # second box: overlap (100..120)x(40..60) = 400 px; union 5000 + 6000 - 400
    assert res["items"][1]["iou"] == pytest.approx(400 / 10600, abs=2e-3)


@pytest.mark.parametrize("question_first", [False, True])
def test_eval_prompt_is_the_training_prompt(question_first):
    """What the runners feed a model is token for token the prompt its training samples
    had, in the layout the model was built with."""
    from conceptvlm.data.templates import encode_parts, grounding_parts, grounding_template, vqa_parts, vqa_template
    from conceptvlm.eval.prompts import filled_prompts, image_prompt_ids

    q = "What is {odd} <image> here?"  # braces and the placeholder in a question stay text
    train_ids, labels = encode_parts(vqa_parts(q, "two", question_first), TOK, 3)
    prompt = image_prompt_ids(TOK, filled_prompts(vqa_template(question_first), "question", [q])[0], 3)
    assert prompt == train_ids[:int((labels < 0).sum())].tolist()
    assert (train_ids == TOK.image_start_id).sum() == 1
    box = (1, 2, 30, 40)
    train_ids, labels = encode_parts(grounding_parts("the cat", box, 50, 50, question_first), TOK, 3)
    prompt = image_prompt_ids(TOK, filled_prompts(grounding_template(question_first), "expression", ["the cat"])[0], 3)
    assert prompt == train_ids[:int((labels < 0).sum())].tolist()


@pytest.mark.parametrize("make", [passkey_prompt, needle_prompt])
def test_long_context_prompts_exact_length_and_deterministic(make):
    for L in (1024, 4096, 32768):
        for d in (0.0, 0.5, 1.0):
            ids, ans = make(TOK, L, d, seed=3)
            assert len(ids) == L and ids[0] == TOK.bos_id
            assert (ids, ans) == make(TOK, L, d, seed=3)
            assert ans in TOK.decode(ids)
    a, _ = make(TOK, 1024, 0.0, seed=1)
    b, _ = make(TOK, 1024, 1.0, seed=1)
    assert a != b and make(TOK, 1024, 0.5, seed=1) != make(TOK, 1024, 0.5, seed=2)


def test_needle_depth_places_needle():
    ids, key = passkey_prompt(TOK, 2048, 0.0)
    text = TOK.decode(ids)
    assert text.index(key) < 300
    ids, key = passkey_prompt(TOK, 2048, 1.0)
    text = TOK.decode(ids)
    assert text.index(key) > len(text) - 200


class CopyKeyModel(torch.nn.Module):
    """'Reads' the answer: emits the first run of >= 5 digits of the row, then eos. Fails
    (emits 'x') when the row is longer than ``reach`` tokens and the needle is deep."""

    def __init__(self, reach):
        super().__init__()
        self.reach = reach

    def forward(self, input_ids, doc_ids=None, images=None):
        B, L = input_ids.shape
        logits = torch.zeros(B, L, V)
        for b in range(B):
            n = int((doc_ids[b] >= 0).sum())
            text = TOK.decode(input_ids[b, :n].tolist())
            q = text.rindex("is:") if "is:" in text[-80:] else text.rindex("pass key is")
            head, done = text[:q], text[q:].split("is", 1)[1].lstrip(":").lstrip()
            key = re.search(r"\d{5,}", head).group(0)
            if n > self.reach and head.index(key) > len(head) // 2:
                key = "x"
            nxt = ord(key[len(done)]) if len(done) < len(key) else TOK.eos_id
            logits[b, n - 1, nxt] = 10.0
        return Out(logits)


def test_run_retrieval_accuracy_grid_and_heatmap(tmp_path):
    res = run_retrieval(CopyKeyModel(reach=600), TOK, "passkey", lengths=(512, 1024),
                        depths=(0.0, 1.0), samples=2, batch_size=2, out_path=tmp_path / "pk.json",
                        heatmap_path=tmp_path / "pk.png",
                        ratio_fn=lambda out: float(out.logits.shape[1]))
    acc = res["summary"]["accuracy"]
    assert acc == {"512": {"0.0": 1.0, "1.0": 1.0}, "1024": {"0.0": 1.0, "1.0": 0.0}}
    assert res["summary"]["ratio"] == {"512": 512.0, "1024": 1024.0}
    assert (tmp_path / "pk.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "pk.json").read_text())["summary"]["overall"] == 0.75
    res = run_retrieval(CopyKeyModel(reach=10**6), TOK, "needle", lengths=(256,), depths=(0.5,))
    assert res["summary"]["overall"] == 1.0


def test_loss_by_position_buckets():
    class LateSuccessor(torch.nn.Module):
        """Uniform (1/V) before position 4; from 4 on the successor token x_t + 1 gets
        logit ln(V - 1), i.e. probability exactly 1/2."""

        def forward(self, input_ids, doc_ids=None, images=None):
            B, L = input_ids.shape
            logits = torch.zeros(B, L, V, dtype=torch.float64)
            succ = ((input_ids + 1) % V)[:, 4:]
            logits[:, 4:].scatter_(2, succ[..., None], math.log(V - 1))
            return Out(logits)
    assert position_buckets(8) == [0, 1, 2, 4, 8]
    assert position_buckets(10) == [0, 1, 2, 4, 8, 10]
    r = loss_by_position(LateSuccessor(), TOK, ["abcdefghijkl", "abc"], max_length=8)
    b = r["buckets"]
    assert [x["tokens"] for x in b] == [2, 2, 3, 4]  # positions 0 | 1 | 2,3 | 4..7
    assert [x["nll"] for x in b] == pytest.approx([math.log(V)] * 3 + [math.log(2)])
