"""Which layer the default guard recipe picks on the Qwen default, from the activations cached by
experiments/guards_cross_source.py (runs/guards/acts.pt; ``last``, every layer).

The recipe of ``steerlab probe`` / ``steerlab guard --fit``: every set (at most 120 prompts each; the cache holds up
to 200, sampled here), each safe-but-scary kind and safety its own source, 5 folds keeping sources whole, C 0.01;
with and without source weights. Prints the pooled source-held-out AUC per layer and the layer it picks.

This is the single-layer, pooled-only rule ``steerlab probe`` used before it chose several layers on two axes;
experiments/guard_layer_ensembles.py judges both rules nested.

Run: ``python experiments/guard_default_layer.py`` (~1 min).
"""

import torch

from steerlab.data.guard_sets import guard_sets, scary_sets
from steerlab.probes.metrics import grouped_folds, source_weights
from steerlab.probes.sweep import sweep


def main():
    acts = torch.load("runs/guards/acts.pt", weights_only=True)["acts"]
    harmful = {s.name: int(s.harmful) for s in guard_sets()} | {f"{s.name}:{s.kind}": int(s.harmful) for s in scary_sets()}
    xs, ys, groups = [], [], []
    for name in sorted((n for n in acts if n in harmful and n not in ("scary_safe", "scary_unsafe")), key=lambda n: -harmful[n]):
        x = acts[name][:, :, 1]  # position `last`
        if len(x) > 120:
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:120]]
        xs.append(x); ys += [harmful[name]] * len(x); groups += [name] * len(x)  # fmt: skip
    x, y = torch.cat(xs), torch.tensor(ys)
    folds = grouped_folds(groups, y, n_folds=5)
    for weighted in (False, True):
        weight = source_weights(groups) if weighted else None
        result = sweep(x[:, :, None], y, layers=list(range(x.shape[1])), folds=folds, C=0.01, balanced=weighted, sample_weight=weight)
        layer, _, value = result.best("auc")
        print(f"{'sources weighted' if weighted else 'rows weighted'}: picks layer {layer} (AUC {value:.3f}); per layer "
              + " ".join(f"{float(a):.3f}" for a in result.auc[:, 0]))  # fmt: skip


if __name__ == "__main__":
    main()
