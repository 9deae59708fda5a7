"""A larger offline corpus (>= 20 MB) of English prose and Python code, from text that
ships with Python and with the packages installed next to this one (issue 16).

Sources (files are read in sorted order; the result is a pure function of the installed
Python and package versions, which the manifest records):

- **english**: ``pydoc_data.topics`` (the language reference's topics), and the
  docstrings (module, class, function; ``ast.get_docstring``, cleaned) of the
  ``english_packages`` (scipy, sklearn, pandas, networkx by default): reference prose
  about numerical methods, statistics and graphs. One unit per topic or source file.
- **code**: the standard library's ``.py`` files, all folders except tests and IDLE.
  One unit per file. No package gives both code and docstrings, so no English unit
  repeats text of a code unit.
- **ood** (held out whole, never trained on): every ``.py`` file of ``ood_package``
  (mpmath by default), for the router-generalisation question: held-out text from a
  source the router never saw.

Split: a unit goes to the held-out side by a hash of its name (``heldout_pct``); then
every run of 64+ characters that a held-out piece shares with the training text
(licence headers, copied helpers, pydoc topics quoting each other) is cut out of it
(:func:`clean_segments`; stretches under ``min_segment`` characters are dropped), and
the overlap of what remains is measured and stored (``manifest["overlap"]``: 0 by
construction, measured rather than assumed).
"""
from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .corpus import pieces
from .protocol import RUN, RunIndex, overlap

DOMAINS = ("english", "code")


@dataclass(frozen=True)
class LargeCorpusSpec:
    heldout_pct: int = 8
    min_segment: int = 256  # shortest held-out stretch kept after cutting out shared runs
    max_chars: int = 4096  # longest document piece (the packer splits longer rows anyway)
    english_packages: tuple[str, ...] = ("scipy", "sklearn", "pandas", "networkx")
    ood_package: str = "mpmath"
    max_units: int = 0  # per domain, 0 = all (tests use a few)
    salt: str = "conceptvlm-v2"
    run: int = RUN
    bpe_vocab: int = 2048  # 0: no BPE tokenizer (byte-level runs only)

    @classmethod
    def from_dict(cls, d: dict) -> "LargeCorpusSpec":
        d = dict(d)
        if "english_packages" in d:
            d["english_packages"] = tuple(d["english_packages"])
        return cls(**d)


def _site() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_test(p: Path) -> bool:
    return any(part in ("test", "tests", "testing", "idlelib", "site-packages", "__pycache__") for part in p.parts)


def _package_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if p.is_file() and not _is_test(p.relative_to(root)))


def docstrings(source: str) -> str:
    """Every module / class / function docstring of ``source``, in source order, blank-line
    separated ("" when it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(doc.strip())
    return "\n\n".join(out) + ("\n" if out else "")


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def english_units(spec: LargeCorpusSpec) -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for k in sorted(topics):
        yield f"pydoc:{k}", topics[k]
    site = _site()
    for pkg in spec.english_packages:
        for p in _package_files(site / pkg):
            text = docstrings(_read(p))
            if text:
                yield f"doc:{p.relative_to(site)}", text


def code_units(spec: LargeCorpusSpec) -> Iterator[tuple[str, str]]:
    root = _stdlib()
    for p in _package_files(root):
        yield f"stdlib:{p.relative_to(root)}", _read(p)


def ood_units(spec: LargeCorpusSpec) -> Iterator[tuple[str, str]]:
    site = _site()
    for p in _package_files(site / spec.ood_package):
        yield f"ood:{p.relative_to(site)}", _read(p)


def _held(name: str, spec: LargeCorpusSpec) -> bool:
    return int(hashlib.sha1(f"{spec.salt}:{name}".encode()).hexdigest(), 16) % 100 < spec.heldout_pct


def _limit(units: Iterator[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    out = []
    for u in units:
        if n and len(out) >= n:
            break
        out.append(u)
    return out


def split(spec: LargeCorpusSpec) -> dict[str, list[tuple[str, str]]]:
    """``{"train/english", "held/english", "train/code", "held/code", "held/ood": [(name, piece)]}``
    after the leakage filter, plus ``"_dropped"``: held-out pieces removed for a shared run."""
    out: dict[str, list] = {f"{s}/{d}": [] for s in ("train", "held") for d in DOMAINS}
    for domain, units in (("english", english_units(spec)), ("code", code_units(spec))):
        for name, text in _limit(units, spec.max_units):
            side = "held" if _held(name, spec) else "train"
            out[f"{side}/{domain}"] += [(name, p) for p in pieces(text, spec.max_chars)]
    out["held/ood"] = [(n, p) for n, t in _limit(ood_units(spec), spec.max_units) for p in pieces(t, spec.max_chars)]
    index = RunIndex((p for d in DOMAINS for _, p in out[f"train/{d}"]), spec.run)
    dropped = {}
    for key in ("held/english", "held/code", "held/ood"):
        keep = [(n, seg) for n, p in out[key] for seg in clean_segments(p, index, spec.min_segment)]
        dropped[key] = sum(len(p) for _, p in out[key]) - sum(len(p) for _, p in keep)
        out[key] = keep
    out["_dropped"] = dropped  # type: ignore[assignment]
    out["_index"] = index  # type: ignore[assignment]
    return out


def clean_segments(text: str, index: RunIndex, min_chars: int) -> list[str]:
    """The stretches of ``text`` outside every run it shares with the indexed training
    text, each at least ``min_chars`` long. No ``run``-character window inside such a
    stretch is shared (a shared window would have marked all of its characters)."""
    mask = index.shared_mask(text)
    if not mask.any():
        return [text] if len(text) >= min_chars else []
    out, start = [], None
    for i, shared in enumerate(mask.tolist() + [True]):
        if not shared and start is None:
            start = i
        elif shared and start is not None:
            if i - start >= min_chars:
                out.append(text[start:i])
            start = None
    return out


def _versions(spec: LargeCorpusSpec) -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (*spec.english_packages, spec.ood_package):
        name = {"sklearn": "scikit-learn"}.get(pkg, pkg)
        try:
            out[pkg] = version(name)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def write_large_corpus(out_dir: str | Path, spec: LargeCorpusSpec = LargeCorpusSpec(), shard_size: int = 2000) -> dict:
    """Write ``OUT/{train,held}/{english,code}/*.tar``, ``OUT/held/ood/*.tar``, the BPE
    tokenizer fitted on the training split (``OUT/bpe/tokenizer.json``) and
    ``OUT/manifest.json``; returns the manifest (reused when its spec matches)."""
    import webdataset as wds

    out = Path(out_dir).resolve()  # the manifest's paths must outlive a symlinked or relative root
    man_path = out / "manifest.json"
    if man_path.exists():
        man = json.loads(man_path.read_text())
        paths = [Path(p) for shards in man.get("shards", {}).values() for p in shards]
        paths += [Path(man["tokenizer"])] if "tokenizer" in man else []
        if man.get("spec") == json.loads(json.dumps(asdict(spec))) and all(p.exists() for p in paths):
            return man
    parts = split(spec)
    index = parts.pop("_index")
    dropped = parts.pop("_dropped")
    man: dict = {"spec": asdict(spec), "versions": _versions(spec), "stdlib": str(_stdlib()), "site": str(_site()),
                 "shards": {}, "docs": {}, "chars": {}, "units": {}, "dropped_chars_for_overlap": dropped, "overlap": {}}
    for key, items in parts.items():
        d = out / key
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.tar"):
            old.unlink()
        with wds.ShardWriter(str(d / f"{key.split('/')[1]}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
            for n, (name, text) in enumerate(items):
                sink.write({"__key__": f"{n:08d}", "txt": text, "json": {"unit": name}})
        man["shards"][key] = sorted(str(p) for p in d.glob("*.tar"))
        man["docs"][key] = len(items)
        man["chars"][key] = sum(len(t) for _, t in items)
        man["units"][key] = len({name for name, _ in items})
        if key.startswith("held/"):
            man["overlap"][key] = overlap((), (t for _, t in items), spec.run, index=index)
    if spec.bpe_vocab:
        from conceptvlm.data.tokenizer import train_bpe_tokenizer

        texts = (t for d in DOMAINS for _, t in parts[f"train/{d}"])
        tok = train_bpe_tokenizer(texts, spec.bpe_vocab, out_dir=out / "bpe")
        man["tokenizer"] = str(out / "bpe")
        n_bytes = n_tok = 0
        for key, items in parts.items():  # bytes per token, per split (the paper's unit is a BPE token)
            b = sum(len(t.encode()) for _, t in items)
            k = sum(len(tok.encode(t)) for _, t in items)
            man.setdefault("bytes_per_token", {})[key] = b / max(k, 1)
            man.setdefault("tokens", {})[key] = k
            if key.startswith("train/"):
                n_bytes, n_tok = n_bytes + b, n_tok + k
        man["bytes_per_token"]["train"] = n_bytes / max(n_tok, 1)
    man["bytes"] = {k: sum(len(t.encode()) for _, t in items) for k, items in parts.items()}
    man_path.write_text(json.dumps(man, indent=1))
    return man

