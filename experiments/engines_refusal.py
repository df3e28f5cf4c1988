"""Refusal rates with the refusal direction: steerlab's HF hooks vs vLLM vs llama.cpp (baked GGUF), same prompts.

* ablation on AdvBench prompts: HF hook (Ablate), vLLM (the same plan, per request), and llama.cpp running the
  baked ablation exported as an f32 GGUF (bake -> write_gguf; a control vector cannot ablate);
* addition on harmless instructions from another source (past-tense rephrasings): HF hook vs vLLM (AddVector).

Greedy, float32, judged by steerlab.eval.is_refusal. Run in the engines venv after ``steerlab refusal``:
``.venv-engines/bin/python experiments/engines_refusal.py --direction runs/refusal/refusal_direction.safetensors``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import steerlab
from steerlab.backends.llamacpp import run_llama_completion
from steerlab.backends.vllm import VLLMEngine
from steerlab.data import advbench, past_tense_harmless
from steerlab.eval.refusal import refusal_rate
from steerlab.steering import Direction
from steerlab.training.gguf_export import write_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direction", required=True)
    parser.add_argument("--coeff", type=float, default=1.0, help="AddVector coefficient on the harmless prompts")
    parser.add_argument("--n-harmful", type=int, default=100)
    parser.add_argument("--n-harmless", type=int, default=80)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--llama-cpp", default=os.environ.get("STEERLAB_LLAMA_CPP",
                        str(Path.home() / ".cache/steerlab/llama.cpp-11434.0.0")))  # fmt: skip
    args = parser.parse_args()
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    model = steerlab.load(dtype=torch.float32)
    direction = Direction.load(args.direction)
    ablate, add = steerlab.Ablate(direction), steerlab.AddVector(direction, coeff=args.coeff)
    harmful, harmless = advbench()[-args.n_harmful :], past_tense_harmless()[: args.n_harmless]
    gen = {"max_new_tokens": args.max_new_tokens}
    rows: list[tuple[str, str, str]] = []

    hf: dict[str, list[str]] = {"harmful plain": model.generate(harmful, **gen)}
    with model.apply(ablate):
        hf["harmful ablated"] = model.generate(harmful, **gen)
    hf["harmless plain"] = model.generate(harmless, **gen)
    with model.apply(add):
        hf["harmless added"] = model.generate(harmless, **gen)
    log("HF done")

    engine = VLLMEngine(model, {"ablate": ablate, "add": add})
    vl = {
        "harmful plain": engine.generate(harmful, **gen),
        "harmful ablated": engine.generate(harmful, steer="ablate", **gen),
        "harmless plain": engine.generate(harmless, **gen),
        "harmless added": engine.generate(harmless, steer="add", **gen),
    }
    log("vLLM done")
    for case, texts in hf.items():
        same = sum(a == b for a, b in zip(texts, vl[case])) / len(texts)
        rows.append((case, f"HF {refusal_rate(texts):.1%} | vLLM {refusal_rate(vl[case]):.1%}", f"{same:.0%}"))

    binary = Path(args.llama_cpp) / "bin" / "llama-completion"
    if binary.is_file():
        tmp = Path(tempfile.mkdtemp())
        baked = steerlab.bake(model, ablate)
        gguf = write_gguf(baked, tmp / "ablated-f32.gguf", precision="f32")
        plain_gguf = write_gguf(model, tmp / "plain-f32.gguf", precision="f32")
        del baked
        texts = [model.chat().render(p).text for p in harmful]
        lc_ablated = [run_llama_completion(binary, gguf, t, n_tokens=args.max_new_tokens).stdout for t in texts]
        lc_plain = [run_llama_completion(binary, plain_gguf, t, n_tokens=args.max_new_tokens).stdout for t in texts]
        log("llama.cpp done")
        ablated_rates = f"HF hook {refusal_rate(hf['harmful ablated']):.1%} | llama.cpp {refusal_rate(lc_ablated):.1%}"
        plain_rates = f"HF {refusal_rate(hf['harmful plain']):.1%} | llama.cpp {refusal_rate(lc_plain):.1%}"
        rows += [("harmful ablated (baked GGUF)", ablated_rates, "-"), ("harmful plain (GGUF)", plain_rates, "-")]
    print(f"\n{model.name} float32, greedy {args.max_new_tokens} tokens; {len(harmful)} AdvBench (last), "
          f"{len(harmless)} past-tense harmless; AddVector coeff {args.coeff}; refusal = steerlab.eval.is_refusal")  # fmt: skip
    print(f"| {'case':<30} | {'refusal rate':<34} | identical replies |")
    print(f"|{'-' * 32}|{'-' * 36}|-------------------|")
    for case, rates, same in rows:
        print(f"| {case:<30} | {rates:<34} | {same:>17} |")


if __name__ == "__main__":
    main()
