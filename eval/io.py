"""Small file helpers shared by the suites: every suite writes one JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union


def write_json(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """Write ``obj`` as indented JSON (non-JSON values via ``str``), creating parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    return path


def read_json(path: Union[str, os.PathLike]) -> Any:
    """Read a JSON file, or a JSON-lines file (``.jsonl``) as a list."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        try:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in f if line.strip()]
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
