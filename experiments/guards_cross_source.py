"""Issue 19, item 1: which guard generalises across prompt sources (Qwen default, float32).

Activations (``resid_pre``, every layer, at ``t_inst`` and ``last``) of every set of
:func:`steerlab.data.guard_sets.guard_sets` (large package sets sampled to 200) and of each safe-but-scary kind are
collected once and cached in runs/guards/acts.pt. Then, for each guard configuration (probe per layer and position
with C in {0.01, 0.1, 1}, balanced classes; LatentGuard over all layers / layer bands):

* leave-sources-out: for every (harmful source, harmless source) pair, fit on all other sources (safe-but-scary
  included), report the held-out pair's AUC and the TPR / FPR at a threshold calibrated on the training sources;
* leave-kind-out: fit without one safe-but-scary kind, AUC of that kind's unsafe vs safe prompts;
* steerlab-only: fit on the sets written for steerlab only, score every package set (AUC vs each harmless set).

Run: ``python -u experiments/guards_cross_source.py`` (collection ~5 min on 2 cores, then ~1 min); writes
runs/guards/cross_source.json.
"""

import json
import random
import sys
import time
from pathlib import Path

import torch

import steerlab
from steerlab.data.guard_sets import SCARY_KINDS, guard_sets, scary_sets
from steerlab.probes import fit_probes
from steerlab.probes.cross_source import fit_on, leave_kind_out, leave_sources_out, score_pairs, summarize

OUT = Path("runs/guards")
OUT.mkdir(parents=True, exist_ok=True)
CAP = 200
POSITIONS = ("t_inst", "last")


def _sample(prompts, name):
    prompts = list(prompts)
    return prompts if len(prompts) <= CAP else random.Random(name).sample(prompts, CAP)


LAYERS = tuple(range(2, 24, 2))  # every other layer: the probe fits dominate the run time


def guard_prompts(kinds=SCARY_KINDS) -> dict[str, list[str]]:
    """Every guard set's prompts as read into the caches (at most CAP per set; each safe-but-scary kind of ``kinds``
    its own set)."""
    want = {s.name: _sample(s.prompts, s.name) for s in guard_sets() if not s.name.startswith("scary_")}
    return want | {f"{s.name}:{s.kind}": list(s.prompts) for s in scary_sets(kinds)}


def read_cached(cache: Path, read, *, tag: str = "", kinds=SCARY_KINDS) -> dict:
    """{"prompts", "acts", "tag"}: every set of :func:`guard_prompts` read once with ``read(model, prompts)`` ->
    ``[n, L, 2, d]`` and cached in ``cache``; a cache made with another ``tag`` (another reading) is read again."""
    want = guard_prompts(kinds)
    have = torch.load(cache, weights_only=True) if cache.exists() else {}
    if have.get("tag", "") != tag or "acts" not in have:
        have = {"prompts": {}, "acts": {}, "tag": tag}
    todo = [n for n, p in want.items() if have["prompts"].get(n) != p]
    if todo:
        model = steerlab.load(dtype=torch.float32)
        for name in todo:
            t0 = time.time()
            have["acts"][name], have["prompts"][name] = read(model, want[name]).float(), want[name]
            print(f"read {name}: {len(want[name])} prompts in {time.time() - t0:.0f} s", flush=True)
            torch.save(have, cache)
    return have


def at_positions(model, prompts: list[str], *, system: str | None = None) -> torch.Tensor:
    """``[n, L, 2, d]``: resid_pre at ``t_inst`` and ``last`` (under ``system``, or the template's default)."""
    acts = steerlab.collect(model, prompts, positions=list(POSITIONS), system=system, progress=False, batch_size=16)
    return torch.stack([acts.get("resid_pre", p)[:, :, -1] for p in POSITIONS], 2)


def collect_all():
    sets = [s for s in guard_sets() if not s.name.startswith("scary_")]
    have = read_cached(OUT / "acts.pt", at_positions)
    return sets, {n: have["acts"][n][:, list(LAYERS)] for n in guard_prompts()}


def probe_fit(pos: int, C: float):
    def fit(x, y, sample_weight=None):
        xp = x[:, :, pos]
        probe = fit_probes(xp, y, layers=list(range(xp.shape[1])), C=C, balanced=True, sample_weight=sample_weight)
        return lambda z: probe.decision_function(z[:, :, pos])

    return fit


def latent_fit(pos: int, bands):
    def fit(x, y):
        xp = x[:, :, pos].double()
        mu_h, mu_s = xp[y == 1].mean(0), xp[y == 0].mean(0)

        def score(z):
            h = z[:, :, pos].double()
            cos = torch.nn.functional.cosine_similarity
            per_layer = cos(h, mu_h[None], dim=-1) - cos(h, mu_s[None], dim=-1)  # [n, L]
            return torch.stack([per_layer[:, a:b].mean(1) for a, b in bands], 1).float()

        return score

    return fit


def main():
    sets, feats = collect_all()
    n_layers = next(iter(feats.values())).shape[1]
    scary = {(name.split(":")[1], name.startswith("scary_unsafe")): x for name, x in feats.items() if name.startswith("scary_")}
    from steerlab.data.guard_sets import PromptSet

    # each safe-but-scary kind and safety is its own source, as in guard_training_data()
    all_sets = sets + [PromptSet(name, name.startswith("scary_unsafe"), "steerlab", ("-",)) for name in feats if name.startswith("scary_")]
    all_feats = feats
    bands = [(0, n_layers), (0, n_layers // 2), (n_layers // 4, 3 * n_layers // 4), (n_layers // 2, n_layers)]
    configs = {}
    for p, pos in enumerate(POSITIONS):
        for C in (0.01, 0.1, 1.0):
            configs[f"probe/{pos}/C{C}"] = (probe_fit(p, C), [f"layer {i}" for i in LAYERS], False)
        # every source (each safe-but-scary kind and safety its own) weighs the same: the default of steerlab probe
        configs[f"probe/{pos}/C0.01/sources"] = (probe_fit(p, 0.01), [f"layer {i}" for i in LAYERS], True)
        configs[f"latent/{pos}"] = (latent_fit(p, bands), [f"layers {LAYERS[a]}-{LAYERS[b - 1]}" for a, b in bands], False)
    harmless_names = [s.name for s in all_sets if not s.harmful and not s.name.startswith("scary_")]
    harmful_names = [s.name for s in all_sets if s.harmful and not s.name.startswith("scary_")]
    # each harmful source against two harmless sources (in turn), so every source is held out at least once
    pairs = [(h, harmless_names[(2 * i + k) % len(harmless_names)]) for i, h in enumerate(harmful_names) for k in range(2)]
    plain_sets = [s for s in all_sets if not s.name.startswith("scary_")]
    own = [s for s in all_sets if s.origin == "steerlab"]
    report = {}
    for cname, (fit, columns, weigh) in configs.items():
        t0 = time.time()
        lso = leave_sources_out(all_feats, all_sets, fit, pairs=pairs, weigh_sources=weigh)
        lko = leave_kind_out(feats, plain_sets, scary, fit, weigh_sources=weigh)
        # steerlab-only training: fit on the sets written for steerlab, score each package harmful set against
        # each package harmless set
        scorer, thresholds = fit_on(all_feats, own, fit, weigh_sources=weigh)
        ext = [s for s in all_sets if s.origin != "steerlab"]
        own_only = score_pairs(scorer, thresholds, all_feats, [(h.name, s.name) for h in ext if h.harmful for s in ext if not s.harmful])
        auc, ba = summarize(lso), summarize(lso, "balanced_accuracy")
        worst = torch.tensor([r["auc"] for r in lso]).min(0).values
        kind_auc = summarize(lko)
        best = int((auc + kind_auc).argmax())
        own_auc = summarize(own_only) if own_only else torch.zeros_like(auc)
        report[cname] = {"own_auc": own_auc.tolist(), "columns": columns, "lso": lso, "lko": lko, "own_only": own_only, "mean_auc": auc.tolist(),
                         "mean_balanced_accuracy": ba.tolist(), "worst_auc": worst.tolist(), "kind_auc": kind_auc.tolist()}  # fmt: skip
        print(f"{cname:22s} best {columns[best]:12s} lso AUC {auc[best]:.3f} (worst {worst[best]:.3f}, bal.acc {ba[best]:.3f})"
              f"  kinds AUC {kind_auc[best]:.3f}  own->ext AUC {own_auc[best]:.3f}  [{time.time() - t0:.0f} s]", flush=True)  # fmt: skip
    (OUT / "cross_source.json").write_text(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
