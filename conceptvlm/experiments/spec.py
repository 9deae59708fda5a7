"""What an experiment YAML (``configs/experiments/NAME.yaml``) may say, checked when it is
loaded: a mistake is one line that names the file and the key, before any corpus is built
or run trained, not a ``KeyError`` an hour into a plan or a misspelt key silently ignored
(``seed:`` for ``seeds:`` would run the default seeds). ``docs/experiments.md`` describes
each key.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, get_args

from ..config import Router
from ..errors import UserError

# every key the runner, the plan or the report reads (a test checks the report's metrics)
TOP_KEYS = ("name", "claim", "protocol", "kind", "train_config", "model_file", "corpus", "corpus_large", "tokenizer",
            "epochs", "steps", "seeds", "overrides", "variants", "claims", "notes", "quick", "gate", "synthetic",
            "weights", "mix", "eval_limit", "eval_train", "eval_window", "save_every", "unsupported")
QUICK_KEYS = ("steps", "seeds", "variants", "eval_limit", "synthetic", "corpus", "corpus_large", "epochs")
VARIANT_KEYS = ("name", "router", "R", "realloc", "overrides")
REALLOC = ("none", "topk", "loops")
CLAIM_FORMS = ("chain", "not_worse", "ratios")
CLAIM_KEYS = ("id", "text", "metric", "margin", "gated", *CLAIM_FORMS)
CLAIM_METRICS = ("held_bpb", "ood_bpb", "cell_accuracy")  # = verdicts.METRICS
GATE_KEYS = ("variant", "metric", "at_least")
# The keys that say which runs a table holds and how it is read, not how a run is made or
# scored: editing them keeps a table's rows. Every other top-level key is part of the
# protocol (:func:`protocol_key`), and a row made under other values of it is superseded.
READING_KEYS = ("name", "claim", "claims", "notes", "gate", "seeds", "variants", "quick", "unsupported")


def with_quick(exp: dict) -> dict:
    """A copy of ``exp`` with its ``quick`` section applied (the pipeline-check form)."""
    out = dict(exp)
    for key, value in (exp.get("quick") or {}).items():  # steps, seeds, eval_limit, corpus_large, ...
        if key == "variants":
            out["variants"] = [v for v in exp["variants"] if v["name"] in set(value)]
        else:
            out[key] = value
    return out


def protocol_key(exp: dict, variant: dict) -> str:
    """What a run of ``variant`` was made under beyond the code: the experiment's settings
    (training config, data, steps, overrides, evaluation) and the variant's own entry. A
    row records it, so a YAML edit that changes how runs are made (a new override, more
    steps) leaves its older rows out of the table instead of mixing them with new ones,
    even at one code revision; the code itself is in the row's ``code_rev``."""
    shared = {k: v for k, v in exp.items() if k in TOP_KEYS and k not in READING_KEYS}
    blob = json.dumps({"experiment": shared, "variant": variant}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def check_experiment(exp: Any, path: Path, repo: Path) -> None:
    """Raise :class:`UserError` naming ``path`` and the key at fault when ``exp`` (the loaded
    YAML) is not an experiment the runner can run to the end."""
    def fail(what: str, hint: str | None = None) -> None:
        raise UserError(f"{path}: {what}", hint)

    def known(keys, allowed, where: str) -> None:
        for k in keys:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                fail(f"unknown key {k!r} in {where}", f"did you mean {close[0]!r}?" if close else
                     f"known keys: {', '.join(allowed)}")

    if not isinstance(exp, dict):
        fail("an experiment is a mapping of keys (claim, kind, train_config, variants, ...)")
    known(exp, TOP_KEYS, "the experiment")
    if exp.get("kind", "text") not in ("text", "vlm"):
        fail(f"kind is {exp['kind']!r}", "text or vlm")
    if exp.get("protocol", 1) not in (1, 2):
        fail(f"protocol is {exp['protocol']!r}", "1 or 2")
    for key in ("train_config", "model_file"):
        if key in exp and not (isinstance(exp[key], str) and (repo / exp[key]).is_file()):
            fail(f"{key} {exp[key]!r} is not a file (paths are relative to the checkout)")
    if "train_config" not in exp:
        fail("no train_config", "e.g. train_config: configs/train/tiny_text.yaml")
    _check_runs(exp, fail, "")
    variants = exp.get("variants")
    if not isinstance(variants, list) or not variants:
        fail("variants must be a non-empty list of {name, router, ...}")
    names: list[str] = []
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            fail(f"variant {i} has no name")
        where = f"variant {v['name']!r}"
        known(v, VARIANT_KEYS, where)
        if v["name"] in names:
            fail(f"two variants are named {v['name']!r}")
        names.append(v["name"])
        if v.get("router") not in get_args(Router):
            fail(f"{where}: router is {v.get('router')!r}", f"one of {', '.join(get_args(Router))}")
        if "R" in v and not (_number(v["R"]) and v["R"] >= 1):
            fail(f"{where}: R is {v['R']!r}", "a target ratio >= 1")
        if v.get("realloc", "none") not in REALLOC:
            fail(f"{where}: realloc is {v['realloc']!r}", f"one of {', '.join(REALLOC)}")
        _check_overrides(v.get("overrides", []), fail, where)
    _check_overrides(exp.get("overrides", []), fail, "overrides")
    quick = exp.get("quick") or {}
    if not isinstance(quick, dict):
        fail("quick must be a mapping (steps, seeds, variants, ...)")
    known(quick, QUICK_KEYS, "quick")
    _check_runs(quick, fail, "quick: ")
    _named(quick.get("variants", []), names, fail, "quick: variants")
    for c in exp.get("claims", []) or []:
        _check_claim(c, names, fail)
    if exp.get("gate") is not None:
        g = exp["gate"]
        if not isinstance(g, dict):
            fail("gate must be a mapping {variant, metric, at_least}")
        known(g, GATE_KEYS, "gate")
        _named([g.get("variant")], names, fail, "gate")
        if "at_least" in g and not _number(g["at_least"]):
            fail(f"gate: at_least is {g['at_least']!r}", "a number")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_runs(section: dict, fail, where: str) -> None:
    """steps, epochs and seeds, in the experiment or its quick form."""
    if "steps" in section and not (isinstance(section["steps"], int) and section["steps"] > 0):
        fail(f"{where}steps is {section['steps']!r}", "a positive whole number")
    if "epochs" in section and not (_number(section["epochs"]) and section["epochs"] > 0):
        fail(f"{where}epochs is {section['epochs']!r}", "a positive number")
    seeds = section.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        fail(f"{where}seeds is {seeds!r}", "a list of whole numbers, e.g. [0, 1, 2]")


def _check_overrides(overrides: Any, fail, where: str) -> None:
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        fail(f"{where}: overrides must be a list of key=value strings, got {overrides!r}")


def _named(names: Any, variants: list[str], fail, where: str) -> None:
    if not isinstance(names, list):
        fail(f"{where} must be a list of variant names")
    unknown = [n for n in names if n not in variants]
    if unknown:
        fail(f"{where} names {unknown}, which are not variants", f"variants: {', '.join(variants)}")


def _check_claim(c: Any, variants: list[str], fail) -> None:
    if not isinstance(c, dict) or not isinstance(c.get("id"), str):
        fail(f"claim {c!r} has no id")
    where = f"claim {c['id']!r}"
    for k in c:
        if k not in CLAIM_KEYS:
            fail(f"unknown key {k!r} in {where}", f"known keys: {', '.join(CLAIM_KEYS)}")
    forms = [f for f in CLAIM_FORMS if f in c]
    if len(forms) != 1:
        fail(f"{where} needs exactly one of {', '.join(CLAIM_FORMS)}, has {forms or 'none'}")
    _named(c[forms[0]], variants, fail, f"{where}: {forms[0]}")
    if forms[0] != "ratios":
        if c.get("metric") not in CLAIM_METRICS:
            fail(f"{where}: metric is {c.get('metric')!r}", f"one of {', '.join(CLAIM_METRICS)}")
        if len(c[forms[0]]) < 2 or (forms[0] == "not_worse" and len(c[forms[0]]) != 2):
            fail(f"{where}: {forms[0]} compares {len(c[forms[0]])} variant(s)",
                 "a chain names two or more, not_worse exactly two")
    if "margin" in c and not _number(c["margin"]):
        fail(f"{where}: margin is {c['margin']!r}", "a number")
