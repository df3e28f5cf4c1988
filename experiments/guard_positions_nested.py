"""Issue 19: the default guard's position rule, judged nested on the guard targets' two axes.

``steerlab probe`` / ``guard --fit`` now compare four positions — ``t_inst``, ``last`` and the pooled means
``inst_mean`` and ``inst_to_last_mean`` — and the guard reads the one whose layers (``choose_layers``) have the best
minimum of source-held-out and kind-held-out CV AUC on the training pool (``steerlab.probes.pipeline._choose_guard``).
Here that rule is judged as experiments/guard_layer_ensembles.py judged the layer rule: in every split it chooses
position and layers on the training sources only, a probe on the chosen layers is fitted there (C 0.01, balanced,
sources weighted), and the held-out sources score it. Beside it, each position fixed (its layers still chosen).

* ``public``: choose and fit on the sets written for steerlab, score each package harmful set vs each package
  harmless set (target AUC >= 0.95);
* ``kinds``: leave one safe-but-scary kind out, its unsafe vs safe prompts (target >= 0.85);
* ``lso`` (with ``--lso``): leave a harmful and a harmless source out, each harmful source once.

Activations: runs/guards/acts.pt (``t_inst``, ``last``; experiments/guards_cross_source.py) and the pooled positions
read with ``steerlab.collect`` into runs/guards/acts_pooled_lib.pt (~4 min once). Run: ``python -u
experiments/guard_positions_nested.py [--lso]`` (~20 min, ~35 with ``--lso``; ``--summary`` re-reads the splits);
writes runs/guards/positions.json.
"""

import json
import sys
import time
from pathlib import Path

import torch

import steerlab
from steerlab.data.guard_sets import PromptSet, guard_sets, kind_families
from steerlab.probes.cross_source import fit_on, score_pairs, summarize
from steerlab.probes.layer_choice import _fit_scorer, _mixer, choose_layers

sys.path.insert(0, str(Path(__file__).parent))
from guards_cross_source import at_positions, read_cached  # noqa: E402

OUT = Path("runs/guards")
POOLED = ("inst_mean", "inst_to_last_mean")
POSITIONS = ("t_inst", "last", *POOLED)


def pooled(model, prompts: list[str]) -> torch.Tensor:
    """``[n, L, 2, d]``: resid_pre at the two pooled positions, read by the library."""
    acts = steerlab.collect(model, prompts, positions=list(POOLED), progress=False, batch_size=16)
    return torch.stack([acts.get("resid_pre", p)[:, :, -1] for p in POOLED], 2)


def features() -> dict[str, dict[str, torch.Tensor]]:
    """{position: {set name: [n, L, d]}}."""
    tokens = read_cached(OUT / "acts.pt", at_positions)["acts"]
    means = read_cached(OUT / "acts_pooled_lib.pt", pooled, tag="steerlab.collect inst_mean, inst_to_last_mean")["acts"]
    return {"t_inst": {n: a[:, :, 0] for n, a in tokens.items()}, "last": {n: a[:, :, 1] for n, a in tokens.items()},
            "inst_mean": {n: a[:, :, 0] for n, a in means.items()}, "inst_to_last_mean": {n: a[:, :, 1] for n, a in means.items()}}  # fmt: skip


def split(feats, train: list[PromptSet], held_pairs: list[tuple[str, str]]) -> dict:
    """Per position: the layers choose_layers picks on ``train``, its rule value, and the held-out AUC of a probe fitted
    on ``train`` at those layers."""
    out = {}
    for p in POSITIONS:
        f = feats[p]
        x = torch.cat([f[s.name] for s in train])
        y = torch.tensor([int(s.harmful) for s in train for _ in range(len(f[s.name]))])
        groups = [s.name for s in train for _ in range(len(f[s.name]))]
        n_layers = x.shape[1]
        choice = choose_layers(x, y, layers=range(n_layers), groups=groups, families=kind_families(groups))
        mix = _mixer([tuple(choice.layers)], n_layers)
        scorer, thresholds = fit_on(f, train, lambda x, y, sample_weight=None: _fit_scorer(x, y, sample_weight, C=0.01, mix=mix), weigh_sources=True)
        held = float(summarize(score_pairs(scorer, thresholds, f, held_pairs))[0])
        out[p] = {"layers": list(choice.layers), "value": min(choice.pooled_auc, choice.family_auc), "held": held}
    return out


def main():
    t0 = time.time()
    feats = features()
    names = list(feats["last"])
    sets = [s for s in guard_sets() if not s.name.startswith("scary_")]
    scary = [n for n in names if n.startswith("scary_")]
    all_sets = sets + [PromptSet(n, n.startswith("scary_unsafe"), "steerlab", ("-",)) for n in scary]
    own = [s for s in all_sets if s.origin == "steerlab"]
    ext = [s for s in all_sets if s.origin != "steerlab"]
    axes = {"public": [(own, [(h.name, s.name) for h in ext if h.harmful for s in ext if not s.harmful])]}
    kinds = sorted({n.split(":")[1] for n in scary})
    axes["kinds"] = [([s for s in all_sets if not s.name.endswith(f":{k}")], [(f"scary_unsafe:{k}", f"scary_safe:{k}")]) for k in kinds]
    if "--lso" in sys.argv:
        harmless = [s.name for s in sets if not s.harmful]
        pairs = [(h.name, harmless[(2 * i) % len(harmless)]) for i, h in enumerate(s for s in sets if s.harmful)]
        axes["lso"] = [([s for s in all_sets if s.name not in pair], [pair]) for pair in pairs]
    results = {}
    for axis, splits in axes.items():
        results[axis] = []
        for train, held in splits:
            r = split(feats, train, held)
            best = max(POSITIONS, key=lambda p: r[p]["value"])  # ties: the first, as _choose_guard
            results[axis].append(r)
            print(f"{axis} {held[0]}: rule picks {best} {r[best]['layers']} -> held-out {r[best]['held']:.3f}; "
                  + ", ".join(f"{p} {r[p]['layers']} {r[p]['value']:.3f}->{r[p]['held']:.3f}" for p in POSITIONS)
                  + f" [{time.time() - t0:.0f} s]", flush=True)  # fmt: skip
    (OUT / "positions.json").write_text(json.dumps({"splits": results}, indent=1))
    summarize(results)


RULES = {"rule over all four (the default)": POSITIONS, "rule over t_inst, last": ("t_inst", "last"),
         "rule over last, inst_to_last_mean": ("last", "inst_to_last_mean")}  # fmt: skip


def summarize(results: dict) -> dict:
    """Mean held-out AUC per axis of each rule (the position with the best rule value among its positions; ties: the
    first) and of each position fixed; written into runs/guards/positions.json beside the splits."""
    summary = {}
    for axis, rows in results.items():
        row = {}
        for rule, allowed in RULES.items():
            picks = [max(allowed, key=lambda p: r[p]["value"]) for r in rows]
            row[rule] = sum(r[p]["held"] for r, p in zip(rows, picks)) / len(rows)
            row[f"{rule}: picks"] = picks
        row |= {f"{p} fixed": sum(r[p]["held"] for r in rows) / len(rows) for p in POSITIONS}
        summary[axis] = row
        print(f"{axis}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if not k.endswith("picks")))
        for rule in RULES:
            print(f"  {rule} picks {row[f'{rule}: picks']}")
    (OUT / "positions.json").write_text(json.dumps({"summary": summary, "splits": results}, indent=1))
    return summary

if __name__ == "__main__":
    if "--summary" in sys.argv:  # again from runs/guards/positions.json
        summarize(json.loads((OUT / "positions.json").read_text())["splits"])
    else:
        main()
