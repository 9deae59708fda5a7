"""Run a named experiment (``configs/experiments/NAME.yaml``) and append one result row per
(variant, seed) to ``docs/results/NAME.json``.

An experiment YAML names a training config, the data (``kind: text`` = the pydoc + stdlib
corpus of :mod:`.corpus`; ``kind: vlm`` = the synthetic image-text shards), the common
overrides, and ``variants``: ``{name, router, R, realloc, overrides}``. ``realloc`` is
``topk`` or ``loops`` (re-spend the compute saved at ratio R, chosen by
:func:`conceptvlm.flops.match_compute`) or ``none``. ``quick`` overrides steps / seeds /
variants for a short form. Each row records the activated linear FLOPs per token of the
variant (at the target R and at the ratio it realised on held-out data).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ..manifest import write_atomic
from . import run2
from .revision import REPO, code_rev, git_rev
from .spec import protocol_key

RESULTS_DIR = REPO / "docs" / "results"
EXPERIMENTS_DIR = REPO / "configs" / "experiments"


def experiment_path(name: str) -> Path:
    p = Path(name)
    path = p if p.suffix in (".yaml", ".yml") and p.is_file() else EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        from ..errors import UserError

        known = sorted(q.stem for q in EXPERIMENTS_DIR.glob("*.yaml"))
        raise UserError(f"unknown experiment {name!r}", f"expected one of {', '.join(known)} or a YAML path")
    return path


def load_experiment(name: str, quick: bool = False) -> dict:
    """The experiment dict, with the ``quick`` section applied when ``quick``."""
    from omegaconf import OmegaConf

    from .spec import check_experiment, with_quick

    path = experiment_path(name)
    exp = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    check_experiment(exp, path, REPO)
    exp.setdefault("name", Path(name).stem)
    exp["all_variants"] = list(exp["variants"])
    return with_quick(exp) if quick else exp


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, " \
           f"Python {platform.python_version()}, torch {torch.__version__}"


# ------------------------------------------------------------------------------- data
def prepare_run_data(exp: dict, runs_root: Path) -> dict:
    """The data of experiment ``exp`` under ``RUNS/_data``, built once, while this process
    holds the folder's lock: processes started together on one experiment (which share
    out its runs) would otherwise build the same corpus or shards at once, and one could
    train on the few shards the other had written so far."""
    import fcntl

    root = Path(runs_root) / "_data"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks until another process has finished building
        if exp.get("protocol", 1) == 2 and exp.get("kind", "text") == "text":
            return run2.prepare_text_data(exp, root)
        return prepare_data(exp, root)


def prepare_data(exp: dict, root: Path) -> dict:
    """``{"train_sources": [...], "held": {name: shards}, "train_eval": {name: shards}, "info": {...}}``."""
    if exp.get("kind", "text") == "text":
        from .corpus import CorpusSpec, write_corpus

        man = write_corpus(root / "corpus", CorpusSpec(**exp.get("corpus", {})))
        mix = exp.get("mix", {"english": 1.0, "code": 1.0})
        return {"train_sources": [{"shards": man["shards"][f"train/{d}"], "kind": "text", "weight": float(w)}
                                  for d, w in mix.items()],
                "held": {d: man["shards"][f"held/{d}"] for d in mix},
                "train_eval": {d: man["shards"][f"train/{d}"] for d in mix},
                "info": {"docs": man["docs"], "chars": man["chars"], "stdlib": man["stdlib"]}}
    from .vlm_runs import prepare_vlm_data  # text runs never import the vision side

    return prepare_vlm_data(exp, root)


# ---------------------------------------------------------------------- compute matching
def variant_overrides(base_model, variant: dict) -> tuple[list[str], dict]:
    """Model overrides of one variant and its FLOPs accounting (``flops`` dict)."""
    from conceptvlm import flops

    router = variant["router"]
    R = float(variant.get("R", 2.0))
    realloc = variant.get("realloc", "none")
    ov = [f"model.chunk.router={router}"]
    knob: dict[str, Any] = {}
    match = None
    if router != "none":
        ov.append(f"model.chunk.target_ratio_text={R}")
        if realloc in ("topk", "loops"):
            match = flops.match_compute(base_model, R, strategy=realloc, router=router,
                                    joint_decoding=base_model.joint_decoding)
            knob = dict(match.knob)
    ov += [f"model.concept.{k}={v}" for k, v in knob.items()]
    ov += list(variant.get("overrides", []))
    acct = {"realloc": realloc, "knob": knob,
            "flops_baseline_per_token": flops.linear_flops_per_token(flops.baseline_of(base_model))["all"]}
    if match is not None:
        acct.update(flops_mismatch_pct=match.flops_mismatch_pct, params_mismatch_pct=match.params_mismatch_pct)
    return ov, acct


# ------------------------------------------------------------------------------- eval
def realised_ratio(model, tokenizer, texts: list[str], max_length: int = 512) -> dict:
    """tokens / boundaries of the eval-mode router over ``texts`` (one document per forward)."""
    import torch

    tokens = boundaries = 0.0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer.encode(text)[:max_length]
            if not ids:
                continue
            out = model(input_ids=torch.tensor([ids]))
            st = out.chunk_stats.get("text")
            if st is None:  # router none: every token a boundary
                tokens += len(ids)
                boundaries += len(ids)
                continue
            tokens += float(st["tokens"])
            boundaries += float(st["boundaries"])
    return {"tokens": tokens, "boundaries": boundaries, "ratio": tokens / max(boundaries, 1.0)}


def _evaluate_text(model, tok, shards: dict, limit: Optional[int]) -> dict:
    from conceptvlm.eval.datasets import texts_from_shards
    from conceptvlm.eval.text import perplexity

    res, all_lp_bytes = {}, [0.0, 0.0]
    for name, spec in shards.items():
        texts = texts_from_shards(spec, limit)
        s = perplexity(model, tok, texts, max_length=512, batch_size=8)["summary"]
        r = realised_ratio(model, tok, texts)
        res[name] = {"bits_per_byte": s["bits_per_byte"], "nll_per_token": s["nll_per_token"],
                     "docs": s["documents"], "bytes": s["bytes"], "realised_ratio": r["ratio"],
                     "tokens": r["tokens"], "boundaries": r["boundaries"]}
        all_lp_bytes[0] += s["bits_per_byte"] * s["bytes"]
        all_lp_bytes[1] += s["bytes"]
    tokens = sum(v["tokens"] for v in res.values())
    bounds = sum(v["boundaries"] for v in res.values())
    res["all"] = {"bits_per_byte": all_lp_bytes[0] / max(all_lp_bytes[1], 1), "realised_ratio": tokens / max(bounds, 1)}
    return res


def _train_ratios(metrics_path: Path, last: int = 20) -> dict:
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    out = {}
    for mod in ("text", "image"):
        vals = [r[f"eval_ratio/{mod}"] for r in rows if f"eval_ratio/{mod}" in r][-last:]
        if vals:
            out[mod] = sum(vals) / len(vals)
    out["final_loss"] = sum(r["lm_loss"] for r in rows[-last:]) / max(len(rows[-last:]), 1) if rows else None
    return out


# ------------------------------------------------------------------------------- run
def run_key(cfg, exp: dict, runs_root: Optional[Path] = None) -> str:
    """What makes two runs the same run: the resolved train config, the code revision and
    the evaluation settings. A run folder or result row with another key is not reused.
    Paths count relative to the runs folder and the checkout, so the same run made in
    another clone or folder keeps its key (and its rows are not rerun)."""
    blob = json.dumps({"config": cfg.to_dict(), "code": exp.get("_code_rev", ""),
                       "eval": [exp.get("eval_limit"), exp.get("eval_window")]}, sort_keys=True, default=str)
    runs = [] if runs_root is None else [(Path(runs_root).resolve(), "$RUNS"), (Path(runs_root), "$RUNS")]
    for root, name in runs + [(REPO, "$REPO")]:
        if str(root) not in (".", os.sep):
            blob = blob.replace(json.dumps(str(root) + os.sep)[1:-1], name + "/")
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _killed_piece_seconds(state: dict, run_dir: Path) -> float:
    """Training time of a piece that was killed: from its start to its last logged step
    (what its checkpoint kept is counted; what came after is redone by the next piece)."""
    started, log = state.get("piece_started"), run_dir / "metrics.jsonl"
    if state.get("trained") or started is None or not log.is_file():
        return 0.0
    return max(0.0, log.stat().st_mtime - float(started))


RUN_STATE = "experiment_run.json"  # in a run folder: its key and the wall time of its pieces


def _read_run_state(run_dir: Path) -> dict:
    try:
        state = json.loads((run_dir / RUN_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_run_state(run_dir: Path, state: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / RUN_STATE, json.dumps(state, indent=1))


def _step_seconds(metrics_path: Path) -> float:
    """Sum of the logged step times (a resumed run's log keeps only the steps it kept)."""
    if not metrics_path.is_file():
        return 0.0
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    return float(sum(r.get("step_time_s", 0.0) for r in rows))


def run_config(exp: dict, variant: dict, seed: int, data: dict, runs_root: Path, quick: bool) -> tuple:
    """``(train config, steps, FLOPs accounting, run folder)`` of one (variant, seed)."""
    from omegaconf import OmegaConf

    from conceptvlm.train_config import load_train_config

    base = OmegaConf.to_container(OmegaConf.load(REPO / exp["train_config"]), resolve=True)
    if exp.get("model_file"):  # the experiment's own model (protocol 2: configs/model/small.yaml)
        base["model_file"] = exp["model_file"]
    if "model_file" in base and not Path(base["model_file"]).is_absolute():
        base["model_file"] = str(REPO / base["model_file"])
    base["data"]["sources"] = data["train_sources"]
    run_dir = run_dir_of(exp, {"quick": quick, "variant": variant["name"], "seed": seed}, runs_root)
    v2 = exp.get("protocol", 1) == 2
    common = list(exp.get("overrides", [])) + [
        f"train.seed={seed}", f"train.out_dir={run_dir}",
        "train.export_at_end=true", f"train.save_every={int(exp.get('save_every', 200))}", "train.keep_last=1",
        "train.progress=false"]
    if v2:  # same data order for every variant of a seed; one pass; the corpus' tokenizer
        common += run2.data_overrides(data, seed)
    probe = load_train_config(None, overrides=common, data=base)
    steps = (run2.packed_steps(exp, probe, runs_root / "_data") if v2 and exp.get("kind", "text") == "text" else
             run2.planned_steps(exp, data, probe.data.seq_len, probe.data.batch_size, probe.optim.grad_accum))
    common.append(f"train.steps={steps}")
    ov, acct = variant_overrides(probe.model, variant)
    return load_train_config(None, overrides=common + ov, data=base), steps, acct, run_dir


def run_one(exp: dict, variant: dict, seed: int, data: dict, runs_root: Path, quick: bool, command: str,
            done_keys: frozenset = frozenset(), force: bool = False) -> Optional[dict]:
    """Train and evaluate one (variant, seed); returns the result row, or None when a row
    with the same run key is already in ``done_keys``.

    Runs outlive a process: training saves a checkpoint every ``save_every`` steps (the
    experiment's, default 200), and a run folder left by an interrupted run with the same
    key resumes from its last checkpoint (training resumes bit for bit); a trained run
    whose evaluation was interrupted is only evaluated. A folder with another key (config
    or code changed), or any folder when ``force``, is cleared and the run starts over."""
    import torch

    from conceptvlm import flops
    from conceptvlm.config import ModelConfig
    from conceptvlm.export import load_exported
    from conceptvlm.train import train

    t0 = time.time()
    cfg, steps, acct, run_dir = run_config(exp, variant, seed, data, runs_root, quick)
    v2 = exp.get("protocol", 1) == 2
    model_cfg: ModelConfig = cfg.model
    key = run_key(cfg, exp, runs_root)
    if key in done_keys:
        print(f"[experiment {exp['name']}] {variant['name']} seed {seed}: done already (run key {key})", flush=True)
        return None
    state = _read_run_state(run_dir)
    if run_dir.exists() and (force or state.get("key") != key):
        import shutil

        shutil.rmtree(run_dir)  # another config or code revision: nothing in it carries over
        state = {}
    killed_s = _killed_piece_seconds(state, run_dir)
    state = {"key": key, "train_wall_s": state.get("train_wall_s", 0.0) + killed_s, "pieces": state.get("pieces", 0),
             "trained": state.get("trained", False)}
    fingerprint = run2.data_fingerprint(cfg) if v2 else None
    if not state["trained"]:
        state["pieces"] += 1
        t_piece = state["piece_started"] = time.time()
        _write_run_state(run_dir, state)
        train(cfg)  # resumes from run_dir/checkpoints when an earlier piece left one
        state.update(trained=True, train_wall_s=state["train_wall_s"] + time.time() - t_piece)
        state.pop("piece_started")
        _write_run_state(run_dir, state)
    t_train = state["train_wall_s"]
    model, tok = load_exported(run_dir / "export")
    torch.manual_seed(seed)
    limit = exp.get("eval_limit")
    row: dict[str, Any] = {"experiment": exp["name"], "variant": variant["name"], "seed": seed,
                           "router": variant["router"], "R": float(variant.get("R", 2.0)) if variant["router"] != "none" else 1.0,
                           "steps": steps, "quick": quick, "command": command, "machine": machine(),
                           "git": exp.get("_git", git_rev()), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "data": data["info"],
                           "params_total": flops.parameter_counts(model_cfg).n_total,
                           "params_activated": flops.parameter_counts(model_cfg).n_activated, **acct}
    row["R_image"] = cfg.model.chunk.target_ratio_image if exp.get("kind", "text") == "vlm" else None
    row["tokens_per_step"] = cfg.data.seq_len * cfg.data.batch_size * cfg.optim.grad_accum
    if fingerprint:
        row["data_order"] = fingerprint
    row["train"] = _train_ratios(run_dir / "metrics.jsonl")
    if v2 and exp.get("kind", "text") == "text":
        window = run2.check_window(cfg, exp.get("eval_window"))
        row.update(protocol=2, lr=cfg.optim.lr, tokenizer=data["info"]["tokenizer"],
                   epochs_seen=run2.epochs_seen(cfg, run_dir, data))
        if not isinstance(exp.get("steps"), int):  # sized by packed rows: the rows of one pass
            row["rows_per_pass"] = run2.packed_rows(cfg, runs_root / "_data")
        t_eval = time.time()
        row["held"] = run2.evaluate_text(model, tok, data["held"], window, limit)
        row["eval_wall_s"] = time.time() - t_eval
        realised, target = row["held"]["all"]["realised_ratio"], row["R"]
        row.update(run2.compute_fields(model_cfg, variant["router"], row["R"], realised, window))
    elif exp.get("kind", "text") == "text":
        row["held"] = _evaluate_text(model, tok, data["held"], limit)
        if exp.get("eval_train", False):
            row["train_eval"] = _evaluate_text(model, tok, data["train_eval"], limit)
        realised, target = row["held"]["all"]["realised_ratio"], row["R"]
    else:
        from .vlm_runs import score_vlm_run

        # over all positions: image patches merge at their own target, not the text's
        realised, target = score_vlm_run(row, model, tok, exp, variant, cfg, data, run_dir,
                                         Path(exp.get("_results_dir", RESULTS_DIR)))
    row["flops_per_token"] = flops.linear_flops_per_token(
        model_cfg, target if variant["router"] != "none" else None)["all"]
    row["flops_per_token_realised"] = (flops.linear_flops_per_token(model_cfg, max(realised, 1.0))["all"]
                                       if variant["router"] not in ("none",) else row["flops_per_token"])
    row["train_wall_s"] = t_train  # every piece's, a killed one's up to its last logged step
    row.update(run_key=key, code_rev=exp.get("_code_rev", ""), protocol_key=protocol_key(exp, variant),
               train_pieces=state["pieces"],
               train_step_s_total=_step_seconds(run_dir / "metrics.jsonl"))
    row["wall_s"] = time.time() - t0
    return row


def run_dir_of(exp: dict, row: dict, runs_root: Path) -> Path:
    return runs_root / exp["name"] / ("quick" if row["quick"] else "full") / f"{row['variant']}-s{row['seed']}"


def rescore_held_ratios(name: str, runs_root: str | Path = "runs/experiments",
                        results_dir: str | Path = RESULTS_DIR) -> int:
    """Add held-out per-modality ratios to the VLM rows of ``NAME.json`` that lack them
    (rows written before they were measured), from each run's exported model.
    Returns how many rows were updated."""
    import torch

    from conceptvlm.export import load_exported

    from . import vlm_runs

    exp = load_experiment(name)
    if exp.get("kind", "text") != "vlm":
        return 0
    runs_root = Path(runs_root)
    data = prepare_run_data(exp, runs_root)
    path = Path(results_dir) / f"{exp['name']}.json"
    if not path.is_file():
        raise FileNotFoundError(f"experiment {exp['name']}: no result rows at {path}")
    done = 0
    with _locked_rows(path) as rows:
        for row in rows:
            export = run_dir_of(exp, row, runs_root) / "export"
            if "ratio" in row["held"] or not export.exists():
                continue
            model, tok = load_exported(export)
            torch.manual_seed(row["seed"])
            row["held"]["ratio"] = vlm_runs.realised_ratios_vlm(model, tok, data["held"])
            done += 1
    return done


@contextlib.contextmanager
def _locked_rows(path: Path) -> Iterator[list]:
    """The rows at ``path`` (``[]`` if missing), written back on exit, under an exclusive
    lock on a file beside it (runs may share a results file). The write is atomic
    (:func:`~conceptvlm.manifest.write_atomic`): a process killed while writing leaves
    every earlier row in place."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = read_rows(path)
        yield rows
        write_atomic(path, json.dumps(rows, indent=1))


def read_rows(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """The result rows in ``path`` (``[]`` when it is missing or empty). A file that is not
    a JSON list of objects, or a row without one of the ``required`` keys, is a one-line
    error naming the file (and row): read before any run trains, so a broken file never
    costs a run (nor has its row lost when the run is done)."""
    from ..errors import UserError

    text = path.read_text() if path.is_file() else ""
    if not text.strip():
        return []
    hint = f"restore it (`git checkout -- {path}`) or mend the broken row by hand"
    try:
        rows = json.loads(text)
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})", hint) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: expected a JSON list of result rows (objects)", hint)
    for i, row in enumerate(rows):
        missing = [k for k in required if k not in row]
        if missing:
            raise UserError(f"{path}: row {i} lacks {', '.join(missing)}", hint)
    return rows


@contextlib.contextmanager
def claim(run_dir: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on ``run_dir`` (a ``.lock`` file beside it): True
    when this process holds it. Several processes running one experiment so share out its
    (variant, seed) pairs; the lock goes with the process, so a killed run is free again."""
    import fcntl

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def done_run_keys(path: Path) -> frozenset:
    """Run keys of the rows already in the results file at ``path``."""
    return frozenset(r["run_key"] for r in read_rows(path) if r.get("run_key"))


def append_result(row: dict, path: Path) -> None:
    """Append ``row`` to the JSON list at ``path``."""
    with _locked_rows(path) as rows:
        rows.append(row)


def run_experiment(name: str, quick: bool = False, runs_root: str | Path = "runs/experiments",
                   results_dir: str | Path = RESULTS_DIR, variants: Optional[list[str]] = None,
                   seeds: Optional[list[int]] = None, steps: Optional[int] = None, threads: int = 1,
                   extra_overrides: Optional[list[str]] = None, force: bool = False) -> list[dict]:
    """Run every (variant, seed) of experiment ``name``; appends rows to ``RESULTS/NAME.json``.
    ``extra_overrides`` (``key=value``) apply to every variant, after the YAML's own. A
    (variant, seed) whose row is already there with the same run key is skipped unless
    ``force``; interrupted runs resume (:func:`run_one`), so a plan can be run in pieces;
    processes started together on one experiment share out its runs (:func:`claim`)."""
    import torch

    torch.set_num_threads(threads)
    exp = load_experiment(name, quick)
    if exp.get("unsupported"):
        raise NotImplementedError(f"experiment {exp['name']}: {exp['unsupported']}")
    if steps is not None:
        exp["steps"] = steps
    if seeds is not None:
        exp["seeds"] = seeds
    if variants is not None:  # chosen from all variants, not only the quick form's
        unknown = set(variants) - {v["name"] for v in exp["all_variants"]}
        if unknown:
            raise ValueError(f"experiment {exp['name']} has no variants {sorted(unknown)}")
        exp["variants"] = [v for v in exp["all_variants"] if v["name"] in set(variants)]
    command = "conceptvlm experiment run " + exp["name"] + (" --quick" if quick else "")
    if variants is not None:
        command += " --variants " + ",".join(variants)
    if seeds is not None:
        command += " --seeds " + ",".join(map(str, seeds))
    if steps is not None:
        command += f" --steps {steps}"
    for o in extra_overrides or []:
        if "=" not in o:
            raise ValueError(f"--override {o!r} is not key=value")
        command += f" --override {o}"
    exp["overrides"] = list(exp.get("overrides", [])) + list(extra_overrides or [])
    exp["_results_dir"] = str(results_dir)
    exp["_git"] = git_rev()  # the code this process runs, even if the checkout moves on meanwhile
    exp["_code_rev"] = code_rev(exp.get("kind", "text"))
    results = Path(results_dir) / f"{exp['name']}.json"
    read_rows(results)  # a broken results file stops here, before any data is built or run trained
    runs_root = Path(runs_root)
    data = prepare_run_data(exp, runs_root)
    rows = []
    for seed in exp["seeds"]:
        for v in exp["variants"]:
            with claim(run_dir_of(exp, {"quick": quick, "variant": v["name"], "seed": seed}, runs_root)) as mine:
                if not mine:
                    print(f"[experiment {exp['name']}] {v['name']} seed {seed}: running in another process", flush=True)
                    continue
                print(f"[experiment {exp['name']}] {v['name']} seed {seed}: "
                      + (f"{exp['steps']} steps" if exp.get("steps") else f"{exp.get('epochs', 1)} epoch(s)"),
                      flush=True)
                done = frozenset() if force else done_run_keys(results)
                row = run_one(exp, v, seed, data, runs_root, quick, command, done, force)
                if row is None:
                    continue
                append_result(row, results)
            held = row["held"].get("all", row["held"].get("text", {}))
            print(f"[experiment {exp['name']}] {v['name']} seed {seed}: held text bpb {held.get('bits_per_byte')}, "
                  f"ratio {held.get('realised_ratio', row['train'].get('text'))}, {row['wall_s']:.0f}s", flush=True)
            rows.append(row)
    return rows
