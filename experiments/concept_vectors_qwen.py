"""METHODS 8 on the embedded default (Qwen2.5-Coder-0.5B-Instruct, float32): parametric concept vectors.

For two concepts ("Python", the programming language; "red", the colour) every down-projection column
(24 layers x 4864) is read through the final norm and the unembedding; the columns whose top-20 tokens
hold the concept's tokens are ranked (summed z-score, both signs; see steerlab.steering.concept_vectors).
Then, on 20 questions per concept and 22 control questions (steerlab/data/concept_questions.jsonl,
written for steerlab), the probability of the one-word answer is measured with the top-N columns
ablated (scale 0); with the top-N columns that write toward the concept in context (activation sign read
on 10 separate selection questions, ConceptSearch.in_context) ablated; with METHODS 8's noise N(0, 0.1^2)
added to the top-N columns (3 draws); and with N random columns ablated (mean of 2 draws), for N = 5 and 20.
A bake of one ablation is parity-checked against the runtime hook.

Run: ``python experiments/concept_vectors_qwen.py`` (about 15 minutes on 2 busy cores); JSON in runs/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import steerlab
from steerlab.data import concept_questions
from steerlab.eval import answer_probability
from steerlab.eval.answers import QA
from steerlab.eval.concepts import noise_validation
from steerlab.interventions import ColumnEdit
from steerlab.measure import random_columns
from steerlab.steering import find_concept_vectors
from steerlab.steering.concept_vectors import VocabProjection
from steerlab.training import bake, parity

CONCEPTS = {"python": ["Python"], "red": ["red"]}
NS = (5, 20)
RANDOM_SEEDS = (0, 1)
OUT = Path("runs/concept_vectors_qwen")

torch.manual_seed(0)
t0 = time.time()
model = steerlab.load(dtype=torch.float32)
model.system = "You are a helpful assistant."  # shorter than the template's default system prompt: faster passes
questions = {name: [QA(q, a) for q, a in concept_questions(name)] for name in (*CONCEPTS, "control")}
selection = {name: [q for q, _ in concept_questions(name, split="select")] for name in CONCEPTS}
base = {name: answer_probability(model, qs) for name, qs in questions.items()}
print("baseline mean p(answer): " + ", ".join(f"{k} {float(v.mean()):.3f}" for k, v in base.items()))

projection = VocabProjection(model)
searches, promoting = {}, {}
for name, words in CONCEPTS.items():
    searches[name] = find_concept_vectors(model, words, top_k=20, projection=projection)
    promoting[name] = searches[name].in_context(model, selection[name], n=200)
    print()
    print(searches[name].table(12))
    print(f"in context (10 selection questions, not the evaluation set): {len(promoting[name])} of the first 200 hits "
          "write toward the concept")  # fmt: skip
    print("\n".join(promoting[name].table(8).splitlines()[1:]))
print(f"\n[{time.time() - t0:.0f}s] searches done")


def effect_row(edit: ColumnEdit, sets: tuple[str, ...]) -> dict[str, float]:
    """Relative drop of mean p(answer), and mean change of log p, on each question set under ``edit``."""
    with model.apply(edit):
        after = {name: answer_probability(model, questions[name]) for name in sets}
    row = {f"drop_{k}": float(1 - after[k].mean() / base[k].mean()) for k in sets}
    row.update({f"dlogp_{k}": float((after[k].log() - base[k].log()).mean()) for k in sets})
    return row


rows = []
for name, search in searches.items():
    other = next(k for k in CONCEPTS if k != name)
    for n in NS:
        cols = search.columns(n)
        found = effect_row(ColumnEdit(cols, scale=0.0), (name, other, "control"))
        in_ctx = effect_row(ColumnEdit(promoting[name].columns(n), scale=0.0), (name, other, "control"))
        noise = noise_validation(model, cols, questions[name], questions["control"], std=0.1, seed=0, draws=3,
                                 before=(base[name], base["control"]))  # fmt: skip
        rand = [
            effect_row(ColumnEdit(random_columns(model, n, seed=s, exclude=cols), scale=0.0), (name, "control"))
            for s in RANDOM_SEEDS
        ]
        rand_mean = {k: sum(r[k] for r in rand) / len(rand) for k in rand[0]}
        rows.append({"concept": name, "other": other, "n": n, "found": found, "in_context": in_ctx, "random": rand_mean,
                     "noise": noise.summary(), "columns": [list(c) for c in cols],
                     "in_context_columns": [list(c) for c in promoting[name].columns(n)]})  # fmt: skip
        print(f"[{time.time() - t0:.0f}s] {name} N={n} done")


def cell(row: dict, key: str) -> str:
    if f"drop_{key}" not in row:
        return f"{'-':>20}"
    return f"{row['drop_' + key]:>+8.1%} ({row['dlogp_' + key]:+.2f})".rjust(20)


print()
print("Relative drop of mean p(answer) = 1 - after/before; mean change of log p(answer) in brackets.")
print("ablate = top-N columns of the vocabulary search set to 0; in-ctx = top-N of those that write toward the")
print("concept on 10 separate selection questions set to 0; random = N random columns set to 0 (mean of 2 draws);")
print("noise = METHODS 8 validation, N(0, 0.1^2) added to each of the top-N columns (p averaged over 3 draws).")
head = f"{'concept':<8}{'N':>4}  {'edit':<7}{'own concept':>20}{'other concept':>20}{'control':>20}"
print(head)
print("-" * len(head))
for r in rows:
    nz = r["noise"]
    noise_row = {"drop_own": nz["concept_drop"], "dlogp_own": nz["concept_dlogp"],
                 "drop_control": nz["control_drop"], "dlogp_control": nz["control_dlogp"]}  # fmt: skip
    for label, v, own in (("ablate", r["found"], r["concept"]), ("in-ctx", r["in_context"], r["concept"]),
                          ("random", r["random"], r["concept"]), ("noise", noise_row, "own")):  # fmt: skip
        print(f"{r['concept']:<8}{r['n']:>4}  {label:<7}{cell(v, own)}{cell(v, r['other'])}{cell(v, 'control')}")

# the weight form of one ablation agrees with the hook
edit = ColumnEdit(searches["python"].columns(10), scale=0.0)
prompts = [q.question for q in questions["python"][:4]] + [q.question for q in questions["control"][:4]]
report = parity(model, bake(model, edit), edit, prompts, max_new_tokens=0)
print(f"\nbake vs hook (top-10 Python columns ablated, 8 prompts): max |logit diff| {report.max_abs_logit_diff:.2e}")

OUT.mkdir(parents=True, exist_ok=True)
payload = {
    "baseline": {k: float(v.mean()) for k, v in base.items()},
    "rows": rows,
    "tables": {k: s.table(20) for k, s in searches.items()},
    "in_context_tables": {k: s.table(20) for k, s in promoting.items()},
    "parity_max_abs_logit_diff": report.max_abs_logit_diff,
}
(OUT / "results.json").write_text(json.dumps(payload, indent=1))
print(f"done in {time.time() - t0:.0f}s; results in {OUT / 'results.json'}")
