"""The synthetic image-text tasks: deterministic, and their answers agree with the pixels."""
import io
from collections import Counter

import numpy as np
from PIL import Image

from conceptvlm.data.synthetic import BACKGROUNDS, QUESTION_TYPES, synthetic_sample


def _pixels(sample: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float32)


def _background(img: np.ndarray) -> str:
    """Name the background from robust whole-image statistics (shapes cover well under
    half the image and are flat inside): noise makes neighbouring pixels differ."""
    if np.median(np.abs(np.diff(img, axis=1)).mean(-1)) > 8:
        return BACKGROUNDS["noise"]
    return BACKGROUNDS["dark"] if np.median(img.mean(-1)) < 70 else BACKGROUNDS["grey"]


def test_samples_are_a_pure_function_of_their_arguments():
    for kind in ("caption", "vqa", "grounding", "text", "interleaved"):
        a, b = synthetic_sample(kind, 7, seed=3), synthetic_sample(kind, 7, seed=3)
        assert a == b
        assert a != synthetic_sample(kind, 8, seed=3)


def test_vqa_answers_and_captions_agree_with_the_image():
    types: Counter = Counter()
    for i in range(300):
        s = synthetic_sample("vqa", i)
        meta = s["json"]
        types[meta["question_type"]] += 1
        assert meta["answer_type"] == QUESTION_TYPES[meta["question_type"]]
        assert Counter(meta["answers"]).most_common(1)[0][0] == meta["answer"]  # annotators mostly agree
        if meta["question_type"] == "background":
            assert meta["answer"] == _background(_pixels(s))
    assert set(types) == set(QUESTION_TYPES)  # every question type occurs
    for i in range(50):
        s = synthetic_sample("caption", i)
        assert s["txt"].endswith(f"on a {_background(_pixels(s))} background.")
