"""Cached generation produces exactly what re-running the full forward each step produces."""
import torch

from conceptvlm.eval.generate import greedy_generate
from conceptvlm.generate import cached_generate
from helpers import interleaved_row, tiny_model, tiny_vlm


def test_cached_equals_full_recompute_text():
    model = tiny_model(chunk={"router": "fixed"})
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 60, (n,), generator=g).tolist() for n in (3, 9, 5)]
    kw = dict(max_new_tokens=[7, 4, 6], eos_id=None, pad_id=0)
    assert cached_generate(model, prompts, **kw) == greedy_generate(model, prompts, **kw)


def test_cached_equals_full_recompute_with_images_and_eos():
    vlm = tiny_vlm(image_positions="2d", image_order="hilbert")
    prompts = [interleaved_row(vlm, [None, "what colour? "]), interleaved_row(vlm, ["describe ", None, ":"])]
    images = [torch.randn(1, 3, 64, 64, dtype=torch.float64), torch.randn(1, 3, 64, 64, dtype=torch.float64)]
    full = greedy_generate(vlm, prompts, max_new_tokens=6, eos_id=None, pad_id=256, images=images)
    eos = full[0][2]  # make row 0 stop early on a token it really produces
    kw = dict(max_new_tokens=6, eos_id=eos, pad_id=256, images=images)
    assert cached_generate(vlm, prompts, **kw) == greedy_generate(vlm, prompts, **kw)


def test_rows_leave_the_batch_as_they_finish_and_sampling_stays_per_row():
    """Finished rows are dropped from the decoding state; a sampled row's tokens equal
    those it gets decoded alone with the same seed (a row with no budget yields nothing)."""
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 60, (n,), generator=g).tolist() for n in (4, 8, 6, 5)]
    kw = dict(eos_id=None, pad_id=0, temperature=0.9, top_p=0.95)
    limits, seeds = [9, 0, 3, 6], [11, 12, 13, 14]
    together = cached_generate(model, prompts, max_new_tokens=limits, seed=seeds, **kw)
    alone = [cached_generate(model, [p], max_new_tokens=n, seed=[s], **kw)[0]
             for p, n, s in zip(prompts, limits, seeds)]
    assert together == alone
    assert [len(t) for t in together] == limits
