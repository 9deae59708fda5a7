"""Small-scale reproductions of the paper's findings on real text (see ``docs/results.md``).

``conceptvlm experiment run NAME [--quick]`` trains and evaluates the variants of
``configs/experiments/NAME.yaml``; ``conceptvlm experiment report`` renders the results.
"""


def register(subparsers) -> None:
    """Add ``experiment run`` / ``experiment report`` to the console script's sub-parsers."""
    from .cli import register as _register

    _register(subparsers)


__all__ = ["register"]
