"""``conceptvlm experiment run NAME [--quick]`` and ``conceptvlm experiment report``."""
from __future__ import annotations

import argparse


def _seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2``."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers, e.g. 0,1,2") \
            from None


def _run(args: argparse.Namespace) -> int:
    from .runner import run_experiment

    run_experiment(args.name, quick=args.quick, runs_root=args.runs, results_dir=args.results,
                   variants=args.variants.split(",") if args.variants else None, seeds=args.seeds,
                   steps=args.steps, threads=args.threads, extra_overrides=args.override, force=args.force)
    return 0


def _rescore(args: argparse.Namespace) -> int:
    from .runner import rescore_held_ratios

    n = rescore_held_ratios(args.name, runs_root=args.runs, results_dir=args.results)
    print(f"{args.name}: held-out ratios added to {n} row(s)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import render_report

    print(render_report(results_dir=args.results, out=args.out))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from .plan import PLAN, estimate, load_timing, measure_all

    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or []) - {name for _, name, _ in PLAN})
    if unknown:
        raise UserError(f"--only {','.join(unknown)}: not in the plan",
                        f"its experiments: {', '.join(name for _, name, _ in PLAN)}")
    timing = measure_all(args.results, only=only) if args.measure else load_timing(args.results)
    total = 0.0
    for e in estimate(timing):
        if only and e["experiment"] not in only:
            continue
        if not e["measured"]:
            print(f"{e['stage']}: {e['experiment']}: not measured (conceptvlm experiment plan --measure)")
            continue
        total += e["hours"]
        print(f"{e['stage']}: {e['experiment']}: {e['runs']} runs x {e['steps']:,} steps at {e['step_s']:.2f} s "
              f"+ evaluation = {e['hours']:.1f} CPU hours"
              + (f" (timed on an older form of its YAML: conceptvlm experiment plan --measure --only {e['experiment']})"
                 if e["stale"] else ""))
    print(f"total: {total:.1f} CPU hours")
    return 0


def _tower_spread(args: argparse.Namespace) -> int:
    from .tower_spread import run

    rows = run(args.exports, args.data, args.limit, args.out)
    return 1 if any(r["collapsed"] for r in rows) else 0


def _curve(args: argparse.Namespace) -> int:
    from .curve import run

    run(args.runs, args.metric, args.window, args.prior)
    return 0


def register(sub: "argparse._SubParsersAction") -> None:
    from .runner import RESULTS_DIR

    exp = sub.add_parser("experiment", help="small-scale reproductions of the paper's findings")
    kinds = exp.add_subparsers(dest="experiment_command", required=True)
    run = kinds.add_parser("run", help="train + evaluate the variants of configs/experiments/NAME.yaml")
    run.add_argument("name", help="experiment name (configs/experiments/NAME.yaml) or a YAML path")
    run.add_argument("--quick", action="store_true", help="the experiment's short form (its `quick:` section)")
    run.add_argument("--variants", default="", help="comma-separated subset of variant names")
    run.add_argument("--seeds", type=_seed_list, default=None, help="comma-separated seeds (default: the YAML's)")
    run.add_argument("--steps", type=int, default=None)
    run.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    run.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                     help="train-config override for every variant (after the YAML's), e.g. optim.lr=2e-3; repeatable")
    run.add_argument("--force", action="store_true",
                     help="rerun (variant, seed) pairs whose rows exist, from scratch (default: skip them, and "
                          "resume runs an earlier process left unfinished)")
    run.add_argument("--runs", default="runs/experiments", help="where run folders go")
    run.add_argument("--results", default=str(RESULTS_DIR), help="where NAME.json result rows are appended")
    run.set_defaults(func=_run)
    rs = kinds.add_parser("rescore", help="add held-out per-modality ratios to VLM result rows that lack them, "
                                           "from the runs' exported models")
    rs.add_argument("name")
    rs.add_argument("--runs", default="runs/experiments")
    rs.add_argument("--results", default=str(RESULTS_DIR))
    rs.set_defaults(func=_rescore)
    plan = kinds.add_parser("plan", help="the second protocol's plan and its CPU-hour estimate")
    plan.add_argument("--measure", action="store_true", help="time each stage's heaviest variant on this machine")
    plan.add_argument("--only", default="", help="comma-separated experiments to show (with --measure: to re-time)")
    plan.add_argument("--results", default=str(RESULTS_DIR))
    plan.set_defaults(func=_plan)
    rep = kinds.add_parser("report", help="render docs/results.md + plots from the result JSONs")
    rep.add_argument("--results", default=str(RESULTS_DIR))
    rep.add_argument("--out", default=None, help="markdown path (default: RESULTS/../results.md)")
    rep.set_defaults(func=_report)
    ts = kinds.add_parser("tower-spread", help="has a model's vision tower collapsed? how far apart its patch vectors "
                                              "are (exit 1 when one has)")
    ts.add_argument("exports", nargs="+", help="exported model folders")
    ts.add_argument("--data", required=True, help="image shards to measure on (e.g. the held-out split)")
    ts.add_argument("--limit", type=int, default=32, help="images")
    ts.add_argument("--out", default=None, help="write the measurements as JSON")
    ts.set_defaults(func=_tower_spread)
    cv = kinds.add_parser("curve", help="window means of a logged metric per run, and the step a run left the "
                                        "prior (grounding: when it learned to look)")
    cv.add_argument("runs", nargs="+", help="run folders (or their metrics.jsonl)")
    cv.add_argument("--metric", default="lm_loss", help="a key of metrics.jsonl")
    cv.add_argument("--window", type=int, default=200, help="logged steps per window")
    cv.add_argument("--prior", default=None,
                    help="nats, or 'cells' for the grounding-cells answer prior: also print when the run left it")
    cv.set_defaults(func=_curve)


def main(argv=None) -> int:
    """``python -m conceptvlm.experiments.cli experiment run NAME`` (before the console script wires it)."""
    import sys

    parser = argparse.ArgumentParser(prog="conceptvlm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
