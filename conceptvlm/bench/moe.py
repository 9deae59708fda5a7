"""``conceptvlm bench moe``: our dropless grouped MoE against the alternatives, forward+backward.

Rows, measured side by side in one process on the same input:
  * ours: sort by expert + ``F.grouped_mm`` (drops nothing),
  * ours, per-expert loop: the same sorted layout, one matmul chain per expert,
  * naive: every token and chosen expert one at a time (measured on fewer tokens),
  * DeepSpeed ``deepspeed.moe.layer.MoE`` with the same SwiGLU experts at capacity
    factor 1.0 and 2.0 (it computes capacity slots and drops the overflow),
  * dense bound: the same activated FLOPs as one chain of plain matmuls over
    tokens x top-k rows (no routing at all) - the floor for any dropless MoE.
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import print_table, time_call, write_result


def _init_single_process_dist() -> None:
    """DeepSpeed's MoE needs process groups even on one rank (gloo on CPU); the trainer's
    set-up, which also skips compiling DeepSpeed's CPU collectives op for one process."""
    from ..train import init_distributed

    init_distributed()


def run_moe_bench(tokens: int = 4096, d_model: int = 512, hidden: int = 1024, n_experts: int = 8,
                  top_k: int = 2, repeats: int = 5, naive_tokens: int = 256, with_deepspeed: bool = True,
                  out: Optional[str] = None, seed: int = 0) -> dict:
    """Forward+backward tokens/s of each MoE implementation; returns the rows as a dict."""
    from ..moe import MoE, SwiGLU, moe_reference

    torch.manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ours = MoE(d_model, n_experts, top_k, hidden).to(dev)
    for p in ours.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    x = torch.randn(tokens, d_model, device=dev, requires_grad=True)
    g = torch.randn(tokens, d_model, device=dev)

    def fb(fn, inp, grad):
        def run():
            y = fn(inp)
            y.backward(grad)
            if dev == "cuda":
                torch.cuda.synchronize()
        return run

    results: dict[str, dict] = {}

    def add(name: str, seconds: float, n_tokens: int, dropped: float = 0.0) -> None:
        results[name] = {"seconds": seconds, "tokens_per_s": n_tokens / seconds, "dropped_frac": dropped}

    add("ours (grouped_mm)", time_call(fb(lambda t: ours(t).y, x, g), repeats), tokens)

    import conceptvlm.moe as moe_mod
    saved = moe_mod._grouped_mm_usable
    moe_mod._grouped_mm_usable = lambda *a, **k: False
    try:
        add("ours (per-expert loop)", time_call(fb(lambda t: ours(t).y, x, g), repeats), tokens)
    finally:
        moe_mod._grouped_mm_usable = saved

    xn, gn = x[:naive_tokens].detach().requires_grad_(), g[:naive_tokens]
    add(f"naive per-token ({naive_tokens} tok)", time_call(fb(lambda t: moe_reference(ours, t), xn, gn), 1),
        naive_tokens)

    if with_deepspeed:
        _init_single_process_dist()
        from deepspeed.moe.layer import MoE as DeepSpeedMoE

        for cf in (1.0, 2.0):
            torch.manual_seed(seed)
            ds = DeepSpeedMoE(hidden_size=d_model, expert=SwiGLU(d_model, hidden), num_experts=n_experts,
                              ep_size=1, k=top_k, capacity_factor=cf, eval_capacity_factor=cf,
                              min_capacity=4, drop_tokens=True).to(dev)
            x3 = x.detach().view(1, tokens, d_model).requires_grad_()
            t = time_call(fb(lambda t_: ds(t_)[0], x3, g.view(1, tokens, d_model)), repeats)
            with torch.no_grad():  # share of (token, expert) slots over capacity
                _, _, _, counts = ds.deepspeed_moe.gate(x3.view(-1, d_model))
            cap = max(int(cf * tokens * top_k / n_experts), 4) if top_k > 1 else max(int(cf * tokens / n_experts), 4)
            dropped = float((counts.float() - cap).clamp_min(0).sum() / (tokens * top_k))
            add(f"DeepSpeed MoE cf={cf}", t, tokens, dropped)

    w1 = torch.randn(d_model, hidden, device=dev, requires_grad=True)
    w3 = torch.randn(d_model, hidden, device=dev, requires_grad=True)
    w2 = torch.randn(hidden, d_model, device=dev, requires_grad=True)
    xr = torch.randn(tokens * top_k, d_model, device=dev, requires_grad=True)
    gr = torch.randn(tokens * top_k, d_model, device=dev)
    dense = lambda t: (torch.nn.functional.silu(t @ w1) * (t @ w3)) @ w2  # noqa: E731
    add("dense bound (tokens x top-k rows)", time_call(fb(dense, xr, gr), repeats), tokens)

    ref = results["ours (grouped_mm)"]["tokens_per_s"]
    rows = [[name, r["tokens_per_s"], r["tokens_per_s"] / ref, f"{100 * r['dropped_frac']:.1f}%"]
            for name, r in results.items()]
    print(f"MoE forward+backward: {tokens} tokens, width {d_model}, {n_experts} experts top-{top_k}, "
          f"expert hidden {hidden}, device {dev}, {torch.get_num_threads()} threads")
    print_table(["implementation", "tokens/s", "vs ours", "tokens dropped"], rows)
    summary = {
        "ours_vs_deepspeed_cf1": ref / results["DeepSpeed MoE cf=1.0"]["tokens_per_s"] if with_deepspeed else None,
        "ours_vs_deepspeed_cf2": ref / results["DeepSpeed MoE cf=2.0"]["tokens_per_s"] if with_deepspeed else None,
        "dense_bound_vs_ours": results["dense bound (tokens x top-k rows)"]["tokens_per_s"] / ref,
    }
    print("  ".join(f"{k}={v:.2f}" for k, v in summary.items() if v is not None))
    payload = {"config": dict(tokens=tokens, d_model=d_model, hidden=hidden, n_experts=n_experts, top_k=top_k),
               "results": results, "summary": summary}
    if out:
        write_result(out, payload)
    return payload


def run_model_step_bench(config_path: str, batch: int = 8, seq_len: int = 256, repeats: int = 5) -> dict:
    """Forward+backward seconds of a whole model config (e.g. configs/model/tiny.yaml)."""
    from ..config import ModelConfig
    from ..model import ConceptMoE

    cfg = ModelConfig.from_yaml(config_path)
    torch.manual_seed(0)
    model = ConceptMoE(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    sec = time_call(step, repeats)
    print_table(["model", "batch x len", "fwd+bwd s", "tokens/s"],
                [[config_path, f"{batch}x{seq_len}", sec, batch * seq_len / sec]])
    return {"config": config_path, "seconds": sec, "tokens_per_s": batch * seq_len / sec}
