"""An experiment YAML with a mistake is one line naming the file and the key, before any
data is built (conceptvlm/experiments/spec.py)."""
from pathlib import Path

import pytest

from conceptvlm.errors import UserError
from conceptvlm.experiments.runner import EXPERIMENTS_DIR, load_experiment

BASE = """kind: text
train_config: configs/train/tiny_text.yaml
variants:
  - {name: none, router: none}
  - {name: cos, router: cosine, R: 2, realloc: topk}
"""


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
def test_every_shipped_experiment_passes_the_check(name):
    assert load_experiment(name)["variants"] and load_experiment(name, quick=True)["variants"]


@pytest.mark.parametrize("extra,says", [
    ("seed: [1]\n", "unknown key 'seed' in the experiment; did you mean 'seeds'?"),
    ("seeds: 3\n", "seeds is 3"),
    ("steps: -5\n", "steps is -5"),
    ("kind2: vlm\n", "unknown key 'kind2'"),
    ("quick: {steps: 2, variants: [nope]}\n", "quick: variants names ['nope'], which are not variants"),
    ("quick: {step: 2}\n", "unknown key 'step' in quick; did you mean 'steps'?"),
    ("claims: [{id: c, text: t, chain: [cos, other], metric: held_bpb}]\n", "claim 'c': chain names ['other']"),
    ("claims: [{id: c, text: t, chain: [cos, none], metric: bpb}]\n", "claim 'c': metric is 'bpb'"),
    ("claims: [{id: c, text: t, chain: [cos, none], not_worse: [cos, none], metric: held_bpb}]\n",
     "needs exactly one of chain, not_worse, ratios"),
    ("claims: [{id: c, text: t, not_worse: [cos], metric: cell_accuracy}]\n", "not_worse compares 1 variant(s)"),
    ("gate: {variant: r1, metric: within_one, at_least: 0.8}\n", "gate names ['r1']"),
    ("overrides: [data.seq_len]\n", "overrides must be a list of key=value strings"),
])
def test_mistakes_in_an_experiment_are_one_line_naming_the_key(tmp_path, extra, says):
    path = tmp_path / "exp.yaml"
    path.write_text(BASE + extra)
    with pytest.raises(UserError, match=f"^{path}: ") as e:
        load_experiment(str(path))
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("variants,says", [
    ("[{name: a, router: cosin}]", "variant 'a': router is 'cosin'; one of cosine, linear, fixed, none"),
    ("[{name: a, router: cosine, R: 0.5}]", "variant 'a': R is 0.5"),
    ("[{name: a, router: cosine, realloc: wide}]", "realloc is 'wide'"),
    ("[{name: a, router: none}, {name: a, router: cosine}]", "two variants are named 'a'"),
    ("[{router: none}]", "variant 0 has no name"),
    ("[{name: a, router: none, lr: 0.1}]", "unknown key 'lr' in variant 'a'"),
    ("[]", "variants must be a non-empty list"),
])
def test_bad_variants_are_named(tmp_path, variants, says):
    path = tmp_path / "exp.yaml"
    path.write_text(f"kind: text\ntrain_config: configs/train/tiny_text.yaml\nvariants: {variants}\n")
    with pytest.raises(UserError, match=f"^{path}: ") as e:
        load_experiment(str(path))
    assert says in str(e.value)


def test_missing_train_config_and_a_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("kind: text\ntrain_config: configs/train/nope.yaml\nvariants: [{name: a, router: none}]\n")
    with pytest.raises(UserError, match="train_config 'configs/train/nope.yaml' is not a file"):
        load_experiment(str(path))
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="an experiment is a mapping"):
        load_experiment(str(path))


def test_the_claim_metrics_checked_are_the_ones_the_report_reads():
    from conceptvlm.experiments.spec import CLAIM_METRICS
    from conceptvlm.experiments.verdicts import METRICS

    assert set(CLAIM_METRICS) == set(METRICS)


def test_command_line_mistakes_are_one_line(tmp_path, capsys):
    from conceptvlm.cli import main

    assert main(["experiment", "run", "chunking_v2", "--seeds", "0,x", "--runs", str(tmp_path)]) == 2
    assert "argument --seeds: '0,x' is not a comma-separated list of whole numbers" in capsys.readouterr().err
    assert main(["experiment", "plan", "--only", "nope"]) == 2
    assert "--only nope: not in the plan" in capsys.readouterr().err
    (tmp_path / "plan_timing.json").write_text("[1")
    assert main(["experiment", "plan", "--results", str(tmp_path)]) == 2
    assert f"{Path(tmp_path) / 'plan_timing.json'}: not valid JSON" in capsys.readouterr().err
