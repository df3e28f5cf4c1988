"""Issue 19, item 1: does a probe guard that averages its logits over a few layers generalise better than one layer?

Reads the activations cached by experiments/guards_cross_source.py (runs/guards/acts.pt; ``last``, every layer). One
probe per layer is fitted per split (C 0.01, balanced classes, every source weighing the same: the recipe of
``steerlab probe``); a candidate guard averages the logits of its layers, so every candidate of a split comes from
the same fits. Three cross-source axes, as in guards_cross_source.py:

* ``public``: fit on the sets written for steerlab only, AUC of each package harmful set vs each package harmless set;
* ``kinds``: leave one safe-but-scary kind out, AUC of its unsafe vs safe prompts;
* ``lso``: leave a harmful and a harmless source out (each harmful source against two harmless ones).

Then the *rule* ``steerlab probe`` uses to pick its layers from its own training pool
(:func:`steerlab.probes.layer_choice.choose_layers`: the best minimum of pooled source-held-out CV AUC and
kind-held-out AUC) is judged nested, beside three other rules (the mean of the two, either alone): in every split
of the three axes it chooses on the training sources only, and the held-out
sources score the layers it chose. Those are the numbers to quote for the default guard.

Run: ``python -u experiments/guard_layer_ensembles.py`` (~2 min for the table, ~35 min nested; ``--table`` skips
the nested part); writes runs/guards/ensembles.json and runs/guards/rule.json.

``--more-kinds`` (stop 36): the pool of ``steerlab probe --more-kinds``. The six more safe-but-scary kinds
(:data:`~steerlab.data.guard_sets.MORE_SCARY_KINDS`) are read into the cache if missing (~1 min) and are training
sources in every split (each kind a family for the rule's kind-held-out CV); the ``kinds`` axis still holds out each of
XSTest's eight kinds in turn, so its numbers compare with the default pool's. Writes ensembles_more.json / rule_more.json.
"""

import json
import sys
import time
from pathlib import Path

import torch

from steerlab.data.guard_sets import ALL_SCARY_KINDS, SCARY_KINDS, PromptSet, guard_sets, kind_families
from steerlab.probes.cross_source import fit_on, leave_kind_out, leave_sources_out, score_pairs, summarize
from steerlab.probes.layer_choice import _fit_scorer, _mixer, choose_layers, layer_candidates

OUT = Path("runs/guards")
LAST = 1  # position index of `last` in acts.pt


def candidates(n_layers: int) -> dict[str, tuple[int, ...]]:
    """The library's candidates (each layer, each pair, runs of 3, 4 or 6 neighbours), named L5, L5+9, L5-8."""

    def name(c):
        return f"L{c[0]}" if len(c) == 1 else f"L{c[0]}+{c[1]}" if len(c) == 2 else f"L{c[0]}-{c[-1]}"

    return {name(c): c for c in layer_candidates(n_layers)}


def candidate_fit(cands: dict[str, tuple[int, ...]], n_layers: int):
    """A cross_source ``fit``: one probe per layer, scored as every candidate's mean logit ``[n, len(cands)]``
    (the scorer steerlab.probes.layer_choice.choose_layers uses)."""
    mix = _mixer(list(cands.values()), n_layers)
    return lambda x, y, sample_weight=None: _fit_scorer(x, y, sample_weight, C=0.01, mix=mix)


MORE = "--more-kinds" in sys.argv
SUFFIX = "_more" if MORE else ""


def main():
    t0 = time.time()
    if MORE:
        from guards_cross_source import at_positions, read_cached

        read_cached(OUT / "acts.pt", at_positions, kinds=ALL_SCARY_KINDS)
    cache = torch.load(OUT / "acts.pt", weights_only=True)["acts"]
    used = ALL_SCARY_KINDS if MORE else SCARY_KINDS
    sets = [s for s in guard_sets() if not s.name.startswith("scary_")]
    feats = {s.name: cache[s.name][:, :, LAST] for s in sets}
    scary_names = [n for n in cache if n.startswith("scary_") and n.split(":")[1] in used]
    feats |= {n: cache[n][:, :, LAST] for n in scary_names}
    n_layers = next(iter(feats.values())).shape[1]
    cands = candidates(n_layers)
    fit = candidate_fit(cands, n_layers)

    all_sets = sets + [PromptSet(n, n.startswith("scary_unsafe"), "steerlab", ("-",)) for n in scary_names]
    held_kind = [n for n in scary_names if n.split(":")[1] in SCARY_KINDS]  # the kinds axis holds out XSTest's kinds only
    scary = {(n.split(":")[1], n.startswith("scary_unsafe")): feats[n] for n in held_kind}
    always = sets + [s for s in all_sets if s.name in scary_names and s.name not in held_kind]
    harmless = [s.name for s in sets if not s.harmful]
    harmful = [s.name for s in sets if s.harmful]
    pairs = [(h, harmless[(2 * i + k) % len(harmless)]) for i, h in enumerate(harmful) for k in range(2)]
    lso = leave_sources_out(feats, all_sets, fit, pairs=pairs, weigh_sources=True)
    lko = leave_kind_out(feats, always, scary, fit, weigh_sources=True)
    own = [s for s in all_sets if s.origin == "steerlab"]
    ext = [s for s in all_sets if s.origin != "steerlab"]
    scorer, thresholds = fit_on(feats, own, fit, weigh_sources=True)
    public = score_pairs(scorer, thresholds, feats, [(h.name, s.name) for h in ext if h.harmful for s in ext if not s.harmful])
    axes = {"public": summarize(public), "kinds": summarize(lko), "lso": summarize(lso),
            "lso_worst": torch.tensor([r["auc"] for r in lso]).min(0).values}  # fmt: skip
    names = list(cands)
    rows = {n: {k: float(v[j]) for k, v in axes.items()} for j, n in enumerate(names)}
    (OUT / f"ensembles{SUFFIX}.json").write_text(json.dumps(rows, indent=1))
    meets = [n for n in names if rows[n]["public"] >= 0.95 and rows[n]["kinds"] >= 0.85]
    print(f"{len(meets)} of {len(names)} candidates meet public >= 0.95 and kinds >= 0.85 [{time.time() - t0:.0f} s]")
    for key in ("public", "kinds", "lso"):
        print(f"top 8 by {key}:")
        for n in sorted(names, key=lambda n: -rows[n][key])[:8]:
            print(f"  {n:10s} " + "  ".join(f"{k} {v:.3f}" for k, v in rows[n].items()))
    print("single layers:")
    for a in range(n_layers):
        print(f"  L{a:<8d} " + "  ".join(f"{k} {v:.3f}" for k, v in rows[f"L{a}"].items()))
    if "--table" not in sys.argv:
        nested(feats, sets, all_sets, scary_names, pairs, n_layers)


def nested(feats, sets, all_sets, scary_names, pairs, n_layers):
    """Layer rules judged on sources they did not choose on: in every split, the rule sees the training sources'
    cross-validation table (:func:`choose_layers`), and the held-out sources score every candidate (from the same
    per-layer fits, so any rule's pick is looked up, not refitted)."""
    cands = candidates(n_layers)
    names = list(cands)
    fit = candidate_fit(cands, n_layers)

    def split(train, held_pairs):
        t0 = time.time()
        x = torch.cat([feats[s.name] for s in train])
        y = torch.tensor([int(s.harmful) for s in train for _ in range(len(feats[s.name]))])
        groups = [s.name for s in train for _ in range(len(feats[s.name]))]
        choice = choose_layers(x, y, layers=range(n_layers), groups=groups, families=kind_families(groups), candidates=list(cands.values()))
        scorer, thresholds = fit_on(feats, train, fit, weigh_sources=True)
        held = summarize(score_pairs(scorer, thresholds, feats, held_pairs)).tolist()
        table = [choice.table[c] for c in cands.values()]
        print(f"  {held_pairs[0]}: the default rule picks {choice.describe()}; held-out AUC {held[names.index(_name(choice.layers))]:.3f} "
              f"[{time.time() - t0:.0f} s]", flush=True)  # fmt: skip
        return {"held": held, "pooled": [t[0] for t in table], "family": [t[1] for t in table]}

    def _name(layers):
        return next(n for n, c in cands.items() if c == tuple(layers))

    out = {}
    own = [s for s in all_sets if s.origin == "steerlab"]
    ext = [s for s in all_sets if s.origin != "steerlab"]
    print("nested, public (choose and fit on the steerlab-written sets):")
    out["public"] = [split(own, [(h.name, s.name) for h in ext if h.harmful for s in ext if not s.harmful])]
    print("nested, leave one kind out:")
    kinds = sorted({n.split(":")[1] for n in scary_names if n.split(":")[1] in SCARY_KINDS})
    out["kinds"] = [split([s for s in all_sets if not s.name.endswith(f":{k}")], [(f"scary_unsafe:{k}", f"scary_safe:{k}")]) for k in kinds]
    print("nested, leave a harmful and a harmless source out (each harmful source once):")
    out["lso"] = [split([s for s in all_sets if s.name not in pair], [pair]) for pair in pairs[::2]]
    rules = {
        "min of pooled and kind CV AUC (the default)": lambda p, f: torch.minimum(p, f),
        "mean of the two": lambda p, f: (p + f) / 2,
        "pooled CV AUC only": lambda p, f: p,
        "kind CV AUC only": lambda p, f: f,
    }
    summary = {}
    for rule, score in rules.items():
        row = {}
        for axis, splits in out.items():
            picks = []
            for sp in splits:
                p, f = torch.tensor(sp["pooled"]), torch.tensor(sp["family"])
                total = score(p, f)
                j = max(range(len(names)), key=lambda j: (round(float(total[j]), 12), -len(cands[names[j]]), [-c for c in cands[names[j]]]))
                picks.append((names[j], sp["held"][j]))
            row[axis] = sum(h for _, h in picks) / len(picks)
            row[f"{axis}_picks"] = [n for n, _ in picks]
        summary[rule] = row
        print(f"{rule}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if not k.endswith("picks"))
              + f"  (picks: public {row['public_picks']}, kinds {row['kinds_picks']}, lso {row['lso_picks']})")  # fmt: skip
    (OUT / f"rule{SUFFIX}.json").write_text(json.dumps({"candidates": names, "summary": summary, "splits": out}, indent=1))


if __name__ == "__main__":
    main()
