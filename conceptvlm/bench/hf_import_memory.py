"""Peak memory of ``conceptvlm convert --from-hf`` on a large random OLMoE-shaped checkpoint.

Writes the checkpoint locally (hub key names, sharded safetensors with an index, a
config.json from transformers' ``OlmoeConfig``, a small tokenizer), layer by layer so
writing it needs little memory either, then runs the conversion in a fresh process and
prints its peak RSS next to the checkpoint's size::

    python -m conceptvlm.bench.hf_import_memory --out /tmp/olmoe-0.5b --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

TEXT = ["a few words to train a byte-level tokenizer on", "the model's own tokenizer ships with it"]


def write_tokenizer(directory: Path, vocab_size: int = 280, texts: list[str] = TEXT, eos: str = "<|endoftext|>") -> int:
    """A byte-level BPE with an eos token, as a transformers checkpoint ships it; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "pad_token": eos}))
    return tok.get_vocab_size()


def write_olmoe_checkpoint(out: Path, hidden: int = 1024, layers: int = 8, experts: int = 32, expert_hidden: int = 512,
                           vocab: int = 50304, heads: int = 16, dtype: torch.dtype = torch.bfloat16) -> int:
    """A random OLMoE checkpoint (one shard per layer); returns its parameter count."""
    from safetensors.torch import save_file
    from transformers import OlmoeConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = OlmoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=expert_hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, num_experts=experts, num_experts_per_tok=8)
    cfg.architectures = ["OlmoeForCausalLM"]
    cfg.save_pretrained(str(out))
    write_tokenizer(out)
    g = torch.Generator().manual_seed(0)
    weight_map, n = {}, 0

    def shard(name: str, tensors: dict[str, tuple[int, ...]]) -> None:
        nonlocal n
        data = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in tensors.items()}
        save_file(data, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in data})
        n += sum(t.numel() for t in data.values())

    shard("model-embed.safetensors", {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                                      "lm_head.weight": (vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {f"{p}input_layernorm.weight": (hidden,), f"{p}post_attention_layernorm.weight": (hidden,),
             f"{p}self_attn.q_norm.weight": (hidden,), f"{p}self_attn.k_norm.weight": (hidden,),
             f"{p}mlp.gate.weight": (experts, hidden)}
        for w in ("q", "k", "v", "o"):
            t[f"{p}self_attn.{w}_proj.weight"] = (hidden, hidden)
        for e in range(experts):
            t[f"{p}mlp.experts.{e}.gate_proj.weight"] = (expert_hidden, hidden)
            t[f"{p}mlp.experts.{e}.up_proj.weight"] = (expert_hidden, hidden)
            t[f"{p}mlp.experts.{e}.down_proj.weight"] = (hidden, expert_hidden)
        shard(f"model-layer{i:03d}.safetensors", t)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="work directory (the checkpoint and the converted model go here)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args(argv)
    out = Path(args.out)
    dtype = getattr(torch, args.dtype)
    n = write_olmoe_checkpoint(out / "ckpt", layers=args.layers, dtype=dtype)
    print(f"wrote {n / 1e6:.0f}M parameters ({args.dtype}) to {out / 'ckpt'}")
    (out / "train.yaml").write_text(yaml.safe_dump({"model": {
        "n_encoder_layers": 1, "n_concept_layers": args.layers - 2, "n_decoder_layers": 1, "chunk": {"router": "cosine"}},
        "train": {"out_dir": str(out / "run")}}))
    cmd = [sys.executable, "-m", "conceptvlm", "convert", "--from-hf", str(out / "ckpt"), "--config",
           str(out / "train.yaml"), "--out", str(out / "converted"), "--dtype", args.dtype]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
