"""A 200-step CPU training run on generated text reaches its compression target and learns."""
import random

import torch

from conceptvlm import ConceptMoE
from helpers import tiny_config

WORDS = ["the", "cat", "sat", "on", "a", "red", "mat", "and", "blue", "dog", "ran", "to", "big",
         "house", "small", "tree", "under", "green", "bird", "flew"]


def char_batch(rng: random.Random, batch: int, length: int) -> torch.Tensor:
    """Rows of space-separated words as byte ids: inside a word the next letter is easy,
    at word starts it is not - structure a dynamic chunker can exploit."""
    rows = []
    for _ in range(batch):
        text = ""
        while len(text) < length:
            text += rng.choice(WORDS) + " "
        rows.append([ord(c) for c in text[:length]])
    return torch.tensor(rows)


def test_training_reaches_target_ratio_and_lowers_loss():
    torch.manual_seed(0)
    target = 2.0
    cfg = tiny_config(vocab_size=128, chunk={"target_ratio_text": target, "ratio_loss_weight_text": 0.3})
    model = ConceptMoE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng, held_out = random.Random(0), char_batch(random.Random(123), 16, 64)

    def evaluate():
        model.eval()
        with torch.no_grad():
            out = model(held_out, labels=held_out)
        model.train()
        return out.lm_loss.item(), out.chunk_stats["text"]["ratio"].item()

    start_loss, _ = evaluate()
    for _ in range(200):
        ids = char_batch(rng, 16, 64)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    end_loss, ratio = evaluate()
    assert end_loss < 0.5 * start_loss, (start_loss, end_loss)
    assert abs(ratio - target) / target < 0.10, f"realised ratio {ratio:.3f} vs target {target}"
