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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``steerlab`` command."""
    parser = argparse.ArgumentParser(prog="steerlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="load a model, render a chat prompt, collect activations, print a per-layer summary")
    demo.add_argument("--model", default=None, help="embedded name, HF id/path or .gguf (default: the embedded Qwen)")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.set_defaults(func=_demo)
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
