"""Expected failures and how the command line reports them.

Library code raises ordinary exceptions (``FileNotFoundError``, ``ValueError``,
:class:`~conceptvlm.config.ConfigError`, ...) or :class:`UserError` when it knows the fix.
The console script catches them in one place (``cli.main``) and prints one line,
``error: WHAT; FIX``, with exit code 2; ``conceptvlm --debug ...`` re-raises instead, so
the traceback is one flag away. Anything not listed in :func:`one_line` is a bug and
keeps its traceback.
"""
from __future__ import annotations

import json
from typing import Optional

EXIT_USAGE = 2
"""Exit code of every expected failure (argparse uses it for bad arguments too)."""


class UserError(Exception):
    """Bad input the user can fix: ``message`` says what and where, ``hint`` how to fix it."""

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


def _expected_types() -> tuple[type, ...]:
    """Exception types that mean bad input rather than a bug (imported lazily: the
    libraries are only loaded when a command used them)."""
    import sys

    types: list[type] = [UserError, OSError, ValueError, KeyError, json.JSONDecodeError, NotImplementedError]
    for module, name in (("yaml", "YAMLError"), ("omegaconf.errors", "OmegaConfBaseException"),
                         ("safetensors", "SafetensorError"), ("PIL", "UnidentifiedImageError")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            types.append(getattr(mod, name))
    return tuple(types)


def one_line(exc: BaseException) -> Optional[str]:
    """The one-line message for an expected failure, or None for a bug (keep the traceback)."""
    if not isinstance(exc, _expected_types()):
        return None
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename is not None:
        text = f"{exc.filename} is in the way: a folder is needed there"
    elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    elif isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    lines = [s.strip() for s in text.strip().splitlines() if s.strip()]
    text = " ".join(lines) if len(lines) <= 3 else lines[0]  # long dumps keep their first line
    kind = type(exc).__name__
    prefix = "" if isinstance(exc, (UserError, ValueError, OSError)) else f"{kind}: "
    return prefix + text
