"""The grouped MoE dispatch against a slow per-token reference."""
import pytest
import torch

from conceptvlm.moe import MoE, expert_counts, moe_reference


def build(dtype, n_shared=0, seed=0, E=4, k=2, D=16, H=24):
    torch.manual_seed(seed)
    moe = MoE(D, E, k, H, n_shared).to(dtype)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return moe


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # grouped_mm / per-expert fallback
@pytest.mark.parametrize("n_shared", [0, 1])
def test_matches_reference_forward_and_backward(dtype, n_shared):
    moe = build(dtype, n_shared)
    x = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    out = moe(x)
    ref = moe_reference(moe, x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.y, ref, **tol)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.y, [x] + list(moe.experts.parameters()), g)
    want = torch.autograd.grad(ref, [x] + list(moe.experts.parameters()), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_drops_no_token_even_when_all_pick_one_expert():
    moe = build(torch.float64, E=4, k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0  # every token's top-1 is expert 2
    x = torch.rand(50, 16, dtype=torch.float64) + 0.1
    out = moe(x)
    assert out.counts.tolist() == [0, 0, 50, 0]
    torch.testing.assert_close(out.y, moe_reference(moe, x))
    assert (out.y.abs().sum(-1) > 0).all()


def test_balance_loss_is_one_when_uniform_and_sum_backward_works():
    moe = build(torch.float32)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities; ties broken by topk
    x = torch.randn(64, 16)
    out = moe(x)
    # f_e sums to 1 and P_e = 1/E, so E * sum f_e P_e = 1 however ties are broken.
    assert out.balance_loss.item() == pytest.approx(1.0)
    assert out.z_loss.item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2, rel=1e-5)
    out.y.sum().backward()  # an expanded (stride-0) gradient must reach grouped_mm safely


def test_empty_input():
    moe = build(torch.float32)
    out = moe(torch.zeros(0, 16))
    assert out.y.shape == (0, 16) and out.counts.sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_few_tokens_decode_case_matches_reference(dtype):
    moe = build(dtype, E=8, k=2)
    for n in (1, 3):  # n * k < n_experts: decoding, most experts get no rows
        x = torch.randn(n, 16, dtype=dtype, requires_grad=True)
        out = moe(x)
        ref = moe_reference(moe, x)
        torch.testing.assert_close(out.y, ref)
        gx, = torch.autograd.grad(out.y.sum(), x)
        rx, = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(gx, rx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_path_runs_only_the_experts_with_rows_and_matches(dtype, monkeypatch):
    """Inference with fewer rows than experts on CPU takes the per-active-expert path;
    it equals the reference and never calls the grouped kernel."""
    import torch.nn.functional as F

    moe = build(dtype, E=8, k=2).eval()
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: pytest.fail("grouped kernel called while decoding"))
    with torch.inference_mode():
        for n in (1, 3):  # n * k = 2, 6 rows < 8 experts
            x = torch.randn(n, 16, dtype=dtype)
            torch.testing.assert_close(moe(x).y, moe_reference(moe, x))


def test_aux_losses_only_in_training():
    moe = build(torch.float32).eval()
    out = moe(torch.randn(10, 16))
    assert out.balance_loss.item() == 0.0 and out.z_loss.item() == 0.0


def test_expert_counts_scatter_path_equals_bincount(monkeypatch):
    """The GPU/compile path (scatter-add) counts exactly what bincount counts, including
    experts nobody chose and an empty batch."""
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 300):
        expert = torch.randint(0, 6, (n,), generator=g)
        want = torch.bincount(expert, minlength=8)
        assert torch.equal(expert_counts(expert, 8), want)
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            assert torch.equal(expert_counts(expert, 8), want)
