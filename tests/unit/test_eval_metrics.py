"""Hand-computed cases for the VQA accuracy and grounding Acc@0.5, and the score CLI."""
import json

import pytest

from conceptvlm.data.boxes import format_box, xywh_to_xyxy
from conceptvlm.eval import box_iou_accuracy, score_grounding, score_vqa, vqa_accuracy
from conceptvlm.eval.cli import main as cli_main
from conceptvlm.eval.vqa import normalize_prediction, process_punctuation


# ------------------------------------------------------------------ VQA normalisation

@pytest.mark.parametrize("pred, norm", [
    ("Two", "2"), ("two dogs", "2 dogs"), ("None", "0"), ("ten", "10"),
    ("a dog.", "dog"), ("The Dog", "dog"), ("an apple", "apple"),
    ("isnt", "isn't"), ("dont know", "don't know"), ("Im", "im"),  # lower-cased first
    ("1,000", "1000"), ("1,000 dollars, really", "1000 dollars really"),
    ("2.5", "2.5"), ("3.", "3"), ("yes/no", "yes no"), ("yes / no", "yes no"),
    ("red, white", "red white"), ("red,white", "red white"), ("  Yes!\n", "yes"),
    ("it's", "it's"), ("left-hand", "left hand"), ("x:y", "x:y"),
])
def test_official_normalisation(pred, norm):
    # "Im" -> "im": the official table's "Im" key never matches after lower-casing.
    assert normalize_prediction(pred) == norm


def test_punctuation_rules_exactly():
    # a mark touching a space is deleted everywhere; otherwise replaced by a space
    assert process_punctuation("yes / no") == "yes  no"
    assert process_punctuation("yes/no") == "yes no"
    # any digit-comma-digit in the text deletes every mark
    assert process_punctuation("1,000 (approx)") == "1000 approx"
    # periods go unless a digit follows
    assert process_punctuation("e.g. 3.14.") == "eg 3.14"


def test_corner_cases_against_human_answers():
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("a dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("isnt", ["isn't"] * 10) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    # human answers are punctuation-processed only when they disagree
    assert vqa_accuracy("1000", ["1,000"] * 10) == 0.0
    assert vqa_accuracy("1000", ["1,000"] * 9 + ["one thousand"]) == 1.0


@pytest.mark.parametrize("k", range(11))
def test_leave_one_out_average(k):
    # k matching humans of 10: the k subsets that drop a match see k-1 matches, the
    # 10-k that drop a non-match see k; acc = (k*min((k-1)/3,1) + (10-k)*min(k/3,1)) / 10
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0}.get(k, 1.0)
    answers = ["yes"] * k + ["no"] * (10 - k)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected, abs=1e-12)


def test_single_answer_is_exact_match():
    assert vqa_accuracy("The Yes.", ["yes"]) == 1.0
    assert vqa_accuracy("no", ["yes"]) == 0.0


def _vqav2_files(tmp_path):
    ann = {"annotations": [
        {"question_id": 1, "image_id": 7, "question_type": "how many", "answer_type": "number",
         "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
        {"question_id": 2, "image_id": 7, "question_type": "is the", "answer_type": "yes/no",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                     for i, a in enumerate(["yes"] * 2 + ["no"] * 8)]},
        {"question_id": 3, "image_id": 8, "question_type": "what", "answer_type": "other",
         "answers": [{"answer": "dog", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
    ]}
    qs = {"questions": [{"question_id": i, "image_id": 7, "question": f"q{i}?"} for i in (1, 2, 3)]}
    preds = [{"question_id": 1, "answer": "two"}, {"question_id": 2, "answer": "Yes"},
             {"question_id": 3, "answer": "a cat"}]
    for name, obj in [("ann.json", ann), ("q.json", qs), ("pred.json", preds)]:
        (tmp_path / name).write_text(json.dumps(obj))
    return tmp_path / "pred.json", tmp_path / "ann.json", tmp_path / "q.json"


def test_score_vqa_file(tmp_path):
    pred, ann, qs = _vqav2_files(tmp_path)
    res = score_vqa(pred, ann, qs)
    s = res["summary"]
    # items: 1.0, 0.6 (2 matching humans), 0.0 -> 53.33
    assert [it["accuracy"] for it in res["items"]] == pytest.approx([1.0, 0.6, 0.0])
    assert s["overall"] == 53.33 and s["missing"] == 0 and s["n"] == 3
    assert s["perAnswerType"] == {"number": 100.0, "other": 0.0, "yes/no": 60.0}
    assert res["items"][0]["question"] == "q1?"


def test_score_gqa_and_textvqa(tmp_path):
    gqa = {"201": {"question": "color?", "answer": "red", "imageId": "n1",
                   "types": {"structural": "query", "semantic": "attr"}},
           "202": {"question": "is it?", "answer": "no", "imageId": "n1",
                   "types": {"structural": "verify", "semantic": "rel"}}}
    (tmp_path / "gqa.json").write_text(json.dumps(gqa))
    (tmp_path / "p.json").write_text(json.dumps([{"question_id": "201", "answer": "Red."},
                                                 {"question_id": "202", "answer": "yes"}]))
    s = score_vqa(tmp_path / "p.json", tmp_path / "gqa.json")["summary"]
    assert s["overall"] == 50.0 and s["perAnswerType"] == {"query": 100.0, "verify": 0.0}

    tv = {"dataset_name": "textvqa", "data": [
        {"question_id": 5, "question": "brand?", "image_id": "x",
         "answers": ["coca cola"] * 3 + ["coke"] * 7}]}
    (tmp_path / "tv.json").write_text(json.dumps(tv))
    (tmp_path / "p2.json").write_text(json.dumps([{"question_id": 5, "answer": "Coca Cola"}]))
    assert score_vqa(tmp_path / "p2.json", tmp_path / "tv.json")["summary"]["overall"] == 90.0


# ------------------------------------------------------------------ grounding

def test_box_iou_accuracy_hand_computed():
    gt = [(0, 0, 10, 10)] * 4
    pred = [(0, 0, 10, 10),    # IoU 1
            (0, 0, 10, 5),     # 50/100 = 0.5 -> counts (>=)
            (5, 0, 15, 10),    # 50/150 = 1/3
            None]              # unparseable -> wrong
    assert box_iou_accuracy(pred, gt) == 0.5
    assert box_iou_accuracy(pred, gt, threshold=0.3) == 0.75


def _refcoco(tmp_path):
    inst = {"images": [{"id": 1, "width": 200, "height": 100, "file_name": "a.jpg"}],
            "annotations": [{"id": 11, "image_id": 1, "bbox": [20, 10, 100, 50], "category_id": 1},
                            {"id": 12, "image_id": 1, "bbox": [0, 0, 50, 50], "category_id": 1}]}
    refs = [{"ref_id": 0, "ann_id": 11, "image_id": 1, "split": "testA",
             "sentences": [{"sent_id": 100, "sent": "left man"}, {"sent_id": 101, "sent": "man"}]},
            {"ref_id": 1, "ann_id": 12, "image_id": 1, "split": "val",
             "sentences": [{"sent_id": 102, "sent": "corner"}]}]
    d = tmp_path / "refcoco"
    d.mkdir()
    (d / "instances.json").write_text(json.dumps(inst))
    (d / "refs.json").write_text(json.dumps(refs))
    return d


def test_score_grounding_xywh_annotations_vs_xyxy_predictions(tmp_path):
    d = _refcoco(tmp_path)
    # GT of sent 100/101 is xywh (20,10,100,50) = xyxy (20,10,120,60)
    assert xywh_to_xyxy([20, 10, 100, 50]) == (20, 10, 120, 60)
    preds = [
        {"sent_id": 100, "answer": format_box((20, 10, 120, 60), 200, 100)},  # grid text, IoU~1
        {"sent_id": 101, "answer": "[20, 10, 100, 50]"},  # xywh mistaken as grid xyxy: IoU<0.5
        {"sent_id": 102, "answer": "I cannot tell"},      # unparseable
    ]
    (tmp_path / "p.json").write_text(json.dumps(preds))
    res = score_grounding(tmp_path / "p.json", d)
    s = res["summary"]
    assert s["n"] == 3 and s["unparseable"] == 1 and s["missing"] == 0
    assert s["per_split"]["testA"]["accuracy"] == 50.0
    assert s["per_split"]["val"] == {"n": 1, "correct": 0, "unparseable": 1, "accuracy": 0.0}
    assert res["items"][0]["iou"] > 0.98 and res["items"][1]["iou"] < 0.5
    # pixel xyxy predictions are accepted too
    (tmp_path / "p2.json").write_text(json.dumps([{"sent_id": 102, "box": [0, 0, 50, 50]}]))
    s2 = score_grounding(tmp_path / "p2.json", d)["summary"]
    assert s2["accuracy"] == 100.0 and s2["missing"] == 2


def test_cli_score(tmp_path, capsys):
    pred, ann, qs = _vqav2_files(tmp_path)
    assert cli_main(["score", "vqa", "--predictions", str(pred), "--annotations", str(ann),
                     "--questions", str(qs)]) == 0
    out = json.loads((tmp_path / "pred.scores.json").read_text())
    assert out["summary"]["overall"] == 53.33 and '"overall": 53.33' in capsys.readouterr().out
    d = _refcoco(tmp_path)
    (tmp_path / "g.json").write_text(json.dumps([{"sent_id": 100, "answer": "[100, 100, 600, 600]"}]))
    assert cli_main(["score", "grounding", "--predictions", str(tmp_path / "g.json"),
                     "--annotations", str(d), "--out", str(tmp_path / "g_out.json")]) == 0
    assert json.loads((tmp_path / "g_out.json").read_text())["summary"]["missing"] == 2
