"""Text suite: perplexity / bits-per-byte / multiple choice with stand-in models whose
probabilities are known exactly, and the lm-eval harness adapter against them."""
import json
import math

import pytest
import torch

from conceptvlm.eval.generate import greedy_generate
from conceptvlm.eval.text import loglikelihood, multiple_choice, perplexity, read_corpus
from helpers import ByteTokenizer


class CharTokenizer(ByteTokenizer):
    """One token per character (Latin-1 only): 'é' is 1 token but 2 UTF-8 bytes."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i < 256)


class Out:
    def __init__(self, logits):
        self.logits = logits


class SuccessorModel(torch.nn.Module):
    """p(next = x_t + 1 | x_<=t) = ps(t), every other token (1 - ps(t)) / (V - 1), where t
    is the position in the row: known exactly, padding-independent."""

    def __init__(self, vocab=262, ps=lambda t: 0.5):
        super().__init__()
        self.vocab, self.ps = vocab, ps

    def forward(self, input_ids, doc_ids=None, images=None):
        B, L = input_ids.shape
        ps = torch.tensor([self.ps(t) for t in range(L)], dtype=torch.float64)
        logits = torch.log((1 - ps) / (self.vocab - 1))[None, :, None].expand(B, L, self.vocab).clone()
        succ = (input_ids + 1) % self.vocab
        logits.scatter_(2, succ[..., None], torch.log(ps)[None, :, None].expand(B, L, 1).clone())
        return Out(logits.float())


def rising(t):
    return 1 - 1 / (t + 2)


V = 262
TOK = ByteTokenizer()


def test_perplexity_uniform_model_and_bpb_counts_bytes_not_tokens():
    uniform = SuccessorModel(ps=lambda t: 1 / V)  # every token 1/V
    text = "héllo"  # 5 chars, 6 UTF-8 bytes
    r_byte = perplexity(uniform, ByteTokenizer(), [text])["summary"]
    r_char = perplexity(uniform, CharTokenizer(), [text])["summary"]
    assert r_byte["perplexity"] == pytest.approx(V) and r_char["perplexity"] == pytest.approx(V)
    assert r_byte["bytes"] == r_char["bytes"] == 6
    assert r_byte["tokens"] == 6 and r_char["tokens"] == 5
    assert r_byte["bits_per_byte"] == pytest.approx(6 * math.log2(V) / 6)
    assert r_char["bits_per_byte"] == pytest.approx(5 * math.log2(V) / 6)


def test_perplexity_known_bigram():
    # "abc": bos->a is not a successor (1/(2(V-1))), a->b and b->c are (1/2 each)
    r = perplexity(SuccessorModel(), TOK, ["abc"])["summary"]
    nll = 2 * math.log(2) + math.log(2 * (V - 1))
    assert r["nll_per_token"] == pytest.approx(nll / 3)
    assert r["perplexity"] == pytest.approx(math.exp(nll / 3))
    assert r["bits_per_byte"] == pytest.approx((2 + math.log2(2 * (V - 1))) / 3)


def test_strided_windows_score_each_token_once_with_stride_context():
    # "abcdef", max_length 4, stride 2: window 1 feeds [bos,a,b,c] and scores a..d at
    # positions 0..3; window 2 feeds [b,c,d,e] and scores e,f at positions 2,3.
    m = SuccessorModel(ps=rising)
    lp = math.log((1 - rising(0)) / (V - 1)) + sum(math.log(rising(t)) for t in (1, 2, 3, 2, 3))
    r = perplexity(m, TOK, ["abcdef"], max_length=4, stride=2)
    assert r["items"][0]["logprob"] == pytest.approx(lp)
    assert r["items"][0]["tokens"] == 6
    # stride = max_length on "abcdefghij": [bos,a,b,c] -> a..d; [d,e,f,g] -> e..h at
    # positions 0..3; the last window is filled up with context: [f,g,h,i] -> i,j at 2,3
    lp_disjoint = (math.log((1 - rising(0)) / (V - 1))
                   + sum(math.log(rising(t)) for t in (1, 2, 3, 0, 1, 2, 3, 2, 3)))
    r = perplexity(m, TOK, ["abcdefghij"], max_length=4)
    assert r["items"][0]["logprob"] == pytest.approx(lp_disjoint)


def test_batching_and_padding_do_not_change_scores():
    m = SuccessorModel(ps=rising)
    texts = ["abcdefghij", "xy", "hello world", "q"]
    alone = [perplexity(m, TOK, [t])["items"][0]["logprob"] for t in texts]
    together = [i["logprob"] for i in perplexity(m, TOK, texts, batch_size=3)["items"]]
    assert together == pytest.approx(alone)


def test_loglikelihood_and_multiple_choice_hand_computed():
    m = SuccessorModel(ps=rising)
    # context "ab" = [bos, a, b]; "c" is predicted at position 2, "cdefgh" at 2..7
    (lp_c, g_c), (lp_long, g_long), (lp_x, g_x) = loglikelihood(
        m, TOK, [("ab", "c"), ("ab", "cdefgh"), ("ab", "x")])
    assert lp_c == pytest.approx(math.log(3 / 4)) and g_c
    assert lp_long == pytest.approx(math.log(3 / 9)) and g_long
    assert lp_x == pytest.approx(math.log((1 - rising(2)) / (V - 1))) and not g_x
    res = multiple_choice(m, TOK, [{"context": "ab", "choices": ["c", "cdefgh", "x"], "label": 1}],
                          delimiter="")
    # acc: ln 3/4 > ln 1/3 -> "c" (wrong); acc_norm: ln(1/3)/6 > ln(3/4)/1 -> "cdefgh" (right)
    assert res["summary"] == {"n": 1, "acc": 0.0, "acc_norm": 1.0}


def test_trailing_space_moves_to_continuation():
    m = SuccessorModel(ps=rising)
    assert loglikelihood(m, TOK, [("ab ", "c")]) == loglikelihood(m, TOK, [("ab", " c")])


def test_read_corpus(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_text("three\nlines")
    assert read_corpus(tmp_path) == ["one", "two", "three\nlines"]


def test_greedy_generate_batched_stops_at_eos_and_limit():
    class EosAfterE(SuccessorModel):
        def forward(self, input_ids, doc_ids=None, images=None):
            out = super().forward(input_ids)
            out.logits[input_ids == ord("e"), TOK.eos_id] = 100.0
            return out
    prompts = [[TOK.bos_id] + TOK.encode("a"), [TOK.bos_id] + TOK.encode("xyz"), TOK.encode("c")]
    out = greedy_generate(EosAfterE(), prompts, max_new_tokens=[10, 2, 10],
                          eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    assert [TOK.decode(o) for o in out] == ["bcde", "{|", "de"]


# ------------------------------------------------------------------ lm-eval harness

def _write_tasks(tmp_path):
    mc = [{"question": "ab", "choices": ["c", "cdefgh", "x"], "label": 1},
          {"question": "Question: 2+2=", "choices": ["4", "5", "22"], "label": 0},
          {"question": "hij", "choices": ["k", "klmnop", "zz"], "label": 0}]
    docs = [{"text": "abcdefghijklmnopqrstuvwxyz " * 3}, {"text": "héllo wörld"}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mc.yaml").write_text(f"""task: cvlm_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (tmp_path / "ppl.yaml").write_text(f"""task: cvlm_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'docs.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return mc, [d["text"] for d in docs]


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    from conceptvlm.eval.harness import run_harness
    tmp_path = tmp_path_factory.mktemp("tasks")
    mc, docs = _write_tasks(tmp_path)
    m = SuccessorModel(ps=rising)
    res = run_harness(m, TOK, ["cvlm_local_mc", "cvlm_local_ppl"], include_path=tmp_path,
                      batch_size=2, max_length=16, stride=8, log_samples=True,
                      out_path=tmp_path / "harness.json")
    return m, mc, docs, res, tmp_path


def test_harness_multiple_choice_equals_text_suite(harness_run):
    m, mc, _, res, _ = harness_run
    ours = multiple_choice(m, TOK, [{"context": d["question"], "choices": d["choices"],
                                     "label": d["label"]} for d in mc], max_length=16)
    r = res["results"]["cvlm_local_mc"]
    assert r["acc,none"] == pytest.approx(ours["summary"]["acc"])
    assert r["acc_norm,none"] == pytest.approx(ours["summary"]["acc_norm"])
    logged = sorted(res["samples"]["cvlm_local_mc"], key=lambda s: s["doc_id"])
    for s, item in zip(logged, ours["items"]):
        assert [float(x[0]) for x in s["filtered_resps"]] == pytest.approx(item["loglikelihoods"])


def test_harness_rolling_equals_text_suite_bpb(harness_run, tmp_path):
    m, _, docs, res, tmp = harness_run
    ours = perplexity(m, TOK, docs, max_length=16, stride=8)["summary"]
    assert res["results"]["cvlm_local_ppl"]["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"])
    saved = json.loads((tmp / "harness.json").read_text())
    assert saved["config"]["model"] == "conceptvlm"


def test_adapter_loglikelihood_equals_direct_scoring():
    from lm_eval.api.instance import Instance

    from conceptvlm.eval.harness import ConceptLM
    m = SuccessorModel(ps=rising)
    lm = ConceptLM(m, TOK, batch_size=2, max_length=32)
    pairs = [("ab", "cdefgh"), ("Question: why", " not"), ("", "abc")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    assert got == loglikelihood(m, TOK, pairs)
    # and by hand, from one full forward of the model
    for (ctx, cont), (lp, _) in zip(pairs, got):
        ids = [TOK.bos_id] + TOK.encode(ctx + cont)
        logp = torch.log_softmax(m(torch.tensor([ids[:-1]])).logits[0].double(), -1)
        n = len(TOK.encode(cont))
        want = sum(float(logp[len(ids) - 1 - n + k, ids[len(ids) - n + k]]) for k in range(n))
        assert lp == pytest.approx(want)
    gen = lm.generate_until([Instance("generate_until", {}, ("abc", {"until": ["g"], "max_gen_toks": 8}), 0),
                             Instance("generate_until", {}, ("xy", {"max_gen_toks": 3}), 1)])
    assert gen == ["def", "z{|"]
