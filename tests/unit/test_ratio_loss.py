"""ratio_loss: the formula, its fixed point, and the direction of its gradient."""
import pytest
import torch

from conceptvlm.chunk import ratio_loss


def formula(F, G, R):
    return R / (R - 1) * ((R - 1) * F * G + (1 - F) * (1 - G))


def test_equals_formula_with_and_without_mask():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 40, dtype=torch.float64, generator=g)
    b = torch.rand(3, 40, generator=g) < 0.3
    mask = torch.rand(3, 40, generator=g) < 0.6
    for R in (1.5, 2.0, 4.0):
        full = ratio_loss(b, p, R)
        assert full.item() == pytest.approx(formula(b.double().mean().item(), p.mean().item(), R))
        part = ratio_loss(b, p, R, mask)
        F = b[mask].double().mean().item()
        G = p[mask].mean().item()
        assert part.item() == pytest.approx(formula(F, G, R))


@pytest.mark.parametrize("R", [1.25, 2.0, 3.0, 6.0])
def test_is_one_at_target_rate(R):
    n = 600  # divisible by every 1/R rate used here
    k = round(n / R)
    b = torch.zeros(n, dtype=torch.bool)
    b[:k] = True
    p = torch.full((n,), k / n, dtype=torch.float64)
    assert ratio_loss(b, p, R).item() == pytest.approx(1.0)


@pytest.mark.parametrize("R", [1.5, 2.0, 4.0])
def test_gradient_moves_rate_towards_target_from_both_sides(R):
    n = 1000
    for rate, direction in ((1.0 / R + 0.2, -1.0), (max(1.0 / R - 0.2, 0.01), +1.0)):
        k = int(rate * n)
        b = torch.zeros(n, dtype=torch.bool)
        b[:k] = True
        p = torch.full((n,), rate, dtype=torch.float64, requires_grad=True)
        ratio_loss(b, p, R).backward()
        # Gradient descent moves p against the gradient: towards 1/R.
        assert torch.sign(-p.grad.mean()).item() == direction
    # At exactly F = 1/R the gradient vanishes.
    k = int(n / R)
    b = torch.zeros(n, dtype=torch.bool)
    b[:k] = True
    p = torch.full((n,), 0.37, dtype=torch.float64, requires_grad=True)
    ratio_loss(b, p, n / k).backward()
    assert p.grad.abs().max().item() < 1e-12


def test_empty_mask_gives_zero_not_nan_and_bad_target_is_rejected():
    p = torch.rand(5, requires_grad=True)
    loss = ratio_loss(p > 0.5, p, 2.0, torch.zeros(5, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="target_ratio"):
        ratio_loss(p > 0.5, p, 1.0)


def test_split_loss_is_bce_against_the_top_share():
    from conceptvlm.chunk import split_loss

    p = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.1, 0.3], dtype=torch.float64)
    target = torch.tensor([1.0, 0, 1, 0, 0, 0], dtype=torch.float64)  # top round(6/3) = 2
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert torch.allclose(split_loss(p, 3.0), expected)
    assert float(split_loss(p[:1], 3.0)) == 0.0  # nothing to split


@pytest.mark.parametrize("R", [2.0, 3.0])
def test_split_loss_turns_near_ties_into_the_target_ratio(R):
    """Many nearly equal p (flat background patches): the ratio loss alone moves them
    together across the threshold; with the split loss the threshold realises 1/R."""
    from conceptvlm.chunk import ratio_loss_from_rates, split_loss

    def train(with_split: bool) -> list[float]:
        torch.manual_seed(0)
        logit = (torch.randn(300) * 1e-3 - 0.2).requires_grad_()  # p ~ 0.45 everywhere, nearly tied
        opt = torch.optim.Adam([logit], lr=0.05)
        rates = []
        for _ in range(200):
            p = torch.sigmoid(logit)
            F_rate = (p.detach() >= 0.5).double().mean()
            loss = ratio_loss_from_rates(F_rate, p.mean(), R) + (split_loss(p, R) if with_split else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rates.append(float((torch.sigmoid(logit) >= 0.5).double().mean()))
        return rates[-20:]

    alone = train(with_split=False)
    assert max(alone) - min(alone) > 0.5  # the failure mode: all or none of them cross
    settled = train(with_split=True)
    assert all(abs(1 / r - R) / R < 0.02 for r in settled)
