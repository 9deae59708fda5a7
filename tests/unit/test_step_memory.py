"""Training-step memory: saved-activation bytes are exact and linear in the row length."""
import pytest
import torch

from conceptvlm import ConceptMoE
from conceptvlm.bench.step_memory import SavedActivations, step_peak_rss
from helpers import tiny_config


def test_saved_activations_counts_each_storage_once_and_skips_parameters():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    with SavedActivations(lin.parameters()) as saved:
        y = lin(x)
        loss = (y * y).sum()  # saves y twice: one storage
    assert saved.bytes == x.numel() * 4 + y.numel() * 4
    loss.backward()  # the saved tensors are kept as autograd needs them
    assert x.grad is not None
    with SavedActivations() as with_weights:
        lin(x).sum()
    assert with_weights.bytes == (x.numel() + lin.weight.numel()) * 4


@pytest.mark.parametrize("router", ["none", "fixed"])
def test_saved_activation_bytes_are_linear_in_row_length(router):
    """Packed rows of 4 documents (and a padded tail), 1k/2k/4k tokens: the bytes kept for
    backward are exactly a + b L. A dense L x S mask or score matrix kept anywhere in the
    token or concept layers (or the dechunk) adds an L^2 term and fails this."""
    cfg = tiny_config(max_seq_len=4096, chunk={"router": router})
    torch.manual_seed(0)
    model = ConceptMoE(cfg).train()
    saved = []
    for L in (1024, 2048, 4096):
        ids = torch.randint(0, cfg.vocab_size, (2, L))
        doc = (torch.arange(L) * 4 // L).expand(2, L).clone()
        doc[1, -100:] = -1  # padding: a constant, not a share of L
        with SavedActivations(model.parameters()) as counter:
            model(ids, labels=ids, doc_ids=doc)
        saved.append(counter.bytes)
    b1, b2, b4 = saved
    linear_prediction = b2 + 2 * (b2 - b1)  # a + 4bL from a + bL and a + 2bL
    assert abs(b4 - linear_prediction) < 0.01 * b4, saved


def test_step_peak_rss_sees_an_allocation():
    def step():
        t = torch.ones(16, 2**20)  # 64 MB, touched
        return float(t.sum())

    peak = step_peak_rss(step)
    if peak is None:
        pytest.skip("no /proc peak-RSS counter here")
    assert peak >= 60 * 2**20
