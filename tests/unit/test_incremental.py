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
