"""steerlab vs TransformerLens vs nnsight vs plain transformers, in one process.

Two tasks, each done the way its framework documents it (and with its own speed options on):

* steer generate: greedy ``generate`` of ``--new-tokens`` tokens for ``--batch`` prompts, adding a
  vector to the residual stream entering layer ``n_layers // 2`` (prompt and generated tokens).
  plain = a torch forward pre-hook on that layer + ``hf.generate``; steerlab = ``model.apply(AddVector)``
  + ``hf.generate``; TransformerLens = ``bridge.hooks(fwd_hooks=[("blocks.L.hook_resid_pre", fn)])`` +
  ``bridge.generate`` (and ``bridge.hf_generate``; the faster one is reported); nnsight =
  ``lm.generate`` with ``layers[L].input`` edited at every step (``tracer.iter``).
* collect: the residual stream entering every layer (``resid_pre``), last token, ``--prompts``
  prompts in batches of ``--batch-size``. plain = ``output_hidden_states=True``; steerlab =
  ``steerlab.collect``; TransformerLens = ``run_with_cache(names_filter, stop_at_layer=n_layers,
  pos_slice=-1)``; nnsight = ``lm.trace`` saving ``layers[i].input[:, -1]``, then ``tracer.stop()``.

Every framework sees the same token ids (the chat template, left-padded, length-sorted batches);
steerlab's time includes its own tokenisation. ``steerlab.collect`` computes the tokens all prompts
share (the chat template's system turn) in its first batch only and reuses their keys and values
afterwards (``share_prefix``); ``steerlab.load`` keeps weights in fresh memory, not the checkpoint's
memory map. TransformerLens and nnsight each wrap their own copy of
the weights (both modify the modules they wrap; TL also switches attention to eager). Outputs are
checked against plain transformers before timing. Interleaved repetitions, medians; ratio = plain
time / framework time (higher is better; 1.0 = as fast as plain transformers).

Run: ``python benchmarks/peers.py [--reps R] [--prompts N] [--batch B] [--dtype float32]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import steerlab
from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
from steerlab.interop import to_bridge, to_language_model
from steerlab.steering import AddVector, Direction

FRAMEWORKS = ("plain transformers", "steerlab", "TransformerLens", "nnsight")


def _prompts(n: int) -> list[str]:
    pool = DEMO_HARMFUL + DEMO_HARMLESS
    return [pool[i % len(pool)] + ("" if i < len(pool) else f" Keep it under {i} words.") for i in range(n)]


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def steering_cases(model, bridge, lm, *, batch: int, new_tokens: int) -> dict[str, Callable[[], torch.Tensor]]:
    """One callable per framework: steered greedy generation, returning the new token ids."""
    layer = model.n_layers // 2
    vec = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 2.0
    direction = Direction(vectors=vec[None], layers=(layer,))
    enc = model.encode(_prompts(batch))
    ids, mask = enc.input_ids, enc.attention_mask
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    hf_kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad}
    width = ids.shape[1]
    v = vec.to(model.dtype)

    def plain() -> torch.Tensor:
        def pre(module, args, kwargs):
            if args:
                return (args[0] + v, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + v}

        handle = model.layer(layer).register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.inference_mode():
                return model.hf.generate(input_ids=ids, attention_mask=mask, **hf_kw)[:, width:]
        finally:
            handle.remove()

    def ours() -> torch.Tensor:
        with model.apply(AddVector(direction)), torch.inference_mode():
            return model.hf.generate(input_ids=ids, attention_mask=mask, **hf_kw)[:, width:]

    tl_hooks = [(f"blocks.{layer}.hook_resid_pre", lambda x, hook: x + v)]

    def tl_generate() -> torch.Tensor:
        with bridge.hooks(fwd_hooks=tl_hooks), torch.inference_mode():
            out = bridge.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, stop_at_eos=False,
                return_type="tokens", verbose=False,
            )  # fmt: skip
        return out[:, width:]

    def tl_hf_generate() -> torch.Tensor:
        with bridge.hooks(fwd_hooks=tl_hooks), torch.inference_mode():
            out = bridge.hf_generate(ids, attention_mask=mask, return_type="tokens", use_past_kv_cache=True, **hf_kw)
        return out[:, width:]

    def nn() -> torch.Tensor:
        with torch.inference_mode(), lm.generate({"input_ids": ids, "attention_mask": mask}, **hf_kw) as tracer:
            for _ in tracer.iter[:new_tokens]:
                block = lm.model.layers[layer]
                block.input = block.input + v
            out = tracer.result.save()
        return out[:, width:]

    return {
        "plain transformers": plain,
        "steerlab": ours,
        "TransformerLens": [tl_generate, tl_hf_generate],
        "nnsight": nn,
    }


def collect_cases(model, bridge, lm, *, prompts: list[str], batch_size: int) -> dict[str, Callable[[], torch.Tensor]]:
    """One callable per framework: [n_prompts, n_layers, d] resid_pre at the last token (in batch order)."""
    n = model.n_layers
    fmt = model.chat()
    batches = [b.to(model.device) for _, b in fmt.batches(fmt.tokenize(prompts), batch_size)]
    order = torch.tensor([j for idx, _ in fmt.batches(fmt.tokenize(prompts), batch_size) for j in idx])
    names = [f"blocks.{la}.hook_resid_pre" for la in range(n)]

    def plain() -> torch.Tensor:
        kept = []
        with torch.inference_mode():
            for b in batches:
                out = model.hf(**b.model_inputs(), output_hidden_states=True, use_cache=False)
                kept.append(torch.stack(out.hidden_states[:n], dim=1)[:, :, -1].float())
        return torch.cat(kept)

    def ours() -> torch.Tensor:
        acts = steerlab.collect(
            model, prompts, sites=["resid_pre"], positions=["last"], batch_size=batch_size, progress=False
        )
        return acts.get("resid_pre", "last")[order][:, :, 0]  # prompt order -> batch order, for the check

    def tl() -> torch.Tensor:
        kept = []
        with torch.inference_mode():
            for b in batches:
                _, cache = bridge.run_with_cache(
                    b.input_ids, attention_mask=b.attention_mask, names_filter=names, stop_at_layer=n, pos_slice=-1
                )
                kept.append(torch.stack([cache[name] for name in names], dim=1).reshape(len(b), n, -1).float())
        return torch.cat(kept)

    def nn() -> torch.Tensor:
        kept = []
        for b in batches:
            saved = []
            with (
                torch.inference_mode(),
                lm.trace({"input_ids": b.input_ids, "attention_mask": b.attention_mask}, use_cache=False) as tracer,
            ):
                for la in range(n):
                    saved.append(lm.model.layers[la].input[:, -1].save())
                tracer.stop()
            kept.append(torch.stack(saved, dim=1).float())
        return torch.cat(kept)

    return {"plain transformers": plain, "steerlab": ours, "TransformerLens": tl, "nnsight": nn}


def _same_tokens(out: torch.Tensor, base: torch.Tensor, eos: set[int]) -> bool:
    """Equal up to each row's first end-of-sequence token in either output (TL's own ``generate`` has
    no ``min_new_tokens``, so it may emit EOS where HF suppresses it; what follows then differs)."""
    for row_a, row_b in zip(out.tolist(), base.tolist()):
        for a, b in zip(row_a, row_b):
            if a in eos or b in eos:
                break
            if a != b:
                return False
    return True


def _check(task: str, outputs: dict[str, torch.Tensor], *, exact: bool, eos: set[int]) -> None:
    base = outputs["plain transformers"]
    for name, out in outputs.items():
        if exact:
            same = _same_tokens(out, base, eos) and out.shape == base.shape
        else:
            same = torch.allclose(out.float(), base.float(), atol=1e-3, rtol=1e-3)
        if not same:
            how = "tokens differ" if exact else f"max diff {float((out.float() - base.float()).abs().max()):.3g}"
            print(f"  note: {task}: {name} output differs from plain transformers ({how})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="prompts per generate() call")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=64, help="prompts to collect activations for")
    parser.add_argument("--batch-size", type=int, default=16, help="collection batch size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    model = steerlab.load(args.model, dtype=getattr(torch, args.dtype))
    bridge = to_bridge(model, copy=True)
    lm = to_language_model(model, copy=True)
    tasks = {
        f"steer generate: {args.batch} x {args.new_tokens} tok, +vector at layer {model.n_layers // 2}": (
            steering_cases(model, bridge, lm, batch=args.batch, new_tokens=args.new_tokens),
            True,
        ),
        f"collect resid_pre, all {model.n_layers} layers, last token, {args.prompts} prompts": (
            collect_cases(model, bridge, lm, prompts=_prompts(args.prompts), batch_size=args.batch_size),
            False,
        ),
    }
    eos_ids = model.hf.generation_config.eos_token_id
    eos = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) | {model.tokenizer.eos_token_id}
    rows = []
    for task, (cases, exact) in tasks.items():
        flat = {}
        for name, fn in cases.items():
            for k, f in enumerate(fn if isinstance(fn, list) else [fn]):
                flat[(name, k)] = f
        outputs = {key: f() for key, f in flat.items()}  # warm-up and correctness
        labelled = {f"{n}[{k}]" if k else n: o for (n, k), o in outputs.items()}
        _check(task, labelled, exact=exact, eos=eos)
        times: dict = {key: [] for key in flat}
        for _ in range(args.reps):
            for key, f in flat.items():
                times[key].append(_timed(f))
        medians = {key: statistics.median(ts) for key, ts in times.items()}
        best = {name: min(m for (n, _), m in medians.items() if n == name) for name in cases}
        rows.append((task, best))

    print(
        f"\nmodel {model.name}, {args.dtype}, {torch.get_num_threads()} threads, {args.reps} interleaved reps, medians"
    )
    print("ratio = plain transformers time / framework time (higher is better; 1.00 = as fast as plain transformers)\n")
    print(f"| {'task':<62} | {'framework':<18} | {'seconds':>8} | {'ratio vs plain':>14} |")
    print(f"|{'-' * 64}|{'-' * 20}|{'-' * 10}|{'-' * 16}|")
    for task, best in rows:
        base = best["plain transformers"]
        for name in FRAMEWORKS:
            print(f"| {task:<62} | {name:<18} | {best[name]:8.2f} | {base / best[name]:14.2f} |")
    for task, best in rows:
        peer = min(best["TransformerLens"], best["nnsight"])
        print(f"steerlab vs fastest peer ({task.split(':')[0]}): {peer / best['steerlab']:.2f}x")


if __name__ == "__main__":
    main()
