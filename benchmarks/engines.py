"""Engine steering overhead, each against the plain engine in the same run, same prompts.

* llama.cpp: the model exported once as an f32 GGUF, AddVector(random unit direction, coeff) at the middle layer
  as a control vector; ``llama-completion`` runs interleaved with and without it, reading llama.cpp's own decode
  speed ("eval time ... tokens per second"). ratio = steered tokens/s / plain tokens/s (1.0 = free).
* vLLM (``--engines vllm``, in the engines venv): one batch of prompts x new tokens (EOS ignored), plain, every
  row steered, and half the rows steered; then the same batches through steerlab's HF hooks (``model.generate``
  with ``model.apply``), for the ratio of the two backends. Throughput = generated tokens / wall time.

Run: ``python benchmarks/engines.py [--engines llama.cpp vllm] [--reps R] [--new-tokens N]`` (``make llama-cpp``,
``make engines`` first; ``.venv-engines/bin/python`` for vLLM).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tables import median_table

import steerlab
from steerlab.backends.llamacpp import run_llama_completion, write_control_vector
from steerlab.data import DEMO_HARMLESS, past_tense_harmless
from steerlab.steering import AddVector, Direction
from steerlab.training.gguf_export import write_gguf

SPEED = re.compile(r"([\d.]+) tokens per second")


def tokens_per_second(binary: Path, model: Path, text: str, n: int, vector: Path | None) -> float:
    out = run_llama_completion(binary, model, text, n_tokens=n, control_vector=vector, ignore_eos=True)
    lines = [line for line in out.stderr.splitlines() if "eval time" in line and "prompt eval" not in line]
    found = SPEED.search(lines[-1]) if lines else None
    if found is None:
        raise RuntimeError(f"no decode 'eval time' line in llama.cpp's output:\n{out.stderr[-1500:]}")
    return float(found.group(1))


def vllm_rows(model, direction: Direction, args: argparse.Namespace) -> None:
    """vLLM plain / all steered / half steered, and steerlab's HF hooks plain / steered, tokens per second."""
    from steerlab.backends.vllm import VLLMEngine

    add = AddVector(direction, coeff=args.coeff, unit=True)
    prompts = past_tense_harmless()[: args.batch]  # distinct prompts: no prefix-cache hits between them
    n = len(prompts) * args.new_tokens
    engine = VLLMEngine(model, {"add": add})
    engine.generate(prompts[:2], max_new_tokens=4)  # warm-up
    cases = {
        "vLLM plain": lambda: engine.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True),
        "vLLM all steered": lambda: engine.generate(prompts, steer="add", max_new_tokens=args.new_tokens, ignore_eos=True),
        "vLLM half steered": lambda: engine.generate(
            prompts, steer=["add", None] * (len(prompts) // 2) + ["add"] * (len(prompts) % 2),
            max_new_tokens=args.new_tokens, ignore_eos=True),
    }  # fmt: skip
    speeds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            speeds[name].append(n / (time.perf_counter() - start))
    hf = {"steerlab HF plain": None, "steerlab HF steered": add}
    hf_kw = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "batch_size": args.batch}
    for name, iv in hf.items():
        speeds[name] = []
        for _ in range(max(1, args.reps // 2)):
            start = time.perf_counter()
            if iv is None:
                model.generate(prompts, **hf_kw)
            else:
                with model.apply(iv):
                    model.generate(prompts, **hf_kw)
            speeds[name].append(n / (time.perf_counter() - start))
    median_table(f"vLLM {model.name} f32 (eager, CPU), batch {len(prompts)} x {args.new_tokens} tokens, {args.reps} "
                 "reps, medians of generated tokens/s", speeds, base="vLLM plain", unit="tokens/s")  # fmt: skip
    ratio = statistics.median(speeds["vLLM all steered"]) / statistics.median(speeds["steerlab HF steered"])
    print(f"vLLM steered / steerlab-on-HF steered: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--engines", nargs="+", choices=["llama.cpp", "vllm"], default=["llama.cpp"])
    parser.add_argument("--llama-cpp", default=os.environ.get("STEERLAB_LLAMA_CPP",
                        str(Path.home() / ".cache/steerlab/llama.cpp-11434.0.0")))  # fmt: skip
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="llama.cpp: prompts, one at a time")
    parser.add_argument("--batch", type=int, default=16, help="vLLM: prompts in one batch")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--coeff", type=float, default=8.0)
    args = parser.parse_args()
    model = steerlab.load(args.model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    direction = Direction(vectors=torch.randn(1, model.d_model, generator=generator), layers=(model.n_layers // 2,))
    if "llama.cpp" in args.engines:
        llama_cpp_rows(model, direction, args)
    if "vllm" in args.engines:
        vllm_rows(model, direction, args)


def llama_cpp_rows(model, direction: Direction, args: argparse.Namespace) -> None:
    """llama.cpp decode tokens/s with and without the control vector, interleaved."""
    binary = Path(args.llama_cpp) / "bin" / "llama-completion"
    if not binary.is_file():
        raise SystemExit(f"no llama-completion under {args.llama_cpp}: run `make llama-cpp` first")
    tmp = Path(tempfile.mkdtemp())
    gguf_model = write_gguf(model, tmp / "model-f32.gguf", precision="f32")
    vector = write_control_vector(
        model.plan(AddVector(direction, coeff=args.coeff, unit=True)), tmp / "v.gguf", model=model
    )
    texts = [model.chat().render(p).text for p in DEMO_HARMLESS[: args.prompts]]
    speeds: dict[str, list[float]] = {"plain": [], "control vector": []}
    for _ in range(args.reps):
        for text in texts:
            speeds["plain"].append(tokens_per_second(binary, gguf_model, text, args.new_tokens, None))
            speeds["control vector"].append(tokens_per_second(binary, gguf_model, text, args.new_tokens, vector))
    median_table(f"llama.cpp {binary}, {model.name} f32, {args.prompts} prompts x {args.new_tokens} tokens, {args.reps} "
                 "interleaved reps, medians of llama.cpp's decode tokens/s", speeds, base="plain", unit="tokens/s")  # fmt: skip


if __name__ == "__main__":
    main()
