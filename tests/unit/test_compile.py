"""Compiled blocks (``train.compile``): the grouped-matmul custom op, and compiled == eager.

Compiling is slow on two cores (tens of seconds per kind of block), so each test
compiles as few kinds of block as it needs; blocks of one shape share a graph.
"""
import pytest
import torch

from conceptvlm.attention import Visibility, rope_rotation
from conceptvlm.block import Block, compile_blocks
from conceptvlm.grouped_mm import grouped_mm, grouped_mm_loop

from helpers import packed_batch, tiny_model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # grouped_mm kernel / one expert at a time
def test_grouped_mm_op_matches_per_expert_products_and_their_gradients(dtype):
    torch.manual_seed(0)
    counts = [5, 0, 9, 2]  # an expert with no rows
    x = torch.randn(16, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 16, 8, dtype=dtype, requires_grad=True)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    y = grouped_mm(x, w, offs)
    ref = grouped_mm_loop(x, w, counts)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w), dy)
    want = torch.autograd.grad(ref, (x, w), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[1][1].abs().sum() == 0  # the expert without rows gets no gradient
    # Fake kernel, autograd registration and schema agree with the real op.
    torch.library.opcheck(grouped_mm, (x, w, offs))


def loss_and_grads(model, ids, doc):
    torch.manual_seed(1)  # the same Bernoulli boundaries in both runs
    model.zero_grad()
    out = model(ids, labels=ids, doc_ids=doc)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow  # compiles two kinds of block: about a minute on two shared cores
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """Training mode (sampled boundaries, auxiliary losses), packed documents, padding.

    Short rows: the dense document mask. The encoder and concept layers share one graph
    (per attention variant), the joint decoder has its own; ``fullgraph`` raises on any
    graph break.
    """
    model = tiny_model(torch.float32).train()
    ids, doc = packed_batch()
    loss0, grads0 = loss_and_grads(model, ids, doc)
    assert compile_blocks(model) == 4
    loss1, grads1 = loss_and_grads(model, ids, doc)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]
    # Compiling wraps no module: parameter names (checkpoint keys) are unchanged.
    assert all("_orig_mod" not in k for k in model.state_dict())


@pytest.mark.slow  # one more compile, about 50 s on two shared cores
def test_compiled_block_with_per_document_attention_matches_eager():
    """Long packed rows attend per document (``Segments``): its buckets index with
    tensors, not boolean masks, so nothing inside the block has a data-dependent size."""
    torch.manual_seed(0)
    block = Block(32, 4, 2, n_experts=4, top_k=2, expert_hidden=32).train()
    for p in block.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    _, doc = packed_batch(L=40)
    doc[0, 30:] = 3  # four documents of different lengths: several buckets
    vis = Visibility.build(doc, doc >= 0, min_segment_row=0)
    assert vis.segments is not None and len(vis.segments.buckets) > 1
    rope = rope_rotation(torch.arange(40).expand(2, 40), 8, 10000.0)
    x = torch.randn(2, 40, 32, requires_grad=True)

    def run():
        y, out = block(x, rope, vis)
        loss = (y * torch.linspace(-1, 1, 32)).pow(2).mean() + out.balance_loss + out.z_loss
        return (loss, *torch.autograd.grad(loss, [x, *block.parameters()]))

    eager = run()
    explained = torch._dynamo.explain(block._forward)(x, rope, vis)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    block.compile_forward()
    compiled = run()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
