"""ema_scan (the dechunk EMA) against a plain loop."""
import pytest
import torch

from conceptvlm.bench.scan import ema_loop  # the recurrence one position at a time
from conceptvlm.chunk import gather_rows, locate_concepts
from conceptvlm.dechunk import ema_scan, straight_through_one


def test_ema_scan_equals_loop_random_and_extremes():
    g = torch.Generator().manual_seed(0)
    for M in (1, 2, 3, 7, 16, 17, 33, 100, 515):
        x = torch.randn(3, M, 5, dtype=torch.float64, generator=g)
        p = torch.rand(3, M, dtype=torch.float64, generator=g)
        p[0] = 0.0  # nothing new ever enters: all zeros
        p[1] = 1.0  # every step replaces: z = x
        p[2, ::3] = 0.0
        p[2, 1::4] = 1.0
        torch.testing.assert_close(ema_scan(x, p), ema_loop(x, p), rtol=1e-12, atol=1e-12)
    assert torch.equal(ema_scan(x, p)[1], x[1])
    assert torch.equal(ema_scan(x, p)[0], torch.zeros_like(x[0]))


@pytest.mark.parametrize("block", [1, 3, 4, 16, 64])
def test_ema_scan_any_block_size_equals_loop(block):
    """Blocks that divide M, blocks that leave a ragged end, one block, one position each."""
    g = torch.Generator().manual_seed(3)
    for M in (5, 12, 61):
        x = torch.randn(2, M, 4, dtype=torch.float64, generator=g)
        p = torch.rand(2, M, dtype=torch.float64, generator=g)
        p[:, ::5] = 1.0
        p[:, 2::7] = 0.0
        torch.testing.assert_close(ema_scan(x, p, block=block), ema_loop(x, p), rtol=1e-12, atol=1e-12)


def test_ema_scan_float32_close_to_float64_loop():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2000, 8, generator=g)
    p = torch.rand(3, 2000, generator=g)
    torch.testing.assert_close(ema_scan(x, p), ema_loop(x.double(), p.double()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,block", [(9, 16), (9, 4), (23, 4)])
def test_ema_scan_is_differentiable(M, block):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, M, 3, dtype=torch.float64, generator=g, requires_grad=True)
    p = torch.rand(2, M, dtype=torch.float64, generator=g).clamp(0.05, 0.95).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, p: ema_scan(x, p, block=block), (x, p))
    # Gradients match the loop's too (within and across blocks).
    w = torch.randn(2, M, 3, dtype=torch.float64, generator=g)
    gx, gp = torch.autograd.grad((ema_scan(x, p, block=block) * w).sum(), (x, p))
    lx, lp = torch.autograd.grad((ema_loop(x, p) * w).sum(), (x, p))
    torch.testing.assert_close(gx, lx)
    torch.testing.assert_close(gp, lp)


def test_straight_through_is_one_forward_identity_backward():
    c = torch.tensor([0.2, 0.7], requires_grad=True)
    y = straight_through_one(c)
    assert torch.equal(y.detach(), torch.ones(2))
    y.sum().backward()
    assert torch.equal(c.grad, torch.ones(2))


def test_locate_concepts_matches_python_reference():
    g = torch.Generator().manual_seed(2)
    b = torch.rand(4, 23, generator=g) < 0.4
    b[:, 0] = True
    b[3, 10:] = False  # a row with few concepts
    chunks = locate_concepts(torch.rand(4, 23), b)
    for r in range(4):
        pos = torch.nonzero(b[r]).flatten()
        n = len(pos)
        assert torch.equal(chunks.pos_BM[r, :n], pos)
        assert chunks.valid_BM[r, :n].all() and not chunks.valid_BM[r, n:].any()
        for t in range(23):
            assert chunks.concept_of_BL[r, t] == int(b[r, : t + 1].sum()) - 1
    x = torch.randn(4, 23, 2)
    assert torch.equal(gather_rows(x, chunks.pos_BM)[0, 0], x[0, 0])
