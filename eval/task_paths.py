"""Relative data paths in a harness task YAML resolve against the YAML's folder.

Both lm-evaluation-harness and lmms-eval hand ``dataset_kwargs.data_files`` (and a
``dataset_path`` folder) to ``datasets.load_dataset`` as written, so a relative path is
read from the current directory and a task folder only works when run from inside it.
:func:`relative_to_yaml` wraps the harness's YAML loader for the duration of a run and
makes such paths absolute, relative to the file that names them.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


def _absolute(value: Any, folder: Path) -> Any:
    if isinstance(value, str):
        if "://" in value or Path(value).is_absolute():
            return value
        return str(folder / value)
    if isinstance(value, list):
        return [_absolute(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, folder) for k, v in value.items()}
    return value


def resolve_data_paths(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Make ``dataset_kwargs.data_files`` / ``data_dir`` and a local ``dataset_path`` folder
    absolute against ``folder`` (in place; hub names and builder names are left alone)."""
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        for key in ("data_files", "data_dir"):
            if key in kwargs:
                kwargs[key] = _absolute(kwargs[key], folder)
    path = cfg.get("dataset_path")
    if isinstance(path, str) and not Path(path).is_absolute() and (folder / path).exists():
        cfg["dataset_path"] = str(folder / path)
    return cfg


def _yaml_folder(args: tuple, kwargs: dict[str, Any]) -> Optional[Path]:
    path = kwargs.get("yaml_path", kwargs.get("path", args[0] if args else None))
    if path is None:
        path_dir = kwargs.get("yaml_dir")
        return Path(path_dir) if path_dir else None
    return Path(path).expanduser().resolve().parent


@contextmanager
def relative_to_yaml(module: Any, loader_name: str) -> Iterator[None]:
    """While active, ``module.loader_name`` (the harness's YAML loader) returns configs with
    data paths resolved against the YAML's folder."""
    original: Callable[..., Any] = getattr(module, loader_name)

    def load(*args: Any, **kwargs: Any) -> Any:
        cfg = original(*args, **kwargs)
        folder = _yaml_folder(args, kwargs)
        if isinstance(cfg, dict) and folder is not None:
            resolve_data_paths(cfg, folder)
        return cfg

    setattr(module, loader_name, load)
    try:
        yield
    finally:
        setattr(module, loader_name, original)
