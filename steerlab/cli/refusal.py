"""``steerlab refusal``: fit and select the refusal direction, evaluate ablation and addition, optionally export."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from steerlab.cli import inputs
from steerlab.cli.args import (
    MODEL_HELP,
    UsageError,
    finite_float,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from steerlab.steering.refusal import MIN_REFUSAL_RATE


def _refusal(args: argparse.Namespace) -> int:
    from steerlab.data import advbench
    from steerlab.eval.refusal_run import run_refusal
    from steerlab.training.deploy import ParityError

    t0 = time.perf_counter()
    out = inputs.output_dir(args.out)
    if args.export:
        inputs.output_dir(args.export)
    held_out = advbench()
    if args.n_eval > len(held_out):
        raise UsageError(
            f"--n-eval {args.n_eval} is more than the {len(held_out)} AdvBench prompts; pass at most {len(held_out)}"
        )
    export_to = None if args.export is None else Path(args.export) if args.export else out / "model"
    run = run_refusal(
        load=lambda dtype: inputs.open_model(args.model, dtype), out=out, held_out=held_out, n_eval=args.n_eval,
        eval_dtype=args.eval_dtype, filter_train=args.filter, kl_max=args.kl_max, induce_min=args.induce_min,
        coeff=args.coeff, min_refusal_rate=args.min_refusal_rate, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed, argv=args.argv, export_to=export_to,
        export_format=args.export_format, tol=args.tol, manifest={"command": "steerlab refusal --export"},
        log=lambda message: print(f"[{time.perf_counter() - t0:6.0f}s] {message}"), export_log=inputs.log,
    )  # fmt: skip
    status = 0
    if run.export_error is not None:  # the reports are written; the missing export is the non-zero exit
        status = inputs.report_error(run.export_error, 1 if isinstance(run.export_error, ParityError) else 2)
    print(f"wrote {out}/refusal_direction.safetensors, report.json, report.html, selection.html, plotly.min.js")
    return status


def add_parser(sub) -> None:
    """The ``refusal`` subcommand."""
    ref = sub.add_parser("refusal", help="fit and select the refusal direction, evaluate ablation and addition")
    ref.add_argument("--model", default=None, help=MODEL_HELP)
    ref.add_argument("--out", default="runs/refusal", help="output directory")
    ref.add_argument("--n-eval", type=positive_int, default=100, help="held-out AdvBench prompts to generate on")
    ref.add_argument("--max-new-tokens", type=positive_int, default=64)
    ref.add_argument("--filter", choices=["score", "judge", "none"], default="judge", help="training-prompt filter")
    # METHODS 1 filters at KL < 0.1 on validation; with 32 validation prompts a pick at 0.098 measured 0.140 on
    # held-out harmless prompts, so the main job keeps a margin (pick at 0.046 -> 0.066 held out).
    ref.add_argument("--kl-max", type=positive_float, default=0.05, help="KL filter on validation (METHODS 1: 0.1)")
    ref.add_argument(
        "--induce-min", type=finite_float, default=0.0, help="induce filter: mean refusal score above this"
    )
    # METHODS 1 adds the raw difference of means (coefficient 1). On the 0.5B Qwen no candidate lifts the mean
    # harmless refusal score above 0 at coefficient 1 (best -0.54: position -1, layer 18), while 2 does (+1.11);
    # experiments/refusal_candidate_grid.py prints the grid.
    ref.add_argument(
        "--coeff", type=positive_float, default=2.0, help="addition coefficient (induce filter and evaluation)"
    )
    ref.add_argument("--eval-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ref.add_argument("--batch-size", type=positive_int, default=16)
    ref.add_argument("--seed", type=non_negative_int, default=0)
    ref.add_argument(
        "--min-refusal-rate",
        type=fraction,
        default=MIN_REFUSAL_RATE,
        help="stop early unless the model refuses at least this fraction of the harmful validation prompts "
        f"(default {MIN_REFUSAL_RATE}; 0 skips the check)",
    )
    ref.add_argument(
        "--export",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="also bake the direction's ablation into float32 weights and export them (default DIR: <out>/model)",
    )
    ref.add_argument("--export-format", choices=["safetensors", "gguf"], default="safetensors")
    ref.add_argument(
        "--tol",
        type=non_negative_float,
        default=1e-2,
        help="largest allowed logit difference, baked vs hooked (export only)",
    )
    ref.set_defaults(func=_refusal)
