"""METHODS 9 on the embedded models: a truthfulness direction from true / false statements.

For the embedded Qwen2.5-Coder-0.5B-Instruct (width 896) and SmolLM2-135M-Instruct (width 576), both float32:

1. the direction mean(true) - mean(false) of resid_pre at the statement's last token (the statement sent as a
   user turn, position t_inst), fitted on 110 + 110 training statements (steerlab/data/true_false_statements.jsonl,
   written for steerlab), and its held-out accuracy per layer on 50 + 50 test statements (projection threshold
   fitted on train, test ROC AUC; a logistic probe per layer for reference);
2. the within-model cosine, per layer, between the truthfulness direction and the refusal direction
   (mean(harmful) - mean(harmless) at the last prompt token, 64 + 64 training instructions);
3. steering: add c times the truthfulness vector at one layer (all tokens) and read p("True") - p("False")
   when the model is asked "True or false?" about each of 20 + 20 held-out statements: the mean shift per
   coefficient, the accuracy, the paper's normalised effect (n/a when the unsteered judgement does not separate
   the classes), and a random direction of the same norm;
4. the two models differ in width, so their directions cannot be compared (the error is shown); instead the
   direction is transferred between Qwen and a copy of Qwen with a small weight edit (N(0, 0.02²) noise
   baked into 4000 random MLP columns): per-layer cosine, and the judgement swing (c=+3 minus c=-3) of the
   transferred vector relative to the target model's own.

Notes from trying formats on Qwen-Coder-0.5B (test ROC AUC of the mean-difference projection, best layer):
raw statement, last token 0.53; as a user turn, t_inst 0.65 and last prompt token 0.65; four-shot
"<statement> This statement is:" 0.64 — the model separates these statements only weakly, so the user-turn
form is used. Its verbal judgement is at chance in every format tried (chat questions, four-shot), so the
swing, not the paper's normalised effect, is the steering measure that means something here.

Run: ``python experiments/truthfulness_qwen.py`` (about 20 minutes on 2 busy cores); JSON in runs/.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

import steerlab
from steerlab.data import load_split, load_statements
from steerlab.errors import ShapeError
from steerlab.interventions import noise_edit
from steerlab.measure import random_columns
from steerlab.steering import Direction, compare_directions, transfer_direction, truthfulness_direction
from steerlab.steering.harmfulness import class_directions
from steerlab.steering.truthfulness import SteeringEffect, steering_effect, truth_judgement, truthfulness_report
from steerlab.training import bake

OUT = Path("runs/truthfulness_qwen")
QWEN, SMOL = "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"
COEFFS = (-3.0, -1.0, 1.0, 3.0)
N_STEER = 20  # held-out pairs used for the (costly) judgement passes

t0 = time.time()
split = load_statements(seed=0, n_test=50)
harm = load_split()
steer_true, steer_false = split.true_test[:N_STEER], split.false_test[:N_STEER]
SYSTEM = "You are a helpful assistant."  # one short system prompt for fitting and judging (faster passes)
FIT = {"chat": True, "position": "t_inst"}  # the statement's last token, as a user turn (see the module notes)
TEMPLATE = "True or false? Answer with one word.\n{statement}"
JUDGE = {"template": TEMPLATE, "chat": True}


def judged(model) -> tuple[torch.Tensor, torch.Tensor]:
    return truth_judgement(model, steer_true, **JUDGE), truth_judgement(model, steer_false, **JUDGE)


def random_like(direction: Direction, seed: int = 0) -> Direction:
    """A random direction with the same norm as ``direction`` at every layer (steering control)."""
    noise = torch.randn(direction.vectors.shape, generator=torch.Generator().manual_seed(seed))
    vectors = noise / noise.norm(dim=-1, keepdim=True) * direction.vectors.norm(dim=-1, keepdim=True)
    return Direction(vectors, direction.layers, model=direction.model)


def mean_shift(eff, c: float) -> float:
    """Mean change of p(True) - p(False) over all steered statements at coefficient ``c``."""
    base = torch.cat([eff.base_true, eff.base_false]).mean()
    return float(torch.cat([eff.steered_true[c], eff.steered_false[c]]).mean() - base)


def fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.2f}"


results: dict = {}
state: dict = {}
for name in (QWEN, SMOL):
    model = steerlab.load(name, dtype=torch.float32)
    model.system = SYSTEM
    report = truthfulness_report(model, split, **FIT)
    refusal = class_directions(model, harm.harmful_train[:64], harm.harmless_train[:64], positions=("last",),
                               progress=False)["last"]  # fmt: skip
    cos = compare_directions(report.direction, refusal).as_dict()
    print(f"\n== {name}: {model.n_layers} layers, width {model.d_model} [{time.time() - t0:.0f}s]")
    print(
        f"{'layer':>5} {'proj train':>10} {'proj test':>9} {'test AUC':>8} {'probe test':>10} {'cos(truth, refusal)':>20}"
    )
    for la in report.direction.layers:
        print(f"{la:>5} {report.train_accuracy[la]:>10.1%} {report.test_accuracy[la]:>9.1%} {report.test_auc[la]:>8.2f} "
              f"{report.probe_test_accuracy[la]:>10.1%} {cos[la]:>+20.3f}")  # fmt: skip
    base = judged(model)
    n = model.n_layers
    kw = {**JUDGE, "baseline": base}
    effects = {
        la: steering_effect(model, report.direction, steer_true, steer_false, layers=[la], coeffs=COEFFS, **kw)
        for la in (n // 4, n // 2)
    }
    control = steering_effect(model, random_like(report.direction), steer_true, steer_false, layers=[n // 2],
                              coeffs=(-3.0, 3.0), **kw)  # fmt: skip
    acc = SteeringEffect((), base[0], base[1], {}, {}).base_accuracy
    print(f"\njudgement p(True) - p(False) on {N_STEER} + {N_STEER} held-out statements: mean on true "
          f"{float(base[0].mean()):+.3f}, on false {float(base[1].mean()):+.3f}, accuracy {acc:.1%}")  # fmt: skip
    print(f"steering: +c x truthfulness vector at one layer, all tokens [{time.time() - t0:.0f}s]")
    print(f"{'layer':>5} " + " ".join(f"{'shift c=' + format(c, '+g'):>11}" for c in COEFFS)
          + " " + " ".join(f"{'acc c=' + format(c, '+g'):>9}" for c in COEFFS) + f" {'swing c=3':>10}"
          + f" {'norm.eff c=1':>13}")  # fmt: skip
    for la, eff in effects.items():
        shifts = " ".join(f"{mean_shift(eff, c):>+11.3f}" for c in COEFFS)
        accs = " ".join(f"{eff.accuracy(c):>9.1%}" for c in COEFFS)
        print(f"{la:>5} {shifts} {accs} {eff.swing(3.0):>+10.3f} {fmt(eff.normalized_effect(1.0)):>13}")
    print(f"random direction (same norm) at layer {n // 2}: shift c=-3 {mean_shift(control, -3.0):+.3f}, "
          f"c=+3 {mean_shift(control, 3.0):+.3f}, swing c=3 {control.swing(3.0):+.3f}")  # fmt: skip
    state[name] = {"model": model, "report": report, "base": base, "effects": effects}
    results[name] = {
        "n_layers": n, "width": model.d_model, "proj_train": report.train_accuracy, "proj_test": report.test_accuracy,
        "test_auc": report.test_auc,
        "probe_test": report.probe_test_accuracy, "cos_truth_refusal": cos, "judgement_base_accuracy": acc,
        "steering": {la: {"shift": {c: mean_shift(e, c) for c in COEFFS}, "accuracy": {c: e.accuracy(c) for c in COEFFS},
                          "swing_c3": e.swing(3.0), "normalized_effect_c1": e.normalized_effect(1.0)}
                     for la, e in effects.items()},
        "random_swing_c3": control.swing(3.0),
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
sib_dir = truthfulness_direction(sibling, split.true_train, split.false_train, **FIT)
cos = compare_directions(qdir, sib_dir)
print(f"\n[{time.time() - t0:.0f}s] Qwen vs Qwen+noise truthfulness direction, cosine per layer:")
print(" ".join(f"{la}:{c:.3f}" for la, c in cos.as_dict().items()))
layer = qwen.n_layers // 2
kw = {"layers": [layer], "coeffs": (-3.0, 3.0), **JUDGE}
sib_base = judged(sibling)
effects = {
    "Qwen -> Qwen": state[QWEN]["effects"][layer],
    "Qwen+noise -> Qwen+noise": steering_effect(sibling, sib_dir, steer_true, steer_false, baseline=sib_base, **kw),
    "Qwen -> Qwen+noise": steering_effect(sibling, transfer_direction(qdir, sibling), steer_true, steer_false,
                                          baseline=sib_base, **kw),
    "Qwen+noise -> Qwen": steering_effect(qwen, transfer_direction(sib_dir, qwen), steer_true, steer_false,
                                          baseline=state[QWEN]["base"], **kw),
}  # fmt: skip
print(f"swing of the judgement, mean p(True) - p(False) at c=+3 minus at c=-3, layer {layer} (direction -> model):")
for label, eff in effects.items():
    print(f"  {label:<26} {eff.swing(3.0):+.3f}")
own_q, own_s = effects["Qwen -> Qwen"].swing(3.0), effects["Qwen+noise -> Qwen+noise"].swing(3.0)
print(f"transfer ratio (transferred swing / the target's own): Qwen -> Qwen+noise "
      f"{effects['Qwen -> Qwen+noise'].swing(3.0) / own_s:.2f}, Qwen+noise -> Qwen "
      f"{effects['Qwen+noise -> Qwen'].swing(3.0) / own_q:.2f}")  # fmt: skip
results["transfer"] = {"cosine": cos.as_dict(), "layer": layer,
                       "swing_c3": {k: e.swing(3.0) for k, e in effects.items()}}  # fmt: skip
OUT.mkdir(parents=True, exist_ok=True)
(OUT / "results.json").write_text(json.dumps(results, indent=1, default=str))
print(f"done in {time.time() - t0:.0f}s; results in {OUT / 'results.json'}")
