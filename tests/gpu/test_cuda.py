"""The CUDA paths against the CPU reference: device placement, the bf16 grouped-matmul
kernel, compiled blocks in bf16, cached decoding, the VLM and the DeepSpeed loop in bf16.

Everything here is skipped without a GPU (CI has none); ``bash tools/gpu_check.sh`` runs
it on a GPU machine. float64 on the GPU checks placement and indexing exactly (the same
numbers as the CPU, 1e-9); bf16 checks the kernels a GPU run really uses, loosely.
"""
from __future__ import annotations

import pytest
import torch

from helpers import MODEL_VARIANTS, interleaved_row, packed_batch, tiny_model, tiny_vlm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 matmuls would put float32 GPU results ~1e-3 off the CPU's."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def loss_and_grads(model, ids, doc):
    model.zero_grad()
    out = model(ids, labels=ids, doc_ids=doc)
    out.loss.backward()
    return out, {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_direction(got: dict, want: dict, min_cos: float) -> None:
    """Gradients agree in direction (bf16 keeps ~3 significant digits, so not elementwise);
    a gradient that is exactly zero in the reference (a zero-initialised gate's input
    norm, say) must be zero here too."""
    assert got.keys() == want.keys()
    for n, w in want.items():
        g = got[n].float().flatten()
        if not w.any():
            assert not g.any(), n
            continue
        cos = torch.nn.functional.cosine_similarity(g, w.float().flatten(), dim=0)
        assert cos > min_cos, (n, float(cos))


@pytest.mark.parametrize("name", list(MODEL_VARIANTS))
def test_float64_forward_and_gradients_match_the_cpu(name):
    cpu = tiny_model(**MODEL_VARIANTS[name])
    gpu = tiny_model(**MODEL_VARIANTS[name]).to(CUDA)
    ids, doc = packed_batch()
    out_c, g_c = loss_and_grads(cpu, ids, doc)
    out_g, g_g = loss_and_grads(gpu, ids.to(CUDA), doc.to(CUDA))
    torch.testing.assert_close(out_g.logits.cpu(), out_c.logits, rtol=1e-9, atol=1e-9)
    # Cross-entropy and MoE routing stay float64 in a float64 model (precision.upcast), so
    # loss and gradients agree to float64's rounding, summed in another order on each device.
    torch.testing.assert_close(out_g.loss.cpu(), out_c.loss, rtol=1e-9, atol=0)
    assert g_c.keys() == g_g.keys()
    for n in g_c:
        torch.testing.assert_close(g_g[n], g_c[n], rtol=1e-9, atol=1e-9, msg=n)


@pytest.mark.parametrize("name", ["cosine", "fixed", "loops_topk"])
def test_cached_decoding_on_the_gpu_equals_the_full_forward(name):
    model = tiny_model(**MODEL_VARIANTS[name]).to(CUDA)
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(0)).to(CUDA)
    full = model(ids).logits
    out = model(ids[:, :9], use_cache=True)
    logits = [out.logits]
    for t in range(9, ids.shape[1]):
        out = model(ids[:, t:t + 1], state=out.state)
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)


def host_syncs_of_one_decode_step(n_concept_layers: int) -> int:
    """Host synchronisations (CUDA's sync debug mode warns at each) in one decode step."""
    import warnings
    model = tiny_model(n_concept_layers=n_concept_layers, chunk={"router": "fixed"}).to(CUDA)
    ids = torch.randint(0, 64, (1, 17), generator=torch.Generator().manual_seed(0)).to(CUDA)
    with torch.no_grad():
        state = model(ids[:, :16], use_cache=True).state
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(ids[:, 16:], state=state)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_decode_step_host_syncs_do_not_grow_with_depth():
    """Per-layer host reads (bincount's min and max were two per MoE layer) stall the GPU
    queue; a decode step may read the host a fixed number of times, not once per layer."""
    assert host_syncs_of_one_decode_step(6) == host_syncs_of_one_decode_step(2)


def test_bf16_grouped_mm_kernel_matches_per_expert_products():
    from conceptvlm.grouped_mm import grouped_mm, grouped_mm_loop, grouped_mm_usable

    torch.manual_seed(0)
    counts = [40, 0, 72, 16]  # an expert with no rows
    x = torch.randn(128, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 64, 32, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    assert grouped_mm_usable(x, w)
    offs = torch.cumsum(torch.tensor(counts, device=CUDA), 0).to(torch.int32)
    y = grouped_mm(x, w, offs)
    ref = grouped_mm_loop(x.float(), w.float(), counts)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=5e-2)
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w), dy.bfloat16())
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    want = torch.autograd.grad(grouped_mm_loop(xf, wf, counts), (xf, wf), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=2e-1)
    assert got[1][1].abs().sum() == 0


@pytest.mark.parametrize("name", ["fixed", "none"])  # routers whose boundaries bf16 cannot move
def test_bf16_training_step_tracks_float32(name):
    ids, doc = packed_batch()
    ref = tiny_model(torch.float32, **MODEL_VARIANTS[name]).to(CUDA)
    low = tiny_model(torch.bfloat16, **MODEL_VARIANTS[name]).to(CUDA)
    out_r, g_r = loss_and_grads(ref, ids.to(CUDA), doc.to(CUDA))
    out_l, g_l = loss_and_grads(low, ids.to(CUDA), doc.to(CUDA))
    assert torch.isfinite(out_l.loss)
    torch.testing.assert_close(out_l.loss.float(), out_r.loss, rtol=2e-2, atol=0)
    assert_same_direction(g_l, g_r, 0.9)  # norm weights sum many small, cancelling terms


def test_compiled_blocks_in_bf16_match_eager():
    """On the GPU in bf16 the compiled graph calls the native grouped-mm kernel (its fake
    kernel takes bf16), a path CPU float32 never takes."""
    from conceptvlm.block import compile_blocks

    torch._dynamo.reset()
    model = tiny_model(torch.bfloat16, **MODEL_VARIANTS["fixed"]).to(CUDA).train()
    ids, doc = packed_batch()
    ids, doc = ids.to(CUDA), doc.to(CUDA)
    torch.manual_seed(1)
    eager, g0 = loss_and_grads(model, ids, doc)
    assert compile_blocks(model) > 0
    torch.manual_seed(1)
    comp, g1 = loss_and_grads(model, ids, doc)
    torch.testing.assert_close(comp.loss.float(), eager.loss.float(), rtol=1e-2, atol=0)
    assert_same_direction(g1, g0, 0.95)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", [{}, dict(image_positions="2d", image_order="hilbert")])
def test_vlm_float64_matches_the_cpu(variant):
    cpu = tiny_vlm(**variant)
    gpu = tiny_vlm(**variant).to(CUDA)
    row = interleaved_row(cpu, ["a red cube ", None, " next to ", None, " and a disc"])
    ids = torch.tensor([row])
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = cpu(ids, images=imgs, labels=ids)
    got = gpu(ids.to(CUDA), images=imgs.to(CUDA), labels=ids.to(CUDA))
    torch.testing.assert_close(got.logits.cpu(), want.logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.loss.cpu(), want.loss, rtol=1e-9, atol=0)


def test_cached_generate_on_the_gpu_gives_the_cpu_tokens():
    from conceptvlm.generate import cached_generate

    prompts = [[5, 9, 13, 2, 7], [1, 2, 3]]
    kw = dict(max_new_tokens=12, eos_id=None, pad_id=0)
    want = cached_generate(tiny_model(), prompts, **kw)
    got = cached_generate(tiny_model().to(CUDA), prompts, **kw)
    assert got == want and all(len(g) == 12 for g in got)
