"""ConceptVLM: interleaving, per-modality chunking, causality and batch independence with images."""
import pytest
import torch

from conceptvlm.chunk import IMAGE, MARKER, TEXT, forced_boundaries
from conceptvlm.vlm import hilbert_index
from helpers import interleaved_row, tiny_vlm

VARIANTS = {
    "1d": {},
    "2d_hilbert": dict(image_positions="2d", image_order="hilbert"),
    "fixed": dict(chunk={"router": "fixed"}),
    "loops": dict(concept={"loops": 2}),
}


def images(n, seed=0, dtype=torch.float64):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality_with_images(name):
    vlm = tiny_vlm(**VARIANTS[name])
    row = interleaved_row(vlm, ["a red cube ", None, " next to ", None, " and a disc"])
    ids = torch.tensor([row])
    imgs = images(2)
    base = vlm(ids, images=imgs).logits
    second_start = row.index(vlm.config.image_start_id, row.index(vlm.config.image_end_id))
    # Change the second image: nothing before it moves.
    out = vlm(ids, images=torch.cat([imgs[:1], images(1, seed=9)])).logits
    torch.testing.assert_close(out[:, :second_start + 1], base[:, :second_start + 1], rtol=0, atol=1e-10)
    assert not torch.allclose(out[:, second_start + 2:], base[:, second_start + 2:])
    # Change a later text token: nothing before it moves.
    j = len(row) - 4
    changed = ids.clone()
    changed[0, j] = ord("z")
    torch.testing.assert_close(vlm(changed, images=imgs).logits[:, :j], base[:, :j], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["1d", "2d_hilbert"])
def test_batch_independence_with_different_image_counts(name):
    vlm = tiny_vlm(**VARIANTS[name])
    rows = [interleaved_row(vlm, ["two ", None, " pictures ", None, " here"]),
            interleaved_row(vlm, ["no picture at all"]),
            interleaved_row(vlm, [None, " one picture"])]
    imgs = images(3, seed=1)
    L = max(map(len, rows))
    ids = torch.full((3, L), vlm.config.image_token_id + 3)  # pad id; masked by doc_ids
    doc = torch.full((3, L), -1)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        doc[r, :len(row)] = 0
    ids[doc < 0] = 0
    batched = vlm(ids, doc_ids=doc, images=imgs).logits
    per_row_images = [imgs[0:2], None, imgs[2:3]]
    for r, row in enumerate(rows):
        alone = vlm(torch.tensor([row]), images=per_row_images[r]).logits
        torch.testing.assert_close(batched[r:r + 1, :len(row)], alone, rtol=0, atol=1e-10)


def test_modality_mask_labels_and_per_modality_statistics():
    vlm = tiny_vlm(chunk={"router": "fixed", "target_ratio_text": 2.0, "target_ratio_image": 4.0})
    row = interleaved_row(vlm, ["abcdefgh", None, "ijklmnop"])
    ids = torch.tensor([row])
    mod = vlm.modality(ids)[0]
    assert (mod == IMAGE).sum() == vlm.tokens_per_image == 16
    assert (mod == MARKER).sum() == 2 and (mod == TEXT).sum() == 16
    out = vlm(ids, labels=ids.clone(), images=images(1))
    s = out.chunk_stats
    assert s["image"]["ratio"].item() == pytest.approx(4.0)
    assert s["text"]["ratio"].item() == pytest.approx(2.0)
    # Loss only on text: labels of patches and markers are masked inside the model.
    masked = vlm(ids, labels=torch.where(mod == TEXT, ids, -100), images=images(1))
    assert out.lm_loss.item() == pytest.approx(masked.lm_loss.item())


def test_no_concept_spans_two_modalities():
    vlm = tiny_vlm()
    row = interleaved_row(vlm, ["ab", None, "cd"])
    ids = torch.tensor([row])
    mod = vlm.modality(ids)
    forced = forced_boundaries(torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool), mod)[0]
    i0 = row.index(vlm.config.image_start_id)
    i1 = row.index(vlm.config.image_end_id)
    assert forced[0] and forced[i0] and forced[i0 + 1] and forced[i1] and forced[i1 + 1]
    assert not forced[1] and not forced[i0 + 2]


def test_image_count_mismatch_is_a_clear_error():
    vlm = tiny_vlm()
    ids = torch.tensor([interleaved_row(vlm, ["x", None])])
    with pytest.raises(ValueError, match="image tokens"):
        vlm(ids, images=images(2))
    with pytest.raises(ValueError, match="vocab_size"):
        vlm(torch.tensor([[999]]))


def test_2d_positions_equal_1d_for_text_and_follow_the_grid_for_patches():
    a, b = tiny_vlm(), tiny_vlm(image_positions="2d")
    b.load_state_dict(a.state_dict())
    ids = torch.tensor([list(b"only text here")])
    torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=1e-12)
    row = interleaved_row(b, ["ab", None])
    mod = b.modality(torch.tensor([row]))
    pos = b.image_positions(torch.arange(len(row))[None], mod)[0]
    start = row.index(b.config.image_token_id)
    rows, cols = b.image_grid
    for k in range(rows * cols):
        assert pos[start + k].tolist() == [start + k // cols, start + k % cols]


def test_hilbert_order_visits_grid_neighbours():
    for n in (2, 4, 8):
        order = torch.argsort(hilbert_index(n, n))
        r, c = order // n, order % n
        steps = (r[1:] - r[:-1]).abs() + (c[1:] - c[:-1]).abs()
        assert steps.max() == 1 and sorted(order.tolist()) == list(range(n * n))
