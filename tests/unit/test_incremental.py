"""Incremental decoding with caches equals one full forward pass (DESIGN.md §3)."""
import pytest
import torch

from helpers import MODEL_VARIANTS as VARIANTS, make_forced_all_boundaries, tiny_model


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("prefill", [1, 9])
def test_token_by_token_equals_full_forward(name, prefill):
    model = tiny_model(**VARIANTS[name])
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    out = model(ids[:, :prefill], use_cache=True)
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], state=out.state)
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, rtol=1e-9, atol=1e-9)


def test_chunks_of_several_tokens_and_packed_documents():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (1, 40), generator=g)
    doc = torch.zeros(1, 40, dtype=torch.long)
    doc[0, 13:] = 1
    doc[0, 29:] = 2
    full = model(ids, doc_ids=doc).logits
    state, parts = None, []
    for s, e in ((0, 7), (7, 15), (15, 16), (16, 33), (33, 40)):
        out = model(ids[:, s:e], doc_ids=doc[:, s:e], use_cache=True, state=state)
        state = out.state
        parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)


def test_batched_prompts_of_different_lengths():
    """Right-padded prompts; each row then decodes its own continuation."""
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    lens, new = [5, 12, 8], 6
    seqs = [torch.randint(0, 64, (n + new,), generator=g) for n in lens]
    P = max(lens)
    prompt = torch.zeros(3, P, dtype=torch.long)
    doc = torch.full((3, P), -1)
    for r, n in enumerate(lens):
        prompt[r, :n] = seqs[r][:n]
        doc[r, :n] = 0
    out = model(prompt, doc_ids=doc, use_cache=True)
    got = [[out.logits[r, :n]] for r, n in enumerate(lens)]
    for k in range(new):
        step = torch.stack([seqs[r][n + k] for r, n in enumerate(lens)])[:, None]
        out = model(step, doc_ids=torch.zeros_like(step), state=out.state)
        for r in range(3):
            got[r].append(out.logits[r])
    for r, n in enumerate(lens):
        full = model(seqs[r][None]).logits[0]
        torch.testing.assert_close(torch.cat(got[r], 0), full, rtol=1e-9, atol=1e-9)


def test_concept_cache_is_smaller_by_the_compression_ratio():
    model = tiny_model(chunk={"router": "fixed", "target_ratio_text": 2.0})
    ids = torch.randint(0, 64, (1, 64))
    state = model(ids[:, :40], use_cache=True).state
    for t in range(40, 64):
        state = model(ids[:, t:t + 1], state=state).state
    kv = state.kv_bytes()
    per_layer_token = kv["encoder"]  # one encoder layer, 64 tokens
    per_layer_concept = kv["concept"] / len(state.concepts.caches)
    assert per_layer_token / per_layer_concept == pytest.approx(2.0)


def test_forced_boundaries_model_matches_too():
    model = tiny_model(chunk={"router": "linear"})
    make_forced_all_boundaries(model)
    ids = torch.randint(0, 64, (1, 12))
    out = model(ids[:, :4], use_cache=True)
    steps = [out.logits] + [(out := model(ids[:, t:t + 1], state=out.state)).logits for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids).logits, rtol=1e-9, atol=1e-9)


def _decode(model, ids, prefill, state=None, doc=None):
    """Prefill ``ids[:, :prefill]`` then one token per call; the logits of every call."""
    out = model(ids[:, :prefill], use_cache=True, state=state, doc_ids=None if doc is None else doc[:, :prefill])
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], state=out.state, doc_ids=None if doc is None else doc[:, t:t + 1])
        logits.append(out.logits)
    return torch.cat(logits, 1), out.state


@pytest.mark.parametrize("name", ["cosine", "loops_topk", "wide"])
def test_batched_decoding_equals_each_row_decoded_alone(name):
    """Rows start concepts at different steps; a decode step runs the concept model on
    the rows that start one, and each row's concept cache holds only its own concepts."""
    model = tiny_model(**VARIANTS[name])
    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(3))
    batched, state = _decode(model, ids, 5)
    concepts = 0
    for r in range(ids.shape[0]):
        alone, _ = _decode(model, ids[r:r + 1], 5)
        torch.testing.assert_close(batched[r:r + 1], alone, rtol=1e-9, atol=1e-9)
        n_concepts = int(model(ids[r:r + 1]).boundary.sum())
        assert int(state.concepts.index.lengths[r]) == n_concepts
        concepts += n_concepts
    attn = model.concept_model.layers[0].attn
    per_concept = 2 * attn.n_kv_heads * attn.head_dim * 8  # keys + values, float64
    assert state.kv_bytes()["concept"] == per_concept * concepts * len(state.concepts.caches)


def test_rows_that_start_concepts_differ_within_a_step():
    """The test above exercises the sub-batch path: some steps have some rows (not all)
    starting a concept."""
    model = tiny_model()
    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(3))
    boundary = model(ids).boundary[:, 5:]
    some = boundary.any(0) & ~boundary.all(0)
    assert int(some.sum()) >= 6


def test_selected_state_decodes_like_its_rows():
    """``state.select(rows)``: drop rows, repeat rows; decoding continues exactly."""
    model = tiny_model(chunk={"router": "fixed", "target_ratio_text": 2.0})
    ids = torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(4))
    prefill = model(ids[:, :10], use_cache=True).state
    rows = torch.tensor([2, 0, 0, 1])
    state = prefill.select(rows)
    logits = []
    for t in range(10, 24):
        out = model(ids[rows, t:t + 1], state=state)
        state = out.state
        logits.append(out.logits)
    full = model(ids).logits
    torch.testing.assert_close(torch.cat(logits, 1), full[rows, 10:], rtol=1e-9, atol=1e-9)
    # the original state is untouched by decoding its selection
    out = model(ids[:, 10:11], state=prefill)
    torch.testing.assert_close(out.logits, full[:, 10:11], rtol=1e-9, atol=1e-9)


def test_padded_prompts_leave_no_padding_in_the_caches():
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    doc = torch.zeros(2, 12, dtype=torch.long)
    doc[1, 7:] = -1  # row 1: a 7-token prompt
    state = model(ids, doc_ids=doc, use_cache=True).state
    assert state.tokens.index.lengths.tolist() == [12, 7]
    assert state.kv_bytes()["encoder"] == 19 * 2 * 2 * 8 * 8  # 19 keys, 2 kv heads of 8, k+v, float64


@pytest.mark.parametrize("name", ["cosine", "fixed", "output_form", "none"])
def test_inference_mode_decode_steps_equal_full_forward(name):
    """Under ``torch.inference_mode`` a decode step takes its short paths (one-token
    dechunk, previous token, positions); they equal the full forward too."""
    model = tiny_model(**VARIANTS[name])
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        batched, _ = _decode(model, ids, 4)
        full = model(ids).logits
    torch.testing.assert_close(batched, full, rtol=1e-9, atol=1e-9)
