"""Per-document attention for packed rows equals the dense document + causal + padding mask."""
import pytest
import torch

from conceptvlm import ConceptMoE, attention, packed_attention
from conceptvlm.attention import Attention, Visibility, rope_rotation
from conceptvlm.packed_attention import Segments
from helpers import tiny_config


def packed_docs(lengths_per_row, L, generator):
    """doc ids [B, L]: rows of consecutive documents of the given lengths, -1 padding after."""
    doc = torch.full((len(lengths_per_row), L), -1, dtype=torch.long)
    for r, lengths in enumerate(lengths_per_row):
        t = 0
        for d, n in enumerate(lengths):
            doc[r, t:t + n] = d
            t += n
    return doc


ROWS = [[1, 2, 37, 100, 3, 17], [160], [5] * 30, [64, 64, 0], [0]]


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_segment_attention_equals_dense_mask_float64(n_heads, n_kv_heads):
    g = torch.Generator().manual_seed(0)
    L, d_model = 170, 12 * n_heads
    doc = packed_docs(ROWS, L, g)
    valid = doc >= 0
    valid[2, 40:45] = False  # padding in the middle of a document too
    doc[2, 40:45] = -1
    attn = Attention(d_model, n_heads, n_kv_heads).double()
    x = torch.randn(len(ROWS), L, d_model, dtype=torch.float64, generator=g, requires_grad=True)
    pos = torch.arange(L).expand(len(ROWS), L)
    rope = rope_rotation(pos, d_model // n_heads, 10000.0, dtype=torch.float64)

    dense = Visibility.build(doc, valid, min_segment_row=10**9)
    seg = Visibility.build(doc, valid, min_segment_row=0)
    assert dense.mask is not None and seg.mask is None and seg.segments is not None
    y_dense, y_seg = attn(x, rope, dense), attn(x, rope, seg)
    torch.testing.assert_close(y_seg, y_dense, rtol=1e-12, atol=1e-12)  # padding rows included
    w = torch.randn_like(y_dense)
    g_dense = torch.autograd.grad((y_dense * w).sum(), [x, *attn.parameters()])
    g_seg = torch.autograd.grad((y_seg * w).sum(), [x, *attn.parameters()])
    for a, b in zip(g_seg, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rows_whose_documents_decrease_keep_the_dense_mask():
    doc = torch.tensor([[0, 0, 1, 1, 0, 0]])
    assert Segments.build(doc, doc >= 0) is None
    assert Visibility.build(doc, doc >= 0, min_segment_row=0).mask is not None
    ok = torch.tensor([[0, 0, 1, 1, -1, -1], [3, 4, 4, 4, 4, 5]])
    assert Segments.build(ok, ok >= 0) is not None


def test_buckets_hold_documents_within_twice_each_others_length():
    doc = packed_docs([[1, 2, 3, 4, 5, 9, 16, 17, 40]], 100, None)
    seg = Segments.build(doc, doc >= 0)
    for gather, real, dest in seg.buckets:  # real: flat indices (into n x T) of the real slots
        n, T = gather.shape
        n_real = torch.bincount(real // T, minlength=n)
        assert int(n_real.max()) <= 2 * int(n_real.min())
        assert T == int(n_real.max()) and len(dest) == len(real)
    assert sum(len(r) for _, r, _ in seg.buckets) == 97


def test_model_with_packed_rows_never_builds_a_dense_mask(monkeypatch):
    """Long packed rows: same logits and gradients as the dense path, and no L x S mask."""
    torch.manual_seed(0)
    cfg = tiny_config(chunk={"router": "fixed"})
    model = ConceptMoE(cfg).double()
    g = torch.Generator().manual_seed(1)
    L = 96
    doc = packed_docs([[30, 50, 10], [96], [7, 7, 7, 40]], L, g)
    ids = torch.randint(0, cfg.vocab_size, (3, L), generator=g)
    ids[doc < 0] = 0

    def run():
        model.zero_grad()
        out = model(ids, labels=ids, doc_ids=doc)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    monkeypatch.setattr(packed_attention, "MIN_SEGMENT_ROW", 10**9)
    logits_dense, grads_dense = run()

    def no_dense_mask(*a, **k):
        raise AssertionError("a dense L x S mask was built for a fresh packed row")

    monkeypatch.setattr(packed_attention, "MIN_SEGMENT_ROW", 0)
    monkeypatch.setattr(attention, "attention_mask", no_dense_mask)
    logits_seg, grads_seg = run()
    valid = doc >= 0
    torch.testing.assert_close(logits_seg[valid], logits_dense[valid], rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_seg, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
