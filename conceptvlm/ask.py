"""Ask a model about images: prompt text + images in, answer text out (streamed or batched).

The text layer over :func:`conceptvlm.generate.stream_generate`: prompts are encoded as in
training (``data.templates.encode_prompt``: images where ``<image>`` stands, or all images
first when the text has none), images are read from paths or, only when one is given,
``http(s)`` URLs, and the decoding options (greedy, temperature / top-p, max new tokens,
stop strings) travel in one :class:`GenerationOptions`. ``ConceptVLM.generate`` and
``conceptvlm generate`` both end here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from .errors import UserError
from .generate import stream_generate

ImageSource = Union[str, Path, bytes, Any]  # path, URL, encoded bytes or a PIL image
URL_TIMEOUT_S = 30


@dataclass
class GenerationOptions:
    """How to decode. ``temperature = 0`` is greedy; otherwise sample from the top-p nucleus.
    Generation stops at eos, after ``max_new_tokens`` or when a ``stop`` string appears (the
    answer is cut before it). ``seed`` makes sampling reproducible (row ``i`` uses ``seed + i``)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.stop = tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)


def read_image_bytes(source: str) -> bytes:
    """The bytes of ``source``: fetched with urllib when it is an http(s) URL, else read from disk."""
    if source.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as r:  # noqa: S310 (scheme checked)
                return r.read()
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"cannot fetch image {source}: {getattr(e, 'reason', e)}",
                            "check the URL and the network, or pass a local file") from None
    path = Path(source)
    if not path.is_file():
        raise UserError(f"image not found: {source}", "pass an existing image file or an http(s) URL")
    return path.read_bytes()


def load_images(model: torch.nn.Module, sources: Sequence[ImageSource]) -> Optional[torch.Tensor]:
    """``[k, 3, H, W]`` for ``sources`` through the model's own image processor (None if empty)."""
    if not sources:
        return None
    processor = getattr(model, "image_processor", None)
    if processor is None:
        raise UserError("this model has no vision tower, so it cannot take images", "drop --image")
    loaded = [read_image_bytes(str(s)) if isinstance(s, (str, Path)) else s for s in sources]
    return processor.batch(loaded, names=[str(s)[:200] for s in sources])


def prompt_ids(model: torch.nn.Module, tokenizer: Any, text: str, n_images: int) -> list[int]:
    """Training's prompt layout: bos, then text with each ``<image>`` replaced by an image
    block; without placeholders the ``n_images`` images come first (as in VQA samples)."""
    from .data.templates import IMAGE_PLACEHOLDER, encode_prompt

    n_marked = text.count(IMAGE_PLACEHOLDER)
    if n_marked == 0 and n_images:
        text = IMAGE_PLACEHOLDER * n_images + text
    elif n_marked != n_images:
        raise UserError(f"the prompt has {n_marked} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s) "
                        "were given", f"give one image per {IMAGE_PLACEHOLDER}, or none in the text")
    return encode_prompt(text, tokenizer, max(1, getattr(model, "tokens_per_image", 0) or 1))


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def generate_texts(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                   images: Optional[Sequence[Optional[Sequence[ImageSource]]]] = None,
                   options: Optional[GenerationOptions] = None,
                   on_text: Optional[Callable[[int, str], None]] = None,
                   seeds: Optional[Sequence[int]] = None) -> list[str]:
    """Answer ``prompts`` (each with its own list of images) in one batch.

    ``on_text(row, piece)`` receives each row's answer as it decodes, in pieces that never
    include a stop string (text that could still become one is held back). ``seeds`` (one per
    row) overrides ``options.seed``, so a row samples the same answer in any batch.
    """
    opts = options or GenerationOptions()
    images = images or [None] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
    pixels = [load_images(model, list(im or [])) for im in images]
    ids = [prompt_ids(model, tokenizer, p, 0 if px is None else px.shape[0]) for p, px in zip(prompts, pixels)]
    generated: list[list[int]] = [[] for _ in prompts]
    shown = [0] * len(prompts)
    hold = max((len(s) for s in opts.stop), default=1) - 1  # a stop string may still be forming

    def stop(row: int, ids_so_far: list[int]) -> bool:
        return any(s in tokenizer.decode(ids_so_far) for s in opts.stop)

    def emit(row: int, final: bool) -> None:
        text = tokenizer.decode(generated[row])
        answer = cut_at_stop(text, opts.stop)
        # "\ufffd" ends a partly decoded multi-byte character: wait for the rest of it.
        end = len(answer) if final else min(len(answer), len(text) - hold)
        while not final and end > shown[row] and answer[end - 1] == "\ufffd":
            end -= 1
        if end > shown[row]:
            on_text(row, answer[shown[row]:end])
            shown[row] = end

    was_training = model.training
    model.eval()
    try:
        for step in stream_generate(model, ids, max_new_tokens=opts.max_new_tokens, eos_id=tokenizer.eos_id,
                                    pad_id=tokenizer.pad_id, images=pixels, stop=stop if opts.stop else None,
                                    temperature=opts.temperature, top_p=opts.top_p,
                                    seed=list(seeds) if seeds is not None else opts.seed):
            for row, tok in enumerate(step):
                if tok is not None:
                    generated[row].append(tok)
                    if on_text is not None:
                        emit(row, final=False)
    finally:
        model.train(was_training)
    if on_text is not None:
        for row in range(len(prompts)):
            emit(row, final=True)
    return [cut_at_stop(tokenizer.decode(g), opts.stop) for g in generated]


def read_requests(path: Union[str, Path]) -> list[dict[str, Any]]:
    """Rows of a jsonl request file: ``{"prompt": str, "image": path|URL|[...]|null, ...}``.
    Relative image paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file not found: {path}", "pass a .jsonl file with one {\"prompt\", \"image\"} per line")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})", "write one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{n}: a row needs a string 'prompt'", 'e.g. {"prompt": "...", "image": "a.jpg"}')
        imgs = row.get("image", row.get("images"))
        imgs = [] if imgs is None else [imgs] if isinstance(imgs, str) else list(imgs)
        row["_images"] = [i if i.startswith(("http://", "https://")) or Path(i).is_absolute()
                          else str(path.parent / i) for i in imgs]
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no requests", "write one JSON object per line")
    return rows


def answer_file(model: torch.nn.Module, tokenizer: Any, requests: Iterable[dict[str, Any]], out: Union[str, Path],
                options: GenerationOptions, batch_size: int = 8) -> Path:
    """Answer jsonl requests in batches; writes each request row plus ``"answer"`` to ``out``.
    Row ``i`` samples with seed ``options.seed + i``, whatever the batch size."""
    from .eval.generate import batches

    rows = list(requests)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for idx in batches(range(len(rows)), batch_size):
            seeds = None if options.seed is None else [options.seed + i for i in idx]
            answers = generate_texts(model, tokenizer, [rows[i]["prompt"] for i in idx],
                                     [rows[i]["_images"] for i in idx], options, seeds=seeds)
            for i, answer in zip(idx, answers):
                row = {k: v for k, v in rows[i].items() if not k.startswith("_")}
                f.write(json.dumps({**row, "answer": answer}, ensure_ascii=False) + "\n")
    return out
