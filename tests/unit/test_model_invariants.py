"""DESIGN.md §3 invariants for the text model: causality, batch independence, conversion identity."""
import pytest
import torch

from conceptvlm.attention import Visibility, rope_rotation
from helpers import MODEL_VARIANTS as VARIANTS, make_forced_all_boundaries, tiny_model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality_in_eval_mode(name):
    model = tiny_model(**VARIANTS[name])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 40), generator=g)
    doc = torch.zeros(2, 40, dtype=torch.long)
    doc[0, 15:] = 1  # packed: two documents in row 0
    doc[0, 31:] = 2
    base = model(ids, doc_ids=doc).logits
    for j in (1, 14, 15, 22, 39):
        changed = ids.clone()
        changed[:, j:] = torch.randint(0, 64, (2, 40 - j), generator=g)
        out = model(changed, doc_ids=doc).logits
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["cosine", "linear", "fixed", "loops_topk"])
def test_packed_documents_do_not_see_each_other(name):
    model = tiny_model(**VARIANTS[name])
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 64, (1, 17), generator=g), torch.randint(0, 64, (1, 23), generator=g)
    packed = torch.cat([a, b], 1)
    doc = torch.cat([torch.zeros(1, 17), torch.ones(1, 23)], 1).long()
    out = model(packed, doc_ids=doc).logits
    torch.testing.assert_close(out[:, 17:], model(b).logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(out[:, :17], model(a).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["cosine", "linear", "fixed", "loops_topk", "wide"])
def test_batch_independence_with_padding(name):
    model = tiny_model(**VARIANTS[name])
    g = torch.Generator().manual_seed(2)
    lens = [31, 12, 25]
    L = max(lens)
    ids = torch.randint(0, 64, (3, L), generator=g)
    doc = torch.full((3, L), -1, dtype=torch.long)
    for r, n in enumerate(lens):
        doc[r, :n] = 0
    batched = model(ids, doc_ids=doc)
    for r, n in enumerate(lens):
        alone = model(ids[r:r + 1, :n]).logits
        torch.testing.assert_close(batched.logits[r:r + 1, :n], alone, rtol=0, atol=1e-10)


def plain_moe_logits(model, ids):
    """The baseline MoE computed by hand: every layer in order, no chunking at all."""
    cfg = model.config
    x = model.embed(ids)
    doc = torch.zeros_like(ids)
    valid = torch.ones_like(ids, dtype=torch.bool)
    rope = rope_rotation(model.token_positions(doc, valid), cfg.d_model // cfg.n_heads, cfg.rope_base,
                         cfg.rope_scaling, x.dtype)
    for layer in [*model.encoder, *model.concept_model.layers, *model.decoder]:
        x, _ = layer(x, rope, Visibility.build(doc, valid))
    return model.lm_head(model.norm(x))


@pytest.mark.parametrize("name", ["none", "linear_forced"])
def test_conversion_identity_every_token_a_boundary(name):
    overrides = dict(chunk={"router": "none"}) if name == "none" else dict(chunk={"router": "linear"})
    model = tiny_model(**overrides)
    if name == "linear_forced":
        make_forced_all_boundaries(model)
    assert model.config.joint_decoding  # zero-initialised joint projectors included
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(ids).logits, plain_moe_logits(model, ids), rtol=1e-10, atol=1e-10)


def test_reference_output_form_breaks_conversion():
    """The demo's h + chat form doubles h: it must NOT reproduce the baseline (named ablation)."""
    model = tiny_model(chunk={"router": "none", "residual_form": "output"})
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(model(ids).logits, plain_moe_logits(model, ids), atol=1e-4)


def test_all_labels_masked_gives_zero_loss_not_nan():
    model = tiny_model(dtype=torch.float32).train()
    ids = torch.randint(0, 64, (2, 16))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert torch.isfinite(out.loss) and out.lm_loss.item() == 0.0
    out.loss.backward()


def test_gradient_reaches_router_through_ste_and_ratio_loss():
    for weight in (0.0, 1.0):  # STE alone, then with the ratio loss
        model = tiny_model(dtype=torch.float32, chunk={"ratio_loss_weight_text": weight}).train()
        ids = torch.randint(0, 64, (2, 32))
        model(ids, labels=ids).loss.backward()
        assert model.router.wq.weight.grad.abs().sum() > 0
        assert model.router.wk.weight.grad.abs().sum() > 0


def test_statistics_are_reported():
    model = tiny_model(chunk={"router": "fixed", "target_ratio_text": 3.0})
    out = model(torch.randint(0, 64, (1, 30)))
    s = out.chunk_stats["text"]
    assert s["ratio"].item() == pytest.approx(3.0)
    assert out.n_concepts == 10 and out.n_tokens == 30
    assert len(out.expert_counts) == 4 and all(c.sum() == 60 or c.sum() == 20 for c in out.expert_counts)
