"""Every ``conceptvlm ...`` line in README.md and docs/*.md parses with the real command
tree, so the documented commands cannot drift from the code (flags renamed or removed).
Only the arguments are parsed; nothing runs."""
import re
import shlex
from pathlib import Path

import pytest

from conceptvlm.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)  # (language, body) of each fenced block


def documented_commands() -> list[tuple[str, str]]:
    """``(file, command)`` for each shell line in a fenced block that runs ``conceptvlm``
    (a ``$`` prompt, line continuations, comments and a trailing pipe or redirect removed)."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for language, block in FENCE.findall(path.read_text()):
            if language not in ("", "bash", "sh", "console"):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if not line.startswith("conceptvlm "):
                    continue
                cmd = re.split(r"\s#|\s\||\s>|\s&", line)[0]
                out.append((path.name, cmd))
    return out


COMMANDS = documented_commands()


def test_the_docs_document_commands():
    assert len(COMMANDS) >= 30  # the scan found the blocks (README alone lists ~30)
    assert {c.split()[1] for _, c in COMMANDS} >= {"train", "eval", "shards", "experiment", "convert", "bench"}


@pytest.mark.parametrize("where, cmd", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_documented_command_parses(where, cmd):
    # usage lines: `[--flag VALUE]` is parsed as given, `...` ("and the rest") dropped
    argv = [a.strip("[]") for a in shlex.split(cmd)[1:]]
    argv = [a for a in argv if a not in ("", "...", "--debug")]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        assert not e.code, f"{where}: `{cmd}` does not parse"
