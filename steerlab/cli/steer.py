"""``steerlab steer`` and ``steerlab export``: a saved direction added or ablated, as a hook or baked into weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from steerlab.cli import gate, inputs
from steerlab.cli.args import add_model_args, add_prompt_args, finite_float, non_negative_float, positive_int


def strength(text: str) -> float:
    """An ablation strength in (0, 1]."""
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _edit(args: argparse.Namespace, direction):
    """The Ablate (``--ablate``) or AddVector (``--coeff``, ``--layer``, ``--unit``) edit of the direction."""
    from steerlab.training.deploy import direction_edit

    if args.ablate:  # --unit only scales an added vector: an ablation projects out the unit direction anyway
        return direction_edit(direction, ablate=True, coeff=None, layer=args.layer, unit=False)
    return direction_edit(direction, ablate=False, coeff=args.coeff, layer=args.layer, unit=args.unit)


def _label(args: argparse.Namespace, direction) -> str:
    """What the edit does, for the first output line."""
    if args.ablate:
        layer = args.layer if args.layer is not None else direction.layers[0]
        return f"direction ablated (vector of layer {layer}, every layer)"
    shown = list(direction.layers) if args.layer is None else [args.layer]
    return f"direction added x{args.coeff:g}{' (unit)' if args.unit else ''} at layer(s) {shown}"


def _calibrated(args: argparse.Namespace, prompts: list[str]) -> int:
    """``--calibrated GUARD``: per prompt, the guard's score picks refusal added, removed, or left alone."""
    from steerlab.cli.args import UsageError
    from steerlab.interventions.gated import GatedRefusal
    from steerlab.probes import ProbeGuard
    from steerlab.probes.fitting import describe_guard

    if args.low is not None or args.high is not None:
        if args.low is None or args.high is None or args.band or args.band_below is not None or args.band_above is not None:
            raise UsageError("--low and --high give the band's two cuts together (steerlab calibrate prints them); leave out --band*")
        if args.low > args.high:
            raise UsageError(f"--low {args.low:g} exceeds --high {args.high:g}")
    if args.floor is not None and (args.low is None or args.floor > args.low):
        raise UsageError("--floor needs --low and --high, and must not exceed --low (comply acts on floor <= score < low)")
    gate.check_guard_spec(args.calibrated, args.tau)
    direction = inputs.load_direction(args.direction, args.layer, ablate=True)
    model = inputs.load(args)
    guard = gate.open_guard(args.calibrated, tau=args.tau, model=model, dtype=args.dtype)
    if args.low is not None:
        low, high = args.low, args.high
    else:
        below = args.band if args.band_below is None else args.band_below
        above = args.band if args.band_above is None else args.band_above
        low, high = guard.threshold - below, guard.threshold + above
        if isinstance(guard, ProbeGuard) and not (0.0 <= low and high <= 1.0):
            raise UsageError(f"the band [{low:.3g}, {high:.3g}) around the threshold {guard.threshold:.3g} leaves [0, 1]; use a smaller band")
    refuse, comply, source = gate.branches(args, direction, [args.ablate_strength])
    comply = comply[f"ablate{args.ablate_strength:g}"]
    gated = GatedRefusal(guard, refuse=refuse, comply=comply, low=low, high=high, floor=args.floor)
    gen = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "progress": True}
    before = model.generate(prompts, **gen)
    after = model.generate(prompts, policy=gated, **gen)
    below = f"score < {low:.4g}" if args.floor is None else f"{args.floor:.4g} <= score < {low:.4g}"
    print(f"calibrated refusal: {describe_guard(guard)}; score >= {high:.4g}: refusal direction added x{args.refuse_coeff:g} "
          f"at layer {source}; {below}: ablated x{args.ablate_strength:g} (vector of layer {source}); otherwise unchanged\n")  # fmt: skip
    for prompt, b, out in zip(prompts, before, after):
        print(f"prompt: {prompt}\n  score {out.score:.4f} -> {out.action}\n  before: {inputs.short(b, 200)}\n  "
              f"after:  {inputs.short(out.text, 200)}\n")  # fmt: skip
    counts = {a: sum(o.action == a for o in after) for a in ("refuse", "comply", "leave")}
    print(f"refuse {counts['refuse']}, comply {counts['comply']}, unchanged {counts['leave']} of {len(prompts)}")
    return 0


def _steer(args: argparse.Namespace) -> int:
    prompts = inputs.gather_prompts(args)
    if args.calibrated is not None:
        return _calibrated(args, prompts)
    direction = inputs.load_direction(args.direction, args.layer, ablate=args.ablate)
    model = inputs.load(args)
    op = _edit(args, direction)
    gen = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "progress": True}
    before = model.generate(prompts, **gen)
    with model.apply(op):
        after = model.generate(prompts, **gen)
    print(f"steering: {_label(args, direction)}\n")
    for prompt, a, b in zip(prompts, before, after):
        print(f"prompt: {prompt}\n  before: {inputs.short(a, 200)}\n  after:  {inputs.short(b, 200)}\n")
    return 0


def _control_vector(args: argparse.Namespace, direction, model) -> int:
    """``--format control-vector``: the AddVector as a llama.cpp control vector (nothing baked)."""
    from steerlab.backends.llamacpp import write_control_vector

    path = write_control_vector(model.plan(_edit(args, direction)), Path(args.out) / "control_vector.gguf", model=model)
    print(f"wrote {path} (llama.cpp control vector, {_label(args, direction)}); use it with llama.cpp's "
          f"--control-vector {path}")  # fmt: skip
    return 0


def _export(args: argparse.Namespace) -> int:
    from steerlab.training.deploy import bake_and_export

    inputs.output_dir(args.out)
    direction = inputs.load_direction(args.direction, args.layer, ablate=args.ablate)
    model = inputs.load(args)
    if args.format == "control-vector":
        return _control_vector(args, direction, model)
    manifest = {"command": "steerlab export", "direction_file": str(Path(args.direction).resolve())}
    info = bake_and_export(model, _edit(args, direction), Path(args.out), format=args.format, precision=args.precision,
                           tol=args.tol, manifest=manifest, log=inputs.log)  # fmt: skip
    rep = info["parity"]
    print(f"max |logit diff| (hooked vs baked, {rep['n_prompts']} prompts): {rep['max_abs_logit_diff']:.3g}")
    print(f"greedy {rep['max_new_tokens']}-token generations identical: {rep['generation_match']:.0%}")
    print(f"wrote {info['path']} ({args.format}); load it with transformers' AutoModelForCausalLM.from_pretrained")
    return 0


def add_steer_parser(sub) -> None:
    """The ``steer`` subcommand."""
    p = sub.add_parser("steer", help="generate with a saved direction added or ablated; print before and after")
    add_model_args(p, batch_size=8)
    add_prompt_args(p)
    p.add_argument("--direction", required=True, help="a saved Direction (.safetensors)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--coeff", type=finite_float, help="add coeff x the direction (AddVector)")
    how.add_argument("--ablate", action="store_true", help="project the direction out everywhere (Ablate)")
    how.add_argument("--calibrated", metavar="GUARD", default=None,
                     help="calibrated refusal: a saved guard (steerlab probe / guard --save), or the directory of a "
                          "model fine-tuned with [refuse]/[respond] tokens (steerlab refusal-tokens), scores each prompt; likely "
                          "harmful -> the direction added (--refuse-coeff), likely safe -> ablated, --band in between -> "
                          "unchanged")  # fmt: skip
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="AddVector: the layer to add at; Ablate: whose vector (default: the direction's)",
    )
    p.add_argument("--unit", action="store_true", help="AddVector: scale the vector to norm 1 first")
    p.add_argument("--refuse-coeff", type=finite_float, default=1.0, help="--calibrated: coefficient on the harmful side")
    p.add_argument("--tau", type=finite_float, default=None,
                   help="--calibrated MODEL_DIR: flag when the fine-tuned model's P([refuse]) >= tau (default: the saved one)")
    p.add_argument("--ablate-strength", type=strength, default=1.0,
                   help="--calibrated: share of the direction removed on the safe side (0 < s <= 1)")
    p.add_argument("--band", type=non_negative_float, default=0.0,
                   help="--calibrated: half-width of the leave-alone band around the guard's threshold (score units)")  # fmt: skip
    p.add_argument("--band-below", type=non_negative_float, default=None, help="--calibrated: the band's lower side (default --band)")
    p.add_argument("--band-above", type=non_negative_float, default=None, help="--calibrated: the band's upper side (default --band)")
    p.add_argument("--low", type=finite_float, default=None, help="--calibrated: the band's lower cut (absolute; with --high)")
    p.add_argument("--high", type=finite_float, default=None, help="--calibrated: the band's upper cut (absolute; with --low)")
    p.add_argument("--floor", type=finite_float, default=None,
                   help="--calibrated: leave prompts scoring below this alone (ablate only on floor <= score < --low)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.set_defaults(func=_steer)


def add_export_parser(sub) -> None:
    """The ``export`` subcommand."""
    p = sub.add_parser("export", help="bake a direction into the weights, check parity with the hook, export",
                       description="Bake Ablate (--ablate) or AddVector (--coeff X [--layer L]) of a saved direction into a copy "
                                   "of the weights, compare its logits with the runtime hook on a few prompts, and export a "
                                   "directory plain transformers loads (safetensors or GGUF) with steerlab_manifest.json.")  # fmt: skip
    add_model_args(p, dtype=True, batch_size=16)
    p.add_argument("--direction", required=True, help="a saved Direction (.safetensors)")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument(
        "--format",
        choices=["safetensors", "gguf", "control-vector"],
        default="safetensors",
        help="control-vector: AddVector as a llama.cpp --control-vector GGUF (an ablation cannot be one)",
    )
    p.add_argument("--precision", choices=["f32", "f16"], default="f32", help="GGUF tensor precision")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--ablate", action="store_true", help="bake the direction's ablation (Ablate)")
    how.add_argument("--coeff", type=finite_float, help="bake coeff x the direction added at --layer (AddVector)")
    p.add_argument(
        "--layer", type=int, default=None, help="AddVector: the layer; Ablate: whose vector (default: the direction's)"
    )
    p.add_argument("--unit", action="store_true", help="AddVector: scale the vector to norm 1 first")
    p.add_argument(
        "--tol", type=non_negative_float, default=1e-2, help="largest allowed logit difference, baked vs hooked"
    )
    p.set_defaults(func=_export)
