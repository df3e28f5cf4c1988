"""METHODS 2 on the embedded default: harmfulness (t_inst) vs refusal (last token) directions.

Prints the per-layer cosine of the two directions fitted on the 128 + 128 training pairs, and the
refusal rate of 40 held-out harmless prompts when +2·v is added on prompt tokens at layers 8, 12, 16.
Run: ``python experiments/harmfulness_vs_refusal.py`` (about 3 minutes on 2 cores).
"""

import torch

import steerlab
from steerlab.data import load_split
from steerlab.eval import refusal_rate
from steerlab.steering.harmfulness import class_directions, steer_prompt

split = load_split()
fit_model = steerlab.load(dtype=torch.float32)
dirs = class_directions(fit_model, split.harmful_train, split.harmless_train, progress=False)
cos = dirs["t_inst"].cosine(dirs["last"])
print("cos(harmfulness@t_inst, refusal@last) per layer:", " ".join(f"{la}:{c:.2f}" for la, c in cos.items()))
del fit_model

model = steerlab.load(dtype=torch.bfloat16)
harmless = split.harmless_test[:40]
print(f"harmless refusal, baseline: {refusal_rate(model.generate(harmless, max_new_tokens=32)):.1%}")
for name in ("t_inst", "last"):
    for layer in (8, 12, 16):
        with model.apply(steer_prompt(dirs[name], layer, coeff=2.0)):
            rate = refusal_rate(model.generate(harmless, max_new_tokens=32))
        print(f"+2 x {name} direction at layer {layer}: harmless refusal {rate:.1%}")
