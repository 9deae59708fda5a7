"""The lmms-eval adapter on a local task with local images (no downloads): the harness's
answers are those of ``conceptvlm generate``'s loop, its metric is computed on them, and
the task's relative data path resolves against the task YAML's folder."""
import json

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")

from conceptvlm.ask import GenerationOptions, generate_texts  # noqa: E402
from conceptvlm.data.tokenizer import ByteTokenizer  # noqa: E402
from helpers import tiny_vlm  # noqa: E402

TOK = ByteTokenizer()
COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}

TASK_YAML = """task: cvlm_local_colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/colours.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: "Question: {{question}} Answer:"
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

UTILS = '''from pathlib import Path
from PIL import Image
HERE = Path(__file__).parent
def doc_to_visual(doc):
    return [Image.open(HERE / "data" / doc["image"]).convert("RGB")]
'''


def _task_folder(root):
    (root / "data").mkdir(parents=True)
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (64, 64), rgb).save(root / "data" / f"{name}.png")
        rows.append({"image": f"{name}.png", "question": "what colour is the image?", "answer": name})
    (root / "data" / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "colours.yaml").write_text(TASK_YAML)
    (root / "utils.py").write_text(UTILS)
    return rows


def test_lmms_adapter_on_a_local_task(tmp_path, monkeypatch):
    from conceptvlm.eval.harness import results_table
    from conceptvlm.eval.lmms import run_lmms
    from lmms_eval.utils import make_table

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = _task_folder(tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)  # not the task folder: its relative data path must still resolve
    torch.set_num_threads(1)
    vlm = tiny_vlm(dtype=torch.float32)
    res = run_lmms(vlm, TOK, ["cvlm_local_colours"], include_path=tmp_path / "tasks", batch_size=2,
                   log_samples=True, out_path=tmp_path / "lmms.json")
    images = [[Image.open(tmp_path / "tasks" / "data" / r["image"]).convert("RGB")] for r in rows]
    expected = generate_texts(vlm, TOK, [f"Question: {r['question']} Answer:" for r in rows], images,
                              GenerationOptions(max_new_tokens=4, stop=("\n",)))
    samples = sorted(res["samples"]["cvlm_local_colours"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples] == expected
    accuracy = sum(a.strip() == r["answer"] for a, r in zip(expected, rows)) / len(rows)
    assert res["results"]["cvlm_local_colours"]["exact_match,none"] == pytest.approx(accuracy)
    assert json.loads((tmp_path / "lmms.json").read_text())["config"]["model"] == "conceptvlm"
    table = results_table(res, make_table)
    assert "cvlm_local_colours" in table and "exact_match" in table


def test_unknown_lmms_task_is_a_user_error(tmp_path):
    from conceptvlm.errors import UserError
    from conceptvlm.eval.lmms import run_lmms

    _task_folder(tmp_path / "tasks")
    with pytest.raises(UserError, match="unknown lmms-eval task"):
        run_lmms(tiny_vlm(), TOK, ["no_such_task_xyz"], include_path=tmp_path / "tasks")
