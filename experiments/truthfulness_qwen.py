"""METHODS 9 on the embedded models: a truthfulness direction from true / false statements.

For the embedded Qwen2.5-Coder-0.5B-Instruct (width 896) and SmolLM2-135M-Instruct (width 576), both float32:

1. the direction mean(true) - mean(false) of resid_pre at the statement's last token (raw text), fitted on
   110 + 110 training statements (steerlab/data/true_false_statements.jsonl, written for steerlab), and its
   held-out accuracy per layer on 50 + 50 test statements (projection threshold at the midpoint of the
   training class means; a logistic probe per layer for reference);
2. the within-model cosine, per layer, between the truthfulness direction and the refusal direction
   (mean(harmful) - mean(harmless) at the last prompt token, 64 + 64 training instructions);
3. steering (Qwen): add ±c times the truthfulness vector at one layer and read p("True") - p("False") when the
   model is asked whether each of 30 + 30 held-out statements is true (accuracy and the paper's normalised
   effect); SmolLM2's unsteered judgement is printed (it is at chance, so it is not steered);
4. the two models differ in width, so their directions cannot be compared (the error is shown); instead the
   direction is transferred between Qwen and a copy of Qwen with a small weight edit (N(0, 0.02²) noise
   baked into 4000 random MLP columns): per-layer cosine and the steering effect of the transferred vector.

Run: ``python experiments/truthfulness_qwen.py`` (about 15 minutes on 2 busy cores); JSON in runs/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import steerlab
from steerlab.data import load_split, load_statements
from steerlab.errors import ShapeError
from steerlab.interventions import noise_edit, random_columns
from steerlab.steering import (
    SteeringEffect,
    class_directions,
    compare_directions,
    steering_effect,
    transfer_direction,
    truth_judgement,
    truthfulness_direction,
    truthfulness_report,
)
from steerlab.training import bake

OUT = Path("runs/truthfulness_qwen")
QWEN, SMOL = "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"
COEFFS = (-2.0, -1.0, 1.0, 2.0)
N_STEER = 30  # held-out pairs used for the (costly) judgement passes
SYSTEM = "You are a helpful assistant."  # shorter than Qwen's default system prompt: faster judgement passes
TEMPLATE = "True or false? Answer with one word.\n{statement}"

t0 = time.time()
split = load_statements(seed=0, n_test=50)
harm = load_split()
steer_true, steer_false = split.true_test[:N_STEER], split.false_test[:N_STEER]


def judged(model) -> tuple[torch.Tensor, torch.Tensor]:
    return truth_judgement(model, steer_true, template=TEMPLATE), truth_judgement(model, steer_false, template=TEMPLATE)


results: dict = {}
state: dict = {}
for name in (QWEN, SMOL):
    model = steerlab.load(name, dtype=torch.float32)
    report = truthfulness_report(model, split)
    refusal = class_directions(model, harm.harmful_train[:64], harm.harmless_train[:64], positions=("last",),
                               progress=False)["last"]  # fmt: skip
    cos = compare_directions(report.direction, refusal).as_dict()
    print(f"\n== {name}: {model.n_layers} layers, width {model.d_model} [{time.time() - t0:.0f}s]")
    print(f"{'layer':>5} {'proj train':>10} {'proj test':>9} {'probe test':>10} {'cos(truth, refusal)':>20}")
    for la in report.direction.layers:
        print(f"{la:>5} {report.train_accuracy[la]:>10.1%} {report.test_accuracy[la]:>9.1%} "
              f"{report.probe_test_accuracy[la]:>10.1%} {cos[la]:>+20.3f}")  # fmt: skip
    model.system = SYSTEM
    base = judged(model)
    n = model.n_layers
    steer_layers = [n // 4, n // 2] if name == QWEN else []  # SmolLM2 judges at chance (printed below)
    effects = {
        la: steering_effect(
            model,
            report.direction,
            steer_true,
            steer_false,
            layers=[la],
            coeffs=COEFFS,
            template=TEMPLATE,
            baseline=base,
        )
        for la in steer_layers
    }
    acc = SteeringEffect((), base[0], base[1], {}, {}).base_accuracy
    print(f"\njudgement p(True) - p(False) on {N_STEER} + {N_STEER} held-out statements: mean on true "
          f"{float(base[0].mean()):+.3f}, on false {float(base[1].mean()):+.3f}, accuracy {acc:.1%}")  # fmt: skip
    if effects:
        print(f"steering: +c x truthfulness vector at one layer (all tokens) [{time.time() - t0:.0f}s]")
        print(f"{'layer':>5} " + " ".join(f"{'acc c=' + format(c, '+g'):>10}" for c in COEFFS)
              + f" {'norm.effect c=1':>16} {'c=2':>6}")  # fmt: skip
    for la, eff in effects.items():
        accs = " ".join(f"{eff.accuracy(c):>10.1%}" for c in COEFFS)
        print(f"{la:>5} {accs} {eff.normalized_effect(1.0):>+16.2f} {eff.normalized_effect(2.0):>+6.2f}")
    state[name] = {"model": model, "report": report, "base": base, "effects": effects}
    results[name] = {
        "n_layers": n, "width": model.d_model, "proj_train": report.train_accuracy, "proj_test": report.test_accuracy,
        "probe_test": report.probe_test_accuracy, "cos_truth_refusal": cos, "judgement_base_accuracy": acc,
        "steering": {la: {"accuracy": {c: e.accuracy(c) for c in COEFFS},
                          "normalized_effect": {c: e.normalized_effect(c) for c in (1.0, 2.0)}}
                     for la, e in effects.items()},
    }  # fmt: skip

qwen, qdir = state[QWEN]["model"], state[QWEN]["report"].direction
try:
    compare_directions(qdir, state[SMOL]["report"].direction, align="depth")
except ShapeError as exc:
    print(f"\nQwen vs SmolLM2: {exc}")
del state[SMOL]

# transfer between Qwen and a lightly edited copy of it (same width and residual basis)
sibling = bake(qwen, noise_edit(qwen, random_columns(qwen, 4000, seed=0), std=0.02, seed=0))
sibling.name, sibling.system = "qwen+noise", SYSTEM
sib_dir = truthfulness_direction(sibling, split.true_train, split.false_train)
cos = compare_directions(qdir, sib_dir)
print(f"\n[{time.time() - t0:.0f}s] Qwen vs Qwen+noise truthfulness direction, cosine per layer:")
print(" ".join(f"{la}:{c:.3f}" for la, c in cos.as_dict().items()))
layer = qwen.n_layers // 2
kw = {"layers": [layer], "coeffs": (-2.0, 2.0), "template": TEMPLATE}
sib_base = judged(sibling)
effects = {
    "Qwen -> Qwen": state[QWEN]["effects"][layer],
    "Qwen+noise -> Qwen+noise": steering_effect(sibling, sib_dir, steer_true, steer_false, baseline=sib_base, **kw),
    "Qwen -> Qwen+noise": steering_effect(sibling, transfer_direction(qdir, sibling), steer_true, steer_false,
                                          baseline=sib_base, **kw),
    "Qwen+noise -> Qwen": steering_effect(qwen, transfer_direction(sib_dir, qwen), steer_true, steer_false,
                                          baseline=state[QWEN]["base"], **kw),
}  # fmt: skip
print(f"judgement accuracy Qwen+noise {SteeringEffect((), *sib_base, {}, {}).base_accuracy:.1%}; "
      f"normalised steering effect at layer {layer}, c = +-2 (direction -> model):")  # fmt: skip
for label, eff in effects.items():
    print(f"  {label:<26} {eff.normalized_effect(2.0):+.2f}")
results["transfer"] = {"cosine": cos.as_dict(), "layer": layer,
                       "normalized_effect_c2": {k: e.normalized_effect(2.0) for k, e in effects.items()}}  # fmt: skip
OUT.mkdir(parents=True, exist_ok=True)
(OUT / "results.json").write_text(json.dumps(results, indent=1, default=str))
print(f"done in {time.time() - t0:.0f}s; results in {OUT / 'results.json'}")
