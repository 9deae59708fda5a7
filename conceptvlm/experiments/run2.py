"""What the second protocol (``protocol: 2`` in an experiment YAML) adds to a run (issue 16).

- data: the large corpus (:mod:`.corpus_large`), sources mixed in proportion to their
  document counts, read once (``data.resample=false``), in an order fixed by the seed
  alone (``data.seed = seed``: every variant of seed ``s`` sees the same rows);
- tokens: the BPE tokenizer fitted on the training split (``tokenizer: bpe``) or bytes;
- steps: ``epochs`` passes over the training tokens (:func:`.protocol.one_pass_steps`);
- evaluation: every held-out document, in windows of the training row length, and the
  epochs each source was actually seen, replayed from the run's saved data position;
- compute: linear and attention-map FLOPs per token at the realised ratio, and whether
  that ratio is within 5% of the target (:func:`.protocol.ratio_matched`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ..manifest import write_atomic
from .protocol import eval_window, one_pass_steps, ratio_matched, size_weights, windows_of

TRAIN_DOMAINS = ("english", "code")


def prepare_text_data(exp: dict, root: Path) -> dict:
    """Shards, weights, tokenizer and token counts of the large corpus (written once)."""
    from .corpus_large import LargeCorpusSpec, write_large_corpus

    spec = LargeCorpusSpec.from_dict(exp.get("corpus_large", {}))
    key = hashlib.sha1(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:10]
    man = write_large_corpus(root / f"corpus_large-{key}", spec)  # quick and full forms don't share
    bpe = exp.get("tokenizer", "bpe") == "bpe"
    if bpe and "tokenizer" not in man:
        raise ValueError(f"experiment {exp['name']}: tokenizer bpe needs corpus_large.bpe_vocab > 0")
    weights = size_weights({d: man["docs"][f"train/{d}"] for d in TRAIN_DOMAINS})
    tokens = {k: (man["tokens"][k] if bpe else man["bytes"][k]) for k in man["docs"]}
    return {"train_sources": [{"shards": man["shards"][f"train/{d}"], "kind": "text", "weight": weights[d]}
                              for d in TRAIN_DOMAINS],
            "held": {d: man["shards"][f"held/{d}"] for d in (*TRAIN_DOMAINS, "ood")},
            "train_eval": {},
            "tokenizer": man.get("tokenizer") if bpe else None,
            # the packer adds a bos and an eos per document
            "train_tokens": sum(tokens[f"train/{d}"] + 2 * man["docs"][f"train/{d}"] for d in TRAIN_DOMAINS),
            "train_docs": {d: man["docs"][f"train/{d}"] for d in TRAIN_DOMAINS},
            "held_tokens": sum(v for k, v in tokens.items() if k.startswith("held/")),
            "info": {"docs": man["docs"], "chars": man["chars"], "bytes": man["bytes"], "versions": man["versions"],
                     "overlap": man["overlap"], "dropped_chars_for_overlap": man["dropped_chars_for_overlap"],
                     "bytes_per_token": man.get("bytes_per_token", {}).get("train", 1.0) if bpe else 1.0,
                     "tokenizer": "bpe-%d" % spec.bpe_vocab if bpe else "bytes", "weights": weights}}


def data_overrides(data: dict, seed: int) -> list[str]:
    """Train-config overrides of the protocol: seed-fixed order, one pass, tokenizer."""
    ov = [f"data.seed={seed}", "data.resample=false"]
    if data.get("tokenizer"):
        from conceptvlm.data import load_tokenizer

        ov += [f"data.tokenizer={data['tokenizer']}", f"model.vocab_size={load_tokenizer(data['tokenizer']).vocab_size}"]
    return ov


def planned_steps(exp: dict, data: dict, seq_len: int, batch_size: int, grad_accum: int) -> int:
    """``exp["steps"]`` if it is a number, else an estimate of ``epochs`` (default 1)
    passes over the data from its token count (full rows; :func:`packed_steps` counts
    the rows a run really makes)."""
    if isinstance(exp.get("steps"), int):
        return int(exp["steps"])
    return one_pass_steps(data["train_tokens"], seq_len * batch_size * grad_accum, float(exp.get("epochs", 1.0)))


def packed_rows(cfg, cache_dir: Path) -> int:
    """Rows the run's packer makes from one pass over its training data, in the run's own
    order. Packing is greedy and in order (``data/packing.py``): a document that does not
    fit the open row closes it, so rows are part padding (about a quarter on the large
    corpus) and a pass takes more rows than tokens / seq_len. Counted by packing one epoch
    without a model (tens of seconds), cached per data config in ``cache_dir``."""
    import dataclasses

    from conceptvlm.data import build_loader, load_tokenizer

    dc = dataclasses.replace(_data_config(cfg), epochs=1)
    key = hashlib.sha1(json.dumps([dataclasses.asdict(dc), [dataclasses.asdict(x) for x in _sources(cfg)],
                                   cfg.data.tokenizer], sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir / f"packed_rows-{key}.json"
    if path.is_file():
        return int(json.loads(path.read_text())["rows"])
    rows = 0
    for batch in build_loader(_sources(cfg), load_tokenizer(cfg.data.tokenizer), dc):
        rows += int((batch["doc_ids"] >= 0).any(dim=1).sum())  # a last, short batch pads with empty rows
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"rows": rows, "data_config": dataclasses.asdict(dc)}, default=str))
    return rows


def packed_steps(exp: dict, cfg, cache_dir: Path) -> int:
    """``exp["steps"]`` if it is a number, else the optimizer steps of ``epochs`` (default
    1) passes over the rows the run's packer makes (:func:`packed_rows`); rounded down, so
    no document is seen more than ``ceil(epochs)`` times."""
    if isinstance(exp.get("steps"), int):
        return int(exp["steps"])
    per_step = cfg.data.batch_size * cfg.optim.grad_accum
    return max(1, int(packed_rows(cfg, cache_dir) * float(exp.get("epochs", 1.0)) // per_step))


def epochs_seen(cfg, run_dir: Path, data: dict) -> dict[str, float]:
    """Passes over each training source that the run consumed, from the data position its
    last checkpoint saved: whole epochs, plus the share of the current epoch's documents
    of that source that came before the position (replayed, bytes only)."""
    from conceptvlm.checkpoint import latest_tag, read_trainer_state
    from conceptvlm.data.counters import DataCounters
    from conceptvlm.data.pipeline import PackedDataset
    from conceptvlm.data.shards import ReaderInfo
    from conceptvlm.data.tokenizer import ByteTokenizer

    ckpt = run_dir / "checkpoints"
    tag = latest_tag(ckpt)
    if tag is None:
        return {}
    state = read_trainer_state(ckpt / tag, 0)[0]["data"][0]  # JSON: nothing unpickles
    epoch, index, _ = state["positions"].get(0, state["positions"].get("0", [0, 0, 0]))
    ds = PackedDataset(_sources(cfg), ByteTokenizer(), _data_config(cfg))
    reader = ReaderInfo(rank=0, world_size=1, worker=0, num_workers=1)
    seen = Counter(raw["__source__"] for raw in itertools.islice(ds.raw_stream(reader, epoch, DataCounters()), index))
    names = list(data["train_docs"])
    return {names[i]: epoch + seen[i] / data["train_docs"][names[i]] for i in range(len(names))}


def _sources(cfg) -> list:
    from conceptvlm.data import Source

    return [Source(s.shards, s.kind, s.weight, s.caption_prompt) for s in cfg.data.sources]


def _data_config(cfg):
    """The single-reader data config of a run (as ``train.build_loaders`` makes it), for
    replaying its order outside the model. Ids depend on neither the image transform nor
    the tower; image blocks count the tiny tower's 64 tokens (the same for every variant)."""
    from conceptvlm.data import DataConfig

    d = cfg.data
    per_image = 1 if all(s.kind == "text" for s in d.sources) else 64
    return DataConfig(seq_len=d.seq_len, batch_size=d.batch_size, seed=d.seed, shuffle_buffer=d.shuffle_buffer,
                      shuffle_initial=d.shuffle_initial, resample=d.resample, long_docs=d.long_docs, rank=0,
                      world_size=1, image_size=16, image_tokens_per_image=per_image)


def data_fingerprint(cfg, batches: int = 2) -> str:
    """A hash of the training shards (names and sizes) and of the token ids of the first
    ``batches`` training batches the run's data config yields: the same for every variant
    of one seed when the seeds are paired, and different when a run read fewer shards."""
    from conceptvlm.data import build_loader, load_tokenizer
    from conceptvlm.data.shards import expand_shards

    loader = build_loader(_sources(cfg), load_tokenizer(cfg.data.tokenizer), _data_config(cfg))
    h = hashlib.sha1()
    for src in cfg.data.sources:
        for shard in map(Path, expand_shards(src.shards)):
            h.update(f"{shard.name}:{shard.stat().st_size if shard.is_file() else '?'};".encode())
    for batch in itertools.islice(iter(loader), batches):
        h.update(batch["input_ids"].numpy().tobytes())
    return h.hexdigest()[:16]


def ratio_over_windows(model, tok, texts: list[str], window: int) -> dict:
    """tokens / boundaries of the eval-rule router over every window of ``texts``."""
    import torch

    tokens = bounds = 0.0
    model.eval()
    with torch.no_grad():
        for text in texts:
            for ids in windows_of([tok.bos_id] + tok.encode(text), window):
                st = model(input_ids=torch.tensor([ids])).chunk_stats.get("text")
                n = float(len(ids)) if st is None else float(st["tokens"])
                tokens += n
                bounds += n if st is None else float(st["boundaries"])
    return {"tokens": tokens, "boundaries": bounds, "ratio": tokens / max(bounds, 1.0)}


def evaluate_text(model, tok, shards: dict, window: int, limit: Optional[int] = None) -> dict:
    """Bits per byte and realised ratio of every held-out document (``limit`` only for
    smoke tests), scored in windows of ``window`` tokens; ``all`` pools the in-domain
    splits (english, code), ``ood`` stays apart."""
    from conceptvlm.eval.datasets import texts_from_shards
    from conceptvlm.eval.text import perplexity

    res: dict = {}
    for name, spec in shards.items():
        texts = [t for t in texts_from_shards(spec, limit) if t]
        if not texts:  # an empty split (tiny test corpora): nothing to score
            continue
        s = perplexity(model, tok, texts, max_length=window, batch_size=8)["summary"]
        r = ratio_over_windows(model, tok, texts, window)
        res[name] = {"bits_per_byte": s["bits_per_byte"], "nll_per_token": s["nll_per_token"], "docs": s["documents"],
                     "bytes": s["bytes"], "tokens": s["tokens"], "realised_ratio": r["ratio"],
                     "boundaries": r["boundaries"], "ratio_tokens": r["tokens"]}
    ind = [res[d] for d in TRAIN_DOMAINS if d in res]
    nbytes = sum(v["bytes"] for v in ind)
    res["all"] = {"bits_per_byte": sum(v["bits_per_byte"] * v["bytes"] for v in ind) / max(nbytes, 1),
                  "bytes": nbytes, "docs": sum(v["docs"] for v in ind),
                  "realised_ratio": sum(v["ratio_tokens"] for v in ind) / max(sum(v["boundaries"] for v in ind), 1.0)}
    res["window"] = window
    return res


def compute_fields(model_cfg, router: str, R: float, realised: float, window: int) -> dict:
    """FLOPs per token (linear and attention map) at the realised ratio, and the ±5% rule."""
    from conceptvlm import flops

    ratio = None if router == "none" else max(realised, 1.0)
    att = flops.attention_map_flops(model_cfg, window, ratio)["all"] / window
    return {"flops_linear_per_token": flops.linear_flops_per_token(model_cfg, ratio)["all"],
            "flops_attention_per_token": att,
            "ratio_target": R, "matched": router == "none" or ratio_matched(realised, R)}


def check_window(cfg, requested: Optional[int]) -> int:
    return eval_window(cfg.data.seq_len, requested)
