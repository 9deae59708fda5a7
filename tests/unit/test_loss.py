"""loss.py: the back-propagated loss and the one rule that normalises it across ranks."""
import pytest
import torch

from conceptvlm.loss import global_mean, training_loss
from helpers import tiny_model


def test_global_mean_has_the_global_value_and_the_world_scaled_local_gradient():
    x = torch.tensor([1.0, 2.0], requires_grad=True)  # this rank's two items
    # the other rank holds two more items summing to 7: global sum 10 over 4 items
    m = global_mean(x.sum(), torch.tensor(10.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64), 2)
    assert m.item() == 2.5
    m.backward()
    # DeepSpeed averages over the 2 ranks: 2 * (1/4) / 2 = 1/4, the global mean's gradient
    assert x.grad.tolist() == [0.5, 0.5]


def test_one_process_training_loss_is_the_models_loss():
    torch.manual_seed(0)
    model = tiny_model().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    out = model(ids, labels=ids)
    loss, info = training_loss(out)
    torch.testing.assert_close(loss, out.loss)
    assert not info["nonfinite"] and info["lm_loss"] == pytest.approx(float(out.lm_loss.detach()), rel=1e-6)
    g = torch.autograd.grad(loss, model.lm_head.weight, retain_graph=True)[0]
    torch.testing.assert_close(g, torch.autograd.grad(out.loss, model.lm_head.weight)[0])
