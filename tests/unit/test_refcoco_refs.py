"""RefCOCO ``refs(unc).p`` is read as plain data: a pickle that would run code is refused."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from conceptvlm.eval.grounding import load_plain_pickle, read_grounding_annotations


class _Payload:
    """Unpickling this calls ``os.system`` (what a crafted refs file does)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _dataset(tmp_path, refs) -> None:
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50}],
        "annotations": [{"id": 7, "image_id": 1, "bbox": [10, 5, 20, 10]}]}))


REF = {"ref_id": 0, "ann_id": 7, "image_id": 1, "split": "val",
       "sentences": [{"sent_id": 3, "sent": "the left one"}], "category_id": 1.5, "flag": (True, None)}


def test_plain_refs_load(tmp_path):
    _dataset(tmp_path, [REF])
    items = read_grounding_annotations(tmp_path)
    assert [(it["sentence"], it["bbox"]) for it in items] == [("the left one", [10.0, 5.0, 30.0, 15.0])]


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_that_runs_code_is_refused_with_one_line_naming_the_file(tmp_path, protocol):
    marker = tmp_path / "pwned"
    _dataset(tmp_path, [REF])
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump([REF, _Payload(str(marker))], f, protocol=protocol)
    with pytest.raises(ValueError) as info:
        read_grounding_annotations(tmp_path)
    message = str(info.value)
    assert "refs(unc).p" in message and ".system; only plain data is allowed" in message
    assert "\n" not in message
    assert not marker.exists()  # the payload never ran


def test_damaged_pickle_is_a_one_line_error(tmp_path):
    (tmp_path / "refs.p").write_bytes(pickle.dumps([REF])[:-5])
    with pytest.raises(ValueError, match=r"refs.p: refused to unpickle"):
        load_plain_pickle(tmp_path / "refs.p")
