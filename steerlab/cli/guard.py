"""``steerlab guard``: score prompts with a saved or freshly fitted latent-space guard and flag harmful ones."""

from __future__ import annotations

import argparse
from pathlib import Path

from steerlab.cli import inputs
from steerlab.cli.args import (
    UsageError,
    add_model_args,
    add_more_kinds_arg,
    add_prompt_args,
    finite_float,
    int_at_least,
    non_negative_int,
    position,
    scary_kinds,
)


def _check_options(args: argparse.Namespace, path: Path | None) -> str:
    """The guard mode (``probe`` or ``latent``) after checking the options against each other and the file."""
    from steerlab.probes.fitting import saved_guard_kind

    if path is not None:
        mode = saved_guard_kind(path)
        if args.mode is not None and args.mode != mode:
            raise UsageError(
                f"{path} holds a {mode} guard but --mode {args.mode} was given; drop --mode or pass another file"
            )
    else:
        mode = args.mode or "probe"
    if args.save_to and path is not None:
        raise UsageError("--save writes a freshly fitted guard; it cannot be combined with --probe")
    if args.leave_out and path is not None:
        raise UsageError("--leave-out keeps sources out of a freshly fitted guard; it cannot be combined with --probe")
    if args.more_kinds and path is not None:
        raise UsageError("--more-kinds adds prompts to a freshly fitted guard's pool; it cannot be combined with --probe")
    if args.save_to and Path(args.save_to).expanduser().is_dir():
        raise UsageError(f"--save {args.save_to} is a directory; pass a file name such as guard.safetensors")
    if args.save_to:
        inputs.check_parent(Path(args.save_to).expanduser(), "--save file")
    return mode


def _guard(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from steerlab.data.fingerprints import training_record
    from steerlab.probes import LatentGuard, ProbeGuard
    from steerlab.probes.fitting import describe_guard, fit_guard

    prompts = inputs.gather_prompts(args)
    path = inputs.existing_file(args.probe, "guard")
    mode = _check_options(args, path)
    model = inputs.load(args)
    if path is not None:
        kind = ProbeGuard if mode == "probe" else LatentGuard
        if kind is ProbeGuard:
            guard = inputs.read_saved(path, "steerlab ProbeGuard", lambda f: ProbeGuard.load(f, model=model, threshold=args.threshold))
        else:
            guard = inputs.read_saved(path, "steerlab LatentGuard", lambda f: LatentGuard.load(f, model=model))
    else:
        guard = fit_guard(model, mode=mode, position=args.position, layers=args.layers, n_train=args.n_train,
                          seed=args.seed, batch_size=args.batch_size, calibrate=args.threshold is None, progress=True,
                          log=inputs.log, leave_out=args.leave_out, scary_kinds=scary_kinds(args))  # fmt: skip
    if args.threshold is not None:
        guard = replace(guard, threshold=args.threshold)
    if args.save_to:
        Path(args.save_to).expanduser().parent.mkdir(parents=True, exist_ok=True)
        guard.save(args.save_to)
        inputs.log(f"saved the guard to {args.save_to}")
    scores = guard.score(prompts, batch_size=args.batch_size, progress=True)
    record = training_record(guard)
    seen = record.seen(prompts).tolist() if record is not None else [False] * len(prompts)
    print(describe_guard(guard))
    print(f"{'score':>8}  {'flag':<4}  prompt")
    for prompt, score, was_seen in zip(prompts, scores.tolist(), seen):
        print(f"{score:>8.4f}  {'yes' if score >= guard.threshold else 'no':<4}  {'* ' if was_seen else ''}{inputs.short(prompt)}")
    print(f"flagged {int((scores >= guard.threshold).sum())} of {len(prompts)}")
    if any(seen):
        print(f"* {sum(seen)} of these prompts are ones the guard was fitted on: their scores are in-sample, not a test of the guard")
    elif record is None:
        inputs.log("this guard does not record the prompts it was fitted on, so in-sample prompts cannot be marked")
    return 0


def add_parser(sub) -> None:
    """The ``guard`` subcommand."""
    p = sub.add_parser("guard", help="score prompts with a latent-space guard and flag harmful ones",
                       description="Score prompts with a saved guard (--probe FILE: a probe from `steerlab probe` or a saved "
                                   "ProbeGuard/LatentGuard), or fit one on the pooled prompt sets (--fit, the default): a probe "
                                   "at the end of the chat template, its layer and threshold chosen with whole sources held out.")  # fmt: skip
    add_model_args(p)
    add_prompt_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--probe", default=None, metavar="FILE", help="a saved Probe, ProbeGuard or LatentGuard (.safetensors)"
    )
    src.add_argument("--fit", action="store_true", help="fit a guard on the pooled prompt sets (the default)")
    p.add_argument(
        "--mode",
        choices=["latent", "probe"],
        default=None,
        help="LatentGuard (cosine rule) or ProbeGuard (default: probe)",
    )
    p.add_argument(
        "--threshold",
        type=finite_float,
        default=None,
        help="flag when score >= this (default: the saved or calibrated one)",
    )
    p.add_argument("--position", type=position, default=None,
                   help="where a fitted guard reads (default: for a probe guard the better of t_inst and last across held-out "
                        "sources and kinds; t_inst for a latent guard)")  # fmt: skip
    p.add_argument(
        "--layers",
        nargs="+",
        type=int,
        default=None,
        help="fitted guard layers (probe: the layers it chooses among, one layer: exactly it; default: every layer, "
             "choosing the set with the best AUC with whole sources and kinds held out / latent: all)",
    )
    p.add_argument(
        "--n-train",
        type=int_at_least(5),
        default=120,
        help="--fit: at most this many prompts from each training set (steerlab's and the packaged public ones)",
    )
    # dest is not "save": nnsight (when imported) gives every object a .save method, which argparse then
    # mistakes for an already-set value and never fills in the default
    p.add_argument("--save", dest="save_to", default=None, metavar="FILE", help="save the fitted guard here")
    p.add_argument("--leave-out", nargs="+", default=[], metavar="SOURCE",
                   help="--fit: keep these sources out of the training pool (a set such as harmbench, or a safe-but-scary kind)")
    add_more_kinds_arg(p)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.set_defaults(func=_guard)
