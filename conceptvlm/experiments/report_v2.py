"""Sections of ``docs/results.md`` for the second protocol (``protocol: 2`` experiments).

One table per experiment and form (full / quick), built from the latest row of each
(variant, seed); a table whose rows come from more than one git revision (or from a
checkout with uncommitted changes) is flagged and gets no verdicts. Verdicts come from
the claims the experiment YAML pre-registers (:mod:`.verdicts`); the plan table is
:mod:`.plan_table`.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Callable, Optional

from . import stats as S
from .plan_table import plan_lines, train_seconds
from .runner import read_rows
from .spec import protocol_key, with_quick
from .verdicts import METRICS, claim_lines, gate, latest


# what every result row carries, whichever protocol or kind made it (the report reads these)
ROW_KEYS = ("variant", "seed", "quick", "steps", "router", "held", "command", "machine", "time", "wall_s")


def revision_of(row: dict) -> str:
    """The code revision a row was made with: the last commit touching the runs' code
    (``code_rev``; rows before it was recorded fall back to the checkout's ``git``)."""
    return row.get("code_rev") or row.get("git") or "?"


def revision_problem(rows: list[dict]) -> Optional[str]:
    revs = sorted({revision_of(r) for r in rows})
    if len(revs) > 1:
        return f"rows from {len(revs)} revisions ({', '.join(revs)}): rerun the table at one revision"
    if revs[0].endswith("+dirty") or revs[0] == "?":
        return f"rows from revision {revs[0]} (uncommitted or unknown code): rerun from a clean checkout"
    return None


def split_by_revision(exp: dict, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(current, superseded)``. A table that decides claims is read at one code revision,
    that of its most recently finished row: a model-code change reruns the table, and rows
    of other revisions are shown apart until the rerun replaces them. A sweep (no claims)
    keeps every row, and :func:`revision_problem` flags the mix."""
    if not exp.get("claims") or not rows:
        return rows, []
    rev = revision_of(max(rows, key=lambda r: r["time"]))
    return [r for r in rows if revision_of(r) == rev], [r for r in rows if revision_of(r) != rev]


def split_by_protocol(exp: dict, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(current, superseded)``: a table that decides claims holds only rows made under
    the YAML's present settings (their ``protocol_key`` matches the one the YAML gives
    their variant now), so an edit to how runs are made (an override, the steps) never
    mixes old and new rows at one code revision. Rows from before rows recorded the key
    stand while no row of the table has one."""
    if not exp.get("claims") or not any(r.get("protocol_key") for r in rows):
        return rows, []
    forms = {False: exp, True: with_quick(exp)}
    keys = {(quick, v["name"]): protocol_key(form, v) for quick, form in forms.items() for v in exp.get("variants", [])}

    def now(r: dict) -> bool:  # a variant no longer in the YAML has no key: superseded
        return r.get("protocol_key") is not None and r["protocol_key"] == keys.get((bool(r["quick"]), r["variant"]))
    return [r for r in rows if now(r)], [r for r in rows if not now(r)]


def current_rows(exp: dict, rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """``(current, other protocol, older code)``: the rows a table is read at
    (:func:`split_by_protocol`, then :func:`split_by_revision`) and the two kinds left out."""
    made_now, other_protocol = split_by_protocol(exp, rows)
    current, older_code = split_by_revision(exp, made_now)
    return current, other_protocol, older_code


def other_protocol_lines(old: list[dict]) -> list[str]:
    if not old:
        return []
    runs = sorted({(r["variant"], r["seed"]) for r in old})
    return [f"Superseded, left out of the table and its verdicts: {len(runs)} run(s) made under other settings "
            "than the experiment YAML's present ones (an earlier protocol, or a probe with extra overrides): "
            + ", ".join(f"{v} seed {s}" for v, s in runs) + ".", ""]


def superseded_lines(old: list[dict], current: list[dict]) -> list[str]:
    if not old:
        return []
    runs = sorted({(r["variant"], r["seed"]) for r in old})
    return [f"Superseded, left out of the table and its verdicts: {len(runs)} run(s) made with older code "
            f"(revision {', '.join(sorted({revision_of(r) for r in old}))}): "
            + ", ".join(f"{v} seed {s}" for v, s in runs)
            + f". The table reruns at {revision_of(current[0])}.", ""]


def pairing_problem(by: dict[str, dict[int, dict]]) -> Optional[str]:
    """Seeds whose variants did not read the same data (different ``data_order``)."""
    orders: dict[int, set] = defaultdict(set)
    for seeds in by.values():
        for s, r in seeds.items():
            if r.get("data_order"):
                orders[s].add(r["data_order"])
    bad = sorted(s for s, o in orders.items() if len(o) > 1)
    return f"seed(s) {bad} read different data across variants: not paired" if bad else None


def _f(m: float, sd: Optional[float], nd: int = 3) -> str:
    if m != m:
        return "–"
    return f"{m:.{nd}f}" + (f" ± {sd:.{nd}f}" if sd is not None else "")


def _col(rows: list[dict], f: Callable[[dict], Optional[float]], nd: int = 3) -> str:
    return _f(*S.mean_sd([f(r) for r in rows]), nd=nd)


def text_table(by: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| variant | router | R | re-spent by | lr | seeds | held bpb | english | code | held-out source (ood) | "
             "realised ratio | matched (±5%) | linear FLOPs/token | attention FLOPs/token | epochs seen | train s |",
             "|" + "---|" * 16]
    for v, seeds in by.items():
        rs = [seeds[s] for s in sorted(seeds)]
        r0 = rs[0]
        knob = ", ".join(f"{k}={x}" for k, x in r0.get("knob", {}).items()) or "–"
        ep = {}
        for r in rs:
            for k, x in r.get("epochs_seen", {}).items():
                ep.setdefault(k, []).append(x)
        epochs = ", ".join(f"{k} {sum(x) / len(x):.2f}" for k, x in ep.items()) or "–"
        matched = sum(bool(r.get("matched")) for r in rs)
        lines.append(
            f"| {v} | {r0['router']} | {r0['R']:g} | {r0.get('realloc', 'none')} ({knob}) | {r0.get('lr', '–')} | "
            f"{','.join(str(r['seed']) for r in rs)} | {_col(rs, METRICS['held_bpb'][1])} | "
            f"{_col(rs, lambda r: r['held'].get('english', {}).get('bits_per_byte'))} | "
            f"{_col(rs, lambda r: r['held'].get('code', {}).get('bits_per_byte'))} | {_col(rs, METRICS['ood_bpb'][1])} | "
            f"{_col(rs, lambda r: r['held']['all'].get('realised_ratio'), 2)} | {matched}/{len(rs)} | "
            f"{r0.get('flops_linear_per_token', float('nan')):,.0f} | {r0.get('flops_attention_per_token', float('nan')):,.0f} | "
            f"{epochs} | {_col(rs, train_seconds, 0)} |")
    return lines


def cells_table(by: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| variant | image R | order | positions | seeds | cell accuracy | within one cell | row error | "
             "column error | realised ratio text | image | matched (±5%) | final train loss | train s |",
             "|" + "---|" * 14]
    for v, seeds in by.items():
        rs = [seeds[s] for s in sorted(seeds)]
        r0 = rs[0]
        cell = lambda key: (lambda r: r["held"].get("cells", {}).get(key))  # noqa: E731
        ratio = lambda m: (lambda r: r["held"].get("ratio", {}).get(m))  # noqa: E731
        rimg = "1" if r0["router"] == "none" else f"{r0.get('R_image')}"
        lines.append(f"| {v} | {rimg} | {r0.get('image_order', '?')} | {r0.get('image_positions', '?')} | "
                     f"{','.join(str(r['seed']) for r in rs)} | {_col(rs, cell('accuracy'))} | "
                     f"{_col(rs, cell('within_one'))} | {_col(rs, cell('row_error'), 2)} | "
                     f"{_col(rs, cell('col_error'), 2)} | {_col(rs, ratio('text'), 2)} | {_col(rs, ratio('image'), 2)} | "
                     f"{sum(bool(r.get('matched')) for r in rs)}/{len(rs)} | "
                     f"{_col(rs, lambda r: r['train'].get('final_loss'), 3)} | {_col(rs, train_seconds, 0)} |")
    return lines + ["", prior_line()]


def prior_line() -> str:
    """The loss a run that never learned to look sits at (byte tokens: " r3 c5" + eos)."""
    from conceptvlm.data.grounding_cells import cell_answer

    from .curve import answer_tokens, cells_prior

    k = answer_tokens(cell_answer(0, 0))
    return (f"The task's prior: a model that ignores the image trains to {cells_prior():.3f} nats per answer "
            f"token (the centre cell's entropy over the answer's {k} byte tokens, eos included). A final train "
            "loss there means the run never learned to look.")



def best_lr_lines(by: dict[str, dict[int, dict]]) -> list[str]:
    """For a learning-rate sweep (rows of one router at several lr): the lr with the lowest
    mean held-out bpb per router, which the later stages' YAMLs take, flagged when it is the
    lowest or highest lr swept (the optimum may lie beyond it)."""
    per: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for seeds in by.values():
        for r in seeds.values():
            x = METRICS["held_bpb"][1](r)
            if r.get("lr") is not None and x is not None:
                per[r["router"]][float(r["lr"])].append(x)
    parts = []
    for router, lrs in per.items():
        if len(lrs) < 2:
            continue
        best = min(lrs, key=lambda lr: S.mean_sd(lrs[lr])[0])
        edge = " (the edge of the swept range)" if best in (min(lrs), max(lrs)) else ""
        parts.append(f"{router} at lr {best:g}{edge}")
    if not parts:
        return []
    return ["Lowest held-out bpb per router: " + ", ".join(parts) + " (the later stages take these).", ""]


def problem_lines(exp: dict, problem: Optional[str]) -> list[str]:
    """What a table with mixed revisions or unpaired seeds says: its verdicts are withheld;
    a sweep decides no claim, so it is only flagged (its note may vouch for the mix)."""
    if not problem:
        return []
    if exp.get("claims"):
        return [f"**Verdicts withheld**: {problem}.", ""]
    return [f"**Caution**: {problem}" + (" (see the note under the table)" if exp.get("notes") else "") + ".", ""]


def note_lines(exp: dict) -> list[str]:
    """The experiment YAML's ``notes:``: facts measured by hand about its rows (e.g. that two
    code revisions train identically), printed under its table."""
    return [f"Note: {n}" for n in exp.get("notes", [])] + ([""] if exp.get("notes") else [])



def overlap_line(row: dict) -> str:
    info = row.get("data", {})
    ov = info.get("overlap", {})
    if not ov:
        return ""
    parts = [f"{k.split('/')[1]} {v['shared_chars']:,} of {v['chars']:,} chars ({100 * v['fraction']:.3f}%)"
             for k, v in ov.items()]
    cut = info.get("dropped_chars_for_overlap", {})
    return ("Held-out overlap with training (characters inside a 64-character run that also occurs in the training "
            "split, measured by rolling hash over every window): " + "; ".join(parts)
            + (". Cut from the held-out pieces before scoring: " + ", ".join(f"{k.split('/')[1]} {v:,} chars"
                                                                              for k, v in cut.items()) if cut else "")
            + ".")


def provenance_lines(rows: list[dict]) -> list[str]:
    """How a table's rows were made: every command and machine that made them, their wall
    time, steps, code revisions, and when the newest finished (rows are listed by variant
    and seed, not in the order they ran)."""
    machines = sorted({r["machine"] for r in rows})
    newest = max(rows, key=lambda r: r["time"])  # "YYYY-mm-dd HH:MM:SS" sorts as time
    return ["Command(s): " + "; ".join(f"`{c}`" for c in sorted({r['command'] for r in rows})) + "  ",
            f"Machine{'s' if len(machines) > 1 else ''}: {'; '.join(machines)}  ",
            f"Wall time: {sum(r['wall_s'] for r in rows):.0f} s in all ({len(rows)} runs); "
            f"steps per run {', '.join(str(s) for s in sorted({r['steps'] for r in rows}))}; "
            f"code revision {', '.join(sorted({revision_of(r) for r in rows}))}; last run {newest['time']}.  "]


def render_experiment(name: str, exp: dict, rows: list[dict]) -> list[str]:
    lines = [f"## {name}", "", f"Claim under test: {exp.get('claim', '–')}", ""]
    forms = defaultdict(list)
    for r in rows:
        forms[r["quick"]].append(r)
    for quick, every in sorted(forms.items()):
        rs, other_protocol, old = current_rows(exp, every)
        lines += [f"### {'quick form (pipeline check, not evidence)' if quick else 'full'}", ""]
        # the YAML's notes are about its full-form rows, not the pipeline check
        noted = {k: v for k, v in exp.items() if k != "notes"} if quick else exp
        if not rs:
            lines += ["No rows under the present protocol yet.", ""] + other_protocol_lines(other_protocol)
            lines += note_lines(noted)
            continue
        by = latest(rs)
        rows_used = [r for seeds in by.values() for r in seeds.values()]
        r_last = max(rows_used, key=lambda r: r["time"])
        lines += provenance_lines(rows_used)
        info = r_last.get("data", {})
        if "tokenizer" in info:
            lines.append(f"Data: tokenizer {info['tokenizer']} ({info.get('bytes_per_token', 1):.2f} training bytes "
                         f"per token); documents {json.dumps(info.get('docs'))}; mixing weights "
                         f"{json.dumps({k: round(v, 3) for k, v in info.get('weights', {}).items()})}.  ")
            lines.append(overlap_line(r_last))
        lines.append("")
        problem = revision_problem(rows_used) or pairing_problem(by)
        lines += problem_lines(noted, problem)
        kind_cells = any("cells" in r["held"] for r in rows_used)
        lines += (cells_table(by) if kind_cells else text_table(by)) + [""] + superseded_lines(old, rs)
        lines += other_protocol_lines(other_protocol)
        lines += best_lr_lines(by) + note_lines(noted)
        gate_ok, gate_line = gate(with_quick(exp) if quick else exp, by)
        if gate_line:
            lines += [gate_line, ""]
        if not problem and not quick:
            lines += claim_lines(exp, by, gate_ok) + [""]
        elif quick:
            lines += ["Quick forms check the pipeline; no verdicts are drawn from them.", ""]
    return lines


def not_run_lines(name: str, exp: dict) -> list[str]:
    claims = "; ".join(c["text"] for c in exp.get("claims", [])) or exp.get("claim", "")
    return [f"## {name}", "", f"**Not run yet** under the second protocol: no rows. Claims it will decide: {claims}.",
            f"Command: `conceptvlm experiment run {name}` (pipeline check: `--quick`).", ""]


# the paper's claims and where the second protocol decides each (experiment, claim id)
PAPER_CLAIMS_V2 = [
    ("Dynamic < No chunk < Fixed at matched compute", "chunking_v2", "dynamic-nochunk-fixed"),
    ("cosine generalises better than linear", "chunking_v2", "cosine-generalises"),
    ("per-modality ratios are reached", "grounding_cells", "modality-ratios"),
    ("2D merging >= 1D on localisation", "grounding_cells", "2d-vs-1d"),
]

PROTOCOL_INTRO = [
    "# Second protocol (issue 16)", "",
    "What changed against the first protocol (kept below, superseded): held-out text is scored in windows of the "
    "trained row length (512 tokens), every held-out document is scored, and the held-out split shares no "
    "64-character run with training (measured below); the corpus is ~23 MB of English prose and Python code that "
    "ships with Python and the installed packages (`conceptvlm/experiments/corpus_large.py`), with one package "
    "(mpmath) held out whole; tokens are BPE (vocabulary 2048, fitted on the training split) with bytes as an "
    "ablation; training reads the data once, mixed in proportion to size, and each row records the epochs it saw "
    "per source; seeds are paired (seed s fixes the data order of every variant); `none` and `none-joint` are both "
    "baselines; re-spent compute keeps 8 experts sparse (top-2 → top-4 at R = 2); a chunked row whose realised "
    "held-out ratio misses its target by more than 5% is marked not matched and left out of verdicts; each claim "
    "names its variants in advance and is judged on the paired 95% t-interval (holds / does not hold / "
    "inconclusive); a table whose rows come from more than one code revision (the last commit touching the code "
    "the runs execute, as `conceptvlm/experiments/revision.py` names it; a test checks that no run imports the "
    "files it leaves out) gets no verdicts.", "",
    "The plan runs in pieces: each run saves a checkpoint every 200 steps and an interrupted run resumes from it "
    "(bit for bit) when its command is given again; runs with rows are skipped; several processes given the same "
    "command share its runs out (e.g. `conceptvlm experiment run chunking_v2 & conceptvlm experiment run "
    "chunking_v2`, one per core).", ""]


def verdict_summary(exps: dict[str, dict], rows: dict[str, list[dict]]) -> list[str]:
    """One line per claim of the paper: its verdict, or that it has not been run. ``rows``:
    each experiment's full-form rows under its present protocol and code (:func:`current_rows`)."""
    out = ["## Verdicts", ""]
    for text, name, cid in PAPER_CLAIMS_V2:
        full = rows.get(name, [])
        claim = next((c for c in exps.get(name, {}).get("claims", []) if c["id"] == cid), None)
        if not full or claim is None:
            out.append(f"- **{text}**: not run yet under the second protocol (`conceptvlm experiment run {name}`); "
                       "no verdict.")
            continue
        by = latest(full)
        problem = revision_problem([r for s in by.values() for r in s.values()]) or pairing_problem(by)
        if problem:
            out.append(f"- **{text}**: verdict withheld ({problem}).")
            continue
        gate_ok, _ = gate(exps[name], by)
        line = claim_lines({"claims": [claim]}, by, gate_ok)[0]
        out.append(line.replace(f"**Claim: {claim['text']}**", f"**{text}**", 1))
    return out + [""]


def second_protocol_lines(names: list[str], results_dir, experiments_dir) -> tuple[list[str], list[str]]:
    """The second protocol's part of the page, and the names left for the first protocol."""
    from omegaconf import OmegaConf

    exps, rows, first = {}, {}, []
    for name in names:
        path = experiments_dir / f"{name}.yaml"
        exp = OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else {}
        if (exp or {}).get("protocol", 1) != 2:
            first.append(name)
            continue
        exps[name] = exp
        rows[name] = read_rows(results_dir / f"{name}.json", ROW_KEYS)
    if not exps:
        return [], first
    from .plan import PLAN

    current = {n: current_rows(exps[n], [r for r in rs if not r.get("quick")])[0] for n, rs in rows.items()}
    lines = PROTOCOL_INTRO + verdict_summary(exps, current) + plan_lines(results_dir, current)
    order = [n for _, n, _ in PLAN if n in exps] + sorted(set(exps) - {n for _, n, _ in PLAN})
    for name in order:
        exp = exps[name]
        lines += render_experiment(name, exp, rows[name]) if rows[name] else not_run_lines(name, exp)
    return lines, first
