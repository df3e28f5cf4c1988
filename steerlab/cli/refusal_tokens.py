"""``steerlab refusal-tokens``: fine-tune a refusal-token guard on the pooled guard sources and save it (model +
calibrated threshold) for ``steerlab steer --calibrated DIR``."""

from __future__ import annotations

import argparse
from dataclasses import replace

from steerlab.cli import inputs
from steerlab.cli.args import UsageError, add_model_args, add_more_kinds_arg, positive_float, positive_int, scary_kinds


def _refusal_tokens(args: argparse.Namespace) -> int:
    from steerlab.data.guard_sets import SCARY_KINDS, guard_training_data
    from steerlab.interventions.token_guard import SETTINGS_FILE
    from steerlab.training.token_guard_fit import DEFAULT_CONFIG, fit_refusal_token_guard

    if not 0.0 < args.holdout < 1.0:
        raise UsageError(f"--holdout is a share of each source in (0, 1); got {args.holdout}")
    direction = inputs.load_direction(args.direction, args.layer, ablate=True)
    if args.layer is not None:
        direction = direction.select(args.layer)
    out = inputs.output_dir(args.out)
    data = guard_training_data(per_set=args.per_set, seed=args.seed, leave_out=args.leave_out, scary_kinds=scary_kinds(args) if args.more_kinds else SCARY_KINDS)  # bad names fail before loading
    model = inputs.load(args)
    config = replace(DEFAULT_CONFIG, epochs=args.epochs, max_steps=args.max_steps)
    fit = fit_refusal_token_guard(model, direction, data=data, holdout=args.holdout, answer_tokens=args.answer_tokens,
                                  config=config, batch_size=args.batch_size, seed=args.seed, progress=True)  # fmt: skip
    summary = fit.summary() | {"calibration_prompts": {"harmful": list(fit.calibration_prompts[0]), "harmless": list(fit.calibration_prompts[1])}}
    fit.guard.save(out, extra={"fit": summary, "command": " ".join(args.argv)})
    c = fit.calibration
    print(f"fine-tuned {fit.steps} steps on {fit.n_train[0]} harmful + {fit.n_train[1]} harmless prompts in {fit.seconds:.0f} s")
    print(f"threshold {fit.guard.threshold:.4g} (best balanced accuracy on {fit.n_calibration[0]} + {fit.n_calibration[1]} held-back prompts): "
          f"AUC {c['auc']:.3f}, TPR {c['tpr']:.3f}, FPR {c['fpr']:.3f}")  # fmt: skip
    print(f"wrote {out} (model and {SETTINGS_FILE}); use it with: steerlab steer --direction {args.direction} --calibrated {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("refusal-tokens", help="fine-tune a refusal-token guard (METHODS 5) and save it with its threshold")
    add_model_args(p, batch_size=16)
    p.add_argument("--direction", required=True, help="the refusal direction (ablated while the model writes the [respond] answers)")
    p.add_argument("--layer", type=int, default=None, help="the direction's vector to ablate (a multi-layer direction needs it)")
    p.add_argument("--out", required=True, help="output directory (the fine-tuned model and refusal_token_guard.json)")
    p.add_argument("--per-set", type=positive_int, default=20, help="prompts of each guard source (default 20)")
    p.add_argument("--holdout", type=positive_float, default=0.2, help="share of each source held back to calibrate the threshold")
    p.add_argument("--epochs", type=positive_float, default=1.5)
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimiser steps (overrides --epochs)")
    p.add_argument("--answer-tokens", type=positive_int, default=40, help="length of the [respond] answers the model writes")
    p.add_argument("--leave-out", nargs="+", default=[], metavar="SOURCE",
                   help="keep these sources out of the fine-tuning and calibration (a set such as harmbench, or a safe-but-scary kind)")
    add_more_kinds_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_refusal_tokens)
