"""Attention building blocks against slow, obvious references: RoPE, RMSNorm, fused QKV."""
import math

import pytest
import torch

from conceptvlm.attention import Attention, RMSNorm, Visibility, apply_rope, rope_rotation


def rope_reference(x_BHLd: torch.Tensor, pos_BL: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) by pos * base^(-2i/d), one scalar at a time."""
    B, H, L, d = x_BHLd.shape
    out = torch.empty_like(x_BHLd)
    for b in range(B):
        for t in range(L):
            for i in range(d // 2):
                a = float(pos_BL[b, t]) * base ** (-2 * i / d)
                c, s = math.cos(a), math.sin(a)
                x1, x2 = x_BHLd[b, :, t, 2 * i], x_BHLd[b, :, t, 2 * i + 1]
                out[b, :, t, 2 * i], out[b, :, t, 2 * i + 1] = x1 * c - x2 * s, x1 * s + x2 * c
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rope_matches_pairwise_rotation(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 7, 100], [3, 3, 4, 0, 9]])
    got = apply_rope(x.to(dtype), rope_rotation(pos, 8, 10000.0, dtype=dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), rope_reference(x, pos, 10000.0), rtol=tol, atol=tol)


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)

    def score(pq, pk):
        rq = rope_rotation(torch.tensor([[pq]]), 16, 500.0, dtype=torch.float64)
        rk = rope_rotation(torch.tensor([[pk]]), 16, 500.0, dtype=torch.float64)
        return float((apply_rope(q, rq) * apply_rope(k, rk)).sum())

    assert score(10, 3) == pytest.approx(score(1007, 1000), abs=1e-9)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-6)


def test_rope_2d_with_equal_coordinates_is_1d_rope_and_scaling_interpolates():
    pos = torch.tensor([[0, 4, 9]])
    one = rope_rotation(pos, 8, 10000.0, dtype=torch.float64)
    two = rope_rotation(torch.stack([pos, pos], -1), 8, 10000.0, dtype=torch.float64)
    torch.testing.assert_close(one, two)
    torch.testing.assert_close(rope_rotation(pos * 4, 8, 10000.0, scaling=4.0, dtype=torch.float64), one)


def test_rope_2d_gives_both_axes_fast_and_slow_frequencies():
    """Frequency i follows axis i % 2. With halves instead, the column axis got only the
    slowest frequencies: across 8 columns they turned < 0.07 rad (head dim 16), and a 2D
    grounding model could not tell columns apart."""
    hd, base = 16, 10000.0
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    even = torch.arange(hd // 2) % 2 == 0
    rows = rope_rotation(torch.tensor([[[7, 0]]]), hd, base, dtype=torch.float64)[0, 0, 0]
    cols = rope_rotation(torch.tensor([[[0, 7]]]), hd, base, dtype=torch.float64)[0, 0, 0]
    turn = torch.polar(torch.ones_like(inv_freq), 7 * inv_freq)
    torch.testing.assert_close(rows, torch.where(even, turn, 1))  # the row turns even frequencies only
    torch.testing.assert_close(cols, torch.where(even, 1, turn))  # the column turns odd ones only
    assert 7 * inv_freq[1] > 1.0  # so 7 columns turn the column's fastest frequency by > 1 rad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rmsnorm_matches_formula(dtype, tol):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 32, generator=g, dtype=torch.float64) * 5
    w = torch.linspace(0.5, 2.0, 32, dtype=torch.float64)
    norm = RMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
    expect = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.detach().double()
    got = norm(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expect, rtol=tol, atol=tol)


def attention_reference(wq, wk, wv, wo, x_LD, n_heads, n_kv, base):
    """Separate projections, every head by hand, explicit causal softmax."""
    L, D = x_LD.shape
    d = D // n_heads
    pos = torch.arange(L)[None]
    rot = rope_rotation(pos, d, base, dtype=x_LD.dtype)
    q = apply_rope((x_LD @ wq.T).view(1, L, n_heads, d).transpose(1, 2), rot)[0]
    k = apply_rope((x_LD @ wk.T).view(1, L, n_kv, d).transpose(1, 2), rot)[0]
    v = (x_LD @ wv.T).view(L, n_kv, d).transpose(0, 1)
    heads = []
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        s = (q[h] @ k[g].T) / math.sqrt(d)
        s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
        heads.append(s.softmax(-1) @ v[g])
    return torch.cat(heads, -1) @ wo.T


def test_fused_qkv_attention_matches_separate_projections_and_loads_legacy_keys():
    torch.manual_seed(3)
    D, H, G, L = 32, 4, 2, 7
    wq, wk, wv, wo = (torch.randn(H * 8, D), torch.randn(G * 8, D), torch.randn(G * 8, D), torch.randn(D, H * 8))
    wq, wk, wv, wo = (w.double() / math.sqrt(D) for w in (wq, wk, wv, wo))
    attn = Attention(D, H, G).double()
    # A checkpoint written with separate q/k/v matrices loads into the fused layout.
    attn.load_state_dict({"wq.weight": wq, "wk.weight": wk, "wv.weight": wv, "wo.weight": wo})
    x = torch.randn(1, L, D, dtype=torch.float64)
    doc, valid = torch.zeros(1, L, dtype=torch.long), torch.ones(1, L, dtype=torch.bool)
    got = attn(x, rope_rotation(torch.arange(L)[None], 8, 10000.0, dtype=torch.float64), Visibility.build(doc, valid))
    torch.testing.assert_close(got[0], attention_reference(wq, wk, wv, wo, x[0], H, G, 10000.0), rtol=1e-10, atol=1e-10)


def test_joint_projection_loads_legacy_keys_and_starts_at_zero():
    a = Attention(16, 2, 1, joint=True)
    assert a.uqkv.is_zero_init and set(a.state_dict()) == {"wqkv.weight", "wo.weight", "uqkv.weight"}
    legacy = {"wq.weight": torch.ones(16, 16), "wk.weight": torch.ones(8, 16) * 2, "wv.weight": torch.ones(8, 16) * 3,
              "uq.weight": torch.ones(16, 16) * 4, "uk.weight": torch.ones(8, 16) * 5, "uv.weight": torch.ones(8, 16) * 6,
              "wo.weight": torch.zeros(16, 16)}
    a.load_state_dict(legacy)
    assert a.wqkv.weight[:16].eq(1).all() and a.wqkv.weight[16:24].eq(2).all() and a.wqkv.weight[24:].eq(3).all()
    assert a.uqkv.weight[:16].eq(4).all() and a.uqkv.weight[24:].eq(6).all()
