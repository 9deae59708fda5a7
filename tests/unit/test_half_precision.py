"""Half and double precision: the computations that need more than the weights' dtype get it.

bf16 holds integers exactly only up to 256, so the fixed router's positions must not be
counted in it; a float64 model must not have its loss or MoE routing cast down to float32.
"""
import pytest
import torch
import torch.nn.functional as F

from conceptvlm.bench.inference import realised_ratio
from conceptvlm.model import next_token_loss
from conceptvlm.moe import Router
from conceptvlm.precision import compute_dtype, upcast
from helpers import tiny_model

L_PREFILL, L_TOTAL = 1100, 1212  # well past bf16's last exact integer (256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_router_spacing_is_exact_at_long_positions(dtype):
    model = tiny_model(dtype=dtype, max_seq_len=2048, chunk={"router": "fixed", "target_ratio_text": 2.0})
    ids = torch.randint(0, 64, (1, L_TOTAL), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids[:, :L_PREFILL], use_cache=True)
        assert out.state.concepts.index.lengths.sum() == L_PREFILL // 2  # one concept per 2 tokens
        state = out.state
        for t in range(L_PREFILL, L_TOTAL):
            state = model(ids[:, t:t + 1], state=state).state
    assert realised_ratio(state) == 2.0
    assert state.concepts.index.lengths.sum() == L_TOTAL // 2


def test_compute_dtype_keeps_float64_and_lifts_half():
    assert compute_dtype(torch.float64) == torch.float64
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert compute_dtype(dt) == torch.float32
    x = torch.ones(2, dtype=torch.float64)
    assert upcast(x) is x  # no copy where nothing changes


def test_float64_loss_and_routing_stay_float64():
    """A float64 model's cross-entropy and router probabilities are float64 and equal the
    float64 reference (``.float()`` would have rounded them to float32)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 9, 64, dtype=torch.float64, generator=g) * 3
    labels = torch.randint(0, 64, (1, 9), generator=g)
    loss, n = next_token_loss(logits, labels, torch.zeros(1, 9, dtype=torch.long))
    ref = F.cross_entropy(logits[0, :-1], labels[0, 1:])
    assert loss.dtype == torch.float64 and n == 8
    assert abs(loss.item() - ref.item()) < 1e-14

    model = tiny_model(dtype=torch.float64)
    router = next(m for m in model.modules() if isinstance(m, Router))
    x = torch.randn(5, router.weight.shape[1], dtype=torch.float64, generator=g)
    routing = router(x)
    assert routing.probs_NE.dtype == torch.float64
    torch.testing.assert_close(routing.probs_NE, (x @ router.weight.T).softmax(-1), rtol=0, atol=1e-15)
