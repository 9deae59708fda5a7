"""``conceptvlm experiment curve``: window means of a run's logged loss and the step it left
the prior, checked against a loop written out by hand."""
import json

import pytest

from conceptvlm.cli import main
from conceptvlm.experiments.curve import left_prior_at, metric_by_step, window_means


def _metrics(path, losses, resumed_from=None):
    """One row per step; ``resumed_from``: the steps after it logged twice, first with a stale value."""
    with open(path, "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step, "lm_loss": loss}) + "\n")
        if resumed_from is not None:  # the process died, the run resumed and logged these again
            for step in range(resumed_from + 1, len(losses) + 1):
                f.write(json.dumps({"step": step, "lm_loss": losses[step - 1]}) + "\n")


def test_windows_match_a_plain_loop_and_a_repeated_step_counts_once():
    rows = [{"step": s, "lm_loss": float(s)} for s in range(1, 11)] + [{"step": 3, "lm_loss": 100.0}]
    rows.append({"step": 11, "lm_loss": float("nan")})  # non-finite: dropped
    values = metric_by_step(rows, "lm_loss")
    assert values[3] == 100.0 and 11 not in values
    expected, steps = [], sorted(values)
    for i in range(0, len(steps), 4):
        chunk = steps[i:i + 4]
        expected.append((chunk[0], sum(values[s] for s in chunk) / len(chunk)))
    assert window_means(values, 4) == expected
    with pytest.raises(ValueError):
        window_means(values, 0)


def test_left_prior_is_the_first_window_that_stays_below():
    prior = 0.5
    # a dip back to the prior (step 300) does not count as leaving; the stay from 400 on does
    w = [(1, 1.3), (100, 0.51), (200, 0.45), (300, 0.499), (400, 0.46), (500, 0.2)]
    assert left_prior_at(w, prior) == 400
    assert left_prior_at([(1, 1.3), (100, 0.51), (200, 0.505)], prior) is None
    assert left_prior_at([(1, 0.2)], prior) == 1


def test_cli_prints_each_run_and_errors_are_one_line(tmp_path, capsys):
    stuck, learns = tmp_path / "stuck", tmp_path / "learns"
    stuck.mkdir(), learns.mkdir()
    _metrics(stuck / "metrics.jsonl", [0.512] * 600)
    # sits at the prior for 300 steps, then falls; resumed from step 450 with the same values
    _metrics(learns / "metrics.jsonl", [0.512] * 300 + [0.3] * 300, resumed_from=450)
    assert main(["experiment", "curve", str(stuck), str(learns / "metrics.jsonl"), "--window", "100",
                 "--prior", "cells"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2
    assert "at the prior (0.512)" in out[0]
    assert "left the prior (0.512) at step ~301" in out[1] and "501:0.300" in out[1]
    assert main(["experiment", "curve", str(learns), "--window", "300"]) == 0  # no prior: windows only
    assert capsys.readouterr().out.strip().endswith("1:0.512 301:0.300")
    for argv in (["experiment", "curve", str(tmp_path / "nope")],
                 ["experiment", "curve", str(learns), "--prior", "high"],
                 ["experiment", "curve", str(learns), "--metric", "bpb"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:")
