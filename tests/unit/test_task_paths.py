"""Relative data paths in a harness task YAML resolve against the YAML's folder."""
import json

from conceptvlm.eval.task_paths import resolve_data_paths
from helpers import ByteTokenizer, tiny_model


def test_resolve_data_paths(tmp_path):
    (tmp_path / "local").mkdir()
    cfg = {"dataset_path": "local", "dataset_kwargs": {"data_files": {"test": "d/a.jsonl", "val": ["b.jsonl", "/abs.jsonl"]},
                                                       "data_dir": "d"}}
    resolve_data_paths(cfg, tmp_path)
    assert cfg["dataset_path"] == str(tmp_path / "local")
    assert cfg["dataset_kwargs"] == {"data_files": {"test": str(tmp_path / "d/a.jsonl"),
                                                    "val": [str(tmp_path / "b.jsonl"), "/abs.jsonl"]},
                                     "data_dir": str(tmp_path / "d")}
    hub = {"dataset_path": "lmms-lab/VQAv2", "dataset_kwargs": {"data_files": "hf://x/y.json"}}
    assert resolve_data_paths(dict(hub), tmp_path) == hub


def test_lm_eval_task_with_a_relative_data_file_runs_from_elsewhere(tmp_path, monkeypatch):
    from conceptvlm.eval.harness import results_table, run_harness

    tasks = tmp_path / "tasks"
    (tasks / "data").mkdir(parents=True)
    docs = [{"question": "ab", "choices": ["c", "x"], "label": 0}, {"question": "hi", "choices": ["j", "k"], "label": 1}]
    (tasks / "data" / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "mc.yaml").write_text("""task: cvlm_relative_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
""")
    monkeypatch.chdir(tmp_path)
    res = run_harness(tiny_model(vocab_size=262), ByteTokenizer(), ["cvlm_relative_mc"], include_path=tasks,
                      batch_size=2, max_length=32)
    assert res["n-samples"]["cvlm_relative_mc"]["effective"] == 2
    assert "cvlm_relative_mc" in results_table(res)
