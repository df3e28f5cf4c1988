"""Activation collection throughput and hook overhead in generate(), against plain transformers.

Prints a table. Every row compares steerlab with the plain-transformers way of doing the same
thing, measured in the same process with interleaved repetitions (median of each):

* collection, all layers: ``steerlab.collect`` vs ``model(..., output_hidden_states=True)`` on the
  same padded batches, gathering the same positions (ratio = baseline time / steerlab time);
* collection, first half of the layers: same, steerlab stops the forward pass early;
* hook overhead: ``generate()`` with a no-op read hook on every layer vs no hooks
  (ratio = plain time / hooked time; 1.0 = no overhead).

Run: ``python benchmarks/collect.py [--model NAME] [--prompts N] [--reps R]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import steerlab
from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS


def _baseline_collect(model, prompts, layers, batch_size):
    """What a user writes with plain transformers: hidden states of every layer, then gather."""
    fmt = model.chat()
    kept = []
    for _, batch in fmt.batches(fmt.tokenize(prompts), batch_size):
        with torch.inference_mode():
            out = model.hf(**batch.model_inputs(), output_hidden_states=True, use_cache=False)
        idx = torch.cat([batch.index("t_inst"), batch.index("post_inst")], dim=1)
        r = torch.arange(len(batch))[:, None]
        kept.append(torch.stack([out.hidden_states[la][r, idx] for la in layers], dim=1).float())
    return kept


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = steerlab.load(args.model)
    pool = DEMO_HARMFUL + DEMO_HARMLESS
    prompts = [pool[i % len(pool)] + ("" if i < len(pool) else f" Keep it under {i} words.") for i in range(args.prompts)]
    n = model.n_layers
    rows = []
    for label, layers in (("all layers", list(range(n))), ("first half", list(range(n // 2)))):
        ours, base = [], []
        run_ours = lambda layers=layers: steerlab.collect(  # noqa: E731
            model, prompts, layers=layers, positions=["t_inst", "post_inst"], batch_size=args.batch_size, progress=False
        )
        run_base = lambda layers=layers: _baseline_collect(model, prompts, layers, args.batch_size)  # noqa: E731
        run_ours(), run_base()  # warm-up
        for _ in range(args.reps):
            ours.append(_timed(run_ours))
            base.append(_timed(run_base))
        b, o = statistics.median(base), statistics.median(ours)
        rows.append((f"collect resid_pre, {label} ({len(layers)})", b, o, b / o, f"{len(prompts) / o:.1f} prompts/s"))

    batch = model.encode(prompts[:4])
    gen_kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=args.new_tokens,
                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=model.tokenizer.eos_token_id)

    def plain():
        with torch.inference_mode():
            model.hf.generate(**gen_kwargs)

    def hooked():
        with model.hooks() as hooks:
            for layer in range(n):
                hooks.add("resid_post", layer, lambda x, ctx: None)
            with torch.inference_mode():
                model.hf.generate(**gen_kwargs)

    plain(), hooked()
    t_plain, t_hooked = [], []
    for _ in range(args.reps):
        t_plain.append(_timed(plain))
        t_hooked.append(_timed(hooked))
    p, h = statistics.median(t_plain), statistics.median(t_hooked)
    rows.append((f"generate {args.new_tokens} tok x4, no-op hook on {n} layers", p, h, p / h, f"{4 * args.new_tokens / h:.1f} tok/s"))

    print(f"\nmodel {model.name}, {model.dtype}, {torch.get_num_threads()} threads, {args.reps} interleaved reps, medians")
    print(f"| {'row':<48} | {'transformers s':>14} | {'steerlab s':>10} | {'ratio':>6} | {'throughput':>16} |")
    print(f"|{'-' * 50}|{'-' * 16}|{'-' * 12}|{'-' * 8}|{'-' * 18}|")
    for name, b, o, ratio, extra in rows:
        print(f"| {name:<48} | {b:14.2f} | {o:10.2f} | {ratio:6.2f} | {extra:>16} |")
    print("ratio = transformers time / steerlab time (higher is better; targets: >=1.2 all layers, >=1.6 first half, >=0.98 hooks)")


if __name__ == "__main__":
    main()
