"""Verdicts of the second protocol's pre-registered claims (issue 16).

Each claim in an experiment YAML names its variants in advance. A claim is judged on the
paired differences over the seeds two variants share (:mod:`.stats`), with rows outside
+-5% of their target ratio left out; a vision table's gate must pass before its merging
variants are compared. The report (:mod:`.report_v2`) prints what this module decides.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

from . import stats as S
from .grounding import GATE_WITHIN_ONE

METRICS: dict[str, tuple[str, Callable[[dict], Optional[float]], bool]] = {
    # name: (label, value of a row, lower is better)
    "held_bpb": ("held-out bpb (english + code)", lambda r: r["held"].get("all", {}).get("bits_per_byte"), True),
    "ood_bpb": ("bpb on the held-out source", lambda r: r["held"].get("ood", {}).get("bits_per_byte"), True),
    "cell_accuracy": ("cell accuracy", lambda r: r["held"].get("cells", {}).get("accuracy"), False),
}


def latest(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """``{variant: {seed: row}}``, the last row written for each."""
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        out[r["variant"]][r["seed"]] = r
    return out


def _values(by: dict, variant: str, metric: str) -> tuple[dict[int, float], int]:
    """``{seed: value}`` of the matched rows of ``variant``, and how many were left out."""
    f = METRICS[metric][1]
    out, dropped = {}, 0
    for s, r in by.get(variant, {}).items():
        if not r.get("matched", True):
            dropped += 1
            continue
        x = f(r)
        if x is not None:
            out[s] = float(x)
    return out, dropped


def _dropped(n: int) -> list[str]:
    """The note for rows a claim left out because their ratio missed its target (none when n is 0)."""
    return [f"{n} not-matched row(s) left out"] if n else []


def _link(by: dict, a: str, b: str, metric: str) -> tuple[str, S.Paired, str]:
    """Verdict of "a better than b" on ``metric``, its paired difference, a note."""
    label, _, lower = METRICS[metric]
    va, da = _values(by, a, metric)
    vb, db = _values(by, b, metric)
    p = S.paired(va, vb) if lower else S.paired(vb, va)  # always "a - b" in the better direction's sign
    verdict = S.verdict_less(p)
    notes = _dropped(da + db)
    notes += _sizing(p, verdict, p.mean)
    if 0 < p.n < S.MIN_SEEDS_HEADLINE:
        notes.append(f"{p.n} paired seed(s), fewer than {S.MIN_SEEDS_HEADLINE}")
    return verdict, p, "; ".join(notes)


def _sizing(p: S.Paired, verdict: str, distance: float) -> list[str]:
    """How many paired seeds an inconclusive claim needs at its measured spread: enough that
    the interval's half-width falls below ``distance``, how far the mean difference sits
    from the bound that decides the claim (issue 16: size seeds from the paired variance)."""
    if p.n < 2 or verdict != S.INCONCLUSIVE:
        return []
    n = S.seeds_needed(p.sd, distance)
    return [f"~{n} seeds would resolve a difference this size" if n else
            "more than 50 seeds would be needed at this spread"]


def _provisional(verdict: str, n_seeds: int) -> str:
    """A decided verdict on fewer paired seeds than the protocol's minimum is not a verdict yet."""
    if verdict == S.INCONCLUSIVE or n_seeds >= S.MIN_SEEDS_HEADLINE:
        return verdict
    return f"{S.INCONCLUSIVE} (reads '{verdict}' on {n_seeds} paired seed(s); the protocol needs {S.MIN_SEEDS_HEADLINE})"


def claim_lines(exp: dict, by: dict, gate_ok: Optional[bool]) -> list[str]:
    out = []
    for c in exp.get("claims", []):
        head = f"**Claim: {c['text']}**"
        if "chain" in c:
            links = [_link(by, a, b, c["metric"]) for a, b in zip(c["chain"], c["chain"][1:])]
            verdict = _provisional(S.combine([v for v, _, _ in links]), min(p.n for _, p, _ in links))
            sign = "−" if METRICS[c["metric"]][2] else "(b − a)"
            parts = [f"{a} vs {b}: {v}, {sign} paired difference {p.fmt()}" + (f" ({note})" if note else "")
                     for (a, b), (v, p, note) in zip(zip(c["chain"], c["chain"][1:]), links)]
            out.append(f"- {head}: **{verdict}**. " + "; ".join(parts) + ".")
        elif "not_worse" in c:
            a, b = c["not_worse"]
            va, da = _values(by, a, c["metric"])
            vb, db = _values(by, b, c["metric"])
            p = S.paired(va, vb)
            if c.get("gated") and gate_ok is not True:
                why = "gate not passed" if gate_ok is False else "gate not decided yet"
                out.append(f"- {head}: **not compared ({why})**; {a} − {b} {p.fmt()}.")
                continue
            margin = float(c.get("margin", 0.0))
            verdict = S.verdict_not_worse(p, margin)
            # it holds once the interval clears -margin, fails once it is all below 0:
            # the farther of the two bounds from the mean is the distance that resolves it
            notes = _dropped(da + db)
            notes += _sizing(p, verdict, max(p.mean + margin, -p.mean))
            if p.n >= 2:  # few seeds: show each, so one outlier seed is visible
                notes.append("per seed " + ", ".join(f"s{s} {va[s] - vb[s]:+.3f}" for s in sorted(set(va) & set(vb))))
            out.append(f"- {head}: **{_provisional(verdict, p.n)}**. {a} − {b}: {p.fmt()} (margin {margin:g})"
                       + "".join(f"; {x}" for x in notes) + ".")
        elif "ratios" in c:
            parts, verdicts = [], []
            for v in c["ratios"]:
                rs = list(by.get(v, {}).values())
                if not rs:
                    continue
                for mod, target in (("text", rs[0]["R"]), ("image", rs[0].get("R_image"))):
                    vals = [r["held"].get("ratio", {}).get(mod) for r in rs]
                    vals = [x for x in vals if x is not None]
                    if not vals or not target:
                        continue
                    verdict, lo, hi = S.verdict_within(vals, float(target), 0.05)
                    verdicts.append(verdict)
                    m = S.mean_sd(vals)[0]
                    ci = f"[95% CI {100 * lo:+.1f}%, {100 * hi:+.1f}%]" if lo == lo else "(1 seed, no interval)"
                    parts.append(f"{v} {mod} {m:.2f} vs {target:g}: {100 * (m / target - 1):+.1f}% {ci} → {verdict}")
            found = "; ".join(parts) if parts else f"no rows yet for {', '.join(c['ratios'])}"
            out.append(f"- {head}: **{S.combine(verdicts) if verdicts else S.INCONCLUSIVE}**. {found}.")
    return out


def gate(exp: dict, by: dict) -> tuple[Optional[bool], str]:
    """``(decided, line)``: whether the gate variant's mean ``metric`` over the YAML's seeds
    reaches ``at_least``. True once every seed has a row and the mean passes; False once it
    cannot pass whatever the missing seeds score (or every seed is in and it does not);
    None while the missing seeds could still swing it, and when there is no gate."""
    g = exp.get("gate")
    if not g:
        return None, ""
    seeds = exp.get("seeds") or sorted(by.get(g["variant"], {}))
    rows = by.get(g["variant"], {})
    vals = [rows[s]["held"].get("cells", {}).get(g["metric"]) for s in seeds if s in rows]
    vals = [x for x in vals if x is not None]
    need = float(g.get("at_least", GATE_WITHIN_ONE))
    if not vals:
        return None, f"Gate: no {g['variant']} rows yet: **gate not decided**; merging variants are not compared."
    m, missing = sum(vals) / len(vals), len(seeds) - len(vals)
    best = (sum(vals) + missing) / len(seeds)  # every missing seed perfect
    over = (f"over its {len(seeds)} seed{'s' * (len(seeds) > 1)}" if not missing
            else f"over {len(vals)} of its {len(seeds)} seeds")
    head = (f"Gate: {g['variant']} reaches {100 * m:.1f}% within one cell {over} "
            f"(needs ≥ {100 * need:.0f}% as a mean): ")
    if not missing and m >= need:
        return True, head + "**gate passed**, merging variants are compared."
    if best < need:
        return False, head + ("**gate not passed**" + ("" if not missing else " (the missing seeds cannot lift it)")
                              + ": merging variants are not compared (train longer or change the task before "
                              "reading them).")
    return None, head + "**gate not decided yet**: merging variants are compared once every seed has a row."
