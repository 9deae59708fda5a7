"""VQAv2 accuracy with the official answer normalisation, readers and file scoring.

Follows the official evaluation script (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) to the letter, quirks included:

* the prediction: newlines/tabs -> spaces, strip, ``process_punctuation`` then
  ``process_digit_article`` (lower case, number words -> digits, articles dropped,
  contractions table);
* the human answers: ``process_punctuation`` only, and only when they are not all
  identical (the released answers are already normalised);
* accuracy: for each of the 10 humans, ``min(#other humans that match / 3, 1)``, averaged
  over the 10 leave-one-out subsets.

Datasets with a single answer per question (GQA) score exact match of the normalised
prediction against that answer, which is the usual GQA accuracy.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence, Union

from .io import read_json

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
         "@", "`", ",", "?", "!")
# "(?!<=\d)" is the official script's (mis-typed) look-behind: a look-ahead that never
# fires, so every period not followed by a digit goes ("dog." -> "dog", "2.5" stays).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) lands in the
# ``count`` argument, so at most 32 periods are removed. Kept for exact parity.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``.

    Each mark in ``PUNCT`` is deleted if it touches a space anywhere in the text or if
    the text contains a digit-comma-digit ("1,000" -> "1000"); otherwise it becomes a
    space ("yes/no" -> "yes no"). Then periods not followed by a digit are deleted.
    """
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower case, number words -> digits, drop
    articles, expand contractions written without apostrophe ("isnt" -> "isn't")."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_prediction(prediction: str) -> str:
    """The official normalisation applied to a model's answer."""
    text = prediction.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy of one prediction against its human answers (usually 10).

    ``mean over humans i of min(#{j != i : answer_j == prediction} / 3, 1)`` after the
    official normalisation (module docstring). With a single answer (GQA) it is exact
    match of the normalised prediction.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_prediction(prediction)
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    if len(gts) == 1:
        return float(gts[0] == pred)
    match = [a == pred for a in gts]
    total = sum(match)
    return sum(min(1.0, (total - m) / 3.0) for m in match) / len(gts)


# ----------------------------------------------------------------------------- readers

def _item(qid, answers, answer_type=None, question_type=None, question=None, image_id=None) -> dict:
    return {"question_id": qid, "answers": list(answers), "answer_type": answer_type,
            "question_type": question_type, "question": question, "image_id": image_id}


def read_vqav2(annotations_path: Union[str, Path],
               questions_path: Optional[Union[str, Path]] = None) -> dict:
    """VQAv2 ``{"annotations": [...]}`` (+ optional ``{"questions": [...]}``) ->
    ``{question_id: item}`` with the 10 human answers, answer and question types."""
    ann = read_json(annotations_path)
    questions = {}
    if questions_path is not None:
        questions = {q["question_id"]: q["question"] for q in read_json(questions_path)["questions"]}
    return {a["question_id"]: _item(a["question_id"], [x["answer"] for x in a["answers"]],
                                    a.get("answer_type"), a.get("question_type"),
                                    questions.get(a["question_id"]), a.get("image_id"))
            for a in ann["annotations"]}


def read_gqa(questions_path: Union[str, Path]) -> dict:
    """GQA questions json ``{qid: {"question", "answer", "imageId", "types": {...}}}`` ->
    items with one answer; the answer type is GQA's structural type (verify, query, ...)."""
    data = read_json(questions_path)
    return {qid: _item(qid, [q["answer"]], (q.get("types") or {}).get("structural"),
                       (q.get("types") or {}).get("semantic"), q.get("question"), q.get("imageId"))
            for qid, q in data.items()}


def read_textvqa(path: Union[str, Path]) -> dict:
    """TextVQA json ``{"data": [{"question_id", "question", "image_id", "answers"}]}``."""
    return {d["question_id"]: _item(d["question_id"], d["answers"], None, None,
                                    d.get("question"), d.get("image_id"))
            for d in read_json(path)["data"]}


def read_vqa_annotations(annotations_path: Union[str, Path],
                         questions_path: Optional[Union[str, Path]] = None) -> dict:
    """Detect the format (VQAv2, TextVQA or GQA) and read it."""
    data = read_json(annotations_path)
    if isinstance(data, dict) and "annotations" in data:
        return read_vqav2(annotations_path, questions_path)
    if isinstance(data, dict) and "data" in data:
        return read_textvqa(annotations_path)
    if isinstance(data, dict) and all(isinstance(v, dict) and "answer" in v for v in data.values()):
        return read_gqa(annotations_path)
    raise ValueError(f"{annotations_path}: not a VQAv2 annotations, TextVQA or GQA questions file")


# ----------------------------------------------------------------------------- scoring

def summarize(items: Sequence[dict]) -> dict:
    """Overall, per-answer-type and per-question-type accuracy in percent (2 decimals,
    as the official script reports)."""
    def pct(v: list) -> float:
        return round(100.0 * sum(v) / len(v), 2) if v else 0.0
    by_ans, by_q = defaultdict(list), defaultdict(list)
    for it in items:
        if it.get("answer_type") is not None:
            by_ans[it["answer_type"]].append(it["accuracy"])
        if it.get("question_type") is not None:
            by_q[it["question_type"]].append(it["accuracy"])
    return {"n": len(items), "overall": pct([it["accuracy"] for it in items]),
            "perAnswerType": {k: pct(v) for k, v in sorted(by_ans.items())},
            "perQuestionType": {k: pct(v) for k, v in sorted(by_q.items())}}


def score_vqa(predictions_path: Union[str, Path], annotations_path: Union[str, Path],
              questions_path: Optional[Union[str, Path]] = None) -> dict:
    """Score an official results file ``[{"question_id": ..., "answer": ...}]``.

    Returns ``{"summary": {...}, "items": [...]}``. Predictions for unknown question ids
    are an error; annotated questions without a prediction are counted in
    ``summary["missing"]`` and left out of the accuracy.
    """
    gts = read_vqa_annotations(annotations_path, questions_path)
    key = {str(k): k for k in gts}
    items, unknown = [], []
    for p in read_json(predictions_path):
        qid = key.get(str(p["question_id"]))
        if qid is None:
            unknown.append(p["question_id"])
            continue
        gt = gts[qid]
        items.append({**gt, "prediction": p["answer"],
                      "normalized": normalize_prediction(p["answer"]),
                      "accuracy": vqa_accuracy(p["answer"], gt["answers"])})
    if unknown:
        raise ValueError(f"{len(unknown)} predictions for question ids not in the "
                         f"annotations, e.g. {unknown[:3]}")
    summary = summarize(items)
    summary["missing"] = len(gts) - len({str(it["question_id"]) for it in items})
    return {"summary": summary, "items": items}
