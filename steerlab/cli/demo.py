"""``steerlab demo``: load a model, render a chat prompt, collect activations, print a per-layer summary."""

from __future__ import annotations

import argparse
import time

from steerlab.cli import inputs
from steerlab.cli.args import MODEL_HELP, positive_int


def _demo(args: argparse.Namespace) -> int:
    import steerlab
    from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
    from steerlab.probes.separation import class_separation

    t0 = time.perf_counter()
    model = inputs.open_model(args.model, "float32")
    print(
        f"loaded {model.name} ({model.spec.model_type}, {model.n_layers} layers, d={model.d_model}) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    fmt = model.chat()
    rendered = fmt.render(DEMO_HARMLESS[0])
    print("\nrendered chat prompt:\n" + rendered.text)
    print(f"post-instruction span (end of turn + assistant header): {fmt.suffix!r} = {len(fmt.header_ids)} tokens")

    prompts = DEMO_HARMFUL + DEMO_HARMLESS
    t0 = time.perf_counter()
    acts = steerlab.collect(
        model, prompts, sites=["resid_pre"], positions=["t_inst", "last"], batch_size=args.batch_size
    )
    print(f"collected resid_pre at t_inst and last for {len(prompts)} prompts in {time.perf_counter() - t0:.1f}s\n")

    rows = class_separation(acts, n_positive=len(DEMO_HARMFUL), site="resid_pre", positions=("t_inst", "last"))
    print("layer  |h| t_inst  |h| last  sep t_inst  sep last  cos(diff t_inst, diff last)")
    for r in rows:
        print(
            f"{r.layer:5d}  {r.norm[0]:10.2f}  {r.norm[1]:8.2f}  {r.separation[0]:10.3f}  {r.separation[1]:8.3f}  "
            f"{r.cosine:8.3f}"
        )
    print("\nsep = |mean(harmful) - mean(harmless)| / mean distance to class mean (higher: classes further apart)")
    return 0


def add_parser(sub) -> None:
    """The ``demo`` subcommand."""
    demo = sub.add_parser(
        "demo", help="load a model, render a chat prompt, collect activations, print a per-layer summary"
    )
    demo.add_argument("--model", default=None, help=MODEL_HELP)
    demo.add_argument("--batch-size", type=positive_int, default=8)
    demo.set_defaults(func=_demo)
