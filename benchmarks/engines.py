"""Engine steering overhead: llama.cpp with a steerlab control vector vs without (same run, same prompts).

Exports the model once as an f32 GGUF, writes AddVector(random unit direction, coeff) at the middle layer as a
control vector, then runs ``llama-completion`` interleaved with and without it, reading llama.cpp's own
decode speed ("eval time ... tokens per second"). ratio = steered tokens/s / plain tokens/s (1.0 = free).
Run: ``python benchmarks/engines.py [--llama-cpp DIR] [--reps R] [--new-tokens N]`` (``make llama-cpp`` first).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
from pathlib import Path

import torch

import steerlab
from steerlab.backends.llamacpp import run_llama_completion, write_control_vector
from steerlab.data import DEMO_HARMLESS
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--llama-cpp", default=os.environ.get("STEERLAB_LLAMA_CPP",
                        str(Path.home() / ".cache/steerlab/llama.cpp-11434.0.0")))  # fmt: skip
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--coeff", type=float, default=8.0)
    args = parser.parse_args()
    binary = Path(args.llama_cpp) / "bin" / "llama-completion"
    if not binary.is_file():
        raise SystemExit(f"no llama-completion under {args.llama_cpp}: run `make llama-cpp` first")
    model = steerlab.load(args.model, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp())
    gguf_model = write_gguf(model, tmp / "model-f32.gguf", precision="f32")
    generator = torch.Generator().manual_seed(0)
    direction = Direction(vectors=torch.randn(1, model.d_model, generator=generator), layers=(model.n_layers // 2,))
    vector = write_control_vector(
        model.plan(AddVector(direction, coeff=args.coeff, unit=True)), tmp / "v.gguf", model=model
    )
    texts = [model.chat().render(p).text for p in DEMO_HARMLESS[: args.prompts]]
    speeds: dict[str, list[float]] = {"plain": [], "control vector": []}
    for _ in range(args.reps):
        for text in texts:
            speeds["plain"].append(tokens_per_second(binary, gguf_model, text, args.new_tokens, None))
            speeds["control vector"].append(tokens_per_second(binary, gguf_model, text, args.new_tokens, vector))
    base = statistics.median(speeds["plain"])
    print(f"\nllama.cpp {binary}, {model.name} f32, {args.prompts} prompts x {args.new_tokens} tokens, "
          f"{args.reps} interleaved reps, medians of llama.cpp's decode tokens/s")  # fmt: skip
    print(f"| {'case':<16} | {'tokens/s':>9} | {'ratio vs plain':>14} |")
    print(f"|{'-' * 18}|{'-' * 11}|{'-' * 16}|")
    for name, values in speeds.items():
        med = statistics.median(values)
        print(f"| {name:<16} | {med:9.2f} | {med / base:14.3f} |")


if __name__ == "__main__":
    main()
