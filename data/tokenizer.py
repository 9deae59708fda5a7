"""Lossless tokenizers: a byte-level default and byte-level BPE via ``tokenizers``.

Both expose one interface (what the rest of the package codes against):

- ``vocab_size, pad_id, bos_id, eos_id, image_id, image_start_id, image_end_id``: ints,
- ``encode(text) -> list[int]``: no special tokens added, and text that happens to
  spell a special token (``"<|eos|>"``) stays text, so ``decode(encode(t)) == t``,
- ``decode(ids) -> str``: special ids dropped,
- ``save(directory)``; ``load_tokenizer(path)`` reads it back.

Lossless matters because a language model must be able to write exactly what it read
(code, whitespace, unicode); CLIP's BPE lowercases and collapses spaces, so it is not
used for the language side.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Order fixes the byte tokenizer's ids (256 + index); BPE tokenizers look them up by name.
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<|pad|>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "image": "<|image|>",
    "image_start": "<|image_start|>",
    "image_end": "<|image_end|>",
}
_BYTE_MARKER = "byte_tokenizer.json"  # what save() writes for the byte-level default
_SPECIAL_MARKER = "special_tokens.conceptvlm.json"  # a BPE tokenizer's own pad/bos/eos texts


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the special tokens (ids 256..261). Needs no files."""

    kind = "bytes"

    def __init__(self) -> None:
        for i, name in enumerate(SPECIAL_TOKENS):
            setattr(self, f"{name}_id", 256 + i)
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.special_ids = frozenset(range(256, self.vocab_size))

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # errors="replace": a slice that cuts a multi-byte character still decodes.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        path = Path(directory) / _BYTE_MARKER
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"type": "bytes", "special_tokens": SPECIAL_TOKENS}, indent=1))
        return path


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` (from a ``tokenizer.json``) with our special tokens.

    Special tokens missing from the file are appended to its vocabulary, so any local
    ``tokenizer.json`` can be used; ``encode_special_tokens`` makes their spellings in
    ordinary text encode as text (lossless).
    """

    kind = "bpe"

    def __init__(self, tok: Tokenizer, special: Optional[dict[str, str]] = None) -> None:
        """``special``: the text of some special tokens (``{"eos": "<|endoftext|>"}``), for a
        pretrained model's tokenizer whose own pad / bos / eos must be kept."""
        self.special = dict(SPECIAL_TOKENS, **(special or {}))
        self.added = [s for s in dict.fromkeys(self.special.values()) if tok.token_to_id(s) is None]
        if self.added:
            tok.add_special_tokens(self.added)
        tok.encode_special_tokens = True
        self._tok = tok
        for name, text in self.special.items():
            setattr(self, f"{name}_id", tok.token_to_id(text))
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(tok.token_to_id(s) for s in self.special.values())
        self.added_ids = [tok.token_to_id(s) for s in self.added]  # ids of the tokens added here

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))
        if self.special != SPECIAL_TOKENS:
            (path.parent / _SPECIAL_MARKER).write_text(json.dumps(self.special, indent=1))
        return path


AnyTokenizer = Union[ByteTokenizer, BPETokenizer]


def load_tokenizer(path: Optional[Union[str, os.PathLike]] = None) -> AnyTokenizer:
    """``None`` -> byte-level default; a ``tokenizer.json`` or a directory holding one
    (or holding what ``ByteTokenizer.save`` wrote) -> that tokenizer."""
    if path is None:
        return ByteTokenizer()
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / _BYTE_MARKER).is_file():
            return ByteTokenizer()
        else:
            raise FileNotFoundError(f"{p}: no tokenizer.json (or {_BYTE_MARKER}) in this directory")
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    if p.name == _BYTE_MARKER:
        return ByteTokenizer()
    marker = p.parent / _SPECIAL_MARKER
    special = _special_texts(json.loads(marker.read_text()), marker) if marker.is_file() else None
    return BPETokenizer(Tokenizer.from_file(str(p)), special)


def _special_texts(d, where: Path) -> dict[str, str]:
    if not isinstance(d, dict) or not all(k in SPECIAL_TOKENS and isinstance(v, str) for k, v in d.items()):
        raise ValueError(f"{where}: expected a mapping of {sorted(SPECIAL_TOKENS)} to token texts")
    return d


def _token_text(value) -> Optional[str]:
    """A tokenizer_config.json special-token entry: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def load_pretrained_tokenizer(model_dir: Union[str, os.PathLike]) -> BPETokenizer:
    """The tokenizer of a transformers checkpoint directory (``tokenizer.json``) with its
    own pad / bos / eos tokens (``tokenizer_config.json``, else the ids in ``config.json``;
    a missing bos or pad is the eos). The image tokens are added when it lacks them
    (``.added`` lists what was added)."""
    d = Path(model_dir)
    if not (d / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{d}: no tokenizer.json (a transformers fast tokenizer is needed)")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    cfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
    model_cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    texts: dict[str, str] = {}
    for name in ("pad", "bos", "eos"):
        text = _token_text(cfg.get(f"{name}_token"))
        tid = model_cfg.get(f"{name}_token_id")
        if text is None and isinstance(tid, int):
            text = tok.id_to_token(tid)
        if text is not None:
            texts[name] = text
    if "eos" in texts:
        texts.setdefault("bos", texts["eos"])
        texts.setdefault("pad", texts["eos"])
    return BPETokenizer(tok, texts)


def _iter_texts(files_or_texts: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> Iterable[str]:
    """Existing paths are read as UTF-8 files (one text per line); other strings are texts."""
    items = [files_or_texts] if isinstance(files_or_texts, (str, os.PathLike)) else files_or_texts
    for item in items:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and len(item) < 4096 and os.path.isfile(item)):
            with open(item, encoding="utf-8") as f:
                yield from f
        else:
            yield str(item)


def train_bpe_tokenizer(
    files_or_texts: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    vocab_size: int,
    out_dir: Optional[Union[str, os.PathLike]] = None,
    min_frequency: int = 2,
) -> BPETokenizer:
    """Fit a byte-level BPE (GPT-2 style, no normaliser: lossless) and save it to ``out_dir``.

    ``files_or_texts``: paths to text files and/or raw strings. The 256 byte symbols are
    always in the vocabulary, so any text encodes; ``vocab_size`` counts them and the
    special tokens.
    """
    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size must be at least {256 + n_special} (bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would change the text (not lossless).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter_texts(files_or_texts), trainer=trainer)
    result = BPETokenizer(tok)
    if out_dir is not None:
        result.save(out_dir)
    return result
