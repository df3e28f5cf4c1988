"""Steering overhead in generate(): AddVector (one layer) and Ablate (every layer, 3 sites) vs plain.

Same process, interleaved repetitions, medians; ratio = plain time / steered time (1.0 = free).
Run: ``python benchmarks/steering.py [--model NAME] [--reps R] [--dtype bfloat16]``
"""

from __future__ import annotations

import argparse
import time

import torch
from tables import median_table

import steerlab
from steerlab.data import DEMO_HARMLESS
from steerlab.steering import Ablate, AddVector, Direction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    model = steerlab.load(args.model, dtype=getattr(torch, args.dtype))
    direction = Direction(vectors=torch.randn(1, model.d_model) * 0.01, layers=(model.n_layers // 2,))
    batch = model.encode(DEMO_HARMLESS[: args.batch])
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=model.tokenizer.eos_token_id)

    def run(op=None):
        def go():
            with torch.inference_mode():
                model.hf.generate(**kw)
        if op is None:
            return go
        def steered():
            with model.apply(op):
                go()
        return steered

    cases = {"plain": run(), "AddVector (1 layer)": run(AddVector(direction, coeff=1.0)), f"Ablate ({3 * model.n_layers} hooks)": run(Ablate(direction))}
    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(args.reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    median_table(f"model {model.name}, {args.dtype}, batch {args.batch} x {args.new_tokens} new tokens, {args.reps} "
                 "interleaved reps, medians", times, base="plain", unit="seconds", faster="lower")  # fmt: skip


if __name__ == "__main__":
    main()
