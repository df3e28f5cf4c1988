"""ADA overhead in generation, against plain transformers ``generate()`` in the same process.

Rows (greedy, same prompts, same number of new tokens; medians of interleaved repetitions):

* baseline: ``model.generate`` (transformers ``generate`` on length-sorted batches);
* ADA loop, no checks: the generation loop's policy path alone (``model.generate(..., policy=guard)``
  with ``every`` larger than the generation: steerlab's cached step-by-step decoder);
* ADA-LP, check every N tokens (and at depth 0) with a probe at a middle layer that never fires, so
  every row generates the same tokens as the baseline (asserted).

Ratio = ADA time / baseline time (the issue's target: at most 1.15 at N = 25).

Run: ``python benchmarks/ada.py [--model NAME] [--dtype bfloat16] [--prompts 16] [--new-tokens 128] [--reps 3]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import steerlab
from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
from steerlab.interventions.ada import ADAGuard
from steerlab.probes import Probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    model = steerlab.load(args.model, dtype=getattr(torch, args.dtype))
    pool = DEMO_HARMLESS + DEMO_HARMFUL
    prompts = [pool[i % len(pool)] for i in range(args.prompts)]
    layer = model.n_layers // 2
    probe = Probe(weights=torch.zeros(1, model.d_model), bias=torch.tensor([-10.0]), layers=(layer,))  # never fires
    kw = dict(max_new_tokens=args.new_tokens, batch_size=args.batch_size)
    runs = {
        "baseline: transformers generate": lambda: model.generate(prompts, **kw),
        "ADA loop, no checks": lambda: [o.text for o in model.generate(prompts, policy=ADAGuard(probe=probe, every=10**9), **kw)],
        "ADA-LP, N=25": lambda: [o.text for o in model.generate(prompts, policy=ADAGuard(probe=probe, every=25), **kw)],
        "ADA-LP, N=5": lambda: [o.text for o in model.generate(prompts, policy=ADAGuard(probe=probe, every=5), **kw)],
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    reference = None
    for _ in range(args.reps):  # interleaved
        for name, fn in runs.items():
            t0 = time.perf_counter()
            texts = fn()
            times[name].append(time.perf_counter() - t0)
            if reference is None:
                reference = texts
            elif texts != reference:
                raise AssertionError(f"{name} generated different text from the baseline")
    base = statistics.median(times["baseline: transformers generate"])
    print(f"model {model.name} ({args.dtype}), {args.prompts} prompts x {args.new_tokens} new tokens, batch {args.batch_size}, probe layer {layer}, {args.reps} reps (medians)")
    print("| run | seconds | ratio vs baseline |")
    print("|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {t / base:.3f} |")


if __name__ == "__main__":
    main()
