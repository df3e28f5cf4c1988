"""The ``steerlab`` command. ``steerlab demo`` runs the main job on the embedded default model.

Example:
    $ steerlab demo --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import sys
import time

from steerlab.errors import SteerlabError


def _demo(args: argparse.Namespace) -> int:
    import torch

    import steerlab
    from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS

    t0 = time.perf_counter()
    model = steerlab.load(args.model)
    print(f"loaded {model.name} ({model.spec.model_type}, {model.n_layers} layers, d={model.d_model}) "
          f"in {time.perf_counter() - t0:.1f}s")
    fmt = model.chat()
    rendered = fmt.render(DEMO_HARMLESS[0])
    print("\nrendered chat prompt:\n" + rendered.text)
    print(f"post-instruction span (end of turn + assistant header): {fmt.suffix!r} = {len(fmt.header_ids)} tokens")

    prompts = DEMO_HARMFUL + DEMO_HARMLESS
    t0 = time.perf_counter()
    acts = steerlab.collect(model, prompts, sites=["resid_pre"], positions=["t_inst", "last"], batch_size=args.batch_size)
    print(f"collected resid_pre at t_inst and last for {len(prompts)} prompts in {time.perf_counter() - t0:.1f}s\n")

    n = len(DEMO_HARMFUL)
    print("layer  |h| t_inst  |h| last  sep t_inst  sep last  cos(diff t_inst, diff last)")
    for j, layer in enumerate(acts.layers):
        row = []
        diffs = []
        for pos in ("t_inst", "last"):
            x = acts.get("resid_pre", pos)[:, j, 0].double()
            diff = x[:n].mean(0) - x[n:].mean(0)
            spread = torch.cat([x[:n] - x[:n].mean(0), x[n:] - x[n:].mean(0)]).norm(dim=-1).mean()
            sep = (diff.norm() / spread).item() if spread > 0 else 0.0  # layer 0: one token, one embedding
            row.append((x.norm(dim=-1).mean().item(), sep))
            diffs.append(diff)
        cos = torch.nn.functional.cosine_similarity(diffs[0], diffs[1], dim=0, eps=1e-12).item()
        print(f"{layer:5d}  {row[0][0]:10.2f}  {row[1][0]:8.2f}  {row[0][1]:10.3f}  {row[1][1]:8.3f}  {cos:8.3f}")
    print("\nsep = |mean(harmful) - mean(harmless)| / mean distance to class mean (higher: classes further apart)")
    return 0


def _refusal(args: argparse.Namespace) -> int:
    import json
    import random
    from pathlib import Path

    import torch

    import steerlab
    from steerlab.data import advbench, load_split
    from steerlab.steering.evaluate import evaluate_refusal_direction
    from steerlab.steering.refusal import refusal_direction

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = load_split(seed=args.seed)
    fit_model = steerlab.load(args.model, dtype=torch.float32)
    run_model = steerlab.load(args.model, dtype=getattr(torch, args.eval_dtype))
    print(f"[{time.perf_counter() - t0:6.0f}s] loaded {run_model.name}: fit in float32, select and generate in {args.eval_dtype}")
    direction, report = refusal_direction(
        run_model, split.harmful_train, split.harmless_train, harmful_val=split.harmful_val,
        harmless_val=split.harmless_val, filter_train=args.filter, fit_model=fit_model, kl_max=args.kl_max,
        induce_min=args.induce_min, induce_coeff=args.coeff, batch_size=args.batch_size,
    )
    del fit_model
    direction.save(out / "refusal_direction.safetensors")
    chosen = report.chosen
    print(f"[{time.perf_counter() - t0:6.0f}s] selected position {chosen.position}, layer {chosen.layer}\n{report.table()}")

    held_out = advbench()
    random.Random(args.seed).shuffle(held_out)
    result = evaluate_refusal_direction(
        run_model, direction, harmful=held_out[: args.n_eval], harmless=split.harmless_test,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, coeff=args.coeff,
    )
    print(f"[{time.perf_counter() - t0:6.0f}s] held-out evaluation (greedy, {args.max_new_tokens} new tokens):\n{result.as_table()}")
    (out / "report.json").write_text(json.dumps({"selection": report.to_dict(), "evaluation": result.to_dict()}, indent=1))
    report.heatmap().write_html(out / "selection.html", include_plotlyjs="cdn")
    print(f"wrote {out}/refusal_direction.safetensors, report.json, selection.html")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``steerlab`` command."""
    parser = argparse.ArgumentParser(prog="steerlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="load a model, render a chat prompt, collect activations, print a per-layer summary")
    demo.add_argument("--model", default=None, help="embedded name, HF id/path or .gguf (default: the embedded Qwen)")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.set_defaults(func=_demo)
    ref = sub.add_parser("refusal", help="fit and select the refusal direction, evaluate ablation and addition")
    ref.add_argument("--model", default=None, help="embedded name, HF id/path or .gguf (default: the embedded Qwen)")
    ref.add_argument("--out", default="runs/refusal", help="output directory")
    ref.add_argument("--n-eval", type=int, default=100, help="held-out AdvBench prompts to generate on")
    ref.add_argument("--max-new-tokens", type=int, default=64)
    ref.add_argument("--filter", choices=["score", "judge", "none"], default="judge", help="training-prompt filter")
    # METHODS 1 filters at KL < 0.1 on validation; with 32 validation prompts a pick at 0.098 measured 0.140 on
    # held-out harmless prompts, so the main job keeps a margin (pick at 0.046 -> 0.066 held out).
    ref.add_argument("--kl-max", type=float, default=0.05, help="KL filter on validation (METHODS 1: 0.1)")
    ref.add_argument("--induce-min", type=float, default=0.0)
    # METHODS 1 adds the raw difference of means (coefficient 1). On the 0.5B Qwen no candidate lifts the mean
    # harmless refusal score above 0 at coefficient 1 (best -0.54: position -1, layer 18), while 2 does (+1.11);
    # experiments/refusal_candidate_grid.py prints the grid.
    ref.add_argument("--coeff", type=float, default=2.0, help="addition coefficient (induce filter and evaluation)")
    ref.add_argument("--eval-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ref.add_argument("--batch-size", type=int, default=16)
    ref.add_argument("--seed", type=int, default=0)
    ref.set_defaults(func=_refusal)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``steerlab`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SteerlabError as exc:
        print(f"steerlab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
