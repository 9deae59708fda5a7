"""Real text that ships with every Python: ``pydoc_data.topics`` (English) and the
standard library's own ``.py`` sources (code), written as webdataset text shards.

Split: train / held-out **by source unit** (a pydoc topic, a stdlib file), chosen by a
hash of its name, so the split is deterministic and no file contributes to both sides.
Long units are cut into pieces of at most ``max_chars`` characters (at line breaks).
"""
from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class CorpusSpec:
    heldout_pct: int = 10  # % of units (topics, files) held out
    max_chars: int = 1024  # longest document piece
    max_files: int = 0  # stdlib files used (0: all top-level *.py); sorted by name first
    salt: str = "conceptvlm"  # changes the split without changing code


def _in_heldout(name: str, spec: CorpusSpec) -> bool:
    h = int(hashlib.sha1(f"{spec.salt}:{name}".encode()).hexdigest(), 16)
    return h % 100 < spec.heldout_pct


def pydoc_units() -> list[tuple[str, str]]:
    """(``pydoc:TOPIC``, text) for every topic of ``pydoc_data.topics``, sorted."""
    from pydoc_data.topics import topics

    return [(f"pydoc:{k}", topics[k]) for k in sorted(topics)]


def stdlib_files(spec: CorpusSpec) -> list[Path]:
    """Top-level ``.py`` files of the standard library (no packages, no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    return files[: spec.max_files] if spec.max_files else files


def stdlib_units(spec: CorpusSpec) -> list[tuple[str, str]]:
    return [(f"stdlib:{p.name}", p.read_text(encoding="utf-8", errors="replace")) for p in stdlib_files(spec)]


def pieces(text: str, max_chars: int) -> Iterator[str]:
    """Cut ``text`` at line breaks into pieces of at most ``max_chars`` (long lines are cut)."""
    buf = ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if buf:
                yield buf
                buf = ""
            yield line[:max_chars]
            line = line[max_chars:]
        if len(buf) + len(line) > max_chars and buf:
            yield buf
            buf = ""
        buf += line
    if buf.strip():
        yield buf


def split_units(spec: CorpusSpec) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """``{"english"|"code": {"train"|"held": [(unit name, text), ...]}}``."""
    out: dict[str, dict[str, list]] = {}
    for domain, units in (("english", pydoc_units()), ("code", stdlib_units(spec))):
        out[domain] = {"train": [], "held": []}
        for name, text in units:
            out[domain]["held" if _in_heldout(name, spec) else "train"].append((name, text))
    return out


def write_corpus(out_dir: str | Path, spec: CorpusSpec = CorpusSpec(), shard_size: int = 2000) -> dict:
    """Write ``OUT/{train,held}/{english,code}/*.tar`` (``KEY.txt`` + ``KEY.json`` with the
    unit name) and ``OUT/manifest.json``; returns the manifest. Reuses an existing manifest
    written with the same spec."""
    import webdataset as wds

    out = Path(out_dir)
    man_path = out / "manifest.json"
    if man_path.exists():
        man = json.loads(man_path.read_text())
        if man.get("spec") == asdict(spec):
            return man
    man = {"spec": asdict(spec), "stdlib": sysconfig.get_paths()["stdlib"], "shards": {}, "units": {}, "docs": {},
           "chars": {}}
    for domain, splits in split_units(spec).items():
        for split, units in splits.items():
            d = out / split / domain
            d.mkdir(parents=True, exist_ok=True)
            for old in d.glob("*.tar"):
                old.unlink()
            n, chars = 0, 0
            with wds.ShardWriter(str(d / f"{domain}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
                for name, text in units:
                    for j, piece in enumerate(pieces(text, spec.max_chars)):
                        sink.write({"__key__": f"{n:08d}", "txt": piece, "json": {"unit": name, "piece": j}})
                        n += 1
                        chars += len(piece)
            key = f"{split}/{domain}"
            man["shards"][key] = sorted(str(p) for p in d.glob("*.tar"))
            man["units"][key] = sorted(name for name, _ in units)
            man["docs"][key] = n
            man["chars"][key] = chars
    man_path.write_text(json.dumps(man, indent=1))
    return man
