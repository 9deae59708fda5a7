"""Which code revision a run executes, so rows made by different code never share a table.

A row records ``code_rev``: the last commit that changed the code a run executes (with
``+dirty`` for uncommitted changes there). Commits that touch anything else (the report,
the docs, the command-line front ends, the Hugging Face import / export, the benchmarks)
leave it, and so leave the rows and checkpoints of long experiments standing.

What a run executes is checked, not guessed: ``tests/unit/test_experiments_protocol.py``
runs the quick form of a text and a vision experiment and fails if any module of a file
left out here was imported.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# This file is imported by every run, but only to name the code a run executes: editing
# its lists changes no run, so it is left out too (and is the one exception the test allows).
SELF = "conceptvlm/experiments/revision.py"
# Files under the code folders that no experiment run imports (each checked by the test
# above): the command-line front ends, interactive generation, the transformers import /
# export path, the report, the plan and the statistics.
NOT_RUN = [SELF,
    "conceptvlm/__main__.py", "conceptvlm/cli.py", "conceptvlm/ask.py", "conceptvlm/generate.py",
    "conceptvlm/demo.py", "conceptvlm/convert.py", "conceptvlm/hf_config.py", "conceptvlm/hf_import.py",
    "conceptvlm/hf_weights.py", "conceptvlm/safetensors_stream.py", "conceptvlm/hf_remote", "conceptvlm/bench",
    *(f"conceptvlm/experiments/{f}" for f in ("report.py", "report_v2.py", "verdicts.py", "plan.py",
                                               "plan_table.py", "stats.py", "cli.py", "tower_spread.py", "curve.py")),
    "data/bench.py", "data/check.py", "data/cli.py", "data/from_folder.py",
    "eval/cli.py", "eval/harness.py", "eval/lmms.py", "eval/longctx.py", "eval/task_paths.py",
]
CODE_DIRS = ["conceptvlm", "data", "vision", "eval"]  # the package (data, vision, eval are its subpackages)
# The code a run executes: model, data, evaluation, the runner, and the configs they read
# (the experiment YAMLs are not here: their effect on a run is in its run key).
NOT_RUN_EXCLUDES = [f":(exclude){p}" for p in NOT_RUN]
RUN_CODE = [*CODE_DIRS, "configs/model", "configs/train", "configs/deepspeed", *NOT_RUN_EXCLUDES]
# A text-only run builds no vision tower and reads no image data: edits there leave text
# tables (30 CPU hours of runs) standing. The vision config stays in: every config imports it.
TEXT_RUNS_SKIP = [":(exclude)vision/towers.py", ":(exclude)vision/projector.py", ":(exclude)vision/transforms.py",
                  ":(exclude)vision/checkpoint.py", ":(exclude)data/grounding_cells.py", ":(exclude)data/synthetic.py",
                  ":(exclude)conceptvlm/experiments/grounding.py", ":(exclude)conceptvlm/experiments/vlm_runs.py"]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()


def rev_of(rev_args: list[str], paths: list[str]) -> str:
    """``git <rev_args>``, with ``+dirty`` when ``paths`` have uncommitted changes, so rows
    made with such code never pass for rows of a clean revision; "" without git."""
    try:
        rev = _git(*rev_args)
        dirty = _git("status", "--porcelain", "--", *paths)
    except (OSError, subprocess.SubprocessError):
        return ""
    return rev + ("+dirty" if rev and dirty else "")


def git_rev() -> str:
    """The checkout's short revision (``+dirty``: the code runs execute differs from it)."""
    return rev_of(["rev-parse", "--short", "HEAD"], RUN_CODE)


def code_rev(kind: str = "vlm") -> str:
    """The last commit that changed the code a run of ``kind`` (``text`` or ``vlm``)
    executes (:data:`RUN_CODE`, less :data:`TEXT_RUNS_SKIP` for text), with ``+dirty`` for
    uncommitted changes there. Rows of one table must share it."""
    paths = RUN_CODE + (TEXT_RUNS_SKIP if kind == "text" else [])
    return rev_of(["log", "-1", "--format=%h", "--", *paths], paths)


def not_run_files() -> list[str]:
    """The tracked files under the code folders that :data:`NOT_RUN` leaves out."""
    every = set(_git("ls-files", "--", *CODE_DIRS).splitlines())
    counted = set(_git("ls-files", "--", *CODE_DIRS, *NOT_RUN_EXCLUDES).splitlines())
    return sorted(every - counted)
